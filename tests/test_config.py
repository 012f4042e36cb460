"""Settings: flags, config files, the old demo's spellings, --gpus planning."""

import dataclasses

import pytest

from vibevoice_pool import config
from vibevoice_pool.cli import launch_config, parser
from vibevoice_pool.config import ConfigError, PoolConfig, build
from vibevoice_pool.pool.devices import Gpu, plan

GPUS = [
    Gpu(0, "NVIDIA H100", 80 << 30),
    Gpu(1, "NVIDIA H100", 80 << 30),
    Gpu(3, "NVIDIA A100", 40 << 30),
]


def cfg_from(*argv):
    return launch_config(parser().parse_args(["launch", *argv]))


def test_every_setting_is_a_config_field_with_the_same_default():
    fields = {f.name: f.default for f in dataclasses.fields(PoolConfig)}
    assert set(fields) == {s.name for s in config.SETTINGS}
    for s in config.SETTINGS:
        assert fields[s.name] == s.default, s.name


def test_old_demo_flags_in_both_spellings():
    a = cfg_from(
        "--model_path",
        "/m",
        "--gpus",
        "0,1,3",
        "--inference_steps",
        "5",
        "--port",
        "8080",
        "--share",
    )
    b = cfg_from(
        "--model-path",
        "/m",
        "--gpus",
        "0,1,3",
        "--inference-steps",
        "5",
        "--port",
        "8080",
        "--share",
    )
    assert a == b
    assert (a.model_path, a.gpus, a.inference_steps, a.port, a.share) == (
        "/m",
        "0,1,3",
        5,
        8080,
        True,
    )


def test_defaults_protect():
    c = cfg_from()
    assert (c.host, c.port, c.share, c.max_queue, c.policy) == (
        "127.0.0.1",
        7860,
        False,
        50,
        "least_work",
    )


def test_flags_override_the_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("engine: sim\nmax_queue: 7\npolicy: seed\nsim_speeds: [1, 0.5]\n")
    c = cfg_from("--config", str(f), "--policy", "round_robin")
    assert (c.engine, c.max_queue, c.policy, c.sim_speeds) == ("sim", 7, "round_robin", (1.0, 0.5))


def test_deprecated_device_flag_is_accepted(caplog):
    ns = parser().parse_args(["launch", "--device", "cuda:0", "--engine", "sim"])
    assert launch_config(ns).engine == "sim"


@pytest.mark.parametrize(
    "values, words",
    [
        ({"policy": "fastest"}, "policy"),
        ({"max_queue": 0}, "max_queue"),
        ({"port": "http"}, "port"),
        ({"no_such_thing": 1}, "unknown setting"),
    ],
)
def test_bad_settings_name_the_setting(values, words):
    with pytest.raises(ConfigError, match=words):
        build(values)


def test_bad_config_file_is_a_clear_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load_file(f)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load_file(tmp_path / "nope.yaml")


def test_gpus_plan():
    assert [p.device for p in plan("0,3", 1, GPUS)] == ["cuda:0", "cuda:3"]
    assert [p.cuda_index for p in plan("all", 2, GPUS)] == [0, 0, 1, 1, 3, 3]
    assert [p.device for p in plan("cpu:3", 1, GPUS)] == ["cpu:0", "cpu:1", "cpu:2"]


def test_all_without_gpus_falls_back_to_cpu_workers_with_a_warning(caplog):
    placements = plan("all", 1, [])
    assert placements and all(not p.is_gpu for p in placements)
    assert "No GPU found" in caplog.text


def test_unknown_gpu_ids_list_the_gpus_found():
    with pytest.raises(ConfigError) as e:
        plan("0,2", 1, GPUS)
    msg = str(e.value)
    assert "no GPU 2" in msg and "0 (NVIDIA H100)" in msg and "3 (NVIDIA A100)" in msg


def test_duplicate_gpu_ids_are_refused():
    with pytest.raises(ConfigError, match="more than once.*GPUs found"):
        plan("1,1", 1, GPUS)


def test_gpu_ids_on_a_machine_without_gpus_say_none_were_found():
    with pytest.raises(ConfigError, match="GPUs found: none"):
        plan("0", 1, [])
    with pytest.raises(ConfigError, match="cpu:N"):
        plan("cpu:x", 1, [])
