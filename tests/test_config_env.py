"""Settings from VIBEVOICE_POOL_<NAME> environment variables (the container
convention): read at launch, below a config file and a flag, errors naming the
variable."""

import pytest

from vibevoice_pool import config, settings_help
from vibevoice_pool.cli import launch_config, parser
from vibevoice_pool.config import ConfigError, PoolConfig
from vibevoice_pool.environment import stray_variables


def cfg_from(*argv):
    return launch_config(parser().parse_args(["launch", *argv]))


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No setting leaks in from the shell that runs the tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)


def test_every_setting_has_its_variable():
    assert config.env_name("model_path") == "VIBEVOICE_POOL_MODEL_PATH"
    names = {config.env_name(n) for n in PoolConfig.model_fields}
    assert len(names) == len(PoolConfig.model_fields)
    block = settings_help.markdown()
    assert all(f"`{n}`" in block for n in names)


def test_variables_of_each_kind_are_read_and_validated(monkeypatch):
    given = {
        "VIBEVOICE_POOL_PORT": "9123",
        "VIBEVOICE_POOL_SHARE": "true",
        "VIBEVOICE_POOL_WARM_WEIGHTS": "0",
        "VIBEVOICE_POOL_SIM_SPEEDS": "1,0.5",
        "VIBEVOICE_POOL_POLICY": "round_robin",
        "VIBEVOICE_POOL_API_KEY": "a-key-from-the-environment",
        "VIBEVOICE_POOL_GRACE_S": "2.5",
        "vibevoice_pool_max_queue": "7",  # any case, as pydantic-settings matches it
    }
    for k, v in given.items():
        monkeypatch.setenv(k, v)
    cfg = cfg_from()
    assert (cfg.port, cfg.share, cfg.warm_weights) == (9123, True, False)
    assert cfg.sim_speeds == (1.0, 0.5) and cfg.policy == "round_robin"
    assert cfg.api_key == "a-key-from-the-environment"
    assert (cfg.grace_s, cfg.max_queue) == (2.5, 7)
    assert cfg_from().model_dump() == cfg.model_dump()  # nothing else moved


def test_a_file_overrides_the_environment_and_a_flag_overrides_both(monkeypatch, tmp_path):
    monkeypatch.setenv("VIBEVOICE_POOL_PORT", "9001")
    monkeypatch.setenv("VIBEVOICE_POOL_MAX_QUEUE", "11")
    monkeypatch.setenv("VIBEVOICE_POOL_INFERENCE_STEPS", "3")
    f = tmp_path / "pool.yaml"
    f.write_text("port: 9002\nmax_queue: 12\n")
    cfg = cfg_from("--config", str(f), "--max-queue", "13")
    assert (cfg.inference_steps, cfg.port, cfg.max_queue) == (3, 9002, 13)


def test_an_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("VIBEVOICE_POOL_PORT", "")
    monkeypatch.setenv("VIBEVOICE_POOL_MAX_QUEUE", "")
    assert cfg_from() == PoolConfig()


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("VIBEVOICE_POOL_PORT", "abc", "valid integer"),
        ("VIBEVOICE_POOL_SHARE", "maybe", "valid boolean"),
        ("VIBEVOICE_POOL_POLICY", "fastest", "least_work"),
        ("VIBEVOICE_POOL_MAX_QUEUE", "0", "greater than 0"),
    ],
)
def test_a_bad_variable_is_refused_naming_it(monkeypatch, variable, value, words):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as e:
        cfg_from()
    assert f"(from ${variable})" in str(e.value) and words in str(e.value)


def test_a_flag_over_a_bad_variable_is_not_blamed_on_it(monkeypatch):
    monkeypatch.setenv("VIBEVOICE_POOL_PORT", "abc")
    assert cfg_from("--port", "8123").port == 8123
    with pytest.raises(ConfigError) as e:
        cfg_from("--port", "-1")
    assert "$VIBEVOICE_POOL_PORT" not in str(e.value) and "port = " in str(e.value)


def test_nothing_is_read_without_launch(monkeypatch):
    monkeypatch.setenv("VIBEVOICE_POOL_PORT", "9123")
    assert PoolConfig().port == 7860 and config.build({}).port == 7860


def test_a_variable_that_names_no_setting_is_pointed_out():
    environ = {
        "VIBEVOICE_POOL_PROT": "8000",
        "VIBEVOICE_POOL_PORT": "8000",
        "VIBEVOICE_POOL_OWNER_FILE": "/x",  # the jobs client's own variable
        "PATH": "/bin",
    }
    assert stray_variables(environ) == [
        "$VIBEVOICE_POOL_PROT is not a setting; did you mean $VIBEVOICE_POOL_PORT?"
    ]


def test_a_variable_a_config_file_overrides_is_said_without_its_value(
    monkeypatch, tmp_path, caplog
):
    """DEPLOY.md runs the image with VIBEVOICE_POOL_MODEL_PATH and the shipped
    configs/vibevoice-1.5b.yaml, which sets model_path too: the file wins, and the
    variable was dropped without a word (the launch went for the hub's model)."""
    monkeypatch.setenv("VIBEVOICE_POOL_MODEL_PATH", "/models/mine")
    monkeypatch.setenv("VIBEVOICE_POOL_API_KEY", "a-secret-from-the-environment")
    monkeypatch.setenv("VIBEVOICE_POOL_MAX_QUEUE", "11")
    f = tmp_path / "pool.yaml"
    f.write_text("model_path: vibevoice/VibeVoice-1.5B-hf\napi_key: a-secret-of-the-file\n")
    with caplog.at_level("WARNING", logger="vibevoice_pool"):
        cfg = cfg_from("--config", str(f), "--api-key", "the-flag-wins-over-both")
    assert cfg.model_path == "vibevoice/VibeVoice-1.5B-hf" and cfg.max_queue == 11
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and "$VIBEVOICE_POOL_MODEL_PATH" in said[0], said
    assert str(f) in said[0] and "/models/mine" not in said[0]
    assert not [m for m in said if "secret" in m or "API_KEY" in m]  # a flag set it: no word
