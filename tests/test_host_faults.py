"""Faults of the host the server shares, caused for real where a test can: /dev/shm
full, the open-file limit reached, a full disk (a file size limit), two servers
sharing a folder; and the wall clock stepped back (read from the code: a test
cannot step the system clock, so the view gets the stepped time)."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import ROOT, free_port, wait_until

SIM_ONE = ("--engine", "sim", "--gpus", "cpu:1")


def counted(s, name: str, **labels) -> float:
    """The server's /metrics sample `name` with `labels` (0 when it has none)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(s.get("/metrics").text)
    samples = [x for f in families for x in f.samples if x.name == name]
    return sum(x.value for x in samples if labels.items() <= x.labels.items())


@contextlib.contextmanager
def file_size_limit(pid: int, limit: int):
    """The process's file size limit (RLIMIT_FSIZE) set to `limit` bytes inside the
    block: a write past it fails with EFBIG, as on a full disk."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


def lowest_free_fd(pid: int) -> int:
    """The number the process's next file handle would take: as its open-file limit,
    every further open fails with EMFILE (the limit caps the number, not the count)."""
    held = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(held) + 1) if n not in held)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a mount namespace of its own (a full /dev/shm) needs root and unshare",
)
def test_a_full_dev_shm_is_refused_at_start_with_a_message(tmp_path):
    """A full /dev/shm used to kill the launch with SIGBUS at the status board's first
    write (its file is made and sized in a full tmpfs all the same): no message,
    exit -7. Now the launch says what is full and exits 2."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace here (unshare -m refused)")
    fill = (
        "mount -t tmpfs -o size=64k tmpfs /dev/shm"
        ' && dd if=/dev/zero of=/dev/shm/fill bs=4k count=16 2>/dev/null; exec "$@"'
    )
    launch = [sys.executable, "-m", "vibevoice_pool", "launch", *SIM_ONE]
    launch += ["--port", str(free_port()), "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", fill, "sh", *launch],
        cwd=ROOT,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "no room in shared memory (/dev/shm) for the status board" in out
    assert "--shm-size" in out


def test_a_worker_respawns_once_the_open_file_limit_frees(server):
    """A worker that died while the parent held every file handle it may: the
    respawn's pipe raised EMFILE in the supervisor's thread, which died, and the slot
    read `starting` for ever. Now the start is a failed boot (with the limit named),
    retried after the backoff, and the worker comes back once handles free."""
    s = server(*SIM_ONE, "--backoff-cap-s", "1", "--boot-failures-to-fail", "1000")
    old = s.worker_pids()[0]
    soft, hard = resource.prlimit(s.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(s.proc.pid, resource.RLIMIT_NOFILE, (lowest_free_fd(s.proc.pid), hard))
    try:
        os.kill(old, signal.SIGKILL)
        wait_until(
            lambda: "could not start" in s.log() or "Exception in thread supervisor" in s.log(),
            30,
            what="the respawn to meet the open-file limit",
        )
    finally:
        resource.prlimit(s.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert "open-file limit" in s.log()

    def back() -> bool:
        w = s.get("/v1/pool").json()["workers"][0]
        return w["state"] == "ready" and w["pid"] not in (None, old)

    wait_until(back, 60, 0.2, "a new worker to be ready")
    assert s.post("/v1/synthesize", json={"script": "Speaker 1: back again"}).status_code == 200
    # what an operator alerts on: boots that failed for lack of file handles, on worker 0
    name = "vibevoice_pool_worker_boot_failures_total"
    assert counted(s, name, worker="0", device="cpu:0", reason="file_handles") >= 1
    assert counted(s, name, reason="load") == counted(s, name, reason="start") == 0


MONITOR_SCRIPT = textwrap.dedent(
    """
    import os, resource, sys, time
    from vibevoice_pool.pool.monitor import Monitor
    from workers.wire.board import Col, StatusBoard

    board = StatusBoard.create(1)
    mon = Monitor(board, lambda: [(0, None, os.getpid())], None, interval_s=0.02)
    mon.start()
    while board.get(0, Col.MEM_USED) == 0:
        time.sleep(0.01)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    free = os.open(os.devnull, os.O_RDONLY)  # the lowest free number
    os.close(free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))
    time.sleep(0.5)  # every sample meets EMFILE
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    board.set(0, Col.MEM_USED, 0)
    deadline = time.monotonic() + 10
    while board.get(0, Col.MEM_USED) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    print("sampled again" if board.get(0, Col.MEM_USED) > 0 else "monitor gone")
    mon.stop()
    board.close()
    """
)


def test_the_monitor_samples_again_after_the_open_file_limit_frees(tmp_path):
    """psutil's EMFILE is a plain OSError, which ended the monitor's thread: the
    board's memory and utilisation columns froze for the rest of the run. Now a
    failed sample is logged once and the next one goes on."""
    done = subprocess.run(
        [sys.executable, "-c", MONITOR_SCRIPT],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "sampled again" in done.stdout, done.stdout + done.stderr


def test_a_request_body_the_disk_has_no_room_for_is_answered_503(server):
    """A large body waits in $TMPDIR; a write there that fails (a full disk, here the
    file size limit: EFBIG) escaped the spool as a 500 `internal_error` with a
    traceback in the log. Now it is a 503 that names the folder, and the server
    serves on."""
    s = server(*SIM_ONE)
    body = {"script": "Speaker 1: hi", "speakers": [{"audio": "A" * (1 << 20)}]}
    with file_size_limit(s.proc.pid, 256 << 10):
        r = s.post("/v1/synthesize", json=body)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "overloaded" and "no room for this request body" in error["message"]
    assert r.headers["retry-after"] == "5"
    assert "Traceback" not in s.log()
    # what an operator alerts on: the temporary folder's disk had no room
    assert counted(s, "vibevoice_pool_disk_full_total", folder="tmp") == 1
    assert counted(s, "vibevoice_pool_refused_total", reason="overloaded") == 1
    assert s.log().count("No room on the disk of the tmp folder") == 1
    assert s.post("/v1/synthesize", json={"script": "Speaker 1: still here"}).status_code == 200


def test_a_voice_the_disk_has_no_room_for_is_answered_507(server):
    """A voice upload whose write to the voices folder failed (a full disk, here the
    file size limit: EFBIG) was a 500 `internal_error`; now 507 `disk_full` naming
    the folder, the voice is not listed, and the same upload works once there is room."""
    from serving import wav_bytes

    s = server(*SIM_ONE)
    upload = {"files": {"file": ("v.wav", wav_bytes(1.0), "audio/wav")}, "data": {"name": "roomy"}}
    with file_size_limit(s.proc.pid, 8 << 10):
        r = s.post("/v1/voices", **upload)
        again = s.post("/v1/voices", **upload)  # the log says it once, not per request
    assert r.status_code == again.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "disk_full" and "voices folder" in error["message"]
    assert "roomy" not in [v["name"] for v in s.get("/v1/voices").json()["voices"]]
    assert s.post("/v1/voices", **upload).status_code == 201
    assert counted(s, "vibevoice_pool_disk_full_total", folder="voices") == 2
    assert counted(s, "vibevoice_pool_refused_total", reason="disk_full") == 2
    assert counted(s, "vibevoice_pool_disk_full_total", folder="tmp") == 0
    said = [x for x in s.log().splitlines() if "No room on the disk of the voices folder" in x]
    assert len(said) == 1 and "1 request(s) refused" in said[0], said


def test_a_job_the_store_has_no_room_for_is_answered_507(server):
    """A job whose write to the job store failed at the file size limit (RLIMIT_FSIZE:
    SQLite says only "disk I/O error" for EFBIG) was a 500 `storage_error`; now 507
    `disk_full` naming the limit, counted as the data folder's, and the same job is
    taken once the limit is raised."""
    s = server(*SIM_ONE)
    job = {"script": "Speaker 1: a job for a store at its limit"}
    with file_size_limit(s.proc.pid, 8 << 10):
        r = s.post("/v1/jobs", json=job)
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "disk_full" and "file size limit" in error["message"], error
    assert counted(s, "vibevoice_pool_disk_full_total", folder="data") == 1
    assert "Traceback" not in s.log()
    assert s.post("/v1/jobs", json=job).status_code == 202


UPLOADER_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from serving import wav_bytes
    from vibevoice_pool.voices.library import VoiceLibrary

    lib = VoiceLibrary(sys.argv[1], max_bytes=1 << 20, max_seconds=10)
    save = lib._save_owners

    def stop_then_save(owners):  # stopped between reading the owners and writing them
        os.kill(os.getpid(), signal.SIGSTOP)
        save(owners)

    lib._save_owners = stop_then_save
    lib.add("from-server-a", wav_bytes(0.5), owner="alice")
    """
)


def test_two_servers_sharing_a_voices_folder_keep_each_others_owners(tmp_path):
    """Two pools on one host share the voices folder by default (the data folder
    is refused, and the refusal says to pass another --data-dir). Each server
    read the owners file, added its voice and wrote it back under a lock of its
    own process only: an upload of one landing inside the other's lost its owner,
    so it became a preset, offered to every caller and to the OpenAI voice names.
    Now the folder's lock (flock) makes the servers take turns. The first server
    is a real process, stopped (SIGSTOP) between reading and writing the owners."""
    from serving import wav_bytes

    from vibevoice_pool.voices.library import VoiceLibrary

    folder = tmp_path / "voices"
    folder.mkdir()
    a = subprocess.Popen(
        [sys.executable, "-c", UPLOADER_SCRIPT, str(folder)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}"),
    )
    try:
        wait_until(lambda: _state(a.pid) == "T", 30, what="server A to stop mid-upload")
        b = VoiceLibrary(folder, max_bytes=1 << 20, max_seconds=10)
        second = threading.Thread(
            target=b.add, args=("from-server-b", wav_bytes(0.5)), kwargs={"owner": "bob"}
        )
        second.start()
        second.join(5)  # the old code finished here; the new waits for A's turn to end
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(30) == 0
        second.join(30)
    finally:
        if a.poll() is None:
            a.kill()
    owners = VoiceLibrary(folder, max_bytes=1 << 20, max_seconds=10)
    assert owners.owner("from-server-a") == "alice"
    assert owners.owner("from-server-b") == "bob"
    assert "from-server-b" not in owners.presets()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_job_view_never_reads_negative_times_when_the_clock_steps_back():
    """A job's times are wall-clock times (they outlive the process, unlike the
    monotonic clock). With the system clock stepped back an hour (NTP, an operator)
    a running job's view read `ran_s` -3,600 and a queued one's `waited_s` below
    zero; both now read 0 until the clock catches up."""
    from vibevoice_pool.jobs.records import Job, JobState
    from vibevoice_pool.jobs.view import job_view

    created = 1_800_000_000.0
    row = dict(owner="o", format="wav", seed=1, est_audio_s=10.0, est_bytes=1, runs=1)
    row |= dict(request_id="r", worker=0, audio_s=0.0, compute_s=None, result_path=None)
    row |= dict(result_bytes=0, error_code=None, error=None, finished_count=0, stop_reason=None)
    running = Job("a", state=JobState.RUNNING, created_at=created, started_at=created + 5,
                  finished_at=None, **row)  # fmt: skip
    queued = Job("b", state=JobState.QUEUED, created_at=created, started_at=None,
                 finished_at=None, **row)  # fmt: skip
    stepped_back = created - 3600
    ran = job_view(running, 1.0, 0, now=stepped_back, ttl_s=60)["timings"]
    waited = job_view(queued, 0.0, None, now=stepped_back, ttl_s=60)["timings"]
    assert ran["ran_s"] == 0.0 and ran["waited_s"] == 5.0
    assert waited["waited_s"] == 0.0
