"""Ray and Ray Serve for the ray backend: start or join, deploy, tear down.

    RayCluster(cfg, tag).start(cpus)
                                  address "": start a private local Ray (loopback,
                                  no dashboard, RAY_AUTH_MODE=disabled unless set)
                                  address auto | HOST:PORT: join that cluster
                                  (a process already connected keeps its Ray)
                                  then Serve, with its HTTP proxy disabled
                                  joined: a warden for our applications
    prefix                        our applications' names start with it (the
                                  driver's job id and the pool's tag)
    deploy(app, spec, ...)        one Serve application per slot (blocks until it
                                  runs, or raises DeployError)
    delete(app)                   remove one slot's application
    stop()                        delete our applications; for a Ray we started,
                                  shut Serve and Ray down and make sure every
                                  process it started is gone, checked by pid

A Ray we started has a watchdog (workers/host/watchdog.py) told of each of its
processes and its session folder: if this process dies without stop() (SIGKILL,
the OOM killer), the watchdog kills what its Ray left (its agents outlived the
parent by a minute, a stopped replica for ever) and deletes the session folder.
A joined cluster, or a Ray this process was connected to before, gets none:
there the pool's warden (ray/warden.py), a detached actor, deletes its Serve
applications once this driver is dead.

It also says how to run a command inside a private network namespace (only
loopback), which is where the tests and the peer benchmark run Ray.
Ray is imported in this package only (here, ray/backend.py, ray/streams.py
and ray/warden.py): without it the rest of the package never notices.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Callable

import psutil
import ray
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.schema import ApplicationStatus

from vibevoice_pool.config import ConfigError, PoolConfig
from vibevoice_pool.pool.devices import Placement
from vibevoice_pool.ray.warden import NAMESPACE, Warden, app_prefix
from workers.engines.contract import EngineSpec
from workers.host.ray_replica import SlotReplica
from workers.host.watchdog import Watchdog

log = logging.getLogger("vibevoice_pool")

LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # audio chunks and voices are small
REAP_WAIT_S = 15.0  # how long Ray's own processes get to exit before SIGKILL
LOST_REAP_WAIT_S = 2.0  # the same, once its raylet or GCS has died
MAX_TEMP_DIR_CHARS = 30  # longer, and Ray's socket paths pass the 107-byte limit
BUILD_TRIES = 5  # building a deployment, when it races Serve's own threads
SHORT_TEMP_DIR = "/tmp/ray"
WARDEN_START_S = 60.0  # a worker process to start on a busy cluster
CORE_PROCESSES = ("gcs_server", "raylet")  # executables; Ray dies with either


class DeployError(RuntimeError):
    """Ray Serve could not bring a slot's application up."""


class RayCluster:
    def __init__(self, cfg: PoolConfig, tag: str = "pool"):
        self.cfg = cfg
        self.tag = tag
        self.prefix = ""  # set once connected: app_prefix(job id, tag)
        self.owned = not cfg.address  # we start (and so stop) this Ray
        self.reused = False  # this process was connected to Ray before us
        self.apps: set[str] = set()
        self._procs: dict[int, psutil.Process] = {}  # the processes our Ray started
        self._core: dict[int, str] = {}  # of those, the ones Ray cannot live without
        self._watchdog: Watchdog | None = None  # ends our Ray if this process dies unstopped
        self._warden = None  # joined: deletes our applications if this process dies unstopped
        # Serve's client is not thread-safe: building a deployment registers and
        # unregisters a module for pickling by value, process-wide. Our calls
        # that build or read configs take this lock (delete builds none).
        self._serve_lock = threading.RLock()
        self.started = False

    # ---- start ---------------------------------------------------------

    def start(self, cpus_needed: float) -> None:
        verbose = self.cfg.log_level == "DEBUG"
        quiet = logging.DEBUG if verbose else logging.WARNING
        kw = dict(include_dashboard=False, log_to_driver=verbose, logging_level=quiet)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports to the outside
        self.reused = ray.is_initialized()
        if self.reused:  # this process is connected already (an embedding, a benchmark)
            self.owned = False
            log.info("Using this process's Ray connection")
        else:
            # ray.init sets SIGTERM to sys.exit in the main thread; the server's own
            # handlers only set a flag (a drain starts from it), so the previous one is put back.
            previous = signal.getsignal(signal.SIGTERM)
            if self.owned:
                self._watchdog = Watchdog(self.cfg.log_format)
            try:
                self._init(cpus_needed, kw)
            except SystemExit as e:
                # Ray's handler ran: a SIGTERM while Ray was starting. Stop what it
                # started, then let the server's handler say what a signal while
                # starting means (logged, exit 143), not Ray's bare exit 15.
                if e.code != signal.SIGTERM or not callable(previous):
                    raise
                self.track()
                ray.shutdown()
                self._reap()
                self._stand_down()
                previous(signal.SIGTERM, None)
                raise
            finally:
                if threading.current_thread() is threading.main_thread() and previous is not None:
                    signal.signal(signal.SIGTERM, previous)
        self.started = True
        self.track()
        logging.getLogger("ray.serve").setLevel(quiet)
        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
        job = ray.get_runtime_context().get_job_id()
        self.prefix = app_prefix(job, self.tag)
        if not self.owned:  # a Ray we started dies with us; a cluster does not
            self._warden = Warden.options(
                name=f"{self.prefix}warden", namespace=NAMESPACE, lifetime="detached"
            ).remote(job, self.prefix)
            ray.get(self._warden.ping.remote(), timeout=WARDEN_START_S)
        self.track()

    def _init(self, cpus_needed: float, kw: dict) -> None:
        if self.owned:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file in ~/.ray
            cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
            log.info("Starting a local Ray (loopback only, %d CPU slots)", cpus)
            if len(tempfile.gettempdir()) > MAX_TEMP_DIR_CHARS:
                # Ray's unix sockets live under $TMPDIR/ray/session_*/sockets/ and a
                # socket path may not exceed 107 bytes: a long TMPDIR fails at init
                kw["_temp_dir"] = SHORT_TEMP_DIR
            context = ray.init(
                address="local",
                num_cpus=cpus,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                _node_ip_address="127.0.0.1",
                **kw,
            )
            session_dir = context.address_info.get("session_dir")
            if self._watchdog is not None and session_dir:
                self._watchdog.remove(session_dir)  # if this process dies unstopped
        else:
            log.info("Joining the Ray cluster at %s", self.cfg.address)
            ray.init(address=self.cfg.address, **kw)

    def gpu_placements(self, cfg: PoolConfig, room: int) -> list[Placement]:
        """For `--gpus all`: one slot per GPU of the whole cluster (times
        workers_per_gpu); [] when the setting names devices or there is no GPU."""
        if (cfg.gpus or "all").strip().lower() != "all":
            return []
        gpus = int(ray.cluster_resources().get("GPU", 0))
        want = gpus * cfg.workers_per_gpu
        if want > room:
            raise ConfigError(
                f"the Ray cluster has {gpus} GPUs and this pool room for {room} workers: "
                "pass --gpus with fewer"
            )
        if gpus:
            log.info("The Ray cluster has %d GPU(s): %d replica(s)", gpus, want)
        return [Placement(f"ray-gpu:{k}", k) for k in range(want)]

    def track(self) -> None:
        """Remember every process our local Ray has started so far (none when
        joined). Called again while serving: restarted replicas are new ones."""
        if not self.owned:
            return
        watchdog = self._watchdog  # None once stopped
        for child in psutil.Process().children(recursive=True):
            if child.pid in self._procs or watchdog and child.pid == watchdog.pid:
                continue
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "multiprocessing.resource_tracker" in cmd:
                continue  # ours, not Ray's
            self._procs[child.pid] = child
            exe = cmd.split(" ", 1)[0]
            for name in CORE_PROCESSES:
                if exe.endswith("/" + name):
                    self._core[child.pid] = name
            if watchdog is not None:
                watchdog.watch_exact(child.pid)
                if exe.endswith("/raylet"):
                    # its workers carry its pid: those started since the last track()
                    watchdog.watch_env("RAY_RAYLET_PID", str(child.pid), child.pid)

    def lost(self) -> str:
        """For a Ray we started: which of its core processes (gcs_server, raylet) is
        gone, e.g. 'raylet (pid 123)'; '' while they run. Without them Ray cannot
        come back in this process: no replica can be deployed again."""
        for pid, name in self._core.items():
            proc = self._procs[pid]
            try:
                gone = not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone:
                return f"{name} (pid {pid})"
        return ""

    def pids(self) -> list[int]:
        return sorted(self._procs)

    # ---- applications --------------------------------------------------

    def deploy(
        self,
        app: str,
        spec: EngineSpec,
        *,
        num_cpus: float,
        num_gpus: float,
        max_ongoing: int,
        stall_timeout_s: float,
        hang_timeout_s: float,
        ready: Callable[[], bool] = lambda: True,
    ):
        """Run one slot's application (one replica) and wait until Serve says it
        runs; its DeploymentHandle. DeployError when Serve gives up, or when
        `ready()` turns False while waiting (the slot was replaced or removed)."""
        with self._serve_lock:
            target = self._target(
                app, spec, num_cpus, num_gpus, max_ongoing, hang_timeout_s, stall_timeout_s
            )
            self.apps.add(app)
            try:
                (handle,) = serve.run_many([target], wait_for_applications_running=False)
            except (RayError, RayServeException) as e:
                raise DeployError(_first_line(e)) from e
        while ready():
            status = self.app_status(app)
            if status is None:
                raise DeployError(f"application {app} is gone")
            if status[0] == ApplicationStatus.RUNNING:
                return handle
            if status[0] == ApplicationStatus.DEPLOY_FAILED:
                raise DeployError(status[1])
            time.sleep(0.2)
        raise DeployError("the slot was replaced or removed while deploying")

    def _target(self, app, spec, num_cpus, num_gpus, max_ongoing, hang_timeout_s, stall_timeout_s):
        """The RunTarget of one slot's application. Serve's own threads (a
        handle's router) may still race us on the by-value registration, so a
        ValueError from it is retried a few times before it counts as a failure."""
        for attempt in range(BUILD_TRIES):
            try:
                deployment = serve.deployment(SlotReplica).options(
                    name="slot",
                    num_replicas=1,
                    ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                    max_ongoing_requests=max_ongoing,
                    health_check_period_s=max(1.0, min(10.0, hang_timeout_s / 3)),
                    health_check_timeout_s=hang_timeout_s,
                    graceful_shutdown_timeout_s=2.0,
                    graceful_shutdown_wait_loop_s=0.5,
                    max_constructor_retry_count=3,
                    logging_config={"enable_access_log": False, "log_level": "WARNING"},
                )
                return serve.RunTarget(
                    target=deployment.bind(spec, stall_timeout_s), name=app, route_prefix=None
                )
            except ValueError as e:
                if attempt + 1 == BUILD_TRIES:
                    raise DeployError(f"Serve could not build the deployment: {e}") from e
                log.debug("building %s raced Serve (%s); again", app, e)
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def app_status(self, app: str) -> tuple[ApplicationStatus, str] | None:
        """(status, Serve's message) of one of our applications; None if unknown."""
        try:
            with self._serve_lock:
                found = serve.status().applications.get(app)
        except (RayError, RayServeException) as e:
            log.debug("serve.status() failed: %s", e)
            return (ApplicationStatus.DEPLOYING, "")
        return None if found is None else (found.status, found.message)

    def delete(self, app: str) -> bool:
        """False (and a warning) when Serve would not delete it."""
        self.apps.discard(app)
        try:
            serve.delete(app)  # builds no config; blocking, so not under the lock
        except (RayError, RayServeException, RuntimeError) as e:
            log.warning("could not delete Serve application %s: %s", app, e)
            return False
        return True

    def failed_apps(self) -> dict[str, str]:
        """Applications Serve gave up deploying: name -> Serve's message."""
        try:
            with self._serve_lock:
                apps = serve.status().applications
        except (RayError, RayServeException) as e:
            log.debug("serve.status() failed: %s", e)
            return {}
        return {
            name: app.message
            for name, app in apps.items()
            if name in self.apps and app.status == ApplicationStatus.DEPLOY_FAILED
        }

    # ---- stop ----------------------------------------------------------

    def stop(self) -> list[int]:
        """Tear down what we made; the pids of Ray processes still alive after
        REAP_WAIT_S and a SIGKILL (empty when all is well)."""
        if not self.started:
            self._stand_down()
            return []
        self.track()
        lost = self.owned and self.lost()
        try:
            if lost:
                pass  # Serve's controller is gone with its node: only Ray's processes are left
            elif self.owned:
                serve.shutdown()
            else:
                deleted = [self.delete(app) for app in list(self.apps)]
                if self._warden is not None and all(deleted):
                    # nothing of ours left to watch (else it deletes the rest once we are gone)
                    ray.kill(self._warden, no_restart=True)
                    self._warden = None
        except (RayError, RayServeException, RuntimeError) as e:
            log.warning("Ray Serve did not shut down cleanly: %s", e)
        self.started = False
        if self.reused:
            return []  # the connection is its owner's to close
        ray.shutdown()  # a Ray we started stops; a joined cluster is only left
        # what a dead Ray left (its agents linger up to a minute) is ended at once
        survivors = self._reap(LOST_REAP_WAIT_S if lost else REAP_WAIT_S)
        self._stand_down()
        return survivors

    def _stand_down(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stand_down()
            self._watchdog = None

    def _reap(self, wait_s: float = REAP_WAIT_S) -> list[int]:
        procs = list(self._procs.values())
        _gone, alive = psutil.wait_procs(procs, timeout=wait_s)
        for p in alive:
            log.warning("Ray process %d (%s) did not exit: killing it", p.pid, p.name())
            try:
                p.kill()
            except psutil.Error:
                pass
        _gone, alive = psutil.wait_procs(alive, timeout=5)
        return [p.pid for p in alive]


def replica_resources(placement: Placement, spec: EngineSpec, workers_per_gpu: int):
    """(num_cpus, num_gpus) one slot's replica asks Ray for."""
    if placement.is_gpu:
        return 1.0, 1.0 / workers_per_gpu
    if spec.engine == "sim":
        return 0.0, 0.0  # it sleeps: no core of its own
    return float(spec.torch_threads), 0.0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- private network namespaces ----------------------------------------------


def only_loopback() -> bool:
    """True inside a network namespace whose only interface is loopback."""
    try:  # /proc/net follows this process's namespace (/sys/class/net need not)
        with open("/proc/self/net/dev") as f:
            names = {line.split(":", 1)[0].strip() for line in f.readlines()[2:]}
    except OSError:
        return False
    return names == {"lo"}


def netns_command(argv: list[str]) -> list[str]:
    """`argv` run in a new network namespace with only loopback up. Ray opens
    ports on every interface: this is how tests and benchmarks keep it private."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        raise OSError(
            "running Ray privately needs `unshare` and `ip`: apt-get install util-linux iproute2"
        )
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    script = f'{ip} link set lo up && exec "$@"'
    return [unshare, "--net", *user, "--", "sh", "-c", script, "sh", *argv]
