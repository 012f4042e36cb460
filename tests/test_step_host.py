"""StepHost's admission rules, on the simulator in process (no model, no processes)."""

from __future__ import annotations

from workers.engines.contract import EngineSpec
from workers.engines.sim import SimEngine
from workers.host.step_host import StepHost
from workers.wire.messages import ErrorKind, PoolError, Request, Turn


class Sink:
    def __init__(self):
        self.events: list[tuple] = []
        self.errors: dict[str, PoolError] = {}

    def chunk(self, rid, pcm, history=None):
        self.events.append(("chunk", rid))

    def finish(self, rid, stop_reason="eos"):
        self.events.append(("finish", rid))

    def fail(self, rid, error):
        assert isinstance(error, PoolError)
        self.events.append(("fail", rid, error.kind))
        self.errors[rid] = error

    def step(self):
        self.events.append(("step",))


def req(rid: str, seconds: float, attempt: int = 1) -> Request:
    text = "x" * int(seconds * 15)  # workers.wire.estimate: 15 characters a second
    return Request(id=rid, turns=(Turn(0, text),), attempt=attempt)


def host(rows: int = 4) -> tuple[StepHost, Sink]:
    spec = EngineSpec(engine="sim", max_batch_size=rows, sim_rtf=0.0, sim_chunk_s=0.5)
    engine = SimEngine(spec)
    engine.load()
    sink = Sink()
    return StepHost(engine, sink), sink


def run(h: StepHost, joins: dict[int, list[Request]]) -> list[list[str]]:
    """Step to the end; returns the ids that joined at each boundary."""
    joined, boundary = [], 0
    while boundary <= max(joins) or h.live or h.pending:
        for r in joins.get(boundary, []):
            h.submit(r)
        joined.append([r.id for r in h.admit()])
        h.step()
        boundary += 1
    return joined


def test_a_request_joins_running_rows_at_the_next_boundary():
    h, _ = host()
    joined = run(h, {0: [req("long", 3.0)], 2: [req("short", 1.0)]})
    assert joined[0] == ["long"] and joined[2] == ["short"]


def test_the_live_row_limit_holds_and_a_freed_row_is_taken_at_once():
    h, _ = host(rows=2)
    joined = run(h, {0: [req("a", 1.0), req("b", 3.0), req("c", 1.0)]})
    assert joined[0] == ["a", "b"] and joined[2] == ["c"]  # a ends after 2 steps


def test_a_replay_runs_alone():
    h, _ = host(rows=4)
    joins = {0: [req("a", 1.0)], 1: [req("replay", 1.0, attempt=2), req("b", 0.5)]}
    joined = run(h, joins)
    assert joined[0] == ["a"] and joined[2] == ["replay"] and joined[4] == ["b"]


def test_cancel_waiting_and_running_rows():
    h, sink = host(rows=1)
    h.submit(req("run", 3.0))
    h.submit(req("wait", 1.0))
    h.admit()
    h.step()
    assert h.cancel("wait") and h.cancel("run") and not h.cancel("nobody")
    fails = [e for e in sink.events if e[0] == "fail"]
    assert fails == [("fail", "wait", ErrorKind.CANCELLED), ("fail", "run", ErrorKind.CANCELLED)]
    assert h.live == 0 and not h.pending and h.engine.live == 0


def test_an_engine_error_fails_every_open_row_and_the_host_goes_on(monkeypatch):
    h, sink = host(rows=4)
    for rid in ("a", "b"):
        h.submit(req(rid, 2.0))
    h.admit()

    def broken(s):
        raise RuntimeError("device lost")

    monkeypatch.setattr(h.engine, "step", broken)
    h.step()
    fails = {e[1]: e[2] for e in sink.events if e[0] == "fail"}
    assert fails == {"a": ErrorKind.ENGINE_ERROR, "b": ErrorKind.ENGINE_ERROR}
    err = sink.errors["a"]  # the message is for clients; the traceback is for the log
    assert err.message == "RuntimeError: device lost"
    assert "Traceback" in err.traceback and "in broken" in err.traceback
    assert repr(err) == "PoolError(engine_error: RuntimeError: device lost)"
    monkeypatch.undo()
    assert run(h, {0: [req("c", 0.5)]})[0] == ["c"]
    assert ("finish", "c") in sink.events
