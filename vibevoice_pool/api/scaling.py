"""Live scaling over HTTP: add a worker on a device, drain and remove one.

POST   /v1/pool/workers          {"device": "cpu" | "cuda:1" | "1"} -> 201 {"id": n}
DELETE /v1/pool/workers/{id}     drain (its rows move to the others), then stop -> 202;
                                 404 for a worker that is not in the pool
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from vibevoice_pool.api.errors import plain_error
from vibevoice_pool.pool.facade import Pool
from vibevoice_pool.pool.states import State


class AddWorker(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str = Field(..., description="'cpu', 'cuda:N' or a GPU id N")


def pool_router(pool: Pool) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/pool/workers", status_code=201)
    async def add_worker(body: AddWorker):
        index = pool.add_worker(body.device)
        return {"id": index, "device": pool.placements[index].device, "state": State.STARTING.value}

    @router.delete("/v1/pool/workers/{worker_id}")
    async def remove_worker(worker_id: int):
        if worker_id not in pool.live_slots():
            return plain_error(404, "not_found", f"no worker {worker_id}; see /v1/pool")
        pool.remove_worker(worker_id)
        return JSONResponse({"id": worker_id, "state": State.DRAINING.value}, 202)

    return router
