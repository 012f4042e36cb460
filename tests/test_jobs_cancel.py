"""Cancel without delete: POST /v1/jobs/{id}/cancel stops a job and keeps its record.

On a real `vibevoice-pool launch` with sim workers: a running job's row leaves its
worker (the pool's inflight counts), the record stays `cancelled`, a second cancel
and a cancel of a done job answer the record as it is, the CLI's `jobs cancel ID`,
and a SIGKILLed server started again on the same data folder never runs it again.
The audio a cancelled job made is kept as its result. Over a fake pool
(jobs_fakes.py): cancels racing the jobs' ends, and one landing while the result
is written."""

from __future__ import annotations

import io
import os
import random
import signal
import sqlite3
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import pid_alive, wait_until
from fastapi import FastAPI
from fastapi.testclient import TestClient
from jobs_fakes import SCRIPT, FakePool, runners
from test_jobs import SIM, audio_of, job, submit, wait_finished

from vibevoice_pool.api.jobs import jobs_router
from vibevoice_pool.cli import main as cli_main
from vibevoice_pool.jobs import client as jobs_client
from vibevoice_pool.jobs import results
from vibevoice_pool.jobs.store import JobState
from vibevoice_pool.ui import jobs as ui_jobs
from workers.engines.sim import tone
from workers.wire.estimate import audio_seconds_for
from workers.wire.messages import SAMPLE_RATE

WHOLE = round(audio_seconds_for(SCRIPT) * SAMPLE_RATE)  # the samples a fake job makes
LONG = "Speaker 1: " + "a long story that takes some time to tell. " * 40  # ~115 s of audio


def inflight(url: str) -> int:
    return sum(w["inflight"] for w in httpx.get(f"{url}/v1/pool", timeout=10).json()["workers"])


def cancel(url: str, job_id: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs/{job_id}/cancel", timeout=60)


@pytest.mark.slow
def test_a_cancelled_job_leaves_its_worker_keeps_its_record_and_stays_cancelled_after_a_sigkill(
    server, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv(jobs_client.OWNER_FILE_ENV, str(tmp_path / "owner-token"))
    data = tmp_path / "data"
    args = (*SIM, "--sim-rtf", "1.0", "--data-dir", str(data))  # LONG runs ~2 minutes
    s = server(*args)
    long_id = submit(s.url, LONG)
    wait_until(lambda: job(s.url, long_id)["progress"]["audio_s"] >= 1.0, 60, 0.05, "audio")
    assert job(s.url, long_id)["state"] == "running" and inflight(s.url) == 1

    r = cancel(s.url, long_id)
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["state"] == "cancelled" and view["error"]["code"] == "cancelled"
    assert view["timings"]["finished_at"] is not None
    wait_until(lambda: inflight(s.url) == 0, 30, 0.05, "its row to leave its worker")
    assert job(s.url, long_id)["state"] == "cancelled"  # the record stays
    made = view["result"]["audio_s"]  # the audio it made before, kept as its result
    assert made >= 1.0 and view["progress"]["audio_s"] == made
    partial = audio_of(s.url, long_id)
    assert len(partial) == round(made * SAMPLE_RATE)
    assert np.abs(partial - tone(view["seed"], 0, len(partial))).max() < 2 / 32768
    out = tmp_path / "partial.wav"  # the CLI writes it, and says what it is
    assert jobs_client.follow(s.url, long_id, str(out)) == 0
    assert len(sf.read(out)[0]) == len(partial)
    assert "was cancelled; writing the audio it made before" in capsys.readouterr().err

    again = cancel(s.url, long_id)  # idempotent: the record as it is, no second cancel
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert cli_main(["jobs", "cancel", long_id, "--url", s.url]) == 0  # cancelled (before)
    out = capsys.readouterr()
    assert long_id in out.out and "cancelled" in out.out and "cancelled" in out.err

    short = submit(s.url, "Speaker 1: this one ends before anyone cancels it.")
    assert wait_finished(s.url, [short])[short]["state"] == "done"
    late = cancel(s.url, short)  # a done job stays done: 200 and its record
    assert late.status_code == 200 and late.json()["state"] == "done"
    assert late.json()["result"]["url"] == f"/v1/jobs/{short}/audio"
    assert jobs_client.cancel_job(s.url, short) == 1  # nothing was cancelled
    assert "had already ended (done)" in capsys.readouterr().err
    nobody = cancel(s.url, "no-such-job")
    assert nobody.status_code == 404 and nobody.json()["error"]["code"] == "not_found"
    doc = httpx.get(f"{s.url}/openapi.json", timeout=30).json()["paths"]
    route = doc["/v1/jobs/{job_id}/cancel"]["post"]
    assert "keep its record" in route["description"]
    assert {"200", "404", "507"} <= set(route["responses"])

    workers = s.worker_pids()
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(10)
    for pid in workers:  # the death pipe ends them
        wait_until(lambda p=pid: not pid_alive(p), 15, what=f"worker {pid} to exit")
    s = server(*args)
    after = submit(s.url, "Speaker 1: the restarted server runs this one.")
    assert wait_finished(s.url, [after])[after]["state"] == "done"  # its loop has run
    view = job(s.url, long_id)
    assert view["state"] == "cancelled" and view["runs"] == 1 and inflight(s.url) == 0
    assert len(audio_of(s.url, long_id)) == len(partial)  # not swept as an orphan
    db = sqlite3.connect(data / "jobs.db")
    moves = db.execute(
        "SELECT from_state, to_state FROM events WHERE job_id=? ORDER BY seq", (long_id,)
    ).fetchall()
    db.close()
    assert moves == [(None, "queued"), ("queued", "running"), ("running", "cancelled")]


@pytest.fixture
def runner(tmp_path):
    yield from runners(tmp_path)


def test_cancels_racing_the_jobs_ends_give_each_job_one_final_state(runner):
    """Forty short jobs. Each odd one is cancelled at a random moment once the runner has
    taken it (running, its last chunks, its result being written, just done), each even
    one once it is done: the cancel's answer is the job's final state, it ends once, a
    done job has its whole result and a cancelled one the audio it made (none when it
    never began), and every file on disk is named by its job."""
    pool = FakePool()
    r = runner(pool)
    app = FastAPI()
    app.include_router(jobs_router(type("Front", (), {})(), r))
    c = TestClient(app)
    rng = random.Random(7)
    ids = [c.post("/v1/jobs", json={"script": SCRIPT}).json()["id"] for _ in range(40)]
    answers: dict[str, httpx.Response] = {}

    def cancel_later(job_id: str, wait_for: tuple[JobState, ...], delay: float) -> None:
        wait_until(lambda: r.store.get(job_id).state in wait_for, 30, 0.002, "its turn")
        time.sleep(delay)
        answers[job_id] = c.post(f"/v1/jobs/{job_id}/cancel")

    taken = (JobState.RUNNING, JobState.DONE)
    threads = [
        threading.Thread(
            target=cancel_later,
            args=(job_id, taken if n % 2 else (JobState.DONE,), rng.uniform(0, 0.03)),
        )
        for n, job_id in enumerate(ids)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wait_until(lambda: not r._live, 10, what="the runner to let go of every run")
    states = {}
    for job_id in ids:
        assert answers[job_id].status_code == 200, answers[job_id].text
        final = r.store.get(job_id)
        states[job_id] = final.state
        assert answers[job_id].json()["state"] == final.state.value  # the answer holds
        assert final.finished_count == 1
        audio = c.get(f"/v1/jobs/{job_id}/audio")
        assert final.state in (JobState.DONE, JobState.CANCELLED)
        if final.state is JobState.DONE or final.result_path:
            assert audio.status_code == 200 and len(audio.content) == final.result_bytes
            pcm, _ = sf.read(io.BytesIO(audio.content))
            assert len(pcm) == round(final.audio_s * SAMPLE_RATE) <= WHOLE
            assert answers[job_id].json()["result"] is not None or final.state is JobState.DONE
        else:
            assert audio.status_code == 410 and final.audio_s == 0
    assert all(states[job_id] is JobState.DONE for job_id in ids[::2])  # done before
    named = {f"{i}.wav" for i in ids if r.store.get(i).result_path}
    assert {p.name for p in r.store.results.iterdir()} == named  # no orphan file


def test_a_cancel_landing_while_the_result_is_written_keeps_the_whole_audio(runner, monkeypatch):
    """The job's row has ended and its result is being written when the cancel comes:
    the store says cancelled (it came first), and the audio, all of it, is its result."""
    r = runner()
    real = results.write_result
    landed = []

    def write_then_cancelled(store, path, pcm, fmt):
        landed.append(r.cancel(path.stem).state)  # the owner's cancel, from another thread
        return real(store, path, pcm, fmt)

    monkeypatch.setattr(results, "write_result", write_then_cancelled)
    job = r.submit("me", {"script": SCRIPT})
    wait_until(lambda: landed and not r._live, 10, what="the cancelled job's run to end")
    job = r.get(job.id)
    assert landed == [JobState.CANCELLED] and job.state is JobState.CANCELLED
    assert job.finished_count == 1 and round(job.audio_s * SAMPLE_RATE) == WHOLE
    pcm, _ = sf.read(r.result_file(job))
    assert len(pcm) == WHOLE
    view = r.describe(job)
    assert view["state"] == "cancelled" and view["result"]["audio_s"] == round(job.audio_s, 3)
    rows, files = ui_jobs.job_rows(r, "me")  # the page's Jobs tab offers it for download
    assert rows[0][3] == f"{job.audio_s:.1f} s" and files == [str(r.result_file(job))]


@pytest.mark.slow
def test_a_job_cancelled_as_its_server_dies_keeps_its_saved_audio_and_is_never_run_again(
    server, tmp_path
):
    """The cancel is written down, but the job's row never leaves its worker (SIGSTOPped)
    and the server is SIGKILLed: the next start finds the audio it saved (progress.py)
    beside a cancelled job, keeps it as its result and removes the files; the job is
    not run again."""
    data = tmp_path / "data"
    args = (*SIM, "--sim-rtf", "1.0", "--data-dir", str(data))
    s = server(*args)
    job_id = submit(s.url, LONG)
    saved = data / "progress" / f"{job_id}.pcm"
    wait_until(lambda: saved.is_file() and saved.stat().st_size >= 4 * SAMPLE_RATE, 60, 0.05)
    on = job(s.url, job_id)["worker"]
    stuck = next(w["pid"] for w in s.get("/v1/pool").json()["workers"] if w["id"] == on)
    workers = s.worker_pids()
    os.kill(stuck, signal.SIGSTOP)
    try:
        with pytest.raises(httpx.ReadTimeout):  # the server waits for the row to leave
            httpx.post(f"{s.url}/v1/jobs/{job_id}/cancel", timeout=httpx.Timeout(2, connect=10))
        db = sqlite3.connect(data / "jobs.db")
        row = db.execute("SELECT state, result_path FROM jobs WHERE id=?", (job_id,)).fetchone()
        db.close()
        assert row == ("cancelled", None)  # written down; its audio not yet kept
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait(10)
    finally:
        os.kill(stuck, signal.SIGKILL)
    for pid in workers:
        wait_until(lambda p=pid: not pid_alive(p), 15, what=f"worker {pid} to exit")
    had = len(np.fromfile(saved, dtype=np.float32))

    s = server(*args)
    view = job(s.url, job_id)
    assert view["state"] == "cancelled" and view["runs"] == 1
    assert round(view["result"]["audio_s"] * SAMPLE_RATE) == had
    pcm = audio_of(s.url, job_id)
    assert len(pcm) == had and np.abs(pcm - tone(view["seed"], 0, had)).max() < 2 / 32768
    assert list((data / "progress").iterdir()) == []
    after = submit(s.url, "Speaker 1: the restarted server runs this one.")
    assert wait_finished(s.url, [after])[after]["state"] == "done"
    assert job(s.url, job_id)["runs"] == 1 and inflight(s.url) == 0


def test_the_jobs_tab_cancels_keeping_the_record_and_deletes_beside_it(runner):
    import gradio as gr

    from vibevoice_pool.ui.i18n import gradio_i18n

    pool = FakePool()
    pool.hold(after_chunks=2)  # each job makes 1 s of audio, then waits
    r = runner(pool)
    front = type("Front", (), {"voices": type("V", (), {"names": lambda self: []})()})()
    with gr.Blocks() as page:
        ui_jobs.add_jobs_tab(front, r, gradio_i18n())
    by_id = {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}
    cancel_button, delete_button = by_id["vv-job-cancel"], by_id["vv-job-delete"]
    assert isinstance(delete_button, gr.Button) and delete_button.parent is cancel_button.parent

    me, other = ui_jobs.owner_for("b1"), ui_jobs.owner_for("b2")
    assert ui_jobs.submit_job(r, me, SCRIPT, [], "wav").startswith("✅")
    first = r.store.list(me)[0][0].id
    wait_until(lambda: r.describe(r.get(first))["progress"]["audio_s"] == 1.0, 10)
    assert ui_jobs.cancel_job(r, me, first) == f"⏹️ Job `{first}` cancelled."
    wait_until(lambda: r.get(first).result_path, 10, what="its audio kept")
    rows, files = ui_jobs.job_rows(r, me)
    assert rows[0][:2] == [first, "cancelled"] and files == [str(r.result_file(r.get(first)))]

    assert ui_jobs.delete_job(r, other, first).startswith("❌ You have no job")
    kept = r.result_file(r.get(first))
    assert ui_jobs.delete_job(r, me, first) == f"🗑️ Job `{first}` deleted, with its result."
    assert r.store.get(first) is None and not kept.exists()

    assert ui_jobs.submit_job(r, me, SCRIPT, [], "wav", "zh").startswith("✅")
    second = r.store.list(me)[0][0].id
    wait_until(lambda: r.describe(r.get(second))["progress"]["audio_s"] == 1.0, 10)
    assert ui_jobs.delete_job(r, me, second, "zh") == f"🗑️ 任务 `{second}` 及其结果已删除。"
    wait_until(lambda: not r._live, 10, what="the deleted job's run to end")
    assert r.store.get(second) is None and list(r.store.results.iterdir()) == []
    assert ui_jobs.job_rows(r, me) == ([], [])
