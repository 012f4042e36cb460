"""The pool's settings, declared once: the fields of `PoolConfig`.

Each field is one setting: its type, default, bounds, choices and help text.
Everything else is read off the fields: the `launch` flags and their --help
(cli.py), the YAML keys of a config file, the validation, and the README's
settings table (settings_help.py: `python -m vibevoice_pool.settings_help --readme
README.md`).
Every setting is also an environment variable, VIBEVOICE_POOL_<NAME> (the
container convention), read by pydantic-settings when `launch` starts.
Precedence: built-in default < environment variable < config file (`--config`)
< command-line flag. Nothing is read from the environment at import time.

    build(values) -> PoolConfig     raw values (YAML, flags) -> validated, frozen
    cfg.replace(**changes)          a validated copy
    load_file(path) -> dict         a YAML file's raw settings
    environment.py: from_environment(), stray_variables(environ)  (the variables)
    settings_help.py: sections(), flag(name), markdown()  (what people read of them)

To add a setting: declare a field below (type, default, help, bounds) with its
section's maker, read it as `cfg.<name>`, and run the README command above (a
test fails until the README's table matches).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from vibevoice_pool.pool.policies import POLICIES
from workers.wire.messages import MAX_INFERENCE_STEPS, MAX_VOICE_S

ENGINES = ("sim", "vibevoice")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the setting."""


def _section(title: str):
    """A field maker for one section of the settings (a --help group, a README block)."""

    def make(default: Any, help: str, metavar: str = "", **bounds: Any) -> Any:
        extra = {"section": title, "metavar": metavar}
        return Field(default, description=help, json_schema_extra=extra, **bounds)

    return make


def _empty_if_none(v: Any) -> Any:
    return "" if v is None else v  # a YAML key with no value


def _split_floats(v: Any) -> Any:
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",") if x.strip())
    return v


Text = Annotated[str, BeforeValidator(_empty_if_none)]
Policy = Literal[tuple(POLICIES)]  # the names the policy registry knows
Positive = Annotated[float, Field(gt=0)]
Steps = Annotated[int, Field(gt=0, le=MAX_INFERENCE_STEPS)]  # what a request may ask

WORKERS = _section("Workers: where they run and what they serve")
SCHEDULING = _section("Scheduling")
RECOVERY = _section("Recovery")
FRONT = _section("The front: HTTP, the page, limits")
FILES = _section("Files, jobs and logs")
SIM = _section("The simulated engine (tests and benchmarks)")


class PoolConfig(BaseModel):
    """Every setting of the pool. It lives in the parent; what a worker needs of it
    crosses as that worker's EngineSpec and WorkerSpec (pool/devices.py, supervisor)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", coerce_numbers_to_str=True, validate_default=False
    )

    # ---- workers -----------------------------------------------------------
    gpus: Text = WORKERS(
        "all",
        "GPUs to use: CUDA ids such as 0,1,3; all (CPU workers with a warning when there "
        "is no GPU); or cpu:N",
        metavar="IDS",
    )
    backend: Literal["local", "ray"] = WORKERS("local", "local worker processes, or ray")
    address: Text = WORKERS(
        "",
        "ray backend: a cluster to join (auto or HOST:PORT); empty starts one",
        metavar="ADDRESS",
    )
    workers_per_gpu: int = WORKERS(1, "worker processes per GPU", gt=0)
    engine: Literal[ENGINES] = WORKERS(
        "vibevoice", "vibevoice (the model), or sim (a simulator for trying the pool)"
    )
    model_path: Text = WORKERS(
        "", "VibeVoice model: an HF-format folder or a hub id", metavar="PATH"
    )
    tiny_model: bool = WORKERS(False, "serve the built-in tiny random model (demo, tests)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = WORKERS("auto", "weights dtype")
    attn_implementation: str = WORKERS(
        "auto",
        "the LM's attention implementation: auto (flash_attention_2 on a GPU where the "
        "flash-attn package is installed, as microsoft's demo; else sdpa), sdpa, eager, ...",
        metavar="NAME",
    )
    max_batch_size: int = WORKERS(
        1,
        "rows a worker runs at once; requests join and leave the running batch at every "
        "step (continuous batching)",
        gt=0,
    )
    mem_budget_mb: float = WORKERS(
        0.0,
        "KV-cache budget of a worker's rows in MiB; a row waits until it fits (0: its share "
        "of the free GPU memory, free/workers_per_gpu, minus mem_headroom_mb; none on CPU)",
        ge=0,
    )
    mem_headroom_mb: float = WORKERS(
        1024.0, "GPU memory in MiB kept free when admitting rows (with mem_budget_mb 0)", ge=0
    )
    head_compile: Literal["", "default", "reduce-overhead", "max-autotune"] = WORKERS(
        "",
        "opt-in, not yet measured on a GPU: torch.compile mode of the diffusion head "
        "(reduce-overhead = CUDA graphs per row count); empty = off",
    )
    engine_mode: Literal["auto", "eager", "graphs", "graphs-lm"] = WORKERS(
        "auto",
        "how a VibeVoice worker runs the diffusion loop and the audio decode/encode: "
        "graphs (captured CUDA graphs per row bucket, checked against eager at first, "
        "eager again on a mismatch), eager, or auto (graphs on a GPU, eager on CPU); "
        "graphs-lm: graphs, and the LM's decode step captured too (opt-in, unmeasured)",
    )
    torch_threads: int = WORKERS(1, "torch threads per CPU worker", gt=0)
    inference_steps: Steps = WORKERS(10, "default diffusion steps per request (1-100)")
    runaway_factor: float = WORKERS(
        2.0,
        "a request that never ends is cut at this times the longer of its estimated "
        "length and its prompt's tokens (microsoft's max_length_times), and never before "
        "5 s (X-Stop-Reason: runaway_cap; max_audio_s still caps it)",
        gt=0,
    )
    worker_start: Literal["zygote", "spawn"] = WORKERS(
        "zygote",
        "how a worker process starts: forked from a template process that has imported "
        "torch and the model code (zygote), or spawned from nothing (spawn)",
    )
    warm_weights: bool = WORKERS(
        True,
        "hold a local model folder's weights in memory once, so a respawned worker maps "
        "them instead of reading the files",
    )

    # ---- scheduling --------------------------------------------------------
    policy: Policy = SCHEDULING(
        "least_work",
        "how a worker is chosen (least_work: the earliest expected finish; seed: the old "
        "demo's score)",
    )
    max_queue: int = SCHEDULING(
        50, "admission queue; when full, requests are refused at once (HTTP 429)", gt=0
    )
    owner_queue_share: float = SCHEDULING(
        0.5, "share of max_queue one named key may fill (HTTP 429 past it; 0: no cap)", ge=0, le=1
    )
    mem_reserve_mb: float = SCHEDULING(
        1024.0, "GPU memory in MiB a request needs beyond its length", ge=0
    )
    mem_per_audio_s_mb: float = SCHEDULING(
        1.0, "GPU memory in MiB per second of audio requested", ge=0
    )
    monitor_interval_s: float = SCHEDULING(1.0, "how often GPUs and workers are sampled", gt=0)
    device_lost_s: float = SCHEDULING(3.0, "a GPU failing NVML this long is lost", gt=0)
    request_timeout_s: float = SCHEDULING(1800.0, "longest a request may take end to end", gt=0)

    # ---- recovery ----------------------------------------------------------
    boot_timeout_s: float = RECOVERY(600.0, "longest a worker may take to load its engine", gt=0)
    heartbeat_s: float = RECOVERY(
        0.25, "how often a worker beats (must be well under hang_timeout_s)", gt=0
    )
    hang_timeout_s: float = RECOVERY(
        30.0, "a worker whose heartbeat is older is killed and replaced", gt=0
    )
    stall_timeout_s: float = RECOVERY(300.0, "a busy worker with no step this long is killed", gt=0)
    grace_s: float = RECOVERY(
        30.0, "on SIGINT/SIGTERM/SIGHUP, time from the signal to finish accepted requests", ge=0
    )
    max_attempts: int = RECOVERY(
        2, "workers a request may take down before it is answered worker_lost", gt=0
    )
    backoff_cap_s: float = RECOVERY(
        30.0,
        "longest wait before a respawn: deaths in a row wait 0, 1, 2, 4 ... s up to this",
        ge=0,
    )
    healthy_reset_s: float = RECOVERY(
        10.0, "a worker ready this long before it died starts the backoff over", ge=0
    )
    boot_failures_to_fail: int = RECOVERY(
        3, "failed boots in a row after which a slot halts (failed)", gt=0
    )
    failed_retry_s: float = RECOVERY(30.0, "how often a failed slot is tried again", gt=0)

    # ---- the front ---------------------------------------------------------
    host: str = FRONT("127.0.0.1", "address to bind (:: for IPv6 and IPv4)", metavar="ADDRESS")
    port: int = FRONT(7860, "port to bind", ge=0, lt=65536)
    share: bool = FRONT(False, "ask Gradio for a public share link")
    api_key: Text = FRONT(
        "",
        "require this Bearer key on the API and a login on the page (an admin key)",
        metavar="KEY",
    )
    api_keys: Text = FRONT(
        "",
        "a file of named keys ('name: [admin|user:] key' a line; no role: a user); each "
        "name owns its own jobs and voices; read again when it changes",
        metavar="FILE",
    )
    cors_origins: Text = FRONT(
        "",
        "origins allowed to call the API from a browser, comma-separated; none by default",
        metavar="ORIGINS",
    )
    allowed_hosts: Text = FRONT(
        "",
        "Host names served besides the loopback ones, comma-separated (*.example.org, "
        "or * for any)",
        metavar="HOSTS",
    )
    openai_voices: Text = FRONT(
        "",
        "presets the OpenAI voice names play, e.g. alloy=en-Alice_woman,echo=en-Carter_man; "
        "a name not given plays the preset of that name, else the presets in a fixed order "
        "(never an upload)",
        metavar="MAP",
    )
    max_connections: int = FRONT(1000, "open connections at most (fit to the file limit)", gt=0)
    client_max_connections: int = FRONT(64, "connections one client address may hold", gt=0)
    client_max_streams: int = FRONT(32, "requests one client address may have open; else 429", gt=0)
    header_timeout_s: float = FRONT(
        10.0, "a client must send its request headers within this", gt=0
    )
    max_header_kb: int = FRONT(64, "request line and headers at most, in KiB; else 431", ge=1)
    body_timeout_s: float = FRONT(10.0, "a request body keeps body_min_rate over this", gt=0)
    body_min_rate: float = FRONT(1024.0, "slowest request body accepted, bytes/s", gt=0)
    body_deadline_s: float = FRONT(120.0, "a request body must be whole within this", gt=0)
    send_timeout_s: float = FRONT(
        60.0, "a client that reads none of an answer for this long (its buffers full) is cut", gt=0
    )
    body_spool_kb: int = FRONT(64, "a larger request body waits on disk ($TMPDIR)", ge=1)
    spool_limit_mb: float = FRONT(4096.0, "disk all bodies on disk at once may take, MiB", gt=0)
    max_decodes: int = FRONT(2, "voice uploads decoded at once", gt=0)
    decode_wait_s: float = FRONT(
        30.0, "longest an upload waits for a decode turn before HTTP 429", gt=0
    )
    max_text_chars: int = FRONT(20000, "longest script accepted, in characters", gt=0)
    max_audio_s: float = FRONT(1800.0, "cap on the audio one request makes, in seconds", gt=0)
    max_upload_mb: float = FRONT(10.0, "largest voice upload accepted, in MiB", gt=0)
    max_voice_s: float = FRONT(
        60.0,
        f"longest voice sample accepted, in seconds (at most {MAX_VOICE_S:g}, the engine's limit)",
        gt=0,
        le=MAX_VOICE_S,
    )

    # ---- files, jobs, logs -------------------------------------------------
    voices_dir: Text = FILES("", "folder of voice presets (default: <cache>/voices)", metavar="DIR")
    cache_dir: Text = FILES(
        "",
        "folder for the tiny model and demo voices (default: ~/.cache/vibevoice-pool)",
        metavar="DIR",
    )
    data_dir: Text = FILES(
        "", "folder for durable jobs and results (default: <cache>/data)", metavar="DIR"
    )
    job_ttl_s: float = FILES(7 * 86400.0, "finished jobs and results expire after this", gt=0)
    jobs_disk_limit_mb: float = FILES(
        10240.0, "disk in MiB the jobs may use: results, expected results and bodies", gt=0
    )
    jobs_owner_disk_mb: float = FILES(
        2560.0, "of that, what one owner's jobs may hold, in MiB", gt=0
    )
    jobs_owner_max_active: int = FILES(200, "jobs one owner may have queued or running", gt=0)
    jobs_owner_running: int = FILES(
        0,
        "jobs of one owner handed to the pool at once (0: the pool's rows but one, so "
        "another owner's job starts at once)",
        ge=0,
    )
    log_format: Literal["text", "json"] = FILES("text", "log lines as text or json")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = FILES("INFO", "log level")

    # ---- the simulated engine ----------------------------------------------
    sim_speeds: Annotated[tuple[Positive, ...], BeforeValidator(_split_floats)] = SIM(
        (), "relative speed of each sim worker, e.g. 1,1,0.5,0.5", metavar="SPEEDS"
    )
    sim_rtf: float = SIM(0.05, "wall seconds per audio second at speed 1", ge=0)
    sim_chunk_s: float = SIM(0.5, "audio seconds per generation step", gt=0)
    sim_boot_s: float = SIM(0.0, "extra seconds a worker takes to boot", ge=0)
    sim_boot_error: Text = SIM(
        "", "make every worker fail to boot with this message", metavar="MESSAGE"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_for_a_value(cls, values: Any) -> Any:
        """`max_queue: yes` in YAML is a mistake, not 1."""
        for name, v in values.items() if isinstance(values, dict) else ():
            info = cls.model_fields.get(name)
            if isinstance(v, bool) and info is not None and info.annotation is not bool:
                raise ValueError(f"{name} = {v!r}: {name} is not a switch; give a value")
        return values

    @model_validator(mode="after")
    def _together(self) -> PoolConfig:
        if self.heartbeat_s * 2 > self.hang_timeout_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s}) must be at most half of hang_timeout_s "
                f"({self.hang_timeout_s}), or a live worker looks hung"
            )
        if self.client_max_streams > self.client_max_connections:
            raise ValueError(
                f"client_max_streams ({self.client_max_streams}) must be at most "
                f"client_max_connections ({self.client_max_connections})"
            )
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))

    def replace(self, **changes: Any) -> PoolConfig:
        return build(self.model_dump() | changes)


def build(values: dict[str, Any], origins: dict[str, str] | None = None) -> PoolConfig:
    """A validated PoolConfig from raw values (a YAML mapping, parsed flags).
    `origins` names where a value came from (an environment variable) for the errors."""
    known = PoolConfig.model_fields
    out = {}
    for key, raw in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(known)}"
            raise ConfigError(f"unknown setting {key!r}{hint}")
        if isinstance(raw, (list, tuple)) and known[name].annotation is str:
            raw = ",".join(str(v) for v in raw)  # a YAML list for a comma-separated setting
        out[name] = raw
    try:
        return PoolConfig(**out)
    except ValidationError as e:
        raise ConfigError(_complaints(e, origins or {})) from None


def _complaints(e: ValidationError, origins: dict[str, str]) -> str:
    lines = []
    for err in e.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        if err["loc"]:
            name = str(err["loc"][0])
            source = f" (from {origins[name]})" if name in origins else ""
            index = [i for i in err["loc"][1:] if isinstance(i, int)]  # in a list setting
            where = f" (item {index[0] + 1} of the list)" if index else ""
            lines.append(f"{name} = {err['input']!r}{where}{source}: {msg}")
        else:
            lines.append(msg)
    return "; ".join(lines)


def load_file(path: str | Path) -> dict[str, Any]:
    """The raw settings of a YAML config file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of setting: value")
    return data


ENV_PREFIX = "VIBEVOICE_POOL_"


def env_name(name: str) -> str:
    """The environment variable of a setting: VIBEVOICE_POOL_<NAME>."""
    return ENV_PREFIX + name.upper()


def default_cache_dir(cfg: PoolConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path.home() / ".cache" / "vibevoice-pool"


def data_dir(cfg: PoolConfig) -> Path:
    return Path(cfg.data_dir).expanduser() if cfg.data_dir else default_cache_dir(cfg) / "data"


def voices_dir(cfg: PoolConfig) -> Path:
    return (
        Path(cfg.voices_dir).expanduser() if cfg.voices_dir else default_cache_dir(cfg) / "voices"
    )
