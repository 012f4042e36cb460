"""Tenants through real servers: keys with roles, voices owned by their uploader,
the OpenAI voice names held to the presets, the huge speaker number, jobs fair
between owners, and a data disk that is really full (a small tmpfs).
The key middleware's throttle runs in-process with a fake clock."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import subprocess
import time

import httpx
import pytest
from conftest import wait_until
from serving import running_server, wav_bytes

from vibevoice_pool.api.auth import ApiKeyMiddleware, key_ring
from vibevoice_pool.api.login_throttle import FailureLog

OPS, ALICE, BOB = "ops-key-0123456789abcdef", "alice-key-0123456789abcd", "bob-key-0123456789abcdef"
OPENAI_NAMES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage")


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("roles")
    keys = tmp / "keys"
    keys.write_text(f"alice: user: {ALICE}\nbob: {BOB}\n")  # bob has no role: a user
    # OPS is the single --api-key: an admin
    with running_server(tmp, "--api-keys", str(keys), "--sim-rtf", "0.002", api_key=OPS) as s:
        yield s


def test_user_keys_get_403_on_worker_actions_and_metrics(keyed):
    for key in (ALICE, BOB):
        for method, path, body in (
            ("POST", "/v1/pool/workers/0/restart", {}),
            ("POST", "/v1/pool/workers", {"device": "cpu"}),
            ("DELETE", "/v1/pool/workers/1", None),
            ("GET", "/metrics", None),
        ):
            r = httpx.request(method, keyed.url + path, json=body, headers=auth(key), timeout=10)
            assert r.status_code == 403, (key, method, path)
            assert r.json()["error"]["code"] == "admin_only"
    assert keyed.get("/metrics", headers=auth(OPS)).status_code == 200
    assert keyed.get("/v1/pool", headers=auth(BOB)).status_code == 200  # reading is for all
    assert (
        keyed.post(
            "/v1/synthesize", json={"script": "Speaker 1: hi"}, headers=auth(BOB)
        ).status_code
        == 200
    )


def test_a_wrong_key_from_another_site_is_judged_by_the_key_check(keyed):
    evil = {"Origin": "http://attacker.example", "Authorization": "Bearer wrong-key-guess"}
    r = keyed.post("/v1/synthesize", json={"script": "Speaker 1: hi"}, headers=evil)
    assert r.status_code == 401  # counted as a guess, not a 403 that tells it apart
    ok = keyed.post(
        "/v1/synthesize", json={"script": "Speaker 1: hi"}, headers={**evil, **auth(BOB)}
    )
    assert ok.status_code == 200


def test_a_users_voice_is_its_own_and_presets_are_the_admins(keyed):
    sample = base64.b64encode(wav_bytes(1.0)).decode()
    up = {"name": "alice-voice", "audio": sample}
    assert keyed.post("/v1/voices", json=up, headers=auth(ALICE)).status_code == 201
    over = keyed.post("/v1/voices", json={**up, "overwrite": True}, headers=auth(BOB))
    assert over.status_code == 403 and over.json()["error"]["code"] == "forbidden"
    gone = httpx.delete(keyed.url + "/v1/voices/alice-voice", headers=auth(BOB), timeout=10)
    assert gone.status_code == 403
    preset = httpx.delete(keyed.url + "/v1/voices/demo-Bob_man", headers=auth(ALICE), timeout=10)
    assert preset.status_code == 403 and "preset" in preset.json()["error"]["message"]
    again = keyed.post("/v1/voices", json={**up, "overwrite": True}, headers=auth(ALICE))
    assert again.status_code == 201  # its own: overwritten
    mine = httpx.delete(keyed.url + "/v1/voices/alice-voice", headers=auth(ALICE), timeout=10)
    assert mine.status_code == 200
    keyed.post("/v1/voices", json=up, headers=auth(ALICE))
    ops = httpx.delete(keyed.url + "/v1/voices/alice-voice", headers=auth(OPS), timeout=10)
    assert ops.status_code == 200  # an admin may remove any voice


def _voices_played(s, key: str) -> dict[str, str]:
    out = {}
    for name in OPENAI_NAMES:
        body = {"model": "tts-1", "input": "hi", "voice": name, "response_format": "wav"}
        r = s.post("/v1/audio/speech", json={**body, "stream": False}, headers=auth(key))
        assert r.status_code == 200, r.text
        out[name] = r.headers["x-voice"]
    return out


def test_the_openai_names_stay_on_the_presets_when_voices_are_uploaded(keyed):
    before = _voices_played(keyed, BOB)
    assert set(before.values()) <= {
        "demo-Alice_woman",
        "demo-Bob_man",
        "demo-Carol_woman",
        "demo-Dave_man",
    }
    sample = base64.b64encode(wav_bytes(1.0)).decode()
    for name in ("e", "a", "aaa-first"):  # would match "echo"... or sort first
        r = keyed.post("/v1/voices", json={"name": name, "audio": sample}, headers=auth(ALICE))
        assert r.status_code == 201
    taken = keyed.post("/v1/voices", json={"name": "Alloy", "audio": sample}, headers=auth(OPS))
    assert taken.status_code == 400 and "OpenAI voice name" in taken.json()["error"]["message"]
    assert _voices_played(keyed, BOB) == before
    for name in ("e", "a", "aaa-first"):
        httpx.delete(keyed.url + f"/v1/voices/{name}", headers=auth(ALICE), timeout=10)


def test_a_huge_speaker_number_is_a_clear_400_on_every_route(keyed):
    for digits in ("1" * 4301, "\u0661" * 4301):  # ASCII and Arabic-Indic
        script = "Speaker " + digits + ": hi"
        for path, body in (
            ("/v1/synthesize", {"script": script}),
            ("/v1/jobs", {"script": script}),
            ("/v1/audio/speech", {"model": "tts-1", "input": script, "voice": "alloy"}),
        ):
            r = keyed.post(path, json=body, headers=auth(ALICE))
            assert r.status_code == 400, (path, r.status_code, r.text[:200])
            assert "out of range" in r.json()["error"]["message"]
    assert keyed.get("/health").status_code == 200


# ---- wrong keys are throttled per address -------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_wrong_api_keys_are_throttled_per_address_and_spare_the_others():
    clock = Clock()
    ring = key_ring(OPS)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    mw = ApiKeyMiddleware(app, ring, failures=FailureLog(clock=clock))

    def call(key: str, address: str) -> tuple[int, dict]:
        got: dict = {}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                got["status"], got["headers"] = message["status"], dict(message["headers"])

        headers = [(b"authorization", f"Bearer {key}".encode())]
        scope = {"type": "http", "method": "GET", "path": "/v1/pool", "headers": headers}
        asyncio.run(mw({**scope, "client": (address, 1)}, receive, send))
        return got["status"], got["headers"]

    assert [call(f"guess-{i}", "10.0.0.9")[0] for i in range(8)] == [401] * 8
    status, headers = call(OPS, "10.0.0.9")  # locked: the right key waits too
    assert status == 429 and int(headers[b"retry-after"]) == 300
    assert call(OPS, "10.0.0.10")[0] == 200  # another address: the operator gets in
    clock.t += 301
    assert call(OPS, "10.0.0.9")[0] == 200


# ---- jobs: fairness between owners ------------------------------------------------


def test_another_owners_job_starts_within_30_s_behind_150_long_jobs(tmp_path):
    long_script = "Speaker 1: " + "one more long sentence for the queue. " * 380  # ~14,400 chars
    args = ("--gpus", "cpu:2", "--max-batch-size", "2", "--sim-rtf", "0.05")
    args += ("--jobs-owner-disk-mb", "100000", "--jobs-disk-limit-mb", "200000")
    with running_server(tmp_path, *args) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        first = c.post("/v1/jobs", json={"script": long_script, "format": "opus"})
        assert first.status_code == 202, first.text
        hers = {"X-Owner-Token": first.headers["x-owner-token"]}
        c.cookies.clear()
        for _ in range(149):
            r = c.post("/v1/jobs", json={"script": long_script, "format": "opus"}, headers=hers)
            assert r.status_code == 202, r.text
        c.cookies.clear()
        assert first.json()["progress"]["estimate_s"] > 600  # each holds a worker for minutes
        t0 = time.monotonic()
        other = c.post("/v1/jobs", json={"script": "Speaker 1: my one line", "format": "wav"})
        assert other.status_code == 202
        job_id = other.json()["id"]
        while time.monotonic() - t0 < 30:
            view = c.get(f"/v1/jobs/{job_id}").json()
            if view["state"] in ("running", "done") and view["timings"]["started_at"]:
                break
            time.sleep(0.2)
        waited = time.monotonic() - t0
        assert view["state"] in ("running", "done"), view
        print(f"another owner's job started after {waited:.2f} s behind 150 long jobs")
        listed = c.get("/v1/jobs", params={"state": "running"}, headers=hers).json()["data"]
        assert 1 <= len(listed) <= 3  # four rows in the pool: one owner holds all but one


# ---- a data disk that is really full ----------------------------------------------


@contextlib.contextmanager
def small_disk(path, size_mb: int):
    """A tmpfs of size_mb at path (root only, as CI runs)."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(
            "a real full disk needs root to mount a small tmpfs (the store's tests "
            "fill SQLite itself without root)"
        )
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)])
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs is refused here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder) -> None:
    """Write until the disk refuses. Unbuffered: a buffered file would keep the part of
    the last block that did not fit and raise ENOSPC again when it closes."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb", buffering=0) as f:
        while f.write(b"\0" * 65536):
            pass


def test_on_a_full_data_disk_jobs_get_507_synthesis_serves_and_the_server_restarts(tmp_path):
    with small_disk(tmp_path / "disk", 16) as disk:
        data = disk / "data"
        args = ("--data-dir", str(data), "--sim-rtf", "0.002")
        with running_server(tmp_path, *args) as s:
            before = s.post("/v1/jobs", json={"script": "Speaker 1: before"})
            assert before.status_code == 202
            owner = {"X-Owner-Token": before.headers["x-owner-token"]}
            url = f"/v1/jobs/{before.json()['id']}"
            # done before the disk fills (a result that meets a full disk waits for room)
            wait_until(lambda: s.get(url, headers=owner).json()["state"] == "done", 30, 0.05)
            fill(disk)
            refused = s.post("/v1/jobs", json={"script": "Speaker 1: on a full disk"})
            assert refused.status_code == 507, refused.text
            assert refused.json()["error"]["code"] in ("disk_full", "disk_limit")
            assert s.post("/v1/synthesize", json={"script": "Speaker 1: hi"}).status_code == 200
            running = s.get("/v1/jobs", params={"state": "running"}).json()["data"]
            assert running == []  # no job stays running without a worker
            (disk / "filler").unlink()
            after = s.post("/v1/jobs", json={"script": "Speaker 1: room again"})
            assert after.status_code == 202
        fill(disk)  # a restart on the full disk
        with running_server(tmp_path, *args) as s:
            assert s.post("/v1/synthesize", json={"script": "Speaker 1: hi"}).status_code == 200
            jobs = s.post("/v1/jobs", json={"script": "Speaker 1: still full"})
            assert jobs.status_code in (503, 507), jobs.text
            assert jobs.json()["error"]["code"] in ("jobs_unavailable", "disk_full", "disk_limit")


def test_a_disk_that_fills_while_a_job_runs_keeps_its_saved_progress_and_the_job_finishes(
    tmp_path,
):
    """The running job's checkpoint meets a full disk: the job goes on, what it saved
    stays on disk (a restart would resume from it), the audio past it waits in memory,
    and once there is room it is appended and the result is whole. It used to lose the
    job: the write's OSError ended the runner's follow ('the server lost track of this
    job'), left the request running in the pool unread, and left the progress files
    filling the disk, the job 'running' until space came back. Then the files were
    dropped, the whole audio kept in memory (jobs/job_audio.py)."""
    with small_disk(tmp_path / "disk", 16) as disk:
        data = disk / "data"
        body = {"script": "Speaker 1: " + "a long line of speech " * 40, "format": "pcm"}
        with running_server(tmp_path, "--data-dir", str(data), "--sim-rtf", "0.1") as s:
            made = s.post("/v1/jobs", json={**body, "seed": 5})
            job, owner = made.json()["id"], {"X-Owner-Token": made.headers["x-owner-token"]}
            progress = data / "progress" / f"{job}.pcm"
            wait_until(lambda: progress.exists() and progress.stat().st_size, 20, 0.05)
            fill(disk)
            refused = "its progress could not be saved"
            wait_until(lambda: refused in s.log(), 10, 0.05, "a refused save")
            assert progress.stat().st_size  # the prefix it saved stays
            (disk / "filler").unlink()

            def ended():
                view = s.get(f"/v1/jobs/{job}", headers=owner).json()
                return view if view["state"] in ("done", "failed", "cancelled") else None

            view = wait_until(ended, 60, 0.2, "the job to end")
            assert view["state"] == "done", view
            audio = s.get(f"/v1/jobs/{job}/audio", headers=owner).content
            clean = s.post("/v1/synthesize", json={**body, "seed": 5}).content
            assert audio == clean  # whole, nothing lost or repeated
            assert list((data / "progress").iterdir()) == []
            assert "lost track" not in s.log()
