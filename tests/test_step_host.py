"""StepHost's admission rules, on the simulator in process (no model, no processes)."""

from __future__ import annotations

import numpy as np

from workers.engines.contract import EngineSpec
from workers.engines.sim import OOM, SimEngine, tone
from workers.host.step_host import SUSPECT_STEPS, StepHost
from workers.wire.estimate import audio_seconds_for
from workers.wire.messages import SAMPLE_RATE, ErrorKind, PoolError, Request, Turn


class Sink:
    def __init__(self):
        self.events: list[tuple] = []
        self.errors: dict[str, PoolError] = {}
        self.audio: dict[str, list[np.ndarray]] = {}

    def started(self, rid, at, from_samples=0):
        self.events.append(("started", rid))

    def chunk(self, rid, pcm, history=None):
        self.events.append(("chunk", rid, len(pcm)))
        self.audio.setdefault(rid, []).append(pcm)

    def finish(self, rid, stop_reason="eos"):
        self.events.append(("finish", rid))

    def fail(self, rid, error):
        assert isinstance(error, PoolError)
        self.events.append(("fail", rid, error.kind))
        self.errors[rid] = error

    def step(self):
        self.events.append(("step",))


def req(rid: str, seconds: float, attempt: int = 1, mark: str = "", seed: int = 0) -> Request:
    text = mark + "x" * int(seconds * 15)  # workers.wire.estimate: 15 characters a second
    return Request(id=rid, turns=(Turn(0, text),), attempt=attempt, seed=seed)


def heard_whole(sink: Sink, r: Request) -> bool:
    """Its audio is its whole tone, once: nothing repeated, nothing missing."""
    got = np.concatenate(sink.audio[r.id])
    total = int(round(audio_seconds_for(r.text, r.max_audio_s) * SAMPLE_RATE))
    return total > 0 and np.array_equal(got, tone(r.seed, 0, total))


def host(rows: int = 4) -> tuple[StepHost, Sink]:
    spec = EngineSpec(engine="sim", max_batch_size=rows, sim_rtf=0.0, sim_chunk_s=0.5)
    engine = SimEngine(spec)
    engine.load()
    sink = Sink()
    return StepHost(engine, sink), sink


def run(h: StepHost, joins: dict[int, list[Request]]) -> list[list[str]]:
    """Step to the end; returns the ids that joined at each boundary."""
    joined, boundary = [], 0
    while boundary <= max(joins) or not h.idle:
        for r in joins.get(boundary, []):
            h.submit(r)
        joined.append(h.run_step().joined_ids)
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


def test_a_long_replay_runs_alone_only_for_its_first_steps():
    """A resumed row may be minutes long: it is a suspect for SUSPECT_STEPS steps, then
    others join beside it (a 20 s row makes 40 steps of 0.5 s)."""
    h, sink = host(rows=4)
    replay, b = req("replay", 20.0, attempt=2), req("b", 0.5)
    joined = run(h, {0: [replay], 1: [b]})
    assert joined[0] == ["replay"]
    at = joined.index(["b"])
    assert at == SUSPECT_STEPS  # after the replay's first SUSPECT_STEPS steps, not its end
    assert sink.events.index(("finish", "b")) < sink.events.index(("finish", "replay"))
    assert heard_whole(sink, replay) and heard_whole(sink, b)


def test_cancel_waiting_and_running_rows():
    h, sink = host(rows=1)
    h.submit(req("run", 3.0))
    h.submit(req("wait", 1.0))
    h.run_step()
    assert h.cancel("wait") and h.cancel("run") and not h.cancel("nobody")
    fails = [e for e in sink.events if e[0] == "fail"]
    assert fails == [("fail", "wait", ErrorKind.CANCELLED), ("fail", "run", ErrorKind.CANCELLED)]
    assert h.live == 0 and not h.pending and h.engine.live == 0


def test_an_engine_error_fails_every_open_row_and_the_host_goes_on(monkeypatch):
    h, sink = host(rows=4)
    for rid in ("a", "b"):
        h.submit(req(rid, 2.0))

    def broken():
        raise RuntimeError("device lost")

    monkeypatch.setattr(h.engine, "execute", broken)
    h.run_step()
    fails = {e[1]: e[2] for e in sink.events if e[0] == "fail"}
    assert fails == {"a": ErrorKind.ENGINE_ERROR, "b": ErrorKind.ENGINE_ERROR}
    err = sink.errors["a"]  # the message is for clients; the traceback is for the log
    assert err.message == "RuntimeError: device lost"
    assert "Traceback" in err.traceback and "in broken" in err.traceback
    assert repr(err) == "PoolError(engine_error: RuntimeError: device lost)"
    monkeypatch.undo()
    assert run(h, {0: [req("c", 0.5)]})[0] == ["c"]
    assert ("finish", "c") in sink.events


def test_a_row_the_engine_cannot_take_in_fails_alone_and_the_rest_go_on(monkeypatch):
    h, sink = host(rows=4)
    real = h.engine.admit

    def admit(row):
        if row.id == "bad":
            raise RuntimeError("simulated: its history cannot be rebuilt")
        real(row)

    monkeypatch.setattr(h.engine, "admit", admit)
    reqs = [req("a", 1.0, seed=1), req("bad", 1.0), req("c", 1.0, seed=3)]
    run(h, {0: reqs[:2], 1: reqs[2:]})
    assert sink.errors["bad"].kind is ErrorKind.ENGINE_ERROR
    assert "cannot be rebuilt" in sink.errors["bad"].message
    assert ("started", "bad") not in sink.events and "bad" not in sink.audio
    assert heard_whole(sink, reqs[0]) and heard_whole(sink, reqs[2])
    assert h.idle and h.engine.live == 0


def test_out_of_memory_halves_the_limit_restarts_the_rows_and_fails_a_row_alone():
    h, sink = host(rows=4)
    a, b = req("a", 3.0, seed=1), req("b", 2.0, seed=2)
    bad = req("bad", 1.0, mark=OOM, seed=3)
    joined = run(h, {0: [a, b], 2: [bad]})
    # step 2 ran a, b and bad out of memory: 4 -> 1; they restart one at a time, in
    # the order they ran; bad, alone again, fails; nothing joins while they restart
    assert h.max_rows == 1 and joined[2] == ["bad"]
    assert sink.errors["bad"].kind is ErrorKind.OUT_OF_MEMORY
    assert ("finish", "a") in sink.events and ("finish", "b") in sink.events
    assert heard_whole(sink, a) and heard_whole(sink, b)
    assert h.idle and h.engine.live == 0


def test_a_restarting_row_can_be_cancelled():
    h, sink = host(rows=4)
    h.submit(req("a", 3.0))
    h.submit(req("b", 3.0, mark=OOM))
    h.run_step()  # out of memory: both restart, the limit is 1
    assert [r.id for r in h.restarting] == ["a", "b"] and h.live == 2
    assert h.cancel("b") and sink.errors["b"].kind is ErrorKind.CANCELLED
    while not h.idle:
        h.run_step()
    assert ("finish", "a") in sink.events and h.live == 0


def jobs_first(waiting: Request, running):
    """A test policy: a chat request takes the place of the youngest job row."""
    if waiting.id.startswith("job"):
        return None
    jobs = [r for r in running if r.id.startswith("job")]
    return jobs[-1] if jobs else None


def test_a_preemption_policy_gives_a_waiting_request_a_running_row_s_place():
    spec = EngineSpec(engine="sim", max_batch_size=2, sim_rtf=0.0, sim_chunk_s=0.5)
    engine = SimEngine(spec)
    engine.load()
    sink = Sink()
    h = StepHost(engine, sink, preempt=jobs_first)
    job1, job2 = req("job1", 3.0, seed=1), req("job2", 3.0, seed=2)
    chat = req("chat", 1.0, seed=3)
    for r in (job1, job2):
        h.submit(r)
    h.run_step()
    h.run_step()
    h.submit(chat)
    sched = h.run_step()
    assert sched.joined_ids == ["chat"] and [r.id for r in sched.preempted] == ["job2"]
    assert set(h.running) == {"job1", "chat"} and [r.id for r in h.preempted] == ["job2"]
    while not h.idle:
        h.run_step()
    # job2 reran from its start, skipping what was sent: its audio is whole, once
    assert heard_whole(sink, job1) and heard_whole(sink, job2)
    assert heard_whole(sink, chat)
    assert [e[1] for e in sink.events if e[0] == "started"] == ["job1", "job2", "chat"]


def test_audio_a_step_handed_out_before_it_ran_out_of_memory_is_sent_not_repeated(monkeypatch):
    """On CUDA a step hands out the previous step's audio before it can run out of
    memory; that audio reaches the listener, and the rows' reruns skip it."""
    h, sink = host(rows=4)
    a, b = req("a", 3.0, seed=1), req("b", 2.0, seed=2)
    real = h.engine.execute
    calls = []

    def late_oom():
        out = real()
        calls.append(1)
        if len(calls) == 3:  # the third step made its audio, then ran out of memory
            out.out_of_memory = "simulated out of memory"
        return out

    monkeypatch.setattr(h.engine, "execute", late_oom)
    run(h, {0: [a, b]})
    assert h.max_rows == 1  # the policy ran
    assert heard_whole(sink, a) and heard_whole(sink, b)


def test_the_simulator_says_max_audio_when_the_requests_cap_cut_it():
    """X-Stop-Reason is max_audio for a row the request's max_audio_s cut (the README);
    the simulator said eos, as if its script had ended there."""
    engine = SimEngine(EngineSpec(engine="sim", sim_rtf=0.0, sim_chunk_s=0.5))
    engine.load()
    cut = Request(id="cut", turns=req("cut", 4.0).turns, max_audio_s=1.0)
    roomy = Request(id="roomy", turns=req("roomy", 1.0).turns, max_audio_s=30.0)
    for r in (cut, roomy, req("plain", 1.0)):
        engine.admit(engine.prepare(r))
    ended = {}
    while engine.live:
        ended.update(engine.execute().ended)
    assert ended == {"cut": "max_audio", "roomy": "eos", "plain": "eos"}
