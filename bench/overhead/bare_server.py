"""The floor for the HTTP benchmark: FastAPI + uvicorn with one handler that
validates the same JSON body as POST /v1/synthesize and returns the same WAV
bytes the pool returns for it, doing nothing else.

    python -m bench.overhead.bare_server PORT   (started and stopped by overhead/run.py)
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel

from vibevoice_pool import audio
from workers.engines.sim import tone
from workers.wire.estimate import audio_seconds_for
from workers.wire.messages import SAMPLE_RATE

SPOKEN = "hello there"  # the body the benchmark posts is "Speaker 1: hello there"
SAMPLES = int(round(audio_seconds_for(SPOKEN) * SAMPLE_RATE))
WAV, CONTENT_TYPE = audio.encode(tone(7, 0, SAMPLES), "wav")  # what the sim engine answers

app = FastAPI()


class Body(BaseModel):
    script: str
    seed: int | None = None


@app.post("/v1/synthesize")
async def synthesize(body: Body) -> Response:
    return Response(WAV, media_type=CONTENT_TYPE)


@app.get("/ready")
async def ready() -> dict:
    return {"ready": True}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
