"""The container image, built here offline and served from: the base made by
debootstrap, the CPU image built from the Containerfile by buildah, the server
started by the image's own entry point (tini, `vibevoice-pool launch`) on the
tiny model, configured only through VIBEVOICE_POOL_<NAME> variables.

Marked `container`: `make test-image` runs it (.ci/run does, after `make test`);
plain `make test` leaves it out (conftest.py). It takes several minutes (the
image build) and needs root; tests/container_build.py does the building.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time

import container_build as cb
import httpx
import psutil
import pytest
import soundfile
from conftest import ROOT, free_port, pid_alive, wait_until

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

TAG = "localhost/vibevoice-pool:test-cpu"
KEY = "container-test-key-0123456789"
MAX_AUDIO_S = 6.0


@pytest.fixture(scope="module")
def store():
    why = cb.unavailable()
    if why:
        pytest.skip(why)
    s = cb.Store(cb.scratch_dir())
    try:
        yield s
    finally:
        s.remove()


@pytest.fixture(scope="module")
def image(store):
    """The CPU image, built from the Containerfile on a debootstrapped base."""
    t0 = time.monotonic()
    store.make_base()
    t_base = time.monotonic() - t0
    settings = cb.pip_settings()
    args, mounts = {"TORCH_VARIANT": "cpu"}, []
    wheels = cb.torch_wheel_folder(settings)
    if wheels is not None:  # torch's CPU wheel on this disk: no index needed for it
        mounts.append(f"{wheels}:/run/wheels:ro")
        args |= {"PIP_FIND_LINKS": "/run/wheels", "TORCH_CPU_INDEX": ""}
    cert = cb.ca_bundle(settings)
    if cert is not None:  # a TLS-inspecting proxy signs with a CA only the host trusts
        mounts.append(f"{cert}:/run/host-ca.crt:ro")
        args["PIP_CERT"] = "/run/host-ca.crt"
    store.build(ROOT, TAG, args, mounts)
    size = store.image_size(TAG)
    took = time.monotonic() - t0
    print(f"\n{TAG}: {size} bytes; base {t_base:.0f} s, build {took - t_base:.0f} s")
    return TAG


class Served:
    """The image's entry point running in a buildah container."""

    def __init__(self, store: cb.Store, tag: str):
        self.store = store
        self.config = store.image_config(tag)
        self.ctr = store.container(tag)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {  # every setting from the environment, none from flags
            "VIBEVOICE_POOL_PORT": str(self.port),
            "VIBEVOICE_POOL_TINY_MODEL": "true",
            "VIBEVOICE_POOL_GPUS": "cpu:1",
            "VIBEVOICE_POOL_API_KEY": KEY,
            "VIBEVOICE_POOL_MAX_AUDIO_S": str(MAX_AUDIO_S),
            "VIBEVOICE_POOL_GRACE_S": "60",
            "TINI_SUBREAPER": "1",  # tini is not PID 1 under buildah run
        }
        self.log_path = store.logs / "server.log"
        self._log = open(self.log_path, "w")
        argv = self.config["Entrypoint"] + (self.config.get("Cmd") or [])
        self.proc = store.run(self.ctr, argv, self.env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def get(self, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}"}
        return httpx.get(self.url + path, headers=headers, timeout=10, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}"}
        return httpx.post(self.url + path, headers=headers, timeout=120, **kw)

    def processes(self) -> list[psutil.Process]:
        """The container's processes, as the host sees them (chroot shares the PID space)."""
        return psutil.Process(self.proc.pid).children(recursive=True)

    def entry(self) -> psutil.Process:
        """The image's PID 1: the process of the entry point's first word (tini)."""
        first = self.config["Entrypoint"][0]
        return next(p for p in self.processes() if p.cmdline()[:1] == [first])

    def server(self) -> psutil.Process:
        """`vibevoice-pool launch`, the one child of tini."""
        (child,) = self.entry().children()
        return child

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()
        self.store.tool("buildah", "rm", self.ctr)


@pytest.fixture(scope="module")
def served(store, image):
    s = Served(store, image)

    def ready():
        if s.proc.poll() is not None:
            raise AssertionError(f"the container exited {s.proc.returncode}:\n{s.log()}")
        try:
            r = httpx.get(s.url + "/ready", timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json()["ready"]

    try:
        wait_until(ready, 300, 0.5, "the server in the container to be ready")
        yield s
    finally:
        s.stop()


def test_the_image_runs_as_a_user_with_volumes_and_a_health_check(store, image):
    config = store.image_config(image)
    # A number, not a name: Kubernetes' runAsNonRoot cannot check a name.
    uid, _, gid = config["User"].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, config["User"]
    assert set(config["Volumes"]) == {"/models", "/voices", "/data"}
    assert config["Entrypoint"][0].endswith("/tini")  # PID 1 passes SIGTERM on
    assert config["Healthcheck"]["Test"] == ["CMD", "vibevoice-pool", "health"]


def test_ready_answers_and_a_synthesis_is_wav_audio(served):
    r = httpx.get(served.url + "/ready", timeout=5)  # open without the key
    assert r.status_code == 200 and r.json()["ready_workers"] == 1
    r = served.post("/v1/synthesize", json={"script": "Speaker 1: hello from the container"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav" and r.content[:4] == b"RIFF"
    audio, rate = soundfile.read(io.BytesIO(r.content))
    assert rate == 24000 and len(audio) > 3200 and abs(audio).max() > 0


def test_the_health_check_passes_inside_the_container(store, served):
    check = served.config["Healthcheck"]["Test"]
    assert check[0] == "CMD"
    # The image's environment names 7860; the server listens elsewhere (its own
    # VIBEVOICE_POOL_PORT, as `--port` would): the check finds it where it said it listens.
    assert served.port != 7860
    ok = store.run(served.ctr, check[1:], {}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert ok.wait(60) == 0, ok.stderr.read()
    assert f":{served.port}: ready" in ok.stdout.read().decode()
    env = {"VIBEVOICE_POOL_URL": f"http://127.0.0.1:{free_port()}"}  # nothing there: unhealthy
    bad = store.run(served.ctr, check[1:], env, stderr=subprocess.DEVNULL)
    assert bad.wait(60) != 0


def test_the_server_and_its_workers_run_as_the_unprivileged_user(store, served):
    uid = int(
        store.tool(
            "buildah", "run", "--isolation", "chroot", served.ctr, "--", "id", "-u"
        ).stdout.strip()
    )
    assert uid != 0
    workers = [w["pid"] for w in served.get("/v1/pool").json()["workers"]]
    assert workers and all(workers)
    for p in [served.entry(), served.server(), *map(psutil.Process, workers)]:
        assert p.uids().real == p.uids().effective == uid, p.cmdline()


def test_settings_from_environment_variables_take_effect(served):
    # The port: nothing but $VIBEVOICE_POOL_PORT says where to listen.
    assert served.port != 7860 and "--port" not in " ".join(served.server().cmdline())
    # The key: the API refuses a call without it.
    r = httpx.get(served.url + "/v1/pool", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    # The audio cap: a long script is cut at $VIBEVOICE_POOL_MAX_AUDIO_S.
    long_script = "Speaker 1: " + "a long sentence that goes on and on, " * 30
    r = served.post("/v1/synthesize", json={"script": long_script})
    assert r.status_code == 200
    assert float(r.headers["x-audio-seconds"]) <= MAX_AUDIO_S + 0.2


def test_sigterm_to_pid_1_drains_the_request_in_flight_and_exits_0(served):
    workers = [w["pid"] for w in served.get("/v1/pool").json()["workers"]]
    results = []
    long_script = "Speaker 1: " + "a long sentence that goes on and on, " * 30
    t = threading.Thread(
        target=lambda: results.append(served.post("/v1/synthesize", json={"script": long_script}))
    )
    t.start()
    wait_until(
        lambda: sum(w["inflight"] for w in served.get("/v1/pool").json()["workers"]) >= 1,
        30,
        what="the request to be in flight",
    )
    served.entry().send_signal(signal.SIGTERM)  # what `docker stop` sends
    t.join(120)
    assert served.proc.wait(90) == 0, served.log()
    assert len(results) == 1 and results[0].status_code == 200
    audio, _ = soundfile.read(io.BytesIO(results[0].content))
    assert len(audio) / 24000 >= MAX_AUDIO_S - 0.5  # the whole answer, not a cut one
    wait_until(lambda: not any(pid_alive(p) for p in workers), 20, what="the workers to exit")
    assert "Stopped." in served.log()


def test_a_read_only_root_with_tini_as_pid_1_serves_drains_and_reaps(store, image):
    """As `docker run --read-only --tmpfs /tmp --shm-size 1m` (or a pod with
    readOnlyRootFilesystem and /tmp as an emptyDir) runs the image, which DEPLOY.md
    offers: the server writes only its volumes, /tmp and a little /dev/shm. tini is
    PID 1 for real here: a worker whose zygote died is its child then, and it must
    reap it (the server itself does not: without tini it stays a zombie)."""
    config = store.image_config(image)
    uid, _, gid = config["User"].partition(":")
    ctr = store.container(image)
    volumes = {}
    for path in config["Volumes"]:
        volumes[path] = store.root / ("volume" + path.replace("/", "-"))
        volumes[path].mkdir()
        os.chown(volumes[path], int(uid), int(gid))
    port = free_port()
    env = {
        "HOME": "/home/vibevoice",
        "VIBEVOICE_POOL_HOST": "127.0.0.1",
        "VIBEVOICE_POOL_PORT": str(port),
        "VIBEVOICE_POOL_TINY_MODEL": "true",
        "VIBEVOICE_POOL_GPUS": "cpu:2",
    }
    url = f"http://127.0.0.1:{port}"
    log_path = store.logs / "read-only.log"
    log = open(log_path, "w")
    argv = config["Entrypoint"] + (config.get("Cmd") or [])
    tmpfs = {"/tmp": "512m", "/dev/shm": "1m"}
    proc = store.run_read_only(
        image, ctr, argv, env, config["User"], volumes, tmpfs, stdout=log, stderr=subprocess.STDOUT
    )

    def ready():
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log_path.read_text()}"
        try:
            return httpx.get(url + "/ready", timeout=2).json()["ready_workers"] == 2
        except (httpx.HTTPError, ValueError):
            return False

    try:
        wait_until(ready, 300, 0.5, "the read-only container to be ready")
        (pid1,) = psutil.Process(proc.pid).children()
        assert pid1.cmdline()[0] == config["Entrypoint"][0]  # tini
        (server,) = pid1.children()

        r = httpx.post(url + "/v1/synthesize", json={"script": "Speaker 1: hi"}, timeout=120)
        assert r.status_code == 200 and r.content[:4] == b"RIFF"
        # An upload over the body spool's 64 KB waits in /tmp on its way to /voices.
        up = httpx.post(url + "/v1/voices", files={"file": ("mine.wav", r.content)}, timeout=60)
        assert up.status_code == 201, up.text
        job = httpx.post(url + "/v1/jobs", json={"script": "Speaker 1: a job"}, timeout=30)
        assert job.status_code in (200, 201, 202), job.text
        done = volumes["/data"] / "results" / f"{job.json()['id']}.wav"
        wait_until(done.is_file, 120, 0.5, "the job's audio in the /data volume")
        assert (volumes["/voices"] / "mine.wav").is_file()
        assert any(volumes["/models"].rglob("config.json"))  # the tiny model's cache

        # The zygote dies: its workers go on as PID 1's children; then one of them dies.
        (zygote,) = [p for p in server.children() if p.children()]
        orphan = zygote.children()[0]
        zygote.kill()
        wait_until(lambda: orphan.ppid() == pid1.pid, 30, what="the worker to pass to PID 1")
        orphan.kill()

        def reaped():  # a zombie still has a status; a reaped process has none
            try:
                orphan.status()
            except psutil.NoSuchProcess:
                return True
            return False

        wait_until(reaped, 20, 0.2, "PID 1 to reap the dead worker")
        wait_until(ready, 120, 0.5, "the pool to be whole again")

        pid1.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log_path.read_text()
        assert "Stopped." in log_path.read_text()
    finally:
        if proc.poll() is None:  # the namespace's PID 1 takes every process there with it
            for child in psutil.Process(proc.pid).children():
                child.kill()
            proc.wait(30)
        log.close()
        store.tool("buildah", "umount", ctr)
        store.tool("buildah", "rm", ctr)
