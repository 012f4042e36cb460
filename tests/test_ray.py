"""The ray backend (`--backend ray`).

Fast: SlotReplica, the class every Serve replica runs, driven in process with
the sim engine (no Ray cluster): streams, batching, cancel, boot failure,
the stall health check.

Slow: tests/ray_scenario.py, run inside a private network namespace that has
only loopback (most of Ray's processes listen on every interface), against a real
`vibevoice-pool launch --backend ray --gpus cpu:2` server: requests through the
HTTP API, SIGKILL of a replica's process while requests run, the replacement,
the quarantine of a request that kills every replica, and a SIGTERM after
which no process the server started is alive (checked by pid). And
tests/ray_parent_death.py, the same way: a SIGKILL of the server after which its
Ray's processes and session folder are gone and a second start serves, and one
of two servers joined to a Ray they did not start: the killed one's Serve
applications are deleted by its warden, the other's stay, and that Ray is left
as it was. And tests/ray_slot_cycles.py: replicas added and removed more times
than the status board has rows, each add taking the removed one's slot.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_until

from workers.engines.contract import EngineSpec
from workers.host.ray_replica import SlotReplica, StalledError
from workers.wire import messages as m
from workers.wire.estimate import audio_seconds_for

ROOT = Path(__file__).resolve().parent.parent


def request(rid: str, text: str = "a" * 15, seed: int = 1) -> m.Request:
    return m.Request(id=rid, turns=(m.Turn(0, text),), seed=seed, max_audio_s=60)


async def collect(replica: SlotReplica, req: m.Request) -> list:
    """The request's messages, in order (the replica yields them in lists)."""
    return [msg async for item in replica.synthesize(req) for msg in item]


def sim(**kw) -> EngineSpec:
    return EngineSpec(**({"engine": "sim", "sim_rtf": 0.0} | kw))


# ---- the replica, in process -------------------------------------------------


def test_replica_streams_one_request_like_a_worker():
    replica = SlotReplica(sim(sim_chunk_s=0.5))
    msgs = asyncio.run(collect(replica, request("r1", "a" * 30)))  # 1.7 s of audio
    audio_s = audio_seconds_for("a" * 30)
    assert isinstance(msgs[0], m.Started) and msgs[0].id == "r1"
    chunks = [x for x in msgs if isinstance(x, m.Chunk)]
    assert [c.seq for c in chunks] == [0, 1, 2, 3]
    assert sum(len(c.pcm) for c in chunks) == pytest.approx(audio_s * m.SAMPLE_RATE, abs=1)
    assert isinstance(msgs[-1], m.Done) and msgs[-1].audio_s == pytest.approx(audio_s, abs=1e-3)
    stats = replica.stats()
    assert stats.ready and stats.boot_error is None and stats.info.engine == "sim"
    assert stats.speed > 0 and stats.rows == 0 and stats.pending == 0


def test_replica_batches_concurrent_requests():
    replica = SlotReplica(sim(max_batch_size=4, sim_chunk_s=0.25))

    async def many():
        return await asyncio.gather(*(collect(replica, request(f"r{i}")) for i in range(3)))

    results = asyncio.run(many())
    assert all(isinstance(r[-1], m.Done) for r in results)
    starts = [r[0].at for r in results]  # rows that join at one step boundary share its time
    assert len(set(starts)) < len(starts), starts  # they shared a batch


def test_replica_fails_a_row_with_its_typed_kind():
    replica = SlotReplica(sim())
    msgs = asyncio.run(collect(replica, request("bad", "[[oom]] too big")))
    assert isinstance(msgs[-1], m.Failed) and msgs[-1].error == m.ErrorKind.OUT_OF_MEMORY


def test_a_cancelled_stream_frees_its_row():
    replica = SlotReplica(sim(sim_rtf=0.5, sim_chunk_s=0.1))  # 50 ms a step

    async def cancel_midway():
        gen = replica.synthesize(request("long", "a" * 600))  # 34 s of audio
        first = await gen.__anext__()
        await gen.aclose()  # what Serve does when the caller cancels
        return first

    first = asyncio.run(cancel_midway())
    assert isinstance(first[0], m.Started)
    deadline = time.monotonic() + 5
    while replica.stats().rows and time.monotonic() < deadline:
        time.sleep(0.02)
    assert replica.stats().rows == 0  # the engine dropped the row within a step
    msgs = asyncio.run(collect(replica, request("next")))
    assert isinstance(msgs[-1], m.Done)


def test_a_cancel_that_empties_the_batch_leaves_the_replica_idle_not_stalled():
    """The row count used to be written only after a step: a cancel that emptied
    the batch left it at 1 for good, so pings showed a busy replica, and once
    stall_timeout_s had passed the stall check (ours and Serve's check_health)
    called the idle replica stuck and it was killed and replaced."""
    replica = SlotReplica(sim(sim_rtf=0.5, sim_chunk_s=0.1), stall_timeout_s=0.3)

    async def cancel_after_steps():
        gen = replica.synthesize(request("long", "a" * 600))
        for _ in range(4):  # Started and three steps' chunks: the row has run steps
            await gen.__anext__()
        await gen.aclose()

    asyncio.run(cancel_after_steps())
    deadline = time.monotonic() + 5
    while replica.stats().rows and time.monotonic() < deadline:
        time.sleep(0.02)
    assert replica.stats().rows == 0
    time.sleep(0.5)  # idle for longer than stall_timeout_s
    stats = replica.stats()
    assert stats.rows == 0 and stats.progress_age_s == 0.0
    asyncio.run(replica.check_health())  # idle: healthy, not stalled


def test_a_row_handed_back_ends_its_stream_with_preempted_and_its_history():
    """A removed slot's rows move to the others (HandBack), as a local worker's do:
    the replica gives the row back at the next step, its chunks carry the history
    to resume from, and its stream ends with Preempted."""
    replica = SlotReplica(sim(sim_rtf=0.5, sim_chunk_s=0.1))

    async def hand_back_midway():
        gen = replica.synthesize(request("moving", "a" * 600))
        items = [await gen.__anext__() for _ in range(4)]  # Started, three steps' chunks
        await replica.hand_back("moving")
        return [msg for item in items for msg in item] + [x async for item in gen for x in item]

    msgs = asyncio.run(hand_back_midway())
    assert isinstance(msgs[-1], m.Preempted) and msgs[-1].id == "moving"
    chunks = [x for x in msgs if isinstance(x, m.Chunk)]
    assert chunks and all(c.history is not None for c in chunks)
    assert msgs[-1].steps == sum(c.history.steps for c in chunks)
    # the step thread counts its rows once hand_back returns, which may be just after
    # the stream's last message reached its reader (CI read 1 there once)
    wait_until(lambda: replica.stats().rows == 0, 5, 0.01, "the replica's rows to read 0")


def test_boot_failure_is_reported_not_raised():
    replica = SlotReplica(sim(sim_boot_error="no such model"))
    stats = replica.stats()
    assert not stats.ready
    assert stats.boot_error == m.ErrorKind.ENGINE_ERROR and "no such model" in stats.boot_message
    msgs = asyncio.run(collect(replica, request("r")))
    assert isinstance(msgs[-1], m.Failed) and msgs[-1].error == m.ErrorKind.UNAVAILABLE


def test_health_check_raises_when_the_engine_stalls():
    replica = SlotReplica(sim(), stall_timeout_s=0.2)
    asyncio.run(replica.check_health())  # idle: healthy
    replica._rows, replica._progress = 1, time.monotonic() - 1.0  # busy, no step for 1 s
    with pytest.raises(StalledError):
        asyncio.run(replica.check_health())


def test_a_deployment_build_that_races_serve_is_retried(monkeypatch):
    """Serve registers a module for pickling by value while it builds a deployment,
    process-wide; its own threads can race that (CI saw `ValueError: ... is not
    registered for pickle by value`). The build is retried, and a build that keeps
    failing is a DeployError (which the backend backs off from), never a hang."""
    from ray import serve

    from vibevoice_pool.config import build
    from vibevoice_pool.ray import cluster as ray_cluster

    real = serve.deployment
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise ValueError("<module 'x'> is not registered for pickle by value")
        return real(*args, **kwargs)

    monkeypatch.setattr(ray_cluster.serve, "deployment", flaky)
    cluster = ray_cluster.RayCluster(build({"engine": "sim", "backend": "ray"}))
    spec = EngineSpec(engine="sim")
    target = cluster._target("app-x", spec, 1.0, 0.0, 4, 5.0, 30.0)
    assert len(calls) == 3 and target.name == "app-x"

    def always(*args, **kwargs):
        raise ValueError("<module 'x'> is not registered for pickle by value")

    monkeypatch.setattr(ray_cluster.serve, "deployment", always)
    with pytest.raises(ray_cluster.DeployError, match="could not build"):
        cluster._target("app-y", spec, 1.0, 0.0, 4, 5.0, 30.0)


def test_the_warden_takes_only_applications_whose_pool_is_dead():
    """A warden deletes an application only if its name says one of our pools
    made it and that pool's driver job is dead: never a live pool's, never
    another program's, never a name it cannot read."""
    from vibevoice_pool.ray.warden import app_prefix, orphans, owner

    dead_pool, live_pool = app_prefix("02000000", "0a53f9"), app_prefix("03000000", "79455a")
    assert (
        dead_pool == "vibevoice-pool-02000000-0a53f9-" and owner(dead_pool + "w1-3") == "02000000"
    )
    apps = [
        dead_pool + "w0-1",
        dead_pool + "w1-3",
        live_pool + "w0-1",
        "vibevoice-pool-0a53f9-w0-1",  # no owner in it (made before owners were named)
        "02000000-w0-1",
        "my-app",
    ]
    assert orphans(apps, {"02000000", "01000000"}) == [dead_pool + "w0-1", dead_pool + "w1-3"]
    assert orphans(apps, set()) == []


def test_without_ray_the_backend_says_how_to_install_it(monkeypatch):
    from vibevoice_pool.config import build
    from vibevoice_pool.pool.facade import supervisor_class

    for name in [n for n in sys.modules if n.startswith("vibevoice_pool.ray")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    with pytest.raises(m.PoolError) as e:
        supervisor_class(build({"backend": "ray"}))
    assert "pip install 'vibevoice-pool[ray]'" in e.value.message


# ---- the whole server on Ray, in a private network namespace -----------------


def run_scenario(
    engine: str, workdir: Path, timeout: float, *extra: str, script: str = "ray_scenario.py"
) -> dict:
    import ray  # noqa: F401  (`make test` installs the ray extra: its absence is a failure)

    from vibevoice_pool.ray.cluster import netns_command

    assert shutil.which("unshare") and shutil.which("ip"), "install util-linux and iproute2"
    probe = subprocess.run(netns_command(["true"]), capture_output=True, text=True)
    assert probe.returncode == 0, f"cannot make a private network namespace: {probe.stderr}"
    argv = [sys.executable, str(ROOT / "tests" / script)]
    argv += ["--engine", engine, "--workdir", str(workdir), *extra]
    proc = subprocess.run(
        netns_command(argv), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, (
        f"no result (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(lines[-1])


def check_common(result: dict) -> dict:
    assert result["only_loopback"], "the scenario must run in a private network namespace"
    phases = result["phases"]
    assert "error" not in result, f"{result['error']}\n{result.get('log_tail', '')}"
    workers = phases["boot"]["workers"]
    assert [w["state"] for w in workers] == ["ready", "ready"]
    assert all(w["pid"] for w in workers)

    # served through the same HTTP API
    assert all(a["status"] == 200 and a["audio_s"] > 0 for a in phases["served"]["answers"])

    # SIGKILL one replica: every request still completes, with all its audio
    kill = phases["kill"]
    assert kill["victim_inflight"] >= 1 and not kill["victim_alive"]
    answers = kill["answers"]
    assert len(answers) == 6 and all(a["status"] == 200 for a in answers), answers
    assert all(a["audio_s"] > 0 for a in answers)

    # Ray Serve replaced the replica and it serves again
    rec = phases["recovered"]
    assert rec["restarts"] >= 1 and rec["pid"] != kill["victim_pid"]
    assert rec["answer"]["status"] == 200

    # SIGTERM: a clean exit, and nothing the server started is alive
    down = phases["shutdown"]
    assert down["exit_code"] == 0, result.get("log_tail", "")
    assert len(down["ray_pids"]) >= 5  # gcs_server, raylet, controller, replicas, ...
    assert kill["victim_pid"] in down["ray_pids"]
    assert down["survivors"] == [], down["survivors"]
    return phases


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(660)
def test_ray_backend_serves_survives_a_kill_and_stops_clean(tmp_path):
    result = run_scenario("sim", tmp_path, timeout=600)
    phases = check_common(result)
    kill = phases["kill"]
    whole = audio_seconds_for("a" * 60)  # the scenario's text for the sim
    assert all(a["audio_s"] == pytest.approx(whole, abs=1e-3) for a in kill["answers"])
    # a request that kills every replica it runs on is quarantined after max_attempts (2)
    q = phases["quarantine"]["answer"]
    assert q["status"] == 502 and q["code"] == "worker_lost"
    # a removed replica's row moves to the other by resume, as a local worker's does
    rm = phases["remove"]
    assert rm["status"] == 202 and rm["rows"]["moved"] >= 1, rm
    assert all(a["status"] == 200 for a in rm["answers"]), rm
    whole = audio_seconds_for("a" * 120)
    assert all(a["audio_s"] == pytest.approx(whole, abs=1e-3) for a in rm["answers"]), rm


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(900)
def test_ray_backend_with_the_tiny_model(tmp_path):
    result = run_scenario("tiny", tmp_path, timeout=840)
    check_common(result)


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(300)
def test_a_sigterm_while_ray_starts_stops_as_while_workers_start(tmp_path):
    """ray.init puts in its own SIGTERM handler (sys.exit(15)) while it starts Ray:
    a SIGTERM then ended the server with exit 15 and no word in its log. It stops
    as a signal while starting does (docs/OPERATIONS.md): logged, exit 143, and
    nothing it started left alive."""
    result = run_scenario("sim", tmp_path, 240, "--signal-while-starting")
    assert result["only_loopback"] and "error" not in result, result
    assert result["ray_still_starting"], result["log_tail"]  # the signal came in ray.init
    down = result["phases"]["shutdown"]
    assert down["exit_code"] == 128 + 15, result["log_tail"]
    assert "SIGTERM while starting" in result["log_tail"]
    assert down["survivors"] == [], down["survivors"]


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(420)
def test_a_dead_raylet_stops_the_server_with_its_own_exit_code(tmp_path):
    """The server's local Ray cannot deploy a replica again once its raylet is gone.
    The server used to stay up, /health ok, every request waiting, and a SIGTERM
    then hung in Serve's shutdown. It now says so and exits 4, leaving nothing."""
    result = run_scenario("sim", tmp_path, 360, "--kill-raylet")
    assert result["only_loopback"] and "error" not in result, result
    assert result["exit_code"] == 4, (result["exit_code"], result["errors"], result["log_tail"])
    assert any("the local Ray's raylet (pid" in line for line in result["errors"]), result
    assert result["phases"]["shutdown"]["survivors"] == [], result["phases"]["shutdown"]


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(420)
def test_a_sigkilled_server_leaves_no_ray_and_starts_again(tmp_path):
    """A SIGKILL of the server (the OOM killer, a `kill -9`) left its local Ray
    behind: its agents and replicas outlived it (the dashboard agent by a minute,
    a stopped replica for ever), and its session folder under
    the temp dir for ever. Its watchdog now kills every process that Ray started
    and deletes the folder within a few seconds; a server started again on the same
    port and temp dir serves."""
    result = run_scenario("sim", tmp_path, 360, "--kill-server", script="ray_parent_death.py")
    assert result["only_loopback"] and "error" not in result, result
    killed = result["phases"]["killed"]
    ray_started = [c for c in killed["started"].values() if "/ray/" in c or c.startswith("ray::")]
    assert len(ray_started) >= 5, killed["started"]  # gcs_server, raylet, agents, replicas
    assert killed["session_dir"] and killed["stopped_replica"] in map(int, killed["started"])
    assert killed["left"] == [], killed["left"]
    assert not killed["folder_left"] and not killed["latest_is_ours"], killed
    again = result["phases"]["again"]
    assert again["session_dir"] not in ("", killed["session_dir"]), again
    assert again["answer"]["status"] == 200 and again["answer"]["audio_s"] > 0, again
    down = result["phases"]["shutdown"]
    assert down["exit_code"] == 0 and down["survivors"] == [], down


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(360)
def test_a_sigkilled_joined_server_leaves_no_application_and_the_cluster_alone(tmp_path):
    """Joined to a Ray it did not start (`--address`), the server has no watchdog:
    its SIGKILL leaves that Ray's own processes and session folder as they were.
    Its Serve applications used to stay deployed for ever, their replicas running
    (on a real cluster, holding GPUs). Its warden, a detached actor, now deletes
    them once its driver's job is dead, and ends; another live pool on the same
    cluster keeps its applications and replicas, and serves."""
    result = run_scenario("sim", tmp_path, 300, "--kill-joined", script="ray_parent_death.py")
    assert result["only_loopback"] and "error" not in result, result
    joined = result["phases"]["joined"]
    first, both, after = joined["first"], joined["both"], joined["after"]
    mine = [a for a in first["apps"] if a.startswith("vibevoice-pool-")]
    theirs = sorted(set(both["apps"]) - set(first["apps"]))
    assert len(mine) == 2 and len(theirs) == 2, (first, both)
    # the killed pool's applications, replicas and warden are gone ...
    assert joined["orphans_gone_s"] is not None, (after, result["log_tail"])
    assert not set(mine) & set(after["apps"]), after
    assert joined["victim_replicas_alive"] == [], joined
    # ... the other pool's are not, and it serves
    assert set(theirs) <= set(after["apps"]), after
    assert sum(name.endswith("-warden") for name in after["actors"]) == 1, after
    assert joined["kept_replicas_alive"] == joined["kept_replicas"], joined
    assert joined["other_answer"]["status"] == 200, joined["other_answer"]

    # the cluster itself: only workers (replicas, wardens) may have gone
    def worker(cmd: str) -> bool:  # its title, or its command line before it set one
        return cmd.startswith("ray::") or "default_worker.py" in cmd

    core = {pid: cmd for pid, cmd in joined["cluster_pids"].items() if not worker(cmd)}
    assert len(core) >= 4 and not set(core) & set(joined["gone"]), joined  # gcs, raylet, agents
    assert joined["folder_left"] and joined["owner_alive"], joined
    # the other pool's clean stop deletes its applications and its warden
    stopped = result["phases"]["other_stopped"]
    assert stopped["exit_code"] == 0, result["log_tail"]
    assert not [n for n in stopped["after"]["apps"] + stopped["after"]["actors"] if "pool-" in n]


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(600)
def test_an_added_replica_takes_the_slot_of_a_removed_one(tmp_path):
    """Each replica added while serving took a new slot and status-board row, and a
    removed one kept its own for good: after 16 add/remove cycles every add was
    refused ("room for 18 workers at most" on a two-replica server). An added
    replica now takes a removed, stopped one's slot (a Serve application of a new
    name), its row cleared, as a local worker does; no removed replica lives on."""
    from ray_slot_cycles import CYCLES

    result = run_scenario("sim", tmp_path, 540, script="ray_slot_cycles.py")
    assert result["only_loopback"] and "error" not in result, (result, result.get("log_tail"))
    assert result["phases"]["first_removed"] == [202, 202]
    rounds = result["phases"]["cycles"]
    refused = [r for r in rounds if r["status"] != 201]
    assert not refused, refused
    assert len(rounds) == CYCLES
    # the first removed slot, every time (the old code took slot 2, 3, ... and refused
    # every add once the board's 18 rows were taken: 16 cycles; the suite runs 4)
    assert {r["id"] for r in rounds} == {0}
    for r in rounds:
        # as new: no count of the replica that served there before
        assert r["completed"] == 0 and r["restarts"] == 0 and r["device"] == "cpu:0", r
        assert r["answer"]["status"] == 200 and r["answer"]["worker"] == "0", r
        assert r["removed"] == 202, r
    assert result["phases"]["replicas_left"] == [], result["phases"]["replicas_left"]
    # 2 at launch and one an add, each of its own name: a deletion still running
    # never meets a new application of the same name
    apps = result["apps"]
    assert len(apps) == 2 + CYCLES and len(set(apps)) == len(apps), apps
    assert result["warnings"] == [], result["warnings"]
    down = result["phases"]["shutdown"]
    assert down["exit_code"] == 0 and down["survivors"] == [], down
