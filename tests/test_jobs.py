"""Durable jobs on a real `vibevoice-pool launch` process with sim workers:
a SIGKILLed server, twenty clients at once, a results folder that cannot be
written, a client that goes away, and the CLI's side."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import threading

import httpx
import pytest
import soundfile as sf
from conftest import Server, pid_alive, wait_until

from vibevoice_pool.jobs import client as jobs_client
from vibevoice_pool.script import parse_script
from workers.wire.estimate import audio_seconds_for
from workers.wire.messages import SAMPLE_RATE

pytestmark = pytest.mark.slow

SIM = ("--engine", "sim", "--gpus", "cpu:2")


def samples_for(script: str) -> int:
    """The audio the sim makes for a script: its turns' text at 15 characters a second."""
    text = "\n".join(t.text for t in parse_script(script))
    return int(round(audio_seconds_for(text) * SAMPLE_RATE))


OWNER: dict[str, str] = {}  # these tests' owner token, as a server minted it


def submit(url: str, script: str, **extra) -> str:
    r = httpx.post(f"{url}/v1/jobs", json={"script": script, **extra}, headers=OWNER, timeout=60)
    assert r.status_code == 202, r.text
    if "x-owner-token" in r.headers:  # a server that did not mint ours made a new one
        OWNER["X-Owner-Token"] = r.headers["x-owner-token"]
    return r.json()["id"]


def job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()


def wait_finished(url: str, ids, timeout: float = 60) -> dict[str, dict]:
    def finished():
        views = {i: job(url, i) for i in ids}
        if all(v["state"] in ("done", "failed", "cancelled") for v in views.values()):
            return views
        return None

    return wait_until(finished, timeout, 0.25, "the jobs to finish")


def audio_of(url: str, job_id: str):
    r = httpx.get(f"{url}/v1/jobs/{job_id}/audio", timeout=30)
    assert r.status_code == 200, r.text
    pcm, rate = sf.read(io.BytesIO(r.content))
    assert rate == SAMPLE_RATE
    return pcm


def stop_and_reap(s: Server) -> None:
    pids = s.worker_pids() if s.proc.poll() is None else []
    s.stop()
    for pid in pids:
        wait_until(lambda p=pid: not pid_alive(p), 15, what=f"worker {pid} to exit")


def test_ten_jobs_survive_a_sigkilled_server_and_each_finishes_exactly_once(server, tmp_path):
    data = tmp_path / "data"
    args = (*SIM, "--sim-rtf", "0.2", "--data-dir", str(data))
    s = server(*args)
    scripts = [f"Speaker 1: job {i} " + "speaks for a while. " * (2 + i % 3) for i in range(10)]
    ids = [submit(s.url, text) for text in scripts]

    def mid_run():
        page = httpx.get(f"{s.url}/v1/jobs", headers=OWNER, timeout=10).json()
        states = [j["state"] for j in page["data"]]
        return states.count("done") >= 2 and states.count("running") >= 1

    wait_until(mid_run, 60, 0.05, "some jobs done and some running")
    workers = s.worker_pids()
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(10)
    for pid in workers:  # the death pipe ends them
        wait_until(lambda p=pid: not pid_alive(p), 15, what=f"worker {pid} to exit")

    again = server(*args)
    views = wait_finished(again.url, ids)
    assert [views[i]["state"] for i in ids] == ["done"] * 10
    for job_id, text in zip(ids, scripts, strict=True):
        assert len(audio_of(again.url, job_id)) == samples_for(text)
        assert views[job_id]["progress"]["fraction"] == 1.0

    db = sqlite3.connect(data / "jobs.db")
    rows = dict(db.execute("SELECT id, finished_count FROM jobs").fetchall())
    assert rows == {i: 1 for i in ids}
    done_events = dict(
        db.execute("SELECT job_id, COUNT(*) FROM events WHERE to_state='done' GROUP BY job_id")
    )
    assert done_events == {i: 1 for i in ids}
    restarted = db.execute(
        "SELECT COUNT(*) FROM events WHERE detail='the server restarted while it ran'"
    ).fetchone()[0]
    assert restarted >= 1  # the kill really caught jobs mid-run
    assert sorted(p.name for p in (data / "results").iterdir()) == sorted(f"{i}.wav" for i in ids)
    db.close()


def test_a_long_job_resumes_from_its_saved_step_after_a_sigkilled_server(server, tmp_path):
    """Issue 23, acceptance 4: the server SIGKILLed at 80% of a long job; after the
    restart the job goes on from the audio and history it saved (jobs/progress.py),
    recomputing at most 10% of its steps, and its audio is whole."""
    import re

    import numpy as np

    from workers.engines.sim import tone

    data = tmp_path / "data"
    args = (*SIM, "--sim-rtf", "0.4", "--data-dir", str(data))  # 0.2 s a step of 0.5 s
    s = server(*args)
    text = "Speaker 1: " + "a long job that reads on and on. " * 16
    job_id = submit(s.url, text)
    wait_until(lambda: job(s.url, job_id)["progress"]["fraction"] >= 0.8, 120, 0.02, "80%")
    made = job(s.url, job_id)["progress"]["audio_s"]
    workers = s.worker_pids()
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(10)
    for pid in workers:
        wait_until(lambda p=pid: not pid_alive(p), 15, what=f"worker {pid} to exit")
    assert (data / "progress" / f"{job_id}.hist").is_file()

    again = server(*args)
    view = wait_finished(again.url, [job_id])[job_id]
    assert view["state"] == "done" and view["progress"]["fraction"] == 1.0
    kept = re.search(rf"job {job_id} resumes from its saved step \d+ \(([\d.]+) s\)", again.log())
    assert kept, again.log()[-2000:]
    total = samples_for(text) / SAMPLE_RATE
    assert made - float(kept.group(1)) <= 0.1 * total  # recomputed at most 10% of its steps
    got = audio_of(again.url, job_id)
    assert len(got) == samples_for(text)
    want = tone(view["seed"], 0, len(got))
    assert np.abs(got - want).max() < 2 / 32768  # 16-bit WAV: nothing repeated or missing
    assert not (data / "progress" / f"{job_id}.pcm").exists()  # dropped once done
    # the job was resumed before the HTTP app was built: /metrics still counts its run
    busy = [
        float(line.split()[-1])
        for line in again.get("/metrics").text.splitlines()
        if line.startswith("vibevoice_pool_worker_busy_seconds_total{")
    ]
    assert sum(busy) > 0.5, busy


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the tests below: a small admission queue, a fast sim."""
    tmp = tmp_path_factory.mktemp("jobs")
    s = Server(
        [*SIM, "--sim-rtf", "0.05", "--max-queue", "4", "--data-dir", str(tmp / "data")], tmp
    )
    s.data = tmp / "data"
    try:
        s.wait_ready(timeout=120)
        yield s
    finally:
        stop_and_reap(s)


def test_twenty_clients_submitting_at_once_all_get_an_id_and_finish(shared):
    barrier = threading.Barrier(20)
    answers: dict[int, httpx.Response] = {}

    def client(i: int) -> None:
        barrier.wait()
        answers[i] = httpx.post(
            f"{shared.url}/v1/jobs",
            json={"script": f"Speaker 1: client {i} says hello to everyone", "seed": i},
            timeout=60,
        )  # each without a token: each gets its own

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in answers.values()) == [202] * 20
    ids = {i: r.json()["id"] for i, r in answers.items()}
    assert len(set(ids.values())) == 20
    views = wait_finished(shared.url, ids.values())
    assert {v["state"] for v in views.values()} == {"done"}  # more jobs than the pool queue holds
    for i, job_id in ids.items():
        token = {"X-Owner-Token": answers[i].headers["x-owner-token"]}
        mine = httpx.get(f"{shared.url}/v1/jobs", headers=token, timeout=10).json()["data"]
        assert [j["id"] for j in mine] == [job_id] and mine[0]["seed"] == i


def test_a_retried_post_with_its_idempotency_key_gets_the_same_job_not_a_second(shared):
    """A client whose first answer was lost (a timeout, a dropped connection) sends the
    POST again: with the same Idempotency-Key it gets the job the first one made, even
    without the owner token that answer carried; the same key with another body is 409."""
    url, key = f"{shared.url}/v1/jobs", "retry-0123456789abcdef"
    body = {"script": "Speaker 1: a chapter sent twice."}
    first = httpx.post(url, json=body, headers={"Idempotency-Key": key}, timeout=60)
    again = httpx.post(url, json=body, headers={"Idempotency-Key": key}, timeout=60)
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert again.json()["id"] == first.json()["id"]
    token = first.headers["x-owner-token"]
    assert again.headers["x-owner-token"] == token  # the key's owner, the same both times
    mine = httpx.get(url, headers={"X-Owner-Token": token}, timeout=10).json()["data"]
    assert [j["id"] for j in mine] == [first.json()["id"]]  # one job, not two
    other = {"script": "Speaker 1: another chapter."}
    r = httpx.post(url, json=other, headers={"Idempotency-Key": key}, timeout=60)
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    r = httpx.post(url, json=other, headers={"Idempotency-Key": "short"}, timeout=60)
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["error"]["message"]
    wait_finished(shared.url, [first.json()["id"]])


def test_the_cli_sends_a_submission_whose_answer_was_lost_again_as_the_same_job(
    shared, tmp_path, capsys, monkeypatch
):
    """The job is written down but its answer never reaches `synth --async` (a read
    timeout): the command sends it again with its Idempotency-Key and follows the one job."""
    monkeypatch.setenv(jobs_client.OWNER_FILE_ENV, str(tmp_path / "owner-token"))
    real_post, sent = httpx.post, []

    def lost_once(*args, **kwargs):
        r = real_post(*args, **kwargs)  # the server has it
        sent.append(r.json()["id"])
        if len(sent) == 1:
            raise httpx.ReadTimeout("the answer was lost")
        return r

    monkeypatch.setattr(jobs_client.httpx, "post", lost_once)
    text = "Speaker 1: a submission whose answer goes missing"
    out = tmp_path / "out.wav"
    assert jobs_client.submit_and_follow(shared.url, {"script": text}, str(out)) == 0
    assert len(sent) == 2 and sent[0] == sent[1]  # the same job twice, not two jobs
    assert "sending it again" in capsys.readouterr().err
    assert len(sf.read(out)[0]) == samples_for(text)


def test_a_result_that_cannot_be_written_fails_its_job_and_the_server_serves_on(shared):
    results = shared.data / "results"
    kept = shared.data / "results-kept"
    results.rename(kept)
    results.write_text("a file where the results folder should be")  # every write: ENOTDIR
    try:
        failed = submit(shared.url, "Speaker 1: this one will not find its folder")
        view = wait_finished(shared.url, [failed])[failed]
    finally:
        results.unlink()
        kept.rename(results)
    assert view["state"] == "failed"
    assert view["error"]["code"] == "storage_error"
    assert "could not be written" in view["error"]["message"]
    assert "Not a directory" in view["error"]["message"]
    r = httpx.get(f"{shared.url}/v1/jobs/{failed}/audio", timeout=10)
    assert r.status_code == 410 and r.json()["error"]["code"] == "no_audio"
    assert "failed" in r.json()["error"]["message"]

    ok = submit(shared.url, "Speaker 1: and this one lands fine")
    assert wait_finished(shared.url, [ok])[ok]["state"] == "done"
    assert len(audio_of(shared.url, ok)) == samples_for("Speaker 1: and this one lands fine")
    assert httpx.get(f"{shared.url}/ready", timeout=10).status_code == 200


def test_a_client_gone_from_synthesize_loses_its_audio_but_a_job_keeps_it(shared):
    script = "Speaker 1: " + "a long story that takes some time to tell. " * 40  # ~115 s
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after a second
        httpx.post(
            f"{shared.url}/v1/synthesize",
            json={"script": script},
            timeout=httpx.Timeout(1.0, connect=30),
        )
    wait_until(lambda: "the client went away; cancelling" in shared.log(), 30, 0.2, "the cancel")

    job_id = submit(shared.url, script)  # and nobody waits on the answer
    assert wait_finished(shared.url, [job_id])[job_id]["state"] == "done"
    assert len(audio_of(shared.url, job_id)) == samples_for(script)


def test_the_cli_follows_a_job_to_a_file_and_lists_it(shared, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(jobs_client.OWNER_FILE_ENV, str(tmp_path / "owner-token"))
    out = tmp_path / "out.wav"
    text = "Speaker 1: the command line waits for this one"
    assert jobs_client.submit_and_follow(shared.url, {"script": text}, str(out)) == 0
    err = capsys.readouterr().err
    assert "submitted" in err and "█" in err and f"wrote {out}" in err
    pcm, _ = sf.read(out)
    assert len(pcm) == samples_for(text)
    assert jobs_client.list_jobs(shared.url) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("job") and " done " in table
    job_id = table.splitlines()[1].split()[0]
    assert jobs_client.show_job(shared.url, job_id) == 0
    assert job_id in capsys.readouterr().out
    assert jobs_client.follow(shared.url, "no-such-job", str(out)) == 1
    capsys.readouterr()
    # a job cut before its script's end (its view says max_audio, as a cut job's
    # does): written, and the terminal says so
    view = job(shared.url, job_id) | {"stop_reason": "max_audio"}
    assert jobs_client._download(shared.url, view, str(out), None) == 0
    assert "stops before the script's end (max_audio)" in capsys.readouterr().err
    assert len(sf.read(out)[0]) == samples_for(text)
    # the jobs are this user's: another owner token lists none of them
    assert (tmp_path / "owner-token").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(jobs_client.OWNER_FILE_ENV, str(tmp_path / "someone-else"))
    assert jobs_client.list_jobs(shared.url) == 0
    assert capsys.readouterr().out.strip() == "no jobs"


def test_a_job_the_server_stops_keeps_all_the_audio_it_made_for_the_next_start(
    sim_pool, tmp_path, monkeypatch
):
    """A stop (SIGTERM past its grace) cancels a running job and queues it for the next
    start, which goes on from its saved progress. That progress was only the last
    checkpoint (up to CHECKPOINT_S old: 20 s of audio at 20x real time, all made again);
    the stop now saves everything the job made. One checkpoint a run here (CHECKPOINT_S
    an hour): what was saved past the first chunk, the stop saved."""
    from jobs_fakes import build

    from vibevoice_pool.jobs import progress as progress_mod
    from vibevoice_pool.jobs.runner import JobRunner
    from vibevoice_pool.jobs.store import JobState, JobStore

    monkeypatch.setattr(progress_mod, "CHECKPOINT_S", 3600.0)
    with sim_pool(gpus="cpu:1", sim_rtf=0.2) as pool:
        store = JobStore.open(tmp_path / "data")
        r = JobRunner(store, pool, build, queue_depth=2).start()
        job = r.submit("me", {"script": "Speaker 1: " + "words to read " * 40})  # 37 s
        wait_until(lambda: r.describe(store.get(job.id))["progress"]["audio_s"] >= 5, 30, 0.01)
        made = r.describe(store.get(job.id))["progress"]["audio_s"]
        r.stop(grace_s=0)
        store = JobStore.open(tmp_path / "data")  # the stop closed it
        assert store.get(job.id).state is JobState.QUEUED
        req, prior = progress_mod.Progress(store.folder).resume(job.id, build({"script": "x"}))
        assert req.resume is not None and prior.on_disk == req.resume.samples
        assert prior.on_disk >= made * SAMPLE_RATE  # all it had made when it was stopped
