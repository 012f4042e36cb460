"""Device monitoring and faults with a fake NVML, and live scaling, on real
spawned sim workers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import pid_alive, wait_until
from fake_nvml import FakeGpu, FakeNvml

from vibevoice_pool.config import build
from vibevoice_pool.pool.facade import Pool
from vibevoice_pool.pool.monitor import RealNvml
from vibevoice_pool.script import parse_script
from workers.wire import messages as m
from workers.wire.board import Col

pytestmark = pytest.mark.slow

TEXT = "Speaker 1: " + "a line of speech " * 4


@pytest.fixture
def gpu_pool(tmp_path, monkeypatch):
    # The fake GPUs are the machine's: a CUDA_VISIBLE_DEVICES of the test run's own
    # would hide some of them (Pool.start keeps to it).
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pools = []

    def start(nvml: FakeNvml, **settings):
        values = {
            "engine": "sim",
            "gpus": ",".join(str(i) for i in nvml.gpus),
            "sim_rtf": 0.2,
            "monitor_interval_s": 0.1,
            "device_lost_s": 0.5,
            "failed_retry_s": 1.0,
            "cache_dir": str(tmp_path),
        }
        values.update(settings)
        pool = Pool.start(build(values), gpus=nvml.gpu_list(), nvml=nvml)
        pools.append(pool)
        n = len(pool.live_slots())
        wait_until(lambda: pool.ready_workers() == n, 60, what="every worker to be ready")
        return pool

    yield start
    for pool in pools:
        pool.shutdown(grace_s=0)


def submit(pool, text=TEXT, seed=1):
    return pool.submit(pool.make_request(parse_script(text), seed=seed))


def state(pool, i):
    return pool.status()["workers"][i]["state"]


def test_the_board_shows_the_fake_devices_numbers(gpu_pool):
    nvml = FakeNvml({0: FakeGpu(mem_used=3 << 30, util=42.0, temp=61.0, power=250.0)})
    pool = gpu_pool(nvml)
    w = wait_until(
        lambda: (w := pool.status()["workers"][0])["mem_used_bytes"] == 3 << 30 and w,
        10,
        what="the monitor's sample",
    )
    assert w["mem_total_bytes"] == 80 << 30
    assert (w["util"], w["temp_c"], w["power_w"]) == (42.0, 61.0, 250.0)
    assert w["device"] == "cuda:0"


def test_a_full_gpu_is_not_chosen(gpu_pool):
    nvml = FakeNvml({0: FakeGpu(), 1: FakeGpu()})
    nvml.gpus[0].mem_used = nvml.gpus[0].mem_total  # no room at all
    pool = gpu_pool(nvml)
    wait_until(lambda: pool.board.get(0, Col.MEM_USED) > 0, 10, what="the monitor's sample")
    handles = [submit(pool, seed=i) for i in range(6)]
    for h in handles:
        h.result(timeout=60)
    assert {h.worker for h in handles} == {1}
    nvml.gpus[0].mem_used = 0  # room again: GPU 0 takes work again
    wait_until(lambda: pool.board.get(0, Col.MEM_USED) == 0, 10, what="the new sample")
    handles = [submit(pool, seed=i) for i in range(6)]
    for h in handles:
        h.result(timeout=60)
    assert {h.worker for h in handles} == {0, 1}


def test_a_lost_device_is_drained_its_requests_move_and_it_recovers(gpu_pool):
    nvml = FakeNvml({0: FakeGpu(), 1: FakeGpu()})
    pool = gpu_pool(nvml, sim_rtf=0.3)
    old_pid = pool.status()["workers"][1]["pid"]
    handles = [submit(pool, seed=i) for i in range(8)]
    wait_until(lambda: pool.status()["workers"][1]["inflight"] > 0, 20, what="GPU 1 busy")
    nvml.gpus[1].lost = True
    wait_until(lambda: state(pool, 1) == "unavailable", 15, what="GPU 1 unavailable")
    wait_until(lambda: not pid_alive(old_pid), 15, what="the lost GPU's worker to be stopped")
    for h in handles:
        assert len(h.result(timeout=60)) > 0  # nothing lost
    more = [submit(pool, seed=i) for i in range(3)]
    for h in more:
        h.result(timeout=60)
    assert {h.worker for h in more} == {0}  # nothing goes to the lost device
    assert state(pool, 1) == "unavailable"
    nvml.gpus[1].lost = False
    w = wait_until(
        lambda: (w := pool.status()["workers"][1])["state"] == "ready" and w,
        20,
        what="GPU 1 back",
    )
    assert w["pid"] != old_pid and w["restarts"] == 1
    assert pool.dispatcher.counters["worker_lost"] == 0  # a device loss quarantines nothing


def test_add_and_remove_workers_while_20_requests_run(sim_pool):
    with sim_pool(gpus="cpu:2", sim_rtf=0.2, max_batch_size=2) as pool:
        handles = [submit(pool, seed=i) for i in range(20)]
        for device in ("", "cuda:", "all", "0,1", "cpu:5", "gpu0"):  # one device, or nothing
            with pytest.raises(m.PoolError, match="name one device") as e:
                pool.add_worker(device)
            assert e.value.kind is m.ErrorKind.BAD_INPUT
        with pytest.raises(m.PoolError, match="device '7'"):  # a GPU this host has not
            pool.add_worker("7")
        assert len(pool.status()["workers"]) == 2
        new = pool.add_worker("cpu")
        wait_until(lambda: state(pool, new) in ("ready", "busy"), 20, what="the new worker")
        wait_until(lambda: pool.board.get(0, Col.INFLIGHT) > 0, 20, what="worker 0 busy")
        held = {j.request.id for j in pool.dispatcher._jobs.values() if j.slot == 0}
        assert held
        removed_pid = pool.status()["workers"][0]["pid"]
        pool.remove_worker(0)
        assert state(pool, 0) == "draining"
        for h in handles:
            assert len(h.result(timeout=90)) > 0
        finished_on = {h.id: h.worker for h in handles}
        # each moved, by resume, into a place that freed elsewhere, or finished on
        # worker 0 (a row moved with no place to go would stall its stream)
        moved = [rid for rid in held if finished_on[rid] != 0]
        assert pool.dispatcher.counters["moved"] == len(moved)
        wait_until(lambda: not pid_alive(removed_pid), 15, what="the removed worker to exit")
        ids = [w["id"] for w in pool.status()["workers"]]
        assert 0 not in ids and new in ids
        assert pool.dispatcher.counters["requeued"] == 0
        assert {h.worker for h in handles} >= {new}


def test_a_removed_workers_slot_is_taken_by_the_next_added_worker(sim_pool):
    """Adding and removing a worker again and again (an operator, an autoscaler, for
    weeks) took a slot and its board row for good each time: after SPARE_ROWS cycles
    every add was refused ("room for 17 workers at most") with one worker up. A
    removed, stopped worker's slot now goes to the next one, its row as new."""
    with sim_pool(gpus="cpu:1") as pool:
        by_id = lambda i: next(w for w in pool.status()["workers"] if w["id"] == i)  # noqa: E731
        rows = pool.board.rows
        for _ in range(rows + 2):  # more cycles than the board has rows
            new = pool.add_worker("cpu")
            wait_until(lambda n=new: by_id(n)["state"] == "ready", 30, what=f"worker {new}")
            pid = by_id(new)["pid"]
            pool.board.set(new, Col.COMPLETED, 7)  # counts of its own, to be forgotten
            pool.remove_worker(new)
            wait_until(lambda n=new: n not in pool.live_slots(), 30, what=f"{new} removed")
            wait_until(lambda p=pid: not pid_alive(p), 15, what="the removed worker to exit")
        assert len(pool.supervisor.slots) == 2  # worker 0 and the one slot reused
        new = pool.add_worker("cpu")
        assert new == 1
        wait_until(lambda: by_id(new)["state"] == "ready", 30, what="the last added worker")
        w = by_id(new)
        assert w["device"] == "cpu:1" and w["restarts"] == 0 and w["completed"] == 0
        handles = [submit(pool, seed=i) for i in range(4)]
        assert all(len(h.result(timeout=60)) > 0 for h in handles)
        assert pool.dispatcher.counters["requeued"] == 0


def test_cpu_workers_are_monitored_without_a_driver(sim_pool):
    assert RealNvml.open() is None  # no NVIDIA driver on this machine: no error either
    with sim_pool(gpus="cpu:2", monitor_interval_s=0.2) as pool:
        workers = wait_until(
            lambda: (
                (ws := pool.status()["workers"]) and all(w["mem_used_bytes"] > 0 for w in ws) and ws
            ),
            10,
            what="CPU columns",
        )
        for w in workers:
            assert w["mem_total_bytes"] > w["mem_used_bytes"] > 10 << 20  # a python process


def test_out_of_memory_in_a_step_lowers_the_live_row_limit(sim_pool):
    """A step that runs out of memory halves the live rows and gives them back to the
    parent, which resumes them from their history; the row that does not fit even
    alone fails out_of_memory, and the others' audio is as if nothing had happened."""
    with sim_pool(gpus="cpu:1", max_batch_size=4, sim_rtf=0.2) as pool:
        assert pool.board.get(0, Col.BATCH_LIMIT) == 4
        blocker = submit(pool, seed=99)  # running when the others join
        wait_until(lambda: pool.board.get(0, Col.BATCH_ROWS) >= 1, 10, what="busy")
        bad = submit(pool, text="Speaker 1: [[oom]] too big", seed=5)
        mates = [submit(pool, seed=i) for i in range(2)]
        with pytest.raises(m.PoolError) as err:
            bad.result(timeout=30)
        assert err.value.kind == m.ErrorKind.OUT_OF_MEMORY
        heard = [h.result(timeout=30) for h in (blocker, *mates)]
        # halved at least once (4 -> 2; the rows go back to the parent and resume, so the
        # bad row may next run alone, and fail, before the limit halves again)
        assert pool.board.get(0, Col.BATCH_LIMIT) <= 2
        assert pool.resumes()["preempted"] >= 2  # the mates went back with their history
        alone = [submit(pool, seed=s).result(timeout=30) for s in (99, 0, 1)]
        for got, want in zip(heard, alone, strict=True):
            assert len(got) == len(want) > 0
            assert np.array_equal(got, want)  # no repeated and no missing audio


def test_removing_the_last_worker_answers_what_waits_at_once(sim_pool):
    """With no worker left, a waiting request gets what a new one gets (unavailable) at
    once; it waited for request_timeout_s (30 min by default). An added worker serves."""
    with sim_pool(gpus="cpu:1", sim_rtf=0.2, max_batch_size=1) as pool:
        running = submit(pool, seed=1)
        wait_until(lambda: pool.board.get(0, Col.INFLIGHT) > 0, 20, what="worker 0 busy")
        waiting = submit(pool, seed=2)
        pool.remove_worker(0)
        assert len(running.result(timeout=60)) > 0  # no other worker: it finishes there
        with pytest.raises(m.PoolError) as e:
            waiting.result(timeout=20)
        assert e.value.kind is m.ErrorKind.UNAVAILABLE and "removed" in e.value.message
        new = pool.add_worker("cpu")
        shown = lambda: {w["id"]: w["state"] for w in pool.status()["workers"]}  # noqa: E731
        wait_until(lambda: shown() == {new: "ready"}, 30, what="the added worker alone")
        assert len(submit(pool, seed=3).result(timeout=60)) > 0


def test_the_log_names_which_worker_of_a_shared_gpu_was_chosen(gpu_pool, caplog):
    """With two workers on one GPU (workers_per_gpu, as configs/vibevoice-1.5b.yaml
    runs), "🎯 Chose GPU 0 for request ..." could be either; it names the worker now."""
    nvml = FakeNvml({0: FakeGpu(), 1: FakeGpu()})
    pool = gpu_pool(nvml, gpus="0", workers_per_gpu=2)
    assert [pool.where(i) for i in range(2)] == ["GPU 0 (worker 0)", "GPU 0 (worker 1)"]
    with caplog.at_level("INFO", logger="vibevoice_pool"):
        h = submit(pool)
        wait_until(lambda: h.done, 30, what="the request to finish")
    chose = [r.getMessage() for r in caplog.records if "Chose" in r.getMessage()]
    assert chose and f"Chose GPU 0 (worker {h.worker}) for request" in chose[0], chose
    single = gpu_pool(FakeNvml({0: FakeGpu(), 1: FakeGpu()}))  # one worker a GPU: as before
    assert [single.where(i) for i in range(2)] == ["GPU 0", "GPU 1"]


def test_the_done_line_names_the_gpu_as_the_choice_line_does(gpu_pool, caplog):
    """ "🎯 Chose GPU 1 for request R" was followed by "request R done on worker 1": a
    grep for one GPU's requests found the choice and not the end (and with workers
    on GPUs 0 and 3, worker 1 is GPU 3)."""
    pool = gpu_pool(FakeNvml({0: FakeGpu(), 3: FakeGpu()}))
    with caplog.at_level("INFO", logger="vibevoice_pool"):
        handles = [submit(pool, seed=s) for s in range(4)]
        wait_until(lambda: all(h.done for h in handles), 30, what="the requests to finish")
    for h in handles:
        gpu = pool.where(h.worker)
        said = [r for r in caplog.records if f"request {h.request.id} " in r.getMessage()]
        done = [r for r in said if " done on " in r.getMessage()]
        assert len(done) == 1 and f"done on {gpu}: " in done[0].getMessage(), said
        assert (done[0].worker, done[0].device) == (h.worker, f"cuda:{gpu[-1]}")


def test_cuda_visible_devices_keeps_the_pool_off_the_gpus_it_hides(gpu_pool, monkeypatch, caplog):
    """`CUDA_VISIBLE_DEVICES=1,3 python gradio_demo.py` ran the old demo (torch) on those
    two GPUs only, as a batch scheduler's allocation does. The pool counted GPUs through
    NVML, which does not read the variable, and started a worker on every GPU, each
    worker setting its own CUDA_VISIBLE_DEVICES: the GPUs it was to leave alone too."""
    nvml = FakeNvml({i: FakeGpu() for i in range(4)})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    with caplog.at_level("INFO", logger="vibevoice_pool"):
        pool = gpu_pool(nvml, gpus="all")
    assert [w["device"] for w in pool.status()["workers"]] == ["cuda:1", "cuda:3"]
    assert "CUDA_VISIBLE_DEVICES=1,3: the pool uses GPUs 1, 3 of 0, 1, 2, 3" in caplog.text
    from vibevoice_pool.config import ConfigError

    with pytest.raises(ConfigError) as e:  # an id it hides: said, with what it leaves
        gpu_pool(FakeNvml({i: FakeGpu() for i in range(4)}), gpus="0,1")
    assert "no GPU 0" in str(e.value) and "CUDA_VISIBLE_DEVICES=1,3" in str(e.value)
    for hidden in ("", "-1"):  # none: CPU workers, and the warning says why
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        caplog.clear()
        with caplog.at_level("INFO", logger="vibevoice_pool"):
            pool = gpu_pool(FakeNvml({0: FakeGpu()}), gpus="all")
        assert all(w["device"].startswith("cpu:") for w in pool.status()["workers"])
        assert f"CUDA_VISIBLE_DEVICES={hidden} hides every GPU" in caplog.text


def test_a_worker_numbers_gpus_as_nvidia_smi_does():
    """The pool's GPU ids are nvidia-smi's (NVML's, in PCI bus order); CUDA's own order is
    fastest first, so the worker tells CUDA to follow the bus before it pins its GPU."""
    from workers.host.worker import pin_device

    env = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    pin_device(2, env)
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2"}
    pin_device(None, env)
    assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_numbered_gpus_on_a_mixed_machine_warn_of_cudas_other_order(gpu_pool, monkeypatch, caplog):
    """On a machine of two kinds of GPU, `CUDA_VISIBLE_DEVICES=1` from a scheduler
    that ran under CUDA's default order (fastest first) may mean another GPU than
    nvidia-smi's 1, which the pool uses; it started there without a word."""
    from vibevoice_pool.pool.devices import Gpu, order_warning

    mixed = [Gpu(0, "NVIDIA A10", 1), Gpu(1, "NVIDIA H100", 1), Gpu(2, "NVIDIA A10", 1)]
    same = [Gpu(i, "NVIDIA H100", 1, f"GPU-{i}aa") for i in range(3)]
    assert "CUDA_DEVICE_ORDER=unset" in order_warning(mixed, "1,2", None)
    assert "fastest first" in order_warning(mixed, "1", "FASTEST_FIRST")
    assert order_warning(mixed, "1", "PCI_BUS_ID") == ""  # the ids are the bus's
    assert order_warning(same, "1", None) == ""  # one kind: both orders agree
    assert order_warning(mixed, "GPU-1aa", None) == ""  # a UUID is one GPU in any order
    assert order_warning(mixed, None, None) == ""
    nvml = FakeNvml({0: FakeGpu(name="NVIDIA A10"), 1: FakeGpu(name="NVIDIA H100")})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    with caplog.at_level("INFO", logger="vibevoice_pool"):
        pool = gpu_pool(nvml, gpus="all")
    assert [w["device"] for w in pool.status()["workers"]] == ["cuda:1"]
    warned = [r for r in caplog.records if "nvidia-smi's order" in r.getMessage()]
    assert warned and warned[0].levelname == "WARNING", caplog.text


def test_a_worker_added_on_a_busy_gpu_counts_its_share_of_the_free_memory(gpu_pool):
    """A worker added at run time (`scale --add`, POST /v1/pool/workers) took the
    launch's workers_per_gpu as its share: added beside a running worker of a GPU, it
    counted the GPU's whole free memory as its own, as the first did (together up to
    twice what fits). It now counts one share of all the workers on that GPU."""
    pool = gpu_pool(FakeNvml({0: FakeGpu(), 1: FakeGpu()}), gpus="0")

    def share(i: int) -> int:  # what the worker is started with
        return pool.supervisor.slots[i].engine.gpu_share

    second = pool.add_worker("0")
    other_gpu = pool.add_worker("cuda:1")
    third = pool.add_worker("0")
    assert [share(0), share(second), share(other_gpu), share(third)] == [1, 2, 1, 3]
    n = len(pool.live_slots())
    wait_until(lambda: pool.ready_workers() == n, 60, what="the added workers")
    pool.remove_worker(second)
    wait_until(lambda: second not in pool.live_slots(), 30, what="the removed worker to go")
    assert share(pool.add_worker("0")) == 3  # two left on GPU 0, and this one
