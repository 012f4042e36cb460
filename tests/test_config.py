"""Settings: flags, config files, the old demo's spellings, the README's table, --gpus planning."""

import contextlib
import io
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vibevoice_pool import config, settings_help
from vibevoice_pool.cli import launch_config, parser
from vibevoice_pool.config import ConfigError, PoolConfig, build, load_file
from vibevoice_pool.pool.devices import Gpu, plan
from vibevoice_pool.pool.policies import POLICIES

ROOT = Path(__file__).resolve().parents[1]

GPUS = [
    Gpu(0, "NVIDIA H100", 80 << 30),
    Gpu(1, "NVIDIA H100", 80 << 30),
    Gpu(3, "NVIDIA A100", 40 << 30),
]


def cfg_from(*argv):
    return launch_config(parser().parse_args(["launch", *argv]))


def launch_help() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser().parse_args(["launch", "--help"])
    return out.getvalue()


def test_every_setting_is_a_flag_in_both_spellings_with_its_default():
    defaults = cfg_from()
    assert defaults == PoolConfig()
    for name, info in PoolConfig.model_fields.items():
        assert getattr(defaults, name) == info.default, name
    launch = parser()._subparsers._group_actions[0].choices["launch"]
    options = {o for a in launch._actions for o in a.option_strings}
    for name in PoolConfig.model_fields:
        assert settings_help.flag(name) in options and f"--{name}" in options, name


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
        ({"inference_steps": 150}, "inference_steps.*less than or equal to 100"),
        ({"no_such_thing": 1}, "unknown setting"),
        ({"sim_speeds": "1,abc,0"}, r"'abc' \(item 2 of the list\).*'0' \(item 3 of the list\)"),
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


def test_workers_per_gpu_with_cpu_workers_says_it_does_not_apply(caplog):
    assert len(plan("cpu:2", 3, [])) == 2
    assert "--workers-per-gpu 3 applies to GPUs only" in caplog.text
    caplog.clear()
    assert len(plan("all", 2, [])) >= 1
    assert "--gpus cpu:N" in caplog.text
    caplog.clear()
    plan("cpu:2", 1, [])
    assert "workers-per-gpu" not in caplog.text


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


def test_gpu_ids_without_any_gpu_say_how_to_run_cpu_workers_instead():
    """The old demo's `--gpus "0,2"` on a machine whose driver answers nothing: the
    message said `GPUs found: none` and no way on; it names cpu:N (and the driver)."""
    for spec in ("0,2", "1", "None", "0,0"):
        with pytest.raises(ConfigError) as e:
            plan(spec, 1, [])
        msg = str(e.value)
        assert "GPUs found: none" in msg and "--gpus cpu:N" in msg, msg
        assert "NVIDIA driver" in msg, msg
    with pytest.raises(ConfigError) as e:  # with GPUs, the list is the way on
        plan("0,2", 1, GPUS)
    assert "cpu:N" not in str(e.value)
    for spec in ("cpu:x", "cpu4", "cpus:2"):
        with pytest.raises(ConfigError, match="cpu:N"):
            plan(spec, 1, [])


# ---- one declaration: validation ----------------------------------------------------


@pytest.mark.parametrize("word", ["maybe", "2", "nein", ""])
def test_a_switch_that_is_not_a_boolean_is_an_error_not_false(word, tmp_path):
    with pytest.raises(ConfigError, match=f"share = {word!r}: .*boolean"):
        build({"share": word})
    f = tmp_path / "c.yaml"
    f.write_text(f"tiny_model: '{word}'\n")
    with pytest.raises(ConfigError, match="tiny_model"):
        cfg_from("--config", str(f))


def test_a_yes_or_no_given_to_a_setting_that_is_not_a_switch_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_queue: yes\n")
    with pytest.raises(ConfigError, match="max_queue = True: max_queue is not a switch"):
        cfg_from("--config", str(f))
    with pytest.raises(ConfigError, match="sim_rtf"):
        build({"sim_rtf": False})


def test_switches_take_yes_and_no_from_files_and_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("share: yes\nwarm_weights: false\n")
    c = cfg_from("--config", str(f))
    assert (c.share, c.warm_weights) == (True, False)
    c = cfg_from("--config", str(f), "--no-share", "--warm_weights")
    assert (c.share, c.warm_weights) == (False, True)


def test_a_switch_turns_off_in_both_spellings():
    """Every flag takes the underscore spelling (the README), `--no_...` of a switch too:
    `--no_warm_weights` was refused as an unrecognized argument."""
    for argv in (["--no-warm-weights"], ["--no_warm_weights"], ["--no_tiny_model"]):
        c = cfg_from("--warm-weights", "--tiny-model", *argv)
        assert not (c.warm_weights if "warm" in argv[0] else c.tiny_model), argv
    assert cfg_from("--no_warm_weights", "--warm_weights").warm_weights  # the last one wins


def test_the_old_demos_abbreviations_mean_its_flags_not_ambiguous_spellings(capsys):
    """The old demo's argparse took any unique prefix of its six flags (`--model /m`,
    `--inference 5`, `--gpu 1`). Each setting has two spellings here, so `--model` matched
    `--model-path` and `--model_path`, one setting, and was refused as ambiguous."""
    c = cfg_from("--model", "/m", "--inference", "5", "--gpu", "1", "--sh")
    assert (c.model_path, c.inference_steps, c.gpus, c.share) == ("/m", 5, "1", True)
    c = cfg_from("--tiny", "--inference_s", "7", "--no_tiny")
    assert (c.inference_steps, c.tiny_model) == (7, False)
    with pytest.raises(SystemExit):  # two settings begin so: still refused, both named
        cfg_from("--max", "3")
    err = capsys.readouterr().err
    assert "ambiguous option: --max could match" in err and "--max-queue" in err
    assert "--max_queue" not in err  # one spelling a setting


def test_every_registered_policy_is_a_choice_and_nothing_else():
    for name in POLICIES:
        assert build({"policy": name}).policy == name
    with pytest.raises(ConfigError) as e:
        build({"policy": "fastest"})
    assert all(name in str(e.value) for name in POLICIES)


def test_an_unknown_setting_suggests_the_nearest():
    with pytest.raises(ConfigError, match="unknown setting 'max_qeue'; did you mean 'max_queue'"):
        build({"max_qeue": 3})


def test_yaml_numbers_and_blanks_read_as_text(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gpus: 0\nmodel_path:\napi_key: 1234567890123456\nsim_speeds: 1, 0.5\n")
    c = cfg_from("--config", str(f))
    assert (c.gpus, c.model_path, c.api_key) == ("0", "", "1234567890123456")
    assert c.sim_speeds == (1.0, 0.5)
    with pytest.raises(ConfigError, match="sim_speeds"):
        build({"sim_speeds": "1,0"})


def test_limits_that_were_constants_are_settings():
    c = cfg_from(
        "--max-upload-mb",
        "2",
        "--max_voice_s",
        "30",
        "--backoff-cap-s",
        "8",
        "--heartbeat-s",
        "0.5",
        "--boot-failures-to-fail",
        "5",
        "--healthy-reset-s",
        "4",
    )
    assert c.max_upload_bytes == 2 << 20
    assert (c.max_voice_s, c.backoff_cap_s, c.heartbeat_s) == (30.0, 8.0, 0.5)
    assert (c.boot_failures_to_fail, c.healthy_reset_s) == (5, 4.0)
    with pytest.raises(ConfigError, match="max_upload_mb"):
        build({"max_upload_mb": 0})


def test_max_voice_s_stops_at_the_engines_own_limit():
    """A longer limit was taken, and every sample past 120 s that it let in (uploads
    stored with 201 included) was then refused by the worker at synthesis."""
    from workers.wire.messages import MAX_VOICE_S

    assert build({"max_voice_s": MAX_VOICE_S}).max_voice_s == MAX_VOICE_S
    with pytest.raises(ConfigError, match="max_voice_s"):
        cfg_from("--max-voice-s", str(MAX_VOICE_S + 1))


def test_a_heartbeat_slower_than_half_the_hang_timeout_is_refused():
    with pytest.raises(ConfigError, match="heartbeat_s .* hang_timeout_s"):
        build({"heartbeat_s": 2, "hang_timeout_s": 3})
    assert build({"heartbeat_s": 1, "hang_timeout_s": 3}).heartbeat_s == 1.0


def test_a_config_is_frozen_replaced_with_validation_and_crosses_processes():
    c = build({"engine": "sim", "sim_speeds": [1, 0.5]})
    with pytest.raises(ValueError):
        c.port = 1  # type: ignore[misc]
    assert c.replace(max_queue=7).max_queue == 7
    with pytest.raises(ConfigError, match="max_queue"):
        c.replace(max_queue=0)
    assert pickle.loads(pickle.dumps(c)) == c


def test_the_shipped_config_files_are_valid():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for f in files:
        assert isinstance(build(config.load_file(f)), PoolConfig), f


# ---- one declaration: the README and --help ------------------------------------------


def _readme_block(text: str) -> str:
    assert settings_help.START in text and settings_help.END in text
    return text.split(settings_help.START, 1)[1].split(settings_help.END, 1)[0]


def test_readme_and_launch_help_list_the_same_settings():
    readme = set(
        re.findall(
            r"^\| `(--[a-z0-9-]+)` \|", _readme_block((ROOT / "README.md").read_text()), re.M
        )
    )
    shown = set(re.findall(r"^  (--[a-z0-9-]+)", launch_help(), re.M)) - {
        "--config",
        "--device",
        "--help",
    }
    assert readme == shown == {settings_help.flag(n) for n in PoolConfig.model_fields}


# Flags the docs show for other programs: docker, ray start, buildah, debootstrap,
# schemathesis, unshare, and the benchmarks' scripts
OTHER_PROGRAMS_FLAGS = {
    "--block", "--build-arg", "--checks", "--disable-usage-stats", "--entrypoint",
    "--exclude-path-regex", "--head", "--include-dashboard", "--isolation", "--max-time",
    "--name", "--net", "--network", "--pull", "--shm-size", "--stop-timeout", "--variant",
    "--cpu-image-bytes", "--cpu-torch-wheel", "--out", "--quick", "--readme", "--from-literal",
    "--read-only", "--tmpfs", "--rm", "--rounds",
}  # fmt: skip


def test_every_flag_the_docs_show_is_a_flag_of_a_command():
    """A flag the README or an operator's doc writes is one `vibevoice-pool` takes (in
    either spelling), or one of another program's: a renamed flag fails here."""
    docs = ["README.md", *(f"docs/{d}.md" for d in ("OPERATIONS", "DEPLOY", "RAY", "MODEL"))]
    shown = set()
    for doc in docs:
        shown |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", (ROOT / doc).read_text()))
    commands = parser()._subparsers._group_actions[0].choices.values()
    taken = {o for p in commands for a in p._actions for o in a.option_strings}
    launch = parser()._subparsers._group_actions[0].choices["launch"]
    unknown = sorted(
        f
        for f in shown - OTHER_PROGRAMS_FLAGS
        if f not in taken and len(launch._get_option_tuples(f)) != 1  # an abbreviation
    )
    assert not unknown, unknown
    assert {"--model_path", "--gpus", "--no-warm-weights", "--async"} <= shown


def test_readme_table_is_the_generated_one():
    assert _readme_block((ROOT / "README.md").read_text()) == "\n" + settings_help.markdown()


def test_the_generator_rewrites_only_its_block(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    before = readme.read_text()
    stale = before.replace("| `--max-queue` |", "| `--old-flag` |")
    readme.write_text(stale)
    run = [sys.executable, "-m", "vibevoice_pool.settings_help", "--readme", str(readme)]
    out = subprocess.run(run, capture_output=True, text=True, check=True, cwd=ROOT)
    assert "updated" in out.stdout and readme.read_text() == before
    out = subprocess.run(run, capture_output=True, text=True, check=True, cwd=ROOT)
    assert "already current" in out.stdout


# ---- the limits reach the server --------------------------------------------------------


def test_the_upload_size_and_voice_length_are_the_settings(sim_pool):
    import base64

    from fastapi.testclient import TestClient
    from serving import wav_bytes

    from vibevoice_pool.api.app import create_app
    from vibevoice_pool.server import build_front

    def speak(sample: bytes):
        body = {
            "script": "Speaker 1: hi",
            "speakers": [{"audio": base64.b64encode(sample).decode()}],
        }
        return client.post("/v1/synthesize", json=body)

    # 0.05 MiB = 52,428 bytes; a 16-bit 24 kHz WAV is 48,000 bytes a second
    with sim_pool(gpus="cpu:1", max_upload_mb=0.05, max_voice_s=0.5) as pool:
        with TestClient(create_app(build_front(pool.cfg, pool, environ={}))) as client:
            assert speak(wav_bytes(0.4)).status_code == 200
            too_long = speak(wav_bytes(0.8))  # 38 KB: fits, but longer than 0.5 s
            assert too_long.status_code == 400, too_long.text
            assert "0.5" in too_long.json()["error"]["message"]
            assert speak(wav_bytes(1.2)).status_code == 413  # 57 KB
            files = {"file": ("v.wav", wav_bytes(1.2), "audio/wav")}
            assert client.post("/v1/voices", files=files, data={"name": "v"}).status_code == 413


def test_the_heartbeat_setting_reaches_the_worker(sim_pool):
    import time

    from workers.wire.board import Col

    def beats_in(pool, seconds: float) -> int:
        seen, end = set(), time.monotonic() + seconds
        while time.monotonic() < end:
            seen.add(pool.board.get(0, Col.HEARTBEAT))
            time.sleep(0.01)
        return len(seen)

    with sim_pool(gpus="cpu:1", heartbeat_s=1.0) as pool:
        slow = beats_in(pool, 2.0)
    with sim_pool(gpus="cpu:1", heartbeat_s=0.1) as pool:
        fast = beats_in(pool, 2.0)
    assert slow <= 3 and fast >= 10, (slow, fast)


def test_a_yaml_list_is_taken_for_a_comma_separated_setting(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gpus: [0, 1]\nallowed_hosts:\n  - tts.example.org\n  - tts2.example.org\n")
    c = build(load_file(f))
    assert (c.gpus, c.allowed_hosts) == ("0,1", "tts.example.org,tts2.example.org")


def test_version_is_printed_and_is_the_packages():
    import tomllib

    from vibevoice_pool import __version__

    out = subprocess.run(
        [sys.executable, "-m", "vibevoice_pool", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == f"vibevoice-pool {__version__}"
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["version"] == __version__
