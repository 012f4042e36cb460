"""The `vibevoice-pool` command. Imports stay inside the commands: a spawned
worker re-imports the main script, and must not load the front ends.

    launch            serve the pool (every field of config.PoolConfig is a flag)
    synth             send a script to a running server, write the audio (--async: as a job)
    jobs              list your jobs, follow one and write its audio, or cancel one
    status            print the pool's status panel as a table
    health            exit 0 if the server is ready to serve (the image's health check)
    make-tiny-model   build the tiny random VibeVoice used by the demo and tests
    convert           convert an original-layout VibeVoice checkpoint to HF
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys

log = logging.getLogger("vibevoice_pool")


class _Parser(argparse.ArgumentParser):
    """argparse, where an abbreviation that matches both spellings of one setting means
    that setting: the old demo's `--model /m` is --model_path (it matched --model-path
    and --model_path, and argparse called it ambiguous). Two settings stay ambiguous."""

    def _get_option_tuples(self, option_string):
        seen: set = set()
        out = []
        for match in super()._get_option_tuples(option_string):
            dest = match[0].dest if match[0] is not None else object()
            if dest not in seen:  # the first is the listed spelling (--model-path)
                seen.add(dest)
                out.append(match)
        return out


def _launch_parser(sub) -> None:
    """Every field of config.PoolConfig is a flag, in its section, with its help."""
    from vibevoice_pool import settings_help

    p = sub.add_parser(
        "launch",
        help="serve the pool",
        description="Serve the pool. Each flag is also a key of a --config YAML file;\n"
        "flags override the file. Every flag takes underscores too, as the old\n"
        "demo wrote them: --model_path is --model-path.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [--config FILE] [--SETTING VALUE ...]",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE", help="a YAML file of settings; flags override it")
    p.add_argument(
        "--device", dest="_device", metavar="DEVICE", help="deprecated: devices come from --gpus"
    )
    for title, fields in settings_help.sections():
        group = p.add_argument_group(title)
        for name, info in fields:
            _add_setting(group, p, name, info)


def _add_setting(group, p, name: str, info) -> None:
    from vibevoice_pool import settings_help

    options = [o for o in settings_help.choices(info) if o]  # "" (off) is said in the help
    words, default = info.description, settings_help.shown(info.default)
    if len(options) > 4:
        words += f"; one of {', '.join(options)}"
    if default and "default" not in words:
        words += f" (default: {default})"
    if settings_help.is_switch(info):
        kind = {"action": argparse.BooleanOptionalAction}
    elif options and len(options) <= 4:
        kind = {"metavar": "{" + ",".join(options) + "}"}
    else:
        kind = {"metavar": _metavar(name, info)}
    group.add_argument(settings_help.flag(name), dest=name, help=words, **kind)
    if "_" in name:  # the old demo's spelling, accepted, not listed twice
        p.add_argument(f"--{name}", dest=name, help=argparse.SUPPRESS, **kind)
        if settings_help.is_switch(info):  # and its off: --no_warm_weights as --no-warm-weights
            p.add_argument(f"--no_{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


def _metavar(name: str, info) -> str:
    declared = info.json_schema_extra.get("metavar")
    if declared:
        return declared
    if name.endswith("_s"):
        return "SECONDS"
    if name.endswith("_mb"):
        return "MIB"
    return {int: "N", float: "X"}.get(info.annotation, "NAME")


KEY_HELP = "the server's API key (default: $VIBEVOICE_POOL_API_KEY)"
URL_HELP = (
    "the server (default: $VIBEVOICE_POOL_URL, else the one server you run on this machine, "
    "else 127.0.0.1 at $VIBEVOICE_POOL_PORT or 7860)"
)


def _client_parsers(sub) -> None:
    p = sub.add_parser("synth", help="synthesize a script on a running server")
    p.add_argument("--url", default=None, help=URL_HELP)
    p.add_argument("--script", required=True, help="a text file, or - for stdin")
    p.add_argument("--voice", action="append", default=[], help="a preset per speaker, in order")
    p.add_argument(
        "--cfg-scale", type=float, default=1.3, help="guidance, 1.0-2.0 (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, help="diffusion steps (default: the server's)")
    p.add_argument("--seed", type=int, help="the same seed gives the same audio (default: random)")
    p.add_argument(
        "--format", default=None, help="wav, flac, mp3, opus, aac or pcm (default: -o's extension)"
    )
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--api-key", default=None, help=KEY_HELP)
    p.add_argument(
        "--async",
        dest="as_job",
        action="store_true",
        help="run it as a durable job (POST /v1/jobs): it survives a closed terminal and a "
        "restarted server; long scripts should use this",
    )

    p = sub.add_parser("jobs", help="list your jobs, follow one and write its audio, or cancel one")
    p.add_argument("job_id", nargs="?", help="a job to follow to its end (with -o), or `cancel ID`")
    p.add_argument("cancel_id", nargs="?", metavar="ID", help="after `cancel`: the job to stop")
    p.add_argument("-o", "--output", help="where to write the job's audio")
    p.add_argument("--url", default=None, help=URL_HELP)
    p.add_argument("--api-key", default=None, help=KEY_HELP)
    p.add_argument("--limit", type=int, default=20, help="how many jobs to list")

    p = sub.add_parser("status", help="print the pool's status")
    p.add_argument("--url", default=None, help=URL_HELP)
    p.add_argument("--api-key", default=None, help=KEY_HELP)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "health", help="exit 0 if the server is ready to serve, 1 if not (health checks)"
    )
    p.add_argument("--url", default=None, help=URL_HELP)
    p.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for an answer")

    p = sub.add_parser("scale", help="add or remove workers of a running server")
    p.add_argument("--url", default=None, help=URL_HELP)
    p.add_argument("--api-key", default=None, help=KEY_HELP)
    p.add_argument("--add", action="append", default=[], metavar="DEVICE", help="cpu, cuda:N or N")
    p.add_argument("--remove", action="append", default=[], type=int, metavar="ID")

    p = sub.add_parser("make-tiny-model", help="build the tiny random VibeVoice model")
    p.add_argument("dir")

    p = sub.add_parser("convert", help="convert an original-layout checkpoint to the HF layout")
    p.add_argument("src", help="original-layout folder or hub id (microsoft/VibeVoice-1.5B)")
    p.add_argument("dst", help="new folder for the HF-layout checkpoint")
    p.add_argument(
        "--tokenizer",
        help="tokenizer folder or hub id (default: the checkpoint's own, else the one its "
        "preprocessor_config names, else Qwen2.5 of its width)",
    )


def parser() -> argparse.ArgumentParser:
    from vibevoice_pool import __version__

    ap = _Parser(  # its subcommands' parsers are _Parser too
        prog="vibevoice-pool", description="Serve VibeVoice on every GPU of a machine."
    )
    ap.add_argument("--version", action="version", version=f"vibevoice-pool {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _launch_parser(sub)
    _client_parsers(sub)
    return ap


def launch_config(ns: argparse.Namespace):
    """Default < VIBEVOICE_POOL_<NAME> variable < --config file < flag."""
    from vibevoice_pool import config
    from vibevoice_pool.environment import from_environment

    environment = from_environment()
    path = getattr(ns, "config", None)
    given = config.load_file(path) if path else {}
    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "_device")}
    for name in sorted(
        environment.keys() & {str(k).replace("-", "_") for k in given} - flags.keys()
    ):
        log.warning(  # the value is not said: it may be a key
            "%s: the value in %s wins over $%s (a flag would win over both)",
            name,
            path,
            config.env_name(name),
        )
    given.update(flags)
    overridden = {str(k).replace("-", "_") for k in given}
    origins = {n: "$" + config.env_name(n) for n in environment if n not in overridden}
    values = {n: v for n, v in environment.items() if n not in overridden} | given
    return config.build(values, origins)


def main(argv: list[str] | None = None) -> int:
    from vibevoice_pool import logs

    ns = parser().parse_args(argv)
    if ns.command == "launch":
        from vibevoice_pool.config import ConfigError
        from vibevoice_pool.pool.stopping import SIGNALS
        from vibevoice_pool.server import EXIT_CONFIG, serve

        logs.setup("INFO")
        if getattr(ns, "_device", None):
            log.warning(
                "--device is deprecated and ignored: choose devices with --gpus (e.g. --gpus 0,1)"
            )

        from vibevoice_pool.environment import stray_variables

        for line in stray_variables(dict(os.environ)):  # a typo'd variable is not silent
            log.warning("%s", line)
        try:
            cfg = launch_config(ns)
        except ConfigError as e:
            log.error("%s", e)
            return EXIT_CONFIG
        logs.setup(cfg.log_level, cfg.log_format)
        code = serve(cfg)
        # Stopped: a late Ctrl+C (a third to the group) changes nothing, and must not
        # raise KeyboardInterrupt while the interpreter exits (a traceback in the log).
        for stop in SIGNALS:
            signal.signal(stop, signal.SIG_IGN)
        # The interpreter's last garbage collection walked every object the server
        # made (Gradio, FastAPI, torch): 2-3 s after "Stopped." before the exit.
        gc.freeze()
        return code
    if getattr(ns, "api_key", "") is None:  # the terminal commands: the server's variable
        from vibevoice_pool.client import API_KEY_ENV

        ns.api_key = os.environ.get(API_KEY_ENV) or None
    if getattr(ns, "url", "") is None:
        from vibevoice_pool.api.address import NoDefaultUrl, default_url

        try:
            ns.url = default_url()
        except NoDefaultUrl as e:
            print(f"vibevoice-pool {ns.command}: {e}", file=sys.stderr)
            return 2
    try:
        return _terminal_command(ns)
    except BrokenPipeError:  # `vibevoice-pool status | head -1`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush
        return 128 + signal.SIGPIPE  # as a command that SIGPIPE ended (141)


def _terminal_command(ns) -> int:
    if ns.command == "jobs" or (ns.command == "synth" and ns.as_job):
        from vibevoice_pool.jobs import client as jobs_client

        return jobs_client.run(ns)
    if ns.command in ("synth", "status", "scale", "health"):
        from vibevoice_pool import client

        return client.run(ns)
    if ns.command in ("make-tiny-model", "convert"):
        return _checkpoint_tool(ns)
    return 2


def _checkpoint_tool(ns) -> int:
    """make-tiny-model and convert: what went wrong in one line (exit 1), no traceback."""
    from workers.wire.messages import PoolError

    try:
        if ns.command == "make-tiny-model":
            from workers.checkpoints.tiny import make_tiny_model

            print(make_tiny_model(ns.dir))
        else:
            from workers.checkpoints.convert import HUB_ID, convert_checkpoint

            if not os.path.exists(ns.src) and not HUB_ID.match(ns.src):
                raise ValueError(f"{ns.src}: no such folder, and no hub id (namespace/name)")
            convert_checkpoint(ns.src, ns.dst, tokenizer=ns.tokenizer)
            print(f"converted {ns.src} -> {ns.dst}")
    except PoolError as e:
        print(f"vibevoice-pool {ns.command}: {e.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # a folder it cannot write, a source that is no model
        print(f"vibevoice-pool {ns.command}: {e}", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
