"""The pool's settings: one typed, validated config that reaches every process.

Each setting is declared once in SETTINGS (name, type, default, help, check);
the CLI flags, the YAML config files and `PoolConfig` all come from that list.
Precedence: built-in default < config file (`--config`) < command-line flag.
Nothing is read from the environment at import time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

POLICIES = ("least_work", "seed", "least_queue", "round_robin", "power_of_two", "random")
ENGINES = ("sim", "vibevoice")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class Setting:
    name: str
    type: Callable[[Any], Any]
    default: Any
    help: str
    check: Callable[[Any], str | None] = lambda v: None  # returns a complaint or None
    flag: bool = True  # exposed as a command-line flag

    @property
    def is_switch(self) -> bool:
        return self.type is _bool


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() in ("1", "true", "yes", "on")


def _positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _one_of(options) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def _floats(v) -> tuple[float, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(float(x) for x in v)
    return tuple(float(x) for x in str(v).split(",") if x.strip())


def _opt_str(v) -> str:
    return "" if v is None else str(v)


SETTINGS: tuple[Setting, ...] = (
    # where the workers run
    Setting("gpus", _opt_str, "all", "GPUs to use: 'all', CUDA ids such as '0,1,3', or 'cpu:N'"),
    Setting("backend", str, "local", "local worker processes, or ray", _one_of(("local", "ray"))),
    Setting(
        "address",
        _opt_str,
        "",
        "ray backend: a cluster to join (auto or HOST:PORT); empty starts one",
    ),
    Setting("workers_per_gpu", int, 1, "worker processes per GPU", _positive),
    Setting("engine", str, "vibevoice", "engine: vibevoice (the model) or sim", _one_of(ENGINES)),
    Setting("model_path", _opt_str, "", "VibeVoice model: an HF-format folder or a hub id"),
    Setting(
        "dtype", str, "auto", "weights dtype", _one_of(("auto", "bfloat16", "float16", "float32"))
    ),
    Setting("attn_implementation", str, "sdpa", "attention implementation (sdpa, eager, ...)"),
    Setting(
        "max_batch_size", int, 1, "rows one worker runs at once (continuous batching)", _positive
    ),
    Setting(
        "mem_budget_mb",
        float,
        0.0,
        "KV cache budget of one worker's running rows in MiB; a row waits until it fits "
        "(0: free GPU memory minus mem_headroom_mb; no limit on CPU)",
        _non_negative,
    ),
    Setting(
        "head_compile",
        str,
        "",
        "opt-in, not yet measured on a GPU: torch.compile mode of the diffusion head "
        "(reduce-overhead = CUDA graphs per row count); empty = off",
        _one_of(("", "default", "reduce-overhead", "max-autotune")),
    ),
    Setting(
        "mem_headroom_mb",
        float,
        1024.0,
        "GPU memory kept free when admitting rows (with mem_budget_mb 0)",
        _non_negative,
    ),
    Setting("torch_threads", int, 1, "torch threads per CPU worker", _positive),
    Setting("inference_steps", int, 10, "default diffusion steps per request", _positive),
    Setting(
        "runaway_factor",
        float,
        2.0,
        "a request that never ends is cut at this times its estimated length (max_audio_s "
        "still caps it)",
        _positive,
    ),
    # scheduling
    Setting("policy", str, "least_work", "how a worker is chosen", _one_of(POLICIES)),
    Setting("max_queue", int, 50, "admission queue size; a full queue refuses at once", _positive),
    Setting(
        "bind_at_arrival",
        _bool,
        False,
        "send each request to a worker's own queue on arrival (for comparison: late binding wins)",
    ),
    Setting(
        "mem_reserve_mb",
        float,
        1024.0,
        "GPU memory a request needs beyond its length",
        _non_negative,
    ),
    Setting(
        "mem_per_audio_s_mb", float, 1.0, "GPU memory per second of audio requested", _non_negative
    ),
    Setting("monitor_interval_s", float, 1.0, "how often GPUs and workers are sampled", _positive),
    Setting("device_lost_s", float, 3.0, "a GPU failing NVML this long is lost", _positive),
    Setting("request_timeout_s", float, 1800.0, "longest a request may take end to end", _positive),
    # recovery
    Setting(
        "boot_timeout_s", float, 600.0, "longest a worker may take to load its engine", _positive
    ),
    Setting(
        "hang_timeout_s", float, 30.0, "a worker whose heartbeat is older is killed", _positive
    ),
    Setting(
        "stall_timeout_s", float, 300.0, "a busy worker with no step this long is killed", _positive
    ),
    Setting("grace_s", float, 30.0, "on shutdown, time to finish accepted requests", _non_negative),
    Setting("max_attempts", int, 2, "workers a request may take down before quarantine", _positive),
    Setting("failed_retry_s", float, 30.0, "how often a failed slot is tried again", _positive),
    Setting(
        "worker_start",
        str,
        "zygote",
        "how a worker process starts: forked from a template process that has imported "
        "torch and the model code (zygote), or spawned from nothing (spawn)",
        _one_of(("zygote", "spawn")),
    ),
    Setting(
        "warm_weights",
        _bool,
        True,
        "hold a local model folder's weights in memory once, so a respawned worker maps "
        "them instead of reading the files",
    ),
    # front
    Setting("host", str, "127.0.0.1", "address to bind"),
    Setting("port", int, 7860, "port to bind", lambda v: None if 0 <= v < 65536 else "0-65535"),
    Setting("share", _bool, False, "ask Gradio for a public share link"),
    Setting("api_key", _opt_str, "", "require this Bearer key on the API and a login on the page"),
    Setting(
        "cors_origins",
        _opt_str,
        "",
        "origins allowed to call the API from a browser, comma-separated; none by default",
    ),
    Setting(
        "api_keys",
        _opt_str,
        "",
        "file of named keys, one 'name: key' a line; each name owns its own jobs",
    ),
    Setting(
        "allowed_hosts",
        _opt_str,
        "",
        "Host names the server answers besides the loopback ones, comma-separated ('*': any)",
    ),
    Setting(
        "max_connections", int, 1000, "open connections at most (fit to the file limit)", _positive
    ),
    Setting(
        "header_timeout_s",
        float,
        10.0,
        "a client must send its request headers within this",
        _positive,
    ),
    Setting(
        "body_timeout_s",
        float,
        10.0,
        "grace before a request body must keep body_min_rate",
        _positive,
    ),
    Setting("body_min_rate", float, 1024.0, "slowest request body accepted, bytes/s", _positive),
    Setting("max_decodes", int, 2, "voice uploads decoded at once", _positive),
    Setting("max_text_chars", int, 20000, "longest script accepted, in characters", _positive),
    Setting("max_audio_s", float, 1800.0, "cap on the audio one request makes", _positive),
    Setting("voices_dir", _opt_str, "", "folder of voice presets (default: <cache>/voices)"),
    Setting("cache_dir", _opt_str, "", "folder for the tiny model and demo voices"),
    Setting(
        "data_dir", _opt_str, "", "folder for durable jobs and results (default: <cache>/data)"
    ),
    Setting(
        "job_ttl_s", float, 7 * 86400.0, "finished jobs and results expire after this", _positive
    ),
    Setting("jobs_disk_limit_mb", float, 10240.0, "disk the job results may use", _positive),
    Setting("log_format", str, "text", "log lines as text or json", _one_of(("text", "json"))),
    Setting("log_level", str, "INFO", "log level", _one_of(("DEBUG", "INFO", "WARNING", "ERROR"))),
    # the simulated engine (tests and benchmarks)
    Setting("sim_speeds", _floats, (), "relative speed of each sim worker, e.g. 1,1,0.5,0.5"),
    Setting("sim_rtf", float, 0.05, "sim: wall seconds per audio second at speed 1", _non_negative),
    Setting("sim_chunk_s", float, 0.5, "sim: audio seconds per generation step", _positive),
    Setting("sim_boot_s", float, 0.0, "sim: extra seconds a worker takes to boot", _non_negative),
    Setting("sim_boot_error", _opt_str, "", "sim: make every worker fail to boot with this"),
    Setting("tiny_model", _bool, False, "serve the built-in tiny random model (demo, tests)"),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class PoolConfig:
    gpus: str = "all"
    backend: str = "local"
    address: str = ""
    workers_per_gpu: int = 1
    engine: str = "vibevoice"
    model_path: str = ""
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    max_batch_size: int = 1
    mem_budget_mb: float = 0.0
    mem_headroom_mb: float = 1024.0
    head_compile: str = ""
    torch_threads: int = 1
    inference_steps: int = 10
    runaway_factor: float = 2.0
    policy: str = "least_work"
    max_queue: int = 50
    bind_at_arrival: bool = False
    mem_reserve_mb: float = 1024.0
    mem_per_audio_s_mb: float = 1.0
    monitor_interval_s: float = 1.0
    device_lost_s: float = 3.0
    request_timeout_s: float = 1800.0
    boot_timeout_s: float = 600.0
    hang_timeout_s: float = 30.0
    stall_timeout_s: float = 300.0
    grace_s: float = 30.0
    max_attempts: int = 2
    failed_retry_s: float = 30.0
    worker_start: str = "zygote"
    warm_weights: bool = True
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    api_key: str = ""
    cors_origins: str = ""
    api_keys: str = ""
    allowed_hosts: str = ""
    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    body_min_rate: float = 1024.0
    max_decodes: int = 2
    max_text_chars: int = 20000
    max_audio_s: float = 1800.0
    voices_dir: str = ""
    cache_dir: str = ""
    data_dir: str = ""
    job_ttl_s: float = 7 * 86400.0
    jobs_disk_limit_mb: float = 10240.0
    log_format: str = "text"
    log_level: str = "INFO"
    sim_speeds: tuple[float, ...] = ()
    sim_rtf: float = 0.05
    sim_chunk_s: float = 0.5
    sim_boot_s: float = 0.0
    sim_boot_error: str = ""
    tiny_model: bool = False

    def replace(self, **changes) -> PoolConfig:
        return build(dataclasses.asdict(self) | changes)


def build(values: dict[str, Any]) -> PoolConfig:
    """A validated PoolConfig from raw values (a YAML mapping, parsed flags)."""
    out = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        setting = _BY_NAME.get(name)
        if setting is None:
            raise ConfigError(f"unknown setting {key!r}; known: {', '.join(sorted(_BY_NAME))}")
        try:
            value = setting.type(raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: cannot read {raw!r} ({e})") from None
        complaint = setting.check(value)
        if complaint:
            raise ConfigError(f"{name} = {value!r}: {complaint}")
        out[name] = value
    return PoolConfig(**out)


def load_file(path: str | Path) -> dict[str, Any]:
    """The raw settings of a YAML config file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of setting: value")
    return data


def default_cache_dir(cfg: PoolConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path.home() / ".cache" / "vibevoice-pool"


def data_dir(cfg: PoolConfig) -> Path:
    if cfg.data_dir:
        return Path(cfg.data_dir).expanduser()
    return default_cache_dir(cfg) / "data"


def voices_dir(cfg: PoolConfig) -> Path:
    if cfg.voices_dir:
        return Path(cfg.voices_dir).expanduser()
    return default_cache_dir(cfg) / "voices"
