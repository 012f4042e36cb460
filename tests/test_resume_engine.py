"""Resume in process: a row cut off at step k and sent again with its history
(workers/wire/history.py) goes on as the uninterrupted row does.

The tiny model in a VibeVoiceEngine, rows driven step by step. Each case runs a
row uninterrupted, then the same request cut at a step (cancelled, as a dead
worker loses it), then once more from the history the cut row's chunks carried.
The cut audio plus the resumed audio must be as long as the uninterrupted audio,
and equal it: exactly before the cut, and within float tolerance after it (the
resumed row's KV comes from one prefill instead of one forward a step, and its
stream caches from one decode over a window: the same sums in another order).
Forced token paths (speech_end, speech_start) put cuts where the negative branch
or the stream caches were just reset.
"""

from __future__ import annotations

import numpy as np
import pytest

from workers.engines.contract import EngineSpec
from workers.engines.sim import SimEngine
from workers.engines.vibevoice.engine import HOP_SAMPLES
from workers.wire.history import TOKEN, HistoryDelta, HistoryLog
from workers.wire.messages import ErrorKind, PoolError, Request, Turn

TOL = 1e-4  # of the row's peak, float32


class Sink:
    """Collects each row's audio and, as the parent does, its history."""

    def __init__(self, logs: dict | None = None):
        self.audio: dict[str, list[np.ndarray]] = {}
        self.logs: dict[str, HistoryLog] = logs or {}
        self.ends: dict[str, object] = {}

    def chunk(self, rid, pcm, history=None):
        self.audio.setdefault(rid, []).append(pcm)
        if history is not None:
            assert self.logs.setdefault(rid, HistoryLog()).extend(history)

    def finish(self, rid, stop_reason="eos"):
        self.ends[rid] = stop_reason

    def fail(self, rid, error):
        self.ends[rid] = error

    def step(self):
        pass

    def pcm(self, rid) -> np.ndarray:
        return np.concatenate(self.audio.get(rid, [np.zeros(0, np.float32)]))


def req(rid: str, seed: int, est_audio_s: float, **kw) -> Request:
    text = "Speaker 1: " + "a line of words to say " * 4
    return Request(rid, (Turn(0, text),), seed=seed, stream=True, est_audio_s=est_audio_s, **kw)


def step(engine, sink) -> None:
    """One engine step; what it made goes to `sink`, as the step host sends it."""
    out = engine.execute()
    for rid, pieces in out.audio.items():
        for pcm, hist in zip(pieces, out.history[rid], strict=True):
            sink.chunk(rid, pcm, hist)
    for rid, why in out.ended:
        sink.finish(rid, why)
    for rid, err in out.failed:
        sink.fail(rid, err)


def run(engine, sink, until=None) -> None:
    while engine.live:
        step(engine, sink)
        if until is not None and until():
            return


def cut_at(engine, r: Request, steps: int) -> tuple[Sink, object]:
    """Run `r` alone for `steps` steps, then forget it (its worker is gone): the sink
    that heard it, and its history."""
    sink = Sink()
    row = engine.prepare(r)
    engine.admit(row)
    run(engine, sink, until=lambda: row.steps >= steps)
    engine.cancel(r.id)
    return sink, sink.logs[r.id].snapshot()


@pytest.fixture
def plans(engine, monkeypatch):
    """plans[row id][step] = the token that row draws at that (0-based) step."""
    steps = engine.steps
    plans: dict[str, dict[int, int]] = {}
    choose = steps._choose

    def forced(hidden):
        tokens = choose(hidden)
        for i, row in enumerate(steps.rows):
            tok = plans.get(row.request.seed, {}).get(row.steps)
            if tok is not None:
                tokens[i] = tok
        return tokens

    monkeypatch.setattr(steps, "_choose", forced)
    return plans


def cut_and_resume(engine, r: Request, cut: int, mate: Request | None = None):
    """(uninterrupted audio, cut + resumed audio, the history, the resumed row's ends)."""
    whole = Sink()
    engine.admit(engine.prepare(r))
    if mate is not None:
        engine.admit(engine.prepare(mate))
    run(engine, whole)
    want = whole.pcm(r.id)

    cut_sink = Sink()
    first = Request(**{**r.__dict__, "id": r.id + "-cut"})
    cut_row = engine.prepare(first)
    engine.admit(cut_row)
    if mate is not None:
        engine.admit(engine.prepare(Request(**{**mate.__dict__, "id": mate.id + "-2"})))
    run(engine, cut_sink, until=lambda: cut_row.steps >= cut)
    engine.cancel(first.id)  # its worker is gone: the engine forgets it
    history = cut_sink.logs[first.id].snapshot()
    before = cut_sink.pcm(first.id)
    # the steps its chunks carried: a step that made no audio (speech_end,
    # speech_start) rides with the next chunk, so it may be made again
    assert cut - 2 <= history.steps <= cut and history.samples == len(before)

    again = Request(**{**r.__dict__, "id": r.id + "-again", "attempt": 2, "resume": history})
    after_sink = Sink({**cut_sink.logs, again.id: HistoryLog(history)})
    row = engine.prepare(again)
    assert row.steps == history.steps and row.made_samples == len(before)
    engine.admit(row)
    run(engine, after_sink)
    got = np.concatenate([before, after_sink.pcm(again.id)])
    assert after_sink.logs[again.id].steps == whole.logs[r.id].steps
    return want, got, history, after_sink.ends


def assert_continues(want: np.ndarray, got: np.ndarray, cut_at: int) -> float:
    assert len(got) == len(want)  # nothing repeated, nothing missing
    assert np.array_equal(got[:cut_at], want[:cut_at])
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < TOL, f"resumed audio differs by {err:.2e} of the peak"
    return err


def test_a_row_cut_mid_speech_resumes_in_a_batch_and_continues_its_audio(engine, plans):
    r = req("mid", seed=41, est_audio_s=6.0)  # 45 audio tokens
    mate = req("mate", seed=42, est_audio_s=8.0)
    want, got, hist, ends = cut_and_resume(engine, r, cut=30, mate=mate)
    assert ends["mid-again"] == "estimate"
    assert_continues(want, got, hist.samples)
    # the history is compact: a token and 48 float32 values a step (+ a noise state)
    assert hist.nbytes <= hist.steps * (TOKEN.itemsize + 48 * 4) + 6000


def test_a_long_row_resumes_with_its_stream_caches_rebuilt_from_a_window(engine, plans):
    """More speech steps than the stream window before the cut: the caches come from
    the last stream_frames latents only, and the audio still continues."""
    r = req("long", seed=43, est_audio_s=16.0)  # 120 audio tokens
    cut = engine.steps.speech.stream_frames + 14
    want, got, hist, _ = cut_and_resume(engine, r, cut=cut)
    assert hist.noise is not None and hist.noise[0] <= cut  # the generator state travelled
    assert_continues(want, got, hist.samples)


def test_a_model_whose_window_is_unknown_reruns_every_frame_and_continues(
    engine, plans, monkeypatch
):
    """No window read from the model (receptive.lookback_frames gave None): the caches
    come from every latent since they were zeroed, and the audio still continues."""
    monkeypatch.setattr(engine.steps.speech, "stream_frames", None)
    r = req("all", seed=45, est_audio_s=8.0)
    want, got, hist, _ = cut_and_resume(engine, r, cut=40)
    assert_continues(want, got, hist.samples)


@pytest.mark.parametrize("cut", [7, 8, 10])
def test_cuts_around_speech_end_and_speech_start_resume_exactly(engine, plans, cut):
    """speech_end at step 4 zeroes the stream caches, speech_start at step 5 restarts
    the negative branch: cut at the first speech step after them, and a few on."""
    cfg = engine.model.config
    r = req(f"turn{cut}", seed=50 + cut, est_audio_s=3.0)
    plans[r.seed] = {4: cfg.audio_eos_token_id, 5: cfg.audio_bos_token_id}
    want, got, hist, _ = cut_and_resume(engine, r, cut=cut)
    toks = hist.token_array().tolist()
    assert toks[4:6] == [cfg.audio_eos_token_id, cfg.audio_bos_token_id]
    assert_continues(want, got, hist.samples)


def test_a_history_that_does_not_fit_replays_from_the_start_and_says_why(engine, caplog):
    r = req("bad", seed=44, est_audio_s=2.0)
    bad = HistoryDelta(0, np.array([7, 7], dtype=TOKEN).tobytes(), b"", 0, 6400)
    hist = HistoryLog()
    assert hist.extend(bad)
    row = engine.prepare(Request(**{**r.__dict__, "resume": hist.snapshot()}))
    assert row.steps == 0 and row.made_samples == 0
    assert "cannot resume" in caplog.text and "bad" in caplog.text


def test_the_history_log_joins_pieces_and_skips_what_a_replay_repeats():
    def piece(start, toks, samples):
        fed = np.arange(len(toks) * 2, dtype=np.float32) + start
        return HistoryDelta(start, np.array(toks, dtype=TOKEN).tobytes(), fed.tobytes(), 2, samples)

    log = HistoryLog()
    assert log.extend(piece(0, [1, 2], 10))
    assert not log.extend(piece(3, [4], 20))  # a gap: refused
    assert log.extend(piece(1, [2, 3], 15))  # a replay's overlap: only step 2 is new
    snap = log.snapshot()
    assert snap.token_array().tolist() == [1, 2, 3] and snap.samples == 15
    assert snap.feedback_array()[2].tolist() == [3.0, 4.0]  # piece(1)'s second step


def test_the_simulator_resumes_its_tone_where_the_history_ends():
    eng = SimEngine(EngineSpec(engine="sim", max_batch_size=2, sim_rtf=0.0, sim_chunk_s=0.5))
    r = Request("s", (Turn(0, "Speaker 1: " + "words " * 30),), seed=3, stream=True)
    whole = Sink()
    eng.admit(eng.prepare(r))
    run(eng, whole)
    cut = Sink()
    eng.admit(eng.prepare(Request(**{**r.__dict__, "id": "s2"})))
    for _ in range(4):
        step(eng, cut)
    eng.cancel("s2")
    hist = cut.logs["s2"].snapshot()
    again = Sink({"s3": HistoryLog(hist)})
    eng.admit(eng.prepare(Request(**{**r.__dict__, "id": "s3", "resume": hist})))
    run(eng, again)
    got = np.concatenate([cut.pcm("s2"), again.pcm("s3")])
    assert hist.steps == 4 and len(cut.pcm("s2")) == hist.samples
    assert np.array_equal(got, whole.pcm("s"))
    assert len(again.pcm("s3")) == len(got) - hist.samples  # only new audio was sent


def test_history_rides_with_the_audio_hop_for_hop(engine):
    """Every chunk of a streamed row carries its steps: the history's sample count is
    always the audio sent so far, so a resume never repeats or skips audio."""
    sink = Sink()
    r = req("hop", seed=45, est_audio_s=2.0)
    engine.admit(engine.prepare(r))
    counts = []
    while engine.live:
        step(engine, sink)
        if r.id in sink.logs:
            counts.append((sink.logs[r.id].samples, len(sink.pcm(r.id))))
    assert counts and all(a == b for a, b in counts)
    assert sink.logs[r.id].samples == 15 * HOP_SAMPLES


def test_a_resume_that_fails_as_it_joins_gives_back_its_blocks_and_its_slot(engine, monkeypatch):
    """bring_in raising once it has taken the row's KV blocks and its stream slot (on a
    GPU: out of memory while it rebuilds the stream caches, or grows the pool) leaves
    nothing held: the engine is as it was, and the next rows still find a slot."""
    import torch

    from workers.engines.vibevoice import resume

    r = req("leak", seed=61, est_audio_s=2.0)
    _, history = cut_at(engine, r, 6)
    steps = engine.steps
    assert steps.live == 0 and steps.kv.live == 0

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(resume, "_rebuild_streams", oom)
    for k in range(steps.slot_count + 1):  # more failures than there are slots
        again = Request(**{**r.__dict__, "id": f"leak-{k}", "attempt": 2, "resume": history})
        with pytest.raises(PoolError) as e:  # the row fails as out of memory, alone
            engine.admit(engine.prepare(again))
        assert e.value.kind is ErrorKind.OUT_OF_MEMORY
        assert steps.live == 0
        assert steps.kv.live == 0 and steps.kv.held_blocks() == 0
        assert sorted(steps.free_slots) == list(range(steps.slot_count))
    monkeypatch.undo()
    after = Sink()
    engine.admit(engine.prepare(req("after", seed=62, est_audio_s=0.4)))
    run(engine, after)
    assert after.ends == {"after": "estimate"} and len(after.pcm("after")) == 3 * HOP_SAMPLES


def test_a_resumed_row_rerun_after_out_of_memory_skips_only_what_it_sent(engine, monkeypatch):
    """A host without give_back reruns the rows of a step that ran out of memory. A row
    that came with a history reruns from that history, not from its start, so it must
    skip only the audio it sent since: the cut, resumed and rerun audio together is the
    uninterrupted row's, nothing missing."""
    import torch

    from workers.host.step_host import StepHost

    class HostSink(Sink):
        def started(self, rid, at, from_samples=0):
            pass

    r = req("rerun", seed=63, est_audio_s=2.0)
    whole = Sink()
    engine.admit(engine.prepare(r))
    run(engine, whole)
    cut, history = cut_at(engine, r, 6)

    steps, real, fired = engine.steps, engine.steps._step, []

    def once(sink):  # out of memory once, in a step of both rows, a few steps on
        if len(steps.rows) == 2 and not fired and steps.rows[0].steps >= history.steps + 3:
            fired.append(True)
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(sink)

    monkeypatch.setattr(steps, "_step", once)
    again = Request(**{**r.__dict__, "id": "rerun-again", "resume": history})
    sink = HostSink({again.id: HistoryLog(history)})
    host = StepHost(engine, sink)
    host.submit(again)
    host.submit(req("rerun-mate", seed=64, est_audio_s=2.0))
    while not host.idle:
        host.run_step()
    assert fired and sink.ends["rerun-again"] == "estimate"
    got = np.concatenate([cut.pcm(r.id), sink.pcm("rerun-again")])
    assert_continues(whole.pcm(r.id), got, history.samples)
