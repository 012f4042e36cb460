"""StatusBoard: the pool's shared-memory status table, one row per worker slot.

A `multiprocessing.shared_memory` block of float64, `rows x Col`. Each column
group has exactly one writer, so nobody takes a lock (a lock held by a
SIGKILLed process would deadlock everyone) and readers never block:

    worker-owned      written by the worker process in that row
    supervisor-owned  written by the parent's supervisor
    dispatcher-owned  written by the parent's dispatcher at assignment time
    monitor-owned     written by the parent's device monitor

It lives on the child side because workers write it; the parent creates the
block and passes its name to each worker, which attaches to it.
Times are `time.monotonic()` values, comparable across processes on Linux.
"""

from __future__ import annotations

import enum
import errno
import os
from multiprocessing import shared_memory

import numpy as np


class Col(enum.IntEnum):
    # worker-owned
    WORKER_STATE = 0  # WorkerState
    PID = 1
    GENERATION = 2  # which spawn of this slot wrote the row
    HEARTBEAT = 3  # last beat of the heartbeat thread
    PROGRESS = 4  # last generation step of the engine (stall detection)
    BATCH_ROWS = 6  # rows in the running batch
    AUDIO_S = 8  # totals since this spawn
    COMPUTE_S = 9
    COMPLETED = 10
    FAILED = 11
    SPEED = 12  # measured audio seconds per wall second (EMA), 0 = unknown
    BATCH_LIMIT = 13  # rows the worker will take now (lowered after repeated OOM); 0 = capacity
    MEM_REUSABLE = 14  # bytes the worker's allocator holds but is not using
    # supervisor-owned
    SLOT_STATE = 16  # SlotState
    RESTARTS = 17
    DEVICE = 18  # CUDA ordinal, or -1 for a CPU / sim worker
    CAPACITY = 19  # slots = the engine's max batch size
    READY_SINCE = 20
    BACKOFF_UNTIL = 21
    # dispatcher-owned
    INFLIGHT = 24
    QUEUED_WORK_S = 25  # estimated audio seconds still to make on this worker
    # monitor-owned
    MEM_USED = 32  # bytes
    MEM_TOTAL = 33
    UTIL = 34  # percent, 0-100
    TEMP = 35  # degrees C
    POWER = 36  # watts
    HEALTH = 37  # 1 healthy, 0 lost / failing, -1 unknown


NCOLS = 40


class WorkerState(enum.IntEnum):
    """What the worker process says of itself."""

    NONE = 0
    BOOTING = 1
    IDLE = 2
    BUSY = 3
    STOPPING = 4


class SlotState(enum.IntEnum):
    """What the supervisor says of a slot; the public state is derived from both."""

    EMPTY = 0
    STARTING = 1
    RUNNING = 2  # the worker is up: ready or busy, by its own column
    DEAD = 3
    BACKOFF = 4
    FAILED = 5
    DRAINING = 6
    UNAVAILABLE = 7
    STOPPED = 8


class StatusBoard:
    """A view on the shared block. `create` in the parent, `attach` in workers."""

    def __init__(self, shm: shared_memory.SharedMemory, rows: int, owner: bool):
        self._shm = shm
        self.rows = rows
        self.owner = owner
        self.table = np.ndarray((rows, NCOLS), dtype=np.float64, buffer=shm.buf)

    @property
    def name(self) -> str:
        return self._shm.name

    @classmethod
    def create(cls, rows: int) -> StatusBoard:
        """OSError with a message to act on when shared memory has no room for it."""
        size = rows * NCOLS * 8
        try:
            shm = shared_memory.SharedMemory(create=True, size=size)
        except OSError as e:
            raise OSError(e.errno, _no_room(size, e.strerror)) from None
        _reserve(shm, size)
        board = cls(shm, rows, owner=True)
        for row in range(rows):
            board.clear_row(row)
        return board

    @classmethod
    def attach(cls, name: str, rows: int) -> StatusBoard:
        return cls(shared_memory.SharedMemory(name=name), rows, owner=False)

    def get(self, row: int, col: Col) -> float:
        return float(self.table[row, col])

    def set(self, row: int, col: Col, value: float) -> None:
        self.table[row, col] = value

    def add(self, row: int, col: Col, delta: float) -> None:
        """Only for the column's own writer: read-modify-write is not atomic."""
        self.table[row, col] += delta

    def clear_row(self, row: int) -> None:
        """A row as new: zeros, and no device health known. Only while nobody writes it
        (a slot with no worker)."""
        self.table[row] = 0.0
        self.table[row, Col.HEALTH] = -1

    def snapshot(self) -> np.ndarray:
        return self.table.copy()

    def close(self) -> None:
        self.table = None
        try:
            self._shm.close()
        except BufferError:
            pass
        if self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass


def _no_room(size: int, why: str | None) -> str:
    return (
        f"no room in shared memory (/dev/shm) for the status board ({size} bytes): "
        f"{why or 'no space left'}; free some, or give the container more "
        "(docker run --shm-size, a Kubernetes emptyDir of medium Memory)"
    )


def _reserve(shm: shared_memory.SharedMemory, size: int) -> None:
    """Give the block its pages now. A file in a full tmpfs is made and sized all
    the same, and the first write through the mapping then kills the process with
    SIGBUS; allocating the pages here turns that into an OSError at start."""
    fd = getattr(shm, "_fd", -1)
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return  # a file system that cannot allocate ahead: nothing to reserve
        shm.close()
        shm.unlink()
        raise OSError(e.errno, _no_room(size, e.strerror)) from None
