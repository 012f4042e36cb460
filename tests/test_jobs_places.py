"""A job whose row gives its place up while it runs (preempted by interactive requests)
on a real `vibevoice-pool launch` process with sim workers: what its view, the list's
state filter and the terminal command's line say while it waits to resume."""

from __future__ import annotations

import threading

import httpx
import pytest
from conftest import wait_until

from vibevoice_pool.jobs.client import _progress_line

pytestmark = pytest.mark.slow

LONG = "Speaker 1: " + "a long audiobook chapter, read slowly. " * 24  # about 60 s of audio
# an interactive answer long enough (about 8 s of audio, 4 s at this sim's speed) that a
# busy machine's poll still sees the jobs it preempts waiting, and the list agreeing
CHAT = "Speaker 1: " + "an answer that takes a few seconds. " * 3


def test_a_preempted_job_shows_queued_waiting_until_a_worker_begins_it_again(server, tmp_path):
    # every place (2 workers x 2 rows) held by one owner's jobs, at 0.5 s a second of audio
    args = ("--engine", "sim", "--gpus", "cpu:2", "--max-batch-size", "2", "--sim-rtf", "0.5")
    s = server(*args, "--jobs-owner-running", "4", "--data-dir", str(tmp_path / "data"))
    c = httpx.Client(base_url=s.url, timeout=60)  # keeps the owner cookie
    ids = []
    for _ in range(4):
        r = c.post("/v1/jobs", json={"script": LONG})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])

    def views():
        return {i: c.get(f"/v1/jobs/{i}").json() for i in ids}

    wait_until(lambda: all(v["state"] == "running" for v in views().values()), 60, 0.1)

    def under_way():  # each has run a while: 4 s of audio, and the runner's ETA for it
        now = views()
        ok = all(
            v["progress"]["audio_s"] >= 4 and (v["progress"]["eta_s"] or 0) > 0
            for v in now.values()
        )
        return now if ok else None

    before = wait_until(under_way, 60, 0.1, "every job to have run a while")
    chats = [  # two interactive requests take two jobs' places
        threading.Thread(target=c.post, args=("/v1/synthesize",), kwargs={"json": {"script": s}})
        for s in (CHAT, CHAT.replace("answer", "reply"))
    ]
    for t in chats:
        t.start()

    def some_waiting():
        now = views()
        return {i: v for i, v in now.items() if v["state"] == "queued"} or None

    waiting = wait_until(some_waiting, 30, 0.05, "a preempted job")
    for job_id, v in waiting.items():
        assert v["waiting"]["reason"] == "preempted", v
        assert v["worker"] is None and v["progress"]["eta_s"] is None
        assert v["progress"]["audio_s"] >= before[job_id]["progress"]["audio_s"]  # kept
        assert v["timings"]["started_at"] == before[job_id]["timings"]["started_at"]
        assert "preempted" in _progress_line(v, 0.0)

    def listed():  # the list's filter agrees once the store has heard it (a tick)
        queued = {j["id"] for j in c.get("/v1/jobs?state=queued").json()["data"]}
        running = {j["id"] for j in c.get("/v1/jobs?state=running").json()["data"]}
        return queued and queued <= set(waiting) and not queued & running

    wait_until(listed, 10, 0.05, "the list to show the preempted jobs queued")
    for t in chats:
        t.join(60)

    def all_running_again():
        now = views()
        return now if all(v["state"] == "running" for v in now.values()) else None

    again = wait_until(all_running_again, 60, 0.05, "the jobs running again")
    for job_id in waiting:
        v = again[job_id]
        assert v["waiting"] is None and v["worker"] is not None
        assert v["timings"]["started_at"] == before[job_id]["timings"]["started_at"]
    wait_until(lambda: len(c.get("/v1/jobs?state=running").json()["data"]) == 4, 10, 0.05)
    for job_id in ids:  # done with them: cancelled and forgotten
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 200
