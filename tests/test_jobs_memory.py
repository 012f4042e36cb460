"""A running job's audio lives on disk, not in the parent's memory: the runner reads
its handle letting go of what it has read, keeps in memory only the audio not saved
yet (jobs/job_audio.py), and encodes the result from the file and that tail. Counted
in samples (the handle's and the runner's), not RSS; the fake pool of jobs_fakes.py
with a history piece per chunk, as the dispatcher gives it."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from conftest import wait_until
from jobs_fakes import FakePool, runners, wait_state

from vibevoice_pool import encoders
from vibevoice_pool.jobs.store import JobState
from workers.wire import messages as m
from workers.wire.history import HistoryDelta

CHUNK = m.SAMPLE_RATE // 2  # the fake pool's chunks: 0.5 s
LONG = "Speaker 1: " + "a" * 200  # about 15 s of audio: 30 chunks


def sound(done: int, n: int, seq: int) -> np.ndarray:
    """The fake pool's chunk `seq`: its samples [done, done + n), a sound of its own."""
    return (0.5 * np.sin(np.arange(done, done + n) * (0.01 + seq * 1e-4))).astype("f4")


def whole_sound(total: int) -> np.ndarray:
    """All the audio of a row of `total` samples, as one run from its start makes it."""
    starts = range(0, total, CHUNK)
    return np.concatenate([sound(a, min(CHUNK, total - a), k) for k, a in enumerate(starts)])


class HistoryPool(FakePool):
    """The fake pool, each chunk a different sound with its history step, as the
    dispatcher hands them over (the history first); what it made is kept to compare.
    A request with a history (resume) goes on from its end, as the engines do."""

    def __init__(self):
        super().__init__()
        self.made: dict[str, list[np.ndarray]] = {}

    def _play(self, handle) -> None:
        req = handle.request
        self.begin.wait()
        handle.push(m.Started(req.id))
        total = int(round(req.est_audio_s * m.SAMPLE_RATE))
        made = self.made.setdefault(req.id, [])
        done, seq = (req.resume.samples, req.resume.steps) if req.resume else (0, 0)
        while done < total:
            if not self.may_go_on(handle, seq):
                return
            n = min(CHUNK, total - done)
            pcm = sound(done, n, seq)
            made.append(pcm.copy())
            fed = np.full(2, seq, "<f4").tobytes()
            handle.history.extend(HistoryDelta(seq, np.int32(seq).tobytes(), fed, 2, done + n))
            handle.push(m.Chunk(req.id, seq, pcm))
            done, seq = done + n, seq + 1
            time.sleep(0.002)
        handle.push(m.Done(req.id, total / m.SAMPLE_RATE, 0.01))


@pytest.fixture
def runner(tmp_path):
    yield from runners(tmp_path)


def every_tick_saves(r) -> None:
    """The runner's progress clock moves 2 s a call: each chunk read is saved at once
    (CHECKPOINT_S is 1 s), so what is held is what the disk refused, not what waits
    for the next second."""
    r.progress.clock = itertools.count(1000.0, 2.0).__next__


def live_of(r, job_id):
    with r._lock:
        return r._live.get(job_id)


def made_by(r, job_id, chunks: int):
    """The job's run once it has read `chunks` chunks."""

    def read():
        live = live_of(r, job_id)
        return live if live and live.audio.made >= chunks * CHUNK else None

    return wait_until(read, 10, 0.01, f"{chunks} chunks read")


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac"])
def test_a_running_jobs_handle_and_runner_hold_no_saved_audio_and_its_result_is_the_same(
    runner, fmt
):
    """The runner read its job's handle keeping every chunk (the handle's _chunks) until
    the job ended, though each second was saved to disk: 96 KB a second of audio, 518 MB
    for a 90 minute job, 5 GB for ten at once. Now the handle lets go of what the runner
    read and the runner lets go of what it saved: with 8 chunks made and saved, neither
    holds a sample. The result, encoded from the file and the tail, is the bytes the
    whole audio encodes to."""
    pool = HistoryPool()
    pool.hold(after_chunks=8)
    r = runner(pool)
    every_tick_saves(r)
    job = r.submit("me", {"script": LONG, "format": fmt})
    live = made_by(r, job.id, 8)
    wait_until(lambda: live.audio.on_disk == 8 * CHUNK, 10, 0.01, "8 chunks saved")
    # the samples the handle holds (old code: all 96,000, until the job ended): it lets
    # go of a batch of chunks when its reader, having saved them, asks for more
    wait_until(lambda: len(live.handle.audio()) == 0, 10, 0.01, "the handle to let go")
    assert live.audio.held == 0  # nor the runner: all of it is on disk
    pcm, _ = r.progress._paths(job.id)
    assert pcm.stat().st_size == 8 * CHUNK * 4
    assert r.describe(r.store.get(job.id))["progress"]["audio_s"] == 4.0  # made, as before
    pool.release()
    done = wait_state(r, job.id, JobState.DONE)
    made = np.concatenate(pool.made[live.handle.id])
    assert len(made) > 20 * CHUNK and round(done.audio_s * m.SAMPLE_RATE) == len(made)
    assert r.result_file(done).read_bytes() == encoders.encode(made, fmt)[0]
    assert not pcm.exists()  # the progress goes once the result is on disk


def test_a_cancelled_jobs_kept_audio_comes_from_disk_and_tail_whole(runner):
    """A cancelled job keeps the audio it made as its result: what was saved (the file)
    and what was not yet (the tail in memory), in order."""
    pool = HistoryPool()
    pool.hold(after_chunks=6)
    r = runner(pool)
    job = r.submit("me", {"script": LONG, "format": "pcm"})
    live = made_by(r, job.id, 6)
    wait_until(lambda: live.audio.on_disk > 0, 10, 0.01, "a save")
    assert live.audio.held < live.audio.made  # part saved (the first chunk), part not
    r.cancel(job.id, wait_s=10)
    kept = r.get(job.id)
    assert kept.state is JobState.CANCELLED and kept.result_path
    made = np.concatenate(pool.made[live.handle.id])
    assert r.result_file(kept).read_bytes() == encoders.encode(made, "pcm")[0]


def test_a_save_the_full_disk_refuses_keeps_its_prefix_the_tail_waits_and_the_result_is_whole(
    tmp_path,
):
    """A save the disk refused dropped the job's progress files (the space back) and kept
    all its audio in memory. Now the saved prefix stays on disk (a restart resumes from
    it), the audio past it waits in memory, and is appended once the disk has room: a
    real full disk (a 16 MB tmpfs filled), then space again, and the result is the
    whole audio, the same bytes."""
    from test_tenants import fill, small_disk

    with small_disk(tmp_path / "disk", 16) as disk:
        make = runners(disk)
        try:
            pool = HistoryPool()
            pool.hold(after_chunks=4)
            r = next(make)(pool)
            every_tick_saves(r)
            job = r.submit("me", {"script": LONG, "format": "wav"})
            live = made_by(r, job.id, 4)
            wait_until(lambda: live.audio.on_disk == 4 * CHUNK, 10, 0.01, "4 chunks saved")
            pcm, _ = r.progress._paths(job.id)
            fill(disk)
            pool.hold(after_chunks=12)  # 8 more chunks made on the full disk
            made_by(r, job.id, 12)
            wait_until(lambda: r.progress.refused(job.id), 10, 0.01, "a refused save")
            assert pcm.stat().st_size == 4 * CHUNK * 4  # the prefix stays on disk
            assert live.audio.on_disk == 4 * CHUNK and live.audio.held == 8 * CHUNK
            # the tail is the runner's, not the handle's
            wait_until(lambda: len(live.handle.audio()) == 0, 10, 0.01, "the handle to let go")
            (disk / "filler").unlink()
            pool.hold(after_chunks=20)  # space again: the next saves append the tail
            wait_until(lambda: live.audio.on_disk == 20 * CHUNK, 20, 0.01, "the tail saved")
            assert not r.progress.refused(job.id) and live.audio.held == 0
            assert pcm.stat().st_size == 20 * CHUNK * 4
            pool.release()
            done = wait_state(r, job.id, JobState.DONE, timeout=30)
            made = np.concatenate(pool.made[live.handle.id])
            assert r.result_file(done).read_bytes() == encoders.encode(made, "wav")[0]
        finally:
            for _ in make:  # the runners stop before the disk goes
                pass


def test_a_disk_that_stays_full_sets_the_job_aside_and_it_goes_on_from_its_saved_audio(
    tmp_path, monkeypatch
):
    """While the disk refuses a job's saves, the audio past it waits in memory; a disk
    that stays full would have it grow to the whole job. Past TAIL_MAX_S the run stops
    (its request cancelled in the pool), the job is queued again and nothing starts
    while the disk has no room; once it has, the job goes on from the audio it saved
    (its history), and its result is the audio of one whole run, the same bytes."""
    from test_tenants import fill, small_disk

    from vibevoice_pool.jobs import ending
    from vibevoice_pool.jobs import runner as runner_mod

    monkeypatch.setattr(ending, "TAIL_MAX_S", 3.0)  # 6 chunks
    monkeypatch.setattr(runner_mod, "DISK_RETRY_S", 0.2)
    with small_disk(tmp_path / "disk", 16) as disk:
        make = runners(disk)
        try:
            pool = HistoryPool()
            pool.hold(after_chunks=4)
            r = next(make)(pool)
            every_tick_saves(r)
            job = r.submit("me", {"script": LONG, "format": "wav"})
            live = made_by(r, job.id, 4)
            wait_until(lambda: live.audio.on_disk == 4 * CHUNK, 10, 0.01, "4 chunks saved")
            first = live.handle.request
            fill(disk)
            pool.release()
            wait_until(lambda: job.id not in r._live, 10, 0.01, "the run to stop")
            assert first.id in pool.cancelled  # its row stopped in the pool
            made = sum(map(len, pool.made[first.id]))
            assert 7 * CHUNK <= made < 20 * CHUNK  # it stopped past 6 unsaved chunks
            pcm, _ = r.progress._paths(job.id)
            assert pcm.stat().st_size == 4 * CHUNK * 4  # what it saved stays
            time.sleep(1.0)  # five retries of DISK_RETRY_S
            assert pool.submitted == [first.id]  # nothing starts on the full disk
            (disk / "filler").unlink()
            done = wait_state(r, job.id, JobState.DONE, timeout=30)
            again = pool.submitted[1]
            assert len(pool.submitted) == 2 and pool.submitted[0] == first.id
            total = round(done.audio_s * m.SAMPLE_RATE)
            assert sum(map(len, pool.made[again])) == total - 4 * CHUNK  # from the 4 saved
            audio = r.result_file(done).read_bytes()
            assert audio == encoders.encode(whole_sound(total), "wav")[0]
        finally:
            for _ in make:
                pass


def test_job_audio_lets_go_of_what_is_saved_and_reads_it_back_in_order(tmp_path):
    from vibevoice_pool.jobs.job_audio import JobAudio

    path = tmp_path / "a.pcm"
    np.arange(9, dtype=np.float32).tofile(path)  # as the save of sample 9 leaves it
    audio = JobAudio(path, on_disk=7)  # a resumed job: 7 samples saved
    for k in range(3):
        audio.add(np.arange(7 + 4 * k, 11 + 4 * k, dtype=np.float32))
    assert audio.made == 19 and audio.held == 12
    np.testing.assert_array_equal(audio.since(9), np.arange(9, 19, dtype=np.float32))
    audio.saved(9)  # mid-chunk: the rest of that chunk stays
    assert audio.on_disk == 9 and audio.held == 10
    with pytest.raises(ValueError):
        audio.since(8)
    whole = np.concatenate(list(audio.pieces(block=3)))
    np.testing.assert_array_equal(whole, np.arange(19, dtype=np.float32))
