"""The engine-host sink that the worker process and the Ray replica share: its
messages, its books, and the hooks each host fills in."""

from __future__ import annotations

import numpy as np

from workers.host.sink import HostSink
from workers.wire import messages as m


class Counting(HostSink):
    def __init__(self):
        self.sent: list = []
        super().__init__(self.sent.append)
        self.totals: list[tuple[float, float]] = []
        self.fails = 0

    def done(self, audio_s: float, compute_s: float) -> None:
        self.totals.append((audio_s, compute_s))

    def failed(self) -> None:
        self.fails += 1


def req(rid: str) -> m.Request:
    return m.Request(id=rid, turns=(m.Turn(0, "hello"),), seed=1)


def test_chunks_are_numbered_per_row_and_done_counts_their_audio():
    sink = Counting()
    sink.track(req("a"))
    sink.track(req("b"))
    pcm = np.zeros(m.SAMPLE_RATE // 2, dtype=np.float32)
    for rid in ("a", "b", "a"):
        sink.chunk(rid, pcm)
    sink.finish("a", m.StopReason.EOS.value)
    chunks = [(x.id, x.seq) for x in sink.sent if isinstance(x, m.Chunk)]
    assert chunks == [("a", 0), ("b", 0), ("a", 1)]
    done = sink.sent[-1]
    assert isinstance(done, m.Done) and done.id == "a" and done.audio_s == 1.0
    assert sink.totals[0][0] == 1.0
    assert list(sink.open) == ["b"]


def test_a_failed_row_is_answered_once_and_late_output_is_dropped():
    sink = Counting()
    sink.track(req("a"))
    sink.fail("a", m.PoolError(m.ErrorKind.OUT_OF_MEMORY, "too long", retryable=True))
    sink.chunk("a", np.zeros(10, dtype=np.float32))  # after its end: never sent
    sink.finish("a")
    sink.fail("a", m.PoolError(m.ErrorKind.ENGINE_ERROR, "again"))
    assert [type(x) for x in sink.sent] == [m.Failed]
    failed = sink.sent[0]
    assert failed.error is m.ErrorKind.OUT_OF_MEMORY and failed.retryable
    assert sink.fails == 1 and not sink.open


def test_compute_time_runs_from_the_row_s_start():
    sink = Counting()
    sink.track(req("a"))
    sink.started("a", 0.0)  # monotonic time 0: long ago
    sink.finish("a")
    assert sink.sent[-1].compute_s > 1.0
