"""A long row's cost on the host: what the parent copies and holds as a row grows
must grow with what is new, not with everything made so far. Counted in bytes (no
timings); bench/longrow/ measures the times these counts stand for."""

from __future__ import annotations

import numpy as np

from vibevoice_pool.jobs.progress import Progress
from vibevoice_pool.pool.handle import RequestHandle
from workers.wire import messages as m
from workers.wire.history import HistoryDelta

HOP = 3200  # one audio token's samples
WIDTH = 4


def chunk(k: int) -> m.Chunk:
    pcm = np.full(HOP, k, dtype=np.float32)
    delta = HistoryDelta(
        k, np.int32(k).tobytes(), np.full(WIDTH, k, "<f4").tobytes(), WIDTH, (k + 1) * HOP
    )
    return m.Chunk("r", k, pcm, delta)


def handle_for(request: m.Request | None = None) -> RequestHandle:
    return RequestHandle(request or m.Request(id="r", turns=(m.Turn(0, "hi"),)), lambda _: None)


def feed(handle: RequestHandle, k: int) -> None:
    """What the dispatcher does with a chunk: its history piece, then its audio."""
    c = chunk(k)
    handle.history.extend(c.history)
    handle.push(m.Chunk(c.id, c.seq, c.pcm))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def counted(handle: RequestHandle) -> dict:
    """Count the audio bytes the handle hands out (handle.audio, whatever it is asked)."""
    seen = {"bytes": 0}
    audio = handle.audio

    def counting(*args, **kw):
        out = audio(*args, **kw)
        seen["bytes"] += out.nbytes
        return out

    handle.audio = counting
    return seen


def test_handle_audio_from_a_sample_copies_only_what_follows_it():
    h = handle_for()
    for k in range(5):
        feed(h, k)
    whole = h.audio()
    assert len(whole) == 5 * HOP
    for start in (0, 1, HOP - 1, HOP, 2 * HOP + 7, 5 * HOP - 1, 5 * HOP, 6 * HOP):
        np.testing.assert_array_equal(h.audio(start), whole[start:])


def test_a_long_jobs_progress_ticks_copy_each_sample_once(tmp_path):
    """Each tick saved the audio made since the last one, but took it from the whole
    audio, concatenated again (handle.audio()) every CHECKPOINT_S: a 90 minute job
    copied its half a gigabyte of audio every second, O(n^2) in all. Now a tick copies
    what is new: the bytes the handle hands out stay within the row's audio."""
    clock = Clock()
    progress = Progress(tmp_path, clock=clock)
    h = handle_for()
    seen = counted(h)
    steps = 300
    for k in range(steps):
        feed(h, k)
        clock.now += 1.0  # a checkpoint each chunk
        progress.tick("job", h, np.zeros(0, dtype=np.float32))
    total = steps * HOP * 4
    assert seen["bytes"] <= total  # old code: about steps / 2 times that
    saved = progress.saved_audio("job")
    np.testing.assert_array_equal(saved, np.repeat(np.arange(steps, dtype=np.float32), HOP))


def test_a_resumed_jobs_ticks_save_after_its_prior_audio_and_copy_it_once(tmp_path):
    """A job a previous server left: its saved audio (prior) is its result's start; the
    ticks go on after it, each copying only what is new."""
    clock = Clock()
    progress = Progress(tmp_path, clock=clock)
    first = handle_for()
    for k in range(10):
        feed(first, k)
        clock.now += 1.0
        progress.tick("job", first, np.zeros(0, dtype=np.float32))
    req, prior = progress.resume("job", m.Request(id="r2", turns=(m.Turn(0, "hi"),)))
    assert len(prior) == 10 * HOP and req.resume.steps == 10
    h = handle_for(req)
    seen = counted(h)
    for k in range(10, 200):
        feed(h, k)
        clock.now += 1.0
        progress.tick("job", h, prior)
    assert seen["bytes"] <= 190 * HOP * 4
    saved = progress.saved_audio("job")
    np.testing.assert_array_equal(saved, np.repeat(np.arange(200, dtype=np.float32), HOP))


def counted_history(handle: RequestHandle) -> dict:
    """Count the history bytes the handle's HistoryLog hands out (a snapshot, a piece)."""
    seen = {"bytes": 0}
    log = handle.history
    for name in ("snapshot", "since"):
        method = getattr(log, name, None)
        if method is None:
            continue

        def counting(*args, _method=method, **kw):
            out = _method(*args, **kw)
            if out is not None:
                seen["bytes"] += len(out.tokens) + len(out.feedback)
            return out

        setattr(log, name, counting)
    return seen


def test_a_long_jobs_history_is_appended_not_rewritten_each_tick(tmp_path, monkeypatch):
    """Each tick took a snapshot of the whole history (a copy) and rewrote all of it to
    .hist: O(n) per second, 32 MB a second at the end of a 90 minute 1.5B job. Now a
    tick copies the steps since the last and appends them; the file written whole
    (.hist, its counts) stays the same size."""
    from vibevoice_pool.jobs import progress as progress_mod

    written: list[int] = []
    write_atomic = progress_mod.write_atomic

    def counting(path, data):
        written.append(len(data))
        return write_atomic(path, data)

    monkeypatch.setattr(progress_mod, "write_atomic", counting)
    clock = Clock()
    progress = Progress(tmp_path, clock=clock)
    h = handle_for()
    seen = counted_history(h)
    steps = 300
    for k in range(steps):
        feed(h, k)
        clock.now += 1.0
        progress.tick("job", h, np.zeros(0, dtype=np.float32))
    per_step = 4 + 4 * WIDTH
    assert seen["bytes"] <= steps * per_step  # old code: about steps / 2 times that
    assert len(written) == steps and max(written) == written[0]  # old: grew with each step
    req, prior = progress.resume("job", m.Request(id="r2", turns=(m.Turn(0, "hi"),)))
    assert req.resume.steps == steps and len(prior) == steps * HOP
    np.testing.assert_array_equal(req.resume.token_array(), np.arange(steps, dtype=np.int32))
    fed = req.resume.feedback_array()
    np.testing.assert_array_equal(
        fed, np.repeat(np.arange(steps, dtype=np.float32), WIDTH).reshape(steps, WIDTH)
    )


def test_a_whole_history_saved_before_steps_were_appended_still_resumes(tmp_path):
    """A .hist written whole (tokens and feedback inside) by the server before: the job
    resumes from it, and its next saves write every step to .steps."""
    import io

    clock = Clock()
    progress = Progress(tmp_path, clock=clock)
    progress.dir.mkdir(parents=True)
    steps = 5
    tokens = np.arange(steps, dtype="<i4").tobytes()
    feedback = np.repeat(np.arange(steps, dtype="<f4"), WIDTH).tobytes()
    buf = io.BytesIO()
    np.savez(
        buf,
        tokens=np.frombuffer(tokens, np.uint8),
        feedback=np.frombuffer(feedback, np.uint8),
        meta=np.array([WIDTH, steps * HOP, -1], dtype=np.int64),
        noise=np.zeros(0, np.uint8),
    )
    (progress.dir / "job.hist").write_bytes(buf.getvalue())
    np.repeat(np.arange(steps, dtype=np.float32), HOP).tofile(progress.dir / "job.pcm")
    req, prior = progress.resume("job", m.Request(id="r", turns=(m.Turn(0, "hi"),)))
    assert req.resume.steps == steps and len(prior) == steps * HOP
    h = handle_for(req)
    for k in range(steps, 12):
        feed(h, k)
    clock.now += 10.0
    progress.tick("job", h, prior)
    again, prior = progress.resume("job", m.Request(id="r2", turns=(m.Turn(0, "hi"),)))
    np.testing.assert_array_equal(again.resume.token_array(), np.arange(12, dtype=np.int32))
    np.testing.assert_array_equal(prior, np.repeat(np.arange(12, dtype=np.float32), HOP))
