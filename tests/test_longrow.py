"""A long row's cost on the host: what the parent copies and holds as a row grows
must grow with what is new, not with everything made so far. Counted in bytes (no
timings); bench/longrow/ measures the times these counts stand for."""

from __future__ import annotations

import numpy as np

from vibevoice_pool.jobs.job_audio import JobAudio
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


def feed(handle: RequestHandle, k: int, audio: JobAudio | None = None) -> None:
    """What the dispatcher does with a chunk: its history piece, then its audio; and
    with `audio`, what a job's runner does with it (it reads it into its JobAudio)."""
    c = chunk(k)
    handle.history.extend(c.history)
    handle.push(m.Chunk(c.id, c.seq, c.pcm))
    if audio is not None:
        audio.add(c.pcm)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def counted(audio: JobAudio) -> dict:
    """Count the audio bytes a job's audio hands out to be saved (JobAudio.since)."""
    seen = {"bytes": 0}
    since = audio.since

    def counting(*args, **kw):
        out = since(*args, **kw)
        seen["bytes"] += out.nbytes
        return out

    audio.since = counting
    return seen


def test_handle_audio_from_a_sample_copies_only_what_follows_it():
    h = handle_for()
    for k in range(5):
        feed(h, k)
    whole = h.audio()
    assert len(whole) == 5 * HOP
    for start in (0, 1, HOP - 1, HOP, 2 * HOP + 7, 5 * HOP - 1, 5 * HOP, 6 * HOP):
        np.testing.assert_array_equal(h.audio(start), whole[start:])


def job_audio(progress: Progress) -> JobAudio:
    return JobAudio(progress._paths("job")[0])


def tick_each_chunk(progress, h, clock, steps: int = 300, audio=None) -> int:
    """`steps` chunks fed to the handle and the job's audio, a checkpoint after each;
    `steps`."""
    audio = audio or job_audio(progress)
    for k in range(steps):
        feed(h, k, audio)
        clock.now += 1.0
        progress.tick("job", h.history, audio)
    return steps


def test_a_long_jobs_progress_ticks_copy_each_sample_once(tmp_path):
    """Each tick saved the audio made since the last one, but took it from the whole
    audio, concatenated again (handle.audio()) every CHECKPOINT_S: a 90 minute job
    copied its half a gigabyte of audio every second, O(n^2) in all. Now a tick copies
    what is new: the bytes handed out to be saved stay within the row's audio."""
    clock = Clock()
    progress = Progress(tmp_path, clock=clock)
    h = handle_for()
    audio = job_audio(progress)
    seen = counted(audio)
    steps = tick_each_chunk(progress, h, clock, audio=audio)
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
    tick_each_chunk(progress, first, clock, steps=10)
    req, prior = progress.resume("job", m.Request(id="r2", turns=(m.Turn(0, "hi"),)))
    assert prior.made == prior.on_disk == 10 * HOP and req.resume.steps == 10
    h = handle_for(req)
    seen = counted(prior)
    for k in range(10, 200):
        feed(h, k, prior)
        clock.now += 1.0
        progress.tick("job", h.history, prior)
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
    steps = tick_each_chunk(progress, h, clock)
    per_step = 4 + 4 * WIDTH
    assert seen["bytes"] <= steps * per_step  # old code: about steps / 2 times that
    assert len(written) == steps and max(written) == written[0]  # old: grew with each step
    req, prior = progress.resume("job", m.Request(id="r2", turns=(m.Turn(0, "hi"),)))
    assert req.resume.steps == steps and prior.made == steps * HOP
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
    assert req.resume.steps == steps and prior.made == steps * HOP
    h = handle_for(req)
    for k in range(steps, 12):
        feed(h, k, prior)
    clock.now += 10.0
    progress.tick("job", h.history, prior)
    again, prior = progress.resume("job", m.Request(id="r2", turns=(m.Turn(0, "hi"),)))
    np.testing.assert_array_equal(again.resume.token_array(), np.arange(12, dtype=np.int32))
    saved = np.concatenate(list(prior.pieces()))
    np.testing.assert_array_equal(saved, np.repeat(np.arange(12, dtype=np.float32), HOP))


def test_a_streamed_answer_lets_go_of_the_audio_its_client_has():
    """A streamed answer's handle kept every chunk (and its event) until the answer
    ended: the parent held the whole answer, 96 KB a second of audio (518 MB at the
    end of a 90 minute stream), though its client had it all but the last chunk. The
    stream's reader (speech.encoded) now lets go of what it has read: the chunks
    pushed are freed as the client gets them."""
    import asyncio
    import gc
    import weakref

    from vibevoice_pool.api import speech
    from vibevoice_pool.encoders import StreamEncoder

    h = handle_for()
    refs = []
    sent = []

    async def client():
        async for data in speech.encoded(h, StreamEncoder("wav")):
            sent.append(len(data))

    async def main() -> int:
        task = asyncio.create_task(client())
        for k in range(200):
            pcm = np.full(HOP, k, dtype=np.float32)
            refs.append(weakref.ref(pcm))
            h.push(m.Chunk("r", k, pcm))
            del pcm
            for _ in range(3):
                await asyncio.sleep(0)  # the client takes it
        gc.collect()
        alive = sum(r() is not None for r in refs)
        h.push(m.Done("r", 200 * HOP / m.SAMPLE_RATE, 1.0))
        await task
        return alive

    alive = asyncio.run(main())
    assert alive <= 2  # old code: all 200
    assert sum(sent) == 44 + 200 * HOP * 2  # the wav header, every sample as int16
    assert h.samples == 200 * HOP and isinstance(h.outcome, m.Done)


def test_a_reader_beside_a_releasing_one_still_reads_every_chunk():
    """What a releasing reader lets go is only what every reader has read: a slower
    reader that began before it still gets the whole audio."""
    import asyncio

    h = handle_for()

    async def read(release: bool, pause: int) -> np.ndarray:
        parts = []
        async for pcm in h.stream(release=release):
            parts.append(pcm)
            for _ in range(pause):
                await asyncio.sleep(0)
        return np.concatenate(parts)

    async def main():
        slow = asyncio.create_task(read(False, 7))
        fast = asyncio.create_task(read(True, 0))
        await asyncio.sleep(0)
        for k in range(50):
            feed(h, k)
            await asyncio.sleep(0)
        h.push(m.Done("r", 50 * HOP / m.SAMPLE_RATE, 1.0))
        return await slow, await fast

    slow, fast = asyncio.run(main())
    whole = np.repeat(np.arange(50, dtype=np.float32), HOP)
    np.testing.assert_array_equal(slow, whole)
    np.testing.assert_array_equal(fast, whole)
    assert len(h.audio()) == 0  # both have read it all: nothing is held
