"""What every engine host (the local worker process, a Ray replica) does the
same way around a batch: which pending requests form it, how an engine's
errors reach the open rows, how repeated out-of-memory shrinks the batch size,
and the speed estimate the scheduler reads."""

from __future__ import annotations

import collections
import logging

from workers import messages as m

log = logging.getLogger("vibevoice_pool.worker")

OOM_STREAK_TO_SHRINK = 2  # batches in a row with an out-of-memory row halve the batch size


def take_batch(pending: collections.deque, limit: int) -> list[m.Request]:
    """Up to `limit` pending requests, in order. A replay (attempt > 1) runs alone:
    if it is what killed a worker, it must not take innocent batch mates down again."""
    batch = [pending.popleft()]
    if batch[0].attempt > 1:
        return batch
    while pending and len(batch) < limit and pending[0].attempt == 1:
        batch.append(pending.popleft())
    return batch


def run_engine(engine, batch: list[m.Request], sink) -> None:
    """engine.synthesize, with every row it leaves open failed by a typed error."""
    try:
        engine.synthesize(batch, sink)
    except m.PoolError as e:
        sink.fail_open(e)
    except Exception as e:  # a bug or a runtime error in the engine
        log.exception("engine error in a batch of %d", len(batch))
        sink.fail_open(m.PoolError(m.ErrorKind.ENGINE_ERROR, f"{type(e).__name__}: {e}"))
    sink.fail_open(m.PoolError(m.ErrorKind.ENGINE_ERROR, "the engine left the row unfinished"))


class BatchSizer:
    """The batch size, halved after OOM_STREAK_TO_SHRINK batches in a row lost a row
    to out-of-memory; a full batch that goes through resets the count."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.streak = 0

    def record(self, rows: int, ooms: int) -> bool:
        """Account one batch; True when the limit was lowered."""
        if rows <= 1:
            return False
        if not ooms:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < OOM_STREAK_TO_SHRINK or self.limit == 1:
            return False
        self.limit, self.streak = max(1, self.limit // 2), 0
        log.warning("repeated out-of-memory: batch size lowered to %d", self.limit)
        return True


def speed_ema(old: float, audio_s: float, wall_s: float) -> float:
    """Audio seconds per wall second, smoothed; `old` <= 0 means unknown."""
    if wall_s <= 0 or audio_s <= 0:
        return old
    speed = audio_s / wall_s
    return speed if old <= 0 else 0.7 * old + 0.3 * speed
