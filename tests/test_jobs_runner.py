"""Durable jobs over a fake pool, without processes: the runner and the routes
(threads play a worker's events into real RequestHandles)."""

from __future__ import annotations

import errno
import io
import threading
import time

import pytest
import soundfile as sf
from conftest import wait_until
from fastapi import FastAPI
from fastapi.testclient import TestClient
from jobs_fakes import SCRIPT, FakePool, build, runners, wait_state

from vibevoice_pool.api.jobs import jobs_router
from vibevoice_pool.jobs.runner import JobRunner
from vibevoice_pool.jobs.store import JobState, JobStore
from workers.wire import messages as m
from workers.wire.estimate import audio_seconds_for


@pytest.fixture
def runner(tmp_path):
    yield from runners(tmp_path)


def test_a_job_runs_to_a_result_that_decodes_to_its_length(runner):
    r = runner()
    job = r.submit("me", {"script": SCRIPT})
    assert job.seed == 1234 and r.store.body(job.id)["seed"] == 1234  # fixed for reruns
    job = wait_state(r, job.id, JobState.DONE)
    pcm, rate = sf.read(r.result_file(job))
    assert rate == m.SAMPLE_RATE and len(pcm) == round(audio_seconds_for(SCRIPT) * m.SAMPLE_RATE)
    view = r.describe(job)
    assert view["progress"]["fraction"] == 1.0 and view["result"]["bytes"] == job.result_bytes
    assert [p.name for p in r.store.results.iterdir()] == [f"{job.id}.wav"]  # no temp left


def test_a_job_reports_why_its_row_stopped_in_its_view(runner):
    pool = FakePool()
    r = runner(pool)
    normal = wait_state(r, r.submit("me", {"script": SCRIPT}).id, JobState.DONE)
    assert normal.stop_reason == "eos" and r.describe(normal)["stop_reason"] == "eos"
    pool.stop_reason = m.StopReason.RUNAWAY_CAP.value
    cut = wait_state(r, r.submit("me", {"script": SCRIPT}).id, JobState.DONE)
    assert r.describe(cut)["stop_reason"] == "runaway_cap"
    app = FastAPI()
    app.include_router(jobs_router(FakeFront(), r))
    c = TestClient(app)
    pool.hold()
    queued = c.post("/v1/jobs", json={"script": SCRIPT}).json()
    assert queued["stop_reason"] is None  # not known before it is done
    pool.release()
    wait_until(lambda: c.get(f"/v1/jobs/{queued['id']}").json()["state"] == "done", 10)
    assert c.get(f"/v1/jobs/{queued['id']}").json()["stop_reason"] == "runaway_cap"
    assert c.get(f"/v1/jobs/{queued['id']}/audio").headers["x-stop-reason"] == "runaway_cap"


def _refuse_results(monkeypatch, times: int | None):
    """The result's write (disk.write_atomic) fails ENOSPC `times` times (None: always)."""
    from vibevoice_pool.jobs import disk, ending

    monkeypatch.setattr(ending, "RESULT_RETRY_S", 0.1)
    real, calls = disk.write_atomic, []

    def disk_full(path, data):
        calls.append(path)
        if times is None or len(calls) <= times:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(disk, "write_atomic", disk_full)
    return calls


def test_a_result_a_full_disk_refuses_is_written_once_there_is_room(runner, monkeypatch, caplog):
    """A job whose audio was whole but whose result found the disk full failed
    `disk_full`: its minutes of GPU work lost to a disk freed seconds later. Its audio
    is on disk and in memory: the result is now written again until there is room, and
    the job is done, run once."""
    calls = _refuse_results(monkeypatch, 3)
    pool = FakePool()
    r = runner(pool)
    first = r.submit("me", {"script": SCRIPT})
    job = wait_state(r, first.id, JobState.DONE)
    assert len(calls) == 4 and len(pool.submitted) == 1  # written at the 4th try, run once
    pcm, _ = sf.read(r.result_file(job))
    assert len(pcm) == round(audio_seconds_for(SCRIPT) * m.SAMPLE_RATE)
    assert "its result waits for room on the disk" in caplog.text
    second = r.submit("me", {"script": SCRIPT})
    assert r.result_file(wait_state(r, second.id, JobState.DONE)).is_file()


def test_a_result_still_waiting_for_room_at_a_stop_is_queued_for_the_next_start(
    runner, monkeypatch, tmp_path
):
    """The server stops while a finished job's result waits for room: the job is queued
    again (not failed, not left running), and the next start finishes it."""
    calls = _refuse_results(monkeypatch, None)
    r = runner()
    job = r.submit("me", {"script": SCRIPT})
    wait_until(lambda: len(calls) >= 2, 10, what="the result refused twice")
    r.stop()
    store = JobStore.open(tmp_path / "data")
    assert store.get(job.id).state is JobState.QUEUED
    monkeypatch.undo()  # the disk has room again
    again = runner(store_=store)
    done = wait_state(again, job.id, JobState.DONE)
    pcm, _ = sf.read(again.result_file(done))
    assert len(pcm) == round(audio_seconds_for(SCRIPT) * m.SAMPLE_RATE)


def test_a_result_that_cannot_be_written_fails_its_job_and_the_next_one_runs(runner, monkeypatch):
    """Not a full disk (the folder is a file): the result never can be; the job fails
    `storage_error` and the next one runs."""
    from vibevoice_pool.jobs import disk

    real = disk.write_atomic
    calls = []

    def not_a_folder_once(path, data):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOTDIR, "Not a directory", str(path))
        real(path, data)

    monkeypatch.setattr(disk, "write_atomic", not_a_folder_once)  # the result's write
    r = runner()
    first = r.submit("me", {"script": SCRIPT})
    job = wait_state(r, first.id, JobState.FAILED)
    assert job.error_code == "storage_error"
    assert "could not be written" in job.error and "Not a directory" in job.error
    second = r.submit("me", {"script": SCRIPT})
    assert r.result_file(wait_state(r, second.id, JobState.DONE)).is_file()


def test_an_overloaded_pool_keeps_jobs_queued_until_it_has_room(runner):
    pool = FakePool()
    pool.refuse = m.ErrorKind.OVERLOADED
    r = runner(pool)
    job = r.submit("me", {"script": SCRIPT})
    time.sleep(1.5)
    assert r.store.get(job.id).state is JobState.QUEUED and pool.submitted == []
    pool.refuse = None
    wait_state(r, job.id, JobState.DONE)


def test_jobs_wait_while_the_admission_queue_is_at_depth(runner):
    pool = FakePool()
    pool.dispatcher.waiting = 2
    r = runner(pool)
    job = r.submit("me", {"script": SCRIPT})
    time.sleep(1.0)
    assert pool.submitted == []
    pool.dispatcher.waiting = 0
    wait_state(r, job.id, JobState.DONE)


def test_progress_is_readable_while_it_runs_and_cancel_stops_it(runner):
    pool = FakePool()
    pool.hold(after_chunks=2)
    r = runner(pool)
    job = r.submit("me", {"script": SCRIPT})
    wait_until(lambda: r.describe(r.get(job.id))["progress"]["audio_s"] == 1.0, 10)
    view = r.describe(r.get(job.id))
    assert view["state"] == "running" and view["progress"]["fraction"] == pytest.approx(
        1.0 / audio_seconds_for(SCRIPT), abs=1e-3
    )
    assert view["worker"] in (0, 1)
    r.cancel(job.id)
    assert pool.cancelled == {r.get(job.id).request_id}
    wait_until(lambda: not r._live, 10, what="the runner to let go")
    job = r.get(job.id)
    assert job.state is JobState.CANCELLED and job.finished_count == 1
    pcm, _ = sf.read(r.result_file(job))  # the second it made is kept as its result
    assert len(pcm) == m.SAMPLE_RATE and job.audio_s == 1.0
    assert [p.name for p in r.store.results.iterdir()] == [f"{job.id}.wav"]


def test_a_stopped_runner_queues_its_job_again_and_the_next_finishes_it_once(runner, tmp_path):
    pool = FakePool()
    pool.hold()
    r = JobRunner(JobStore.open(tmp_path / "data"), pool, build, queue_depth=2).start()
    job = r.submit("me", {"script": SCRIPT})
    wait_until(lambda: r.store.get(job.id).state is JobState.RUNNING, 10)
    r.stop(grace_s=0)
    again = runner(FakePool(), JobStore.open(tmp_path / "data"))
    assert again.store.events(job.id)[-1][1:] == ("queued", "the server stopped before it finished")
    done = wait_state(again, job.id, JobState.DONE)
    assert done.runs == 2 and done.finished_count == 1
    assert [b for _, b, _ in again.store.events(job.id)].count("done") == 1


def test_a_bad_body_is_refused_before_it_is_written_down(runner):
    r = runner()
    with pytest.raises(m.PoolError) as e:
        r.submit("me", {"script": "  "})
    assert e.value.kind is m.ErrorKind.BAD_INPUT
    assert r.store.list("me")[0] == []


def test_expiry_deletes_old_results(runner):
    now = [time.time()]
    r = runner(clock=lambda: now[0], ttl_s=60)
    job = wait_state(r, r.submit("me", {"script": SCRIPT}).id, JobState.DONE)
    path = r.result_file(job)
    now[0] += 61
    assert r.expire() == 1
    assert not path.exists() and r.store.get(job.id) is None


# ---- the routes --------------------------------------------------------


class FakeFront:
    class cfg:
        api_key = ""


def test_routes_submit_list_fetch_with_range_and_cancel(runner):
    pool = FakePool()
    r = runner(pool)
    app = FastAPI()
    app.include_router(jobs_router(FakeFront(), r))
    c = TestClient(app)
    resp = c.post("/v1/jobs", json={"script": SCRIPT})
    assert resp.status_code == 202
    job_id = resp.json()["id"]
    token = resp.headers["x-owner-token"]  # minted for a caller that had none
    mine = {"X-Owner-Token": token}
    cookie = resp.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    c.cookies.clear()
    assert resp.headers["location"] == f"/v1/jobs/{job_id}"
    wait_until(lambda: c.get(f"/v1/jobs/{job_id}").json()["state"] == "done", 10)
    got = c.get(f"/v1/jobs/{job_id}").json()
    assert got["result"]["url"] == f"/v1/jobs/{job_id}/audio" and got["error"] is None

    whole = c.get(f"/v1/jobs/{job_id}/audio")
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    assert len(sf.read(io.BytesIO(whole.content))[0]) == round(audio_seconds_for(SCRIPT) * 24000)
    part = c.get(f"/v1/jobs/{job_id}/audio", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(whole.content)}"
    assert c.get(f"/v1/jobs/{job_id}/audio", headers={"Range": "bytes=9999999-"}).status_code == 416

    # Only tokens this server minted own anything: a made-up one (or X-Browser-Id) is not
    # an owner id; POST replaces it with a minted one, and it lists nothing.
    made_up = {"X-Owner-Token": "A" * 54, "X-Browser-Id": "tab-1"}
    other = c.post("/v1/jobs", json={"script": SCRIPT}, headers=made_up)
    c.cookies.clear()
    assert other.status_code == 202 and other.headers["x-owner-token"] not in ("A" * 54, token)
    assert c.get("/v1/jobs", headers=made_up).json()["data"] == []
    assert c.get("/v1/jobs", headers={"X-Browser-Id": "tab-1"}).json()["data"] == []
    forged = token[:32] + ("B" if token[32] != "B" else "C") + token[33:]  # the HMAC part wrong
    assert c.get("/v1/jobs", headers={"X-Owner-Token": forged}).json()["data"] == []
    theirs = {"X-Owner-Token": other.headers["x-owner-token"]}
    assert [j["id"] for j in c.get("/v1/jobs", headers=mine).json()["data"]] == [job_id]
    assert [j["id"] for j in c.get("/v1/jobs", headers=theirs).json()["data"]] == [
        other.json()["id"]
    ]
    c.cookies.set("vvp_owner", token)
    assert c.get("/v1/jobs").json()["data"][0]["id"] == job_id
    c.cookies.clear()
    over_tls = TestClient(app, base_url="https://testserver")
    assert "Secure" in over_tls.post("/v1/jobs", json={"script": SCRIPT}).headers["set-cookie"]

    pool.hold()
    slow = c.post("/v1/jobs", json={"script": SCRIPT}, headers=mine).json()["id"]
    early = c.get(f"/v1/jobs/{slow}/audio")
    assert early.status_code == 409 and early.json()["error"]["code"] == "not_ready"
    gone = c.delete(f"/v1/jobs/{slow}").json()
    assert gone["state"] == "cancelled" and gone["deleted"]  # cancelled, then forgotten
    pool.release()
    assert c.get(f"/v1/jobs/{slow}").status_code == 404
    assert c.delete(f"/v1/jobs/{slow}").status_code == 404
    assert c.get("/v1/jobs/nope").json()["error"]["code"] == "not_found"
    assert c.get("/v1/jobs/nope").status_code == 404
    bad = c.post("/v1/jobs", json={"script": " "})  # the schema refuses a blank script:
    assert bad.status_code == 422  # 400 in the real app (create_app's handler; test_bad_inputs)
    page = c.get("/v1/jobs?limit=1", headers=mine).json()
    assert page["data"][0]["id"] == job_id and not page["has_more"]
    result = r.result_file(r.get(job_id))
    done = c.delete(f"/v1/jobs/{job_id}")  # a finished job: its result goes with it
    assert done.json()["state"] == "done" and not result.exists()


def test_routes_come_before_a_page_mounted_at_root(runner):
    from starlette.responses import PlainTextResponse

    app = FastAPI()  # as server.build_app does: every router first, the page last
    app.include_router(jobs_router(FakeFront(), runner()))
    app.mount("/", PlainTextResponse("the page"))
    client = TestClient(app)
    assert client.get("/v1/jobs").json()["object"] == "list"
    assert client.get("/anything").text == "the page"


def test_the_jobs_tab_builds_and_lists_this_browsers_jobs(runner):
    import gradio as gr

    from vibevoice_pool.ui import jobs as ui_jobs

    r = runner()

    class Voices:
        def names(self):
            return ["alice", "bob"]

    class Front:
        voices = Voices()

    from vibevoice_pool.ui.i18n import gradio_i18n

    with gr.Blocks():
        listed = ui_jobs.add_jobs_tab(Front(), r, gradio_i18n())
    assert listed.choices == [("alice", "alice"), ("bob", "bob")]
    b1 = ui_jobs.owner_for("b1")
    assert ui_jobs.submit_job(r, b1, SCRIPT, [], "wav").startswith("✅")
    assert "已排队" in ui_jobs.submit_job(r, b1, SCRIPT, [], "wav", "zh")
    assert ui_jobs.submit_job(r, b1, "", [], "wav").startswith("❌")
    job = wait_state(r, r.store.list("browser:b1")[0][0].id, JobState.DONE)
    rows, files = ui_jobs.job_rows(r, "browser:b1")
    assert [job.id, "done"] in [row[:2] for row in rows] and str(r.result_file(job)) in files
    assert ui_jobs.job_rows(r, "browser:b2") == ([], [])
    table, _ = ui_jobs.job_table(r, "browser:b1", "zh")  # a Chinese browser's table
    assert table["headers"][:3] == ["任务", "状态", "进度"]
    row = next(row for row in table["data"] if row[0] == job.id)
    assert row[1] == "已完成" and "秒" in row[2]
    assert ui_jobs.cancel_job(r, ui_jobs.owner_for("b2"), job.id).startswith("❌ You have no job")


def test_saved_progress_counts_on_disk_and_goes_when_its_queued_job_is_cancelled(runner):
    """A job queued to go on after a restart has its audio and history on disk
    (jobs/progress.py): they count against the data limit, and cancelling the job
    while it waits removes them."""
    pool = FakePool()
    pool.refuse = m.ErrorKind.OVERLOADED  # the job stays queued
    r = runner(pool)
    job = r.submit("me", {"script": SCRIPT})
    before = r.store.disk_bytes()
    pcm, hist = r.progress._paths(job.id)
    pcm.parent.mkdir(parents=True, exist_ok=True)
    pcm.write_bytes(b"\0" * 40_000)
    hist.write_bytes(b"\0" * 1_000)
    assert r.store.disk_bytes() - before == 41_000
    r.cancel(job.id)
    assert not pcm.exists() and not hist.exists()
    assert r.store.get(job.id).state is JobState.CANCELLED


def test_an_owner_at_its_limit_gets_429_with_retry_after(runner, tmp_path):
    pool = FakePool()
    pool.hold()
    r = runner(pool, JobStore.open(tmp_path / "limited", owner_max_active=1))
    app = FastAPI()
    app.include_router(jobs_router(FakeFront(), r))
    c = TestClient(app)
    first = c.post("/v1/jobs", json={"script": SCRIPT})
    assert first.status_code == 202
    mine = {"X-Owner-Token": first.headers["x-owner-token"]}
    c.cookies.clear()
    over = c.post("/v1/jobs", json={"script": SCRIPT}, headers=mine)
    assert over.status_code == 429 and over.json()["error"]["code"] == "owner_limit"
    assert int(over.headers["retry-after"]) > 0
    pool.release()


def test_saved_progress_stays_until_the_result_is_on_disk(runner, monkeypatch):
    """A server killed while it writes a finished job's result must find its progress
    at the next start (it resumes from there), not run the whole job again: the
    progress goes only once the result is written."""
    import vibevoice_pool.jobs.results as results_mod  # the runner writes through it

    writing, release = threading.Event(), threading.Event()
    real_write = results_mod.write_result

    def slow_write(*args):
        writing.set()
        assert release.wait(10)
        return real_write(*args)

    monkeypatch.setattr(results_mod, "write_result", slow_write)
    pool = FakePool()
    pool.hold()
    r = runner(pool)
    job = r.submit("me", {"script": SCRIPT})
    wait_until(lambda: r.store.get(job.id).state is JobState.RUNNING, 10, what="running")
    pcm, hist = r.progress._paths(job.id)  # what a checkpoint saved while it ran
    pcm.parent.mkdir(parents=True, exist_ok=True)
    pcm.write_bytes(b"\0" * 4_000)
    hist.write_bytes(b"\0" * 100)
    pool.release()
    assert writing.wait(10)
    assert pcm.exists() and hist.exists()  # the row is done; its result is not on disk yet
    release.set()
    wait_state(r, job.id, JobState.DONE)
    wait_until(lambda: not pcm.exists() and not hist.exists(), 10, what="the progress to go")


def test_a_running_jobs_view_names_the_worker_that_runs_it_now(runner):
    pool = FakePool()
    pool.hold(after_chunks=1)
    r = runner(pool)
    job = r.submit("me", {"script": SCRIPT})
    wait_until(lambda: r.describe(r.store.get(job.id))["worker"] is not None, 10, what="started")
    first = r.describe(r.store.get(job.id))["worker"]
    with r._lock:
        live = r._live[job.id]
    live.handle.worker = first + 1  # its worker died: the dispatcher sent the row to another
    assert r.describe(r.store.get(job.id))["worker"] == first + 1
    pool.release()
    wait_state(r, job.id, JobState.DONE)
