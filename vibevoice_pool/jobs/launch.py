"""The server's jobs, wired at launch: the store in the data folder, the runner over
the pool, and what happens when the data disk is full at start or the job store's
file is damaged (the server serves without jobs: /v1/jobs answers 503
jobs_unavailable, saying why).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vibevoice_pool.jobs.runner import JobRunner
from vibevoice_pool.jobs.store import JobError, JobErrorKind, JobStore
from workers.wire import messages as m

if TYPE_CHECKING:
    from vibevoice_pool.config import PoolConfig
    from vibevoice_pool.pool.facade import Pool

log = logging.getLogger("vibevoice_pool")


def open_store(cfg: PoolConfig) -> tuple[JobStore | None, str]:
    """The server's JobStore in config.data_dir(cfg), or (None, why) when the data
    disk is too full to open it or its file is damaged: the server then starts without
    jobs. ConfigError
    when the folder cannot be used at all (another server holds it, not writable)."""
    from vibevoice_pool import config

    try:
        store = JobStore.open(
            config.data_dir(cfg),
            disk_limit_mb=cfg.jobs_disk_limit_mb,
            owner_disk_mb=cfg.jobs_owner_disk_mb,
            owner_max_active=cfg.jobs_owner_max_active,
        )
    except JobError as e:
        if e.kind in (JobErrorKind.DISK_FULL, JobErrorKind.STORAGE):
            why = e.message
            if e.kind is JobErrorKind.DISK_FULL:
                why += "; restart it once there is space"
            log.error("Jobs are unavailable: %s", why)
            return None, why
        raise config.ConfigError(e.message) from e
    return store, ""


def start_jobs(cfg: PoolConfig, pool: Pool, front, store: JobStore) -> JobRunner:
    """The server's JobRunner over `store`, started: its requests are built by
    front.build_request, as /v1/synthesize builds them."""
    from pydantic import ValidationError

    from vibevoice_pool.api.speech import SynthesizeBody, describe_invalid

    def build(body: dict) -> m.Request:
        try:
            parsed = SynthesizeBody.model_validate(body)
        except ValidationError as e:
            raise m.PoolError(m.ErrorKind.BAD_INPUT, describe_invalid(e.errors())) from None
        return front.build_request(parsed)

    def capacity() -> int:  # rows the pool runs at once
        return len(pool.live_slots()) * cfg.max_batch_size

    depth = max(1, min(len(pool.placements), cfg.max_queue // 2))
    runner = JobRunner(
        store,
        pool,
        build,
        queue_depth=depth,
        ttl_s=cfg.job_ttl_s,
        owner_running=cfg.jobs_owner_running,
        capacity=capacity,
    )
    log.info("Jobs: data in %s", store.folder)
    return runner.start()
