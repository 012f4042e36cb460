"""The parent's logging: JSON lines, and a log reader that stops reading never
stops the logging threads (records queue up; one listener writes them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, wait_until

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from vibevoice_pool import logs
    logs.setup("INFO", sys.argv[1])
    log = logging.getLogger("vibevoice_pool")
    for i in range(int(sys.argv[2])):
        log.info("line %d of the log", i, extra={"request_id": f"r{i}"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    print("logged", flush=True)
    sys.stdin.readline()  # the test says when to exit
    """
)


def run(fmt: str, n: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, fmt, str(n)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_json_lines_carry_the_request_id_and_the_traceback_and_all_are_written_at_exit():
    p = run("json", 2000)
    out, err = p.communicate("\n", timeout=60)
    assert p.returncode == 0 and out.strip() == "logged"
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert len(lines) == 2001
    assert [x["request_id"] for x in lines[:2000]] == [f"r{i}" for i in range(2000)]
    assert lines[5]["msg"] == "line 5 of the log" and lines[5]["level"] == "INFO"
    assert lines[-1]["msg"] == "it failed" and "ValueError: boom" in lines[-1]["exc"]


@pytest.mark.timeout(60)
def test_a_log_reader_that_stops_reading_does_not_block_the_logger():
    """100,000 lines (several MB) into a stderr pipe nobody reads: a logger that
    wrote stderr itself would block once the pipe's 64 KB are full."""
    p = run("text", 100_000)
    try:
        assert p.stdout.readline().strip() == "logged"  # reached while stderr is unread
        p.stdin.write("\n")
        p.stdin.flush()
        err = p.stderr.read()  # now read: the listener writes the rest, then exits
        assert p.wait(timeout=60) == 0
    finally:
        p.kill()
    lines = err.splitlines()
    assert lines[0].endswith("INFO line 0 of the log")
    assert sum(1 for x in lines if " INFO line " in x) == 100_000
    assert "ValueError: boom" in err


def test_with_json_logs_the_workers_lines_are_json_too():
    """Workers write to the same stderr as the parent: their lines were plain text
    among the JSON (`2026-... worker 0 ERROR engine failed to load: ...`), which
    a log shipper reading JSON lines cannot parse."""
    cmd = [sys.executable, "-m", "vibevoice_pool", "launch", "--engine", "sim", "--port", "0"]
    cmd += ["--gpus", "cpu:1", "--log-format", "json", "--sim-boot-error", "bad weights"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    lines = [json.loads(x) for x in p.stderr.splitlines()]  # every line is JSON
    own = [x for x in lines if x["msg"] == "engine failed to load: bad weights"]
    assert own and all(x["worker"] == 0 and x["level"] == "ERROR" for x in own)


def test_json_lines_about_a_worker_carry_its_worker_and_device(server):
    """An alert on a worker's death, or a count of requests per GPU, keys on fields of
    the JSON line. The request lines carried `worker`, but the lines of a worker's life
    (initialising, initialised, died, respawning) carried none: only the text said which
    worker, and the choice line named the worker but not its device ("GPU 1")."""
    s = server("--engine", "sim", "--gpus", "cpu:2", "--log-format", "json")
    r = s.post("/v1/synthesize", json={"script": "Speaker 1: Hello.", "seed": 1})
    assert r.status_code == 200
    chosen = int(r.headers["X-Worker"])
    victim = 1 - chosen
    os.kill(s.worker_pids()[victim], signal.SIGKILL)
    wait_until(lambda: s.log().count("initialised: SimEngine") >= 3, 60, what="a respawn")
    lines = [json.loads(x) for x in s.log().splitlines() if x.startswith("{")]

    def about(words: str) -> list[dict]:
        return [x for x in lines if words in x["msg"]]

    pick = about("🎯 Chose")[0]
    assert (pick["worker"], pick["device"]) == (chosen, f"cpu:{chosen}")
    died, respawning = about("died: killed by SIGKILL"), about("🔄 respawning")
    assert len(died) == 1 and len(respawning) == 1
    life = died + respawning + about("Initialising") + about("initialised:")
    assert len(life) == 8  # two boots, a death, a respawn, its boot
    for x in life:
        assert "worker" in x and x["device"] == f"cpu:{x['worker']}", x
    assert {x["worker"] for x in died + respawning} == {victim}
    done = about(f"request {r.headers['X-Request-Id']} done on ")
    assert len(done) == 1  # its times as fields: one search gives a request's story
    times = done[0]
    assert 0 <= times["queue_s"] <= times["first_audio_s"] <= times["total_s"]
    assert times["audio_s"] > 0 and times["request_id"] == r.headers["X-Request-Id"]


def test_json_lines_about_a_job_carry_its_job_id_and_request_id(server):
    """A job's lines (queued, running as request R, done) named the job only in their
    text: a log search by job, or from a job to the request lines of its run (the
    worker's choice, its death), had to parse messages. They now carry `job_id`, and
    the lines that name the run its `request_id`, the field the request lines have."""
    s = server("--engine", "sim", "--gpus", "cpu:1", "--log-format", "json")
    job = s.post("/v1/jobs", json={"script": "Speaker 1: Hello there.", "seed": 1}).json()
    wait_until(lambda: s.get(f"/v1/jobs/{job['id']}").json()["state"] == "done", 60, what="done")
    wait_until(lambda: f"job {job['id']} done" in s.log(), 10, what="the done line")
    lines = [json.loads(x) for x in s.log().splitlines() if x.startswith("{")]
    mine = [x for x in lines if x.get("job_id") == job["id"]]
    said = {x["msg"].split(" ")[2].rstrip(":") for x in mine}
    assert {"queued", "running", "done"} <= said, mine
    run = next(x for x in mine if " running as request " in x["msg"])
    request_id = run["msg"].rsplit(" ", 1)[1]
    assert run["request_id"] == request_id
    assert next(x for x in mine if " done: " in x["msg"])["request_id"] == request_id
    chose = [x for x in lines if "Chose" in x["msg"] and x.get("request_id") == request_id]
    assert len(chose) == 1  # the pool's line about the same run, joined by the field
