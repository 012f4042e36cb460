"""`vibevoice-pool launch`: resolve the model, start the pool, serve HTTP.

resolve model (tiny model built once into the cache when asked for), check the
keys, the voices folder, bind the port           -> ConfigError: exit 2, one line
Pool.start(cfg)            -> BootError: exit 3 with the first cause
listen on the bound port   -> ConfigError: exit 2 (another server took it meanwhile)
FastAPI app (+ Gradio page at / when the UI is present)
uvicorn until SIGINT/SIGTERM/SIGHUP (stopping.py), then: stop accepting, let open
  requests finish within grace_s of the signal (one deadline for every phase; a
  second signal: now), drain the pool, stop the workers, exit 0
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import threading
from pathlib import Path

from vibevoice_pool import config as config_mod
from vibevoice_pool.api.address import private_temp
from vibevoice_pool.api.address import publish as publish_address
from vibevoice_pool.api.address import withdraw as withdraw_address
from vibevoice_pool.config import ConfigError, PoolConfig
from vibevoice_pool.pool.stopping import Interrupted, Stopping, StopWork, no_init_warning

log = logging.getLogger("vibevoice_pool")

EXIT_BOOT_FAILED = 3
EXIT_CONFIG = 2
LISTEN_BACKLOG = 2048  # uvicorn's own default, which it sets again
STOP_MARGIN_S = 3  # past grace_s, what uvicorn waits for answers the pool is closing


def resolve_model(cfg: PoolConfig) -> str:
    """The model path the workers load ('' for the sim engine)."""
    if cfg.engine == "sim":
        return ""
    if cfg.tiny_model:
        from workers.checkpoints.tiny import ensure_tiny_model

        folder = config_mod.default_cache_dir(cfg) / "tiny-model"
        try:
            path = ensure_tiny_model(folder)
        except OSError as e:
            raise ConfigError(f"cannot build the tiny model in {str(folder)!r}: {e}") from None
        log.warning(
            "Serving the built-in TINY RANDOM model: it makes noise, not speech. "
            "To serve the real one: vibevoice-pool launch --model_path vibevoice/VibeVoice-1.5B-hf"
        )
        return path
    if not cfg.model_path:
        raise ConfigError(
            "no model given: pass --model_path (an HF-format folder or a hub id such as "
            "vibevoice/VibeVoice-1.5B-hf), or --tiny-model for the built-in demo model, "
            "or --engine sim for the simulator"
        )
    check_model_path(cfg.model_path)
    return cfg.model_path


def check_model_path(path: str) -> None:
    """ConfigError, before any worker boots, for a model path no worker could load: no
    such folder and no hub id, a folder without a config, or an original-layout
    checkpoint (which `vibevoice-pool convert` turns into one). A hub id is left to
    the workers (this machine may be offline, or the hub slow)."""
    from workers.checkpoints.convert import HUB_ID, refusal_for

    folder = Path(path).expanduser()
    if folder.is_dir():
        refusal = refusal_for(str(folder))
        if refusal:
            raise ConfigError(refusal)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model_path {path!r}: the folder has no config.json, so it is no model in "
                "Hugging Face's format (an original microsoft/VibeVoice checkpoint is "
                "converted with `vibevoice-pool convert SRC DST`)"
            )
    elif folder.exists():
        raise ConfigError(f"model_path {path!r} is a file: give the model's folder")
    elif not HUB_ID.match(path):
        raise ConfigError(
            f"model_path {path!r}: no such folder, and no Hugging Face hub id "
            "(namespace/name, such as vibevoice/VibeVoice-1.5B-hf)"
        )
    else:
        check_hub_model(path)


def check_hub_model(repo_id: str) -> None:
    """ConfigError for a hub id no worker could download: not in the cache and the hub
    unreachable (offline, HF_HUB_OFFLINE), no such repository, or a gated one without
    a token. Each worker would otherwise retry it for minutes. Any other answer of
    the hub is left to the workers."""
    import huggingface_hub as hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return  # downloaded before: the workers load it from the cache
    where = f"model_path {repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{where} and HF_HUB_OFFLINE is set: download it first, or pass its folder"
        )
    try:
        hub.model_info(repo_id, timeout=15)
    except GatedRepoError:
        raise ConfigError(
            f"{repo_id!r} is gated: accept its terms on the hub and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{where}, and the hub has no model {repo_id!r} (or it is private: set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as e:
        log.warning("the hub answered %s about %s; the workers will try to download it", e, repo_id)
    except Exception as e:  # noqa: BLE001 - no connection: DNS, refused, timed out, a proxy
        raise ConfigError(
            f"{where}, and the hub ({constants.ENDPOINT}) cannot be reached: {e}"
        ) from None


CORS_ENV = "VIBEVOICE_POOL_CORS_ORIGINS"  # comma-separated origins; unset: no CORS


def build_front(cfg: PoolConfig, pool, environ=None):
    """The Front every route uses. The API key and CORS origins are read here, at
    launch: --api-key, else $VIBEVOICE_POOL_API_KEY; --cors-origins, else
    $VIBEVOICE_POOL_CORS_ORIGINS. The --api-keys file is read here and again
    whenever it changes (live_keys.LiveKeys)."""
    from vibevoice_pool.api.auth import (
        KeyFileError,
        key_ring,
        resolve_api_key,
        short_key_warning,
    )
    from vibevoice_pool.api.live_keys import LiveKeys
    from vibevoice_pool.api.speech import Front
    from vibevoice_pool.voices.library import VoiceLibrary, prepare_voices
    from workers.checkpoints.tiny import is_tiny_model

    env = os.environ if environ is None else environ
    key = resolve_api_key(cfg.api_key, env)
    if key != cfg.api_key:
        cfg = cfg.replace(api_key=key)
    try:  # the keys file is read again when it changes (live_keys.py)
        keys = LiveKeys(key, cfg.api_keys) if cfg.api_keys else key_ring(key)
    except KeyFileError as e:
        raise ConfigError(f"api_keys: {e}") from None
    if short_key_warning(key):
        log.warning("%s", short_key_warning(key))
    if keys.named:
        log.info(
            "API keys: %s (each name owns its jobs and voices)",
            ", ".join(f"{c.name} ({c.role})" for _, c in keys.entries),
        )
    if not keys and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "Serving on %s with no API key: anyone who reaches this address can use the "
            "GPUs. Pass --api-key (or set $VIBEVOICE_POOL_API_KEY)",
            cfg.host,
        )
    listed = cfg.cors_origins or env.get(CORS_ENV, "")
    origins = tuple(o.strip() for o in listed.split(",") if o.strip())

    folder = config_mod.voices_dir(cfg)
    # The synthetic demo voices are tones: offered only to the tiny model and the sim.
    synthetic = cfg.engine == "sim" or cfg.tiny_model or is_tiny_model(cfg.model_path or ".")
    _, line = prepare_voices(folder, synthetic=synthetic)
    if line:
        log.info("%s", line)
    voices = VoiceLibrary(
        folder,
        max_bytes=cfg.max_upload_bytes,
        max_seconds=cfg.max_voice_s,
        offer_demo=synthetic,
    )
    return Front(pool, voices, cfg, cors_origins=origins, keys=keys)


def build_app(front):
    """Every router first (create_app), then the page mounted at "/" last (it
    answers every path after it), then the guards around the whole."""
    from vibevoice_pool.api.app import create_app
    from vibevoice_pool.ui import page as ui

    app = create_app(front)
    app = ui.mount(app, front)
    install_guards(app, front)
    return app


def carries_key(headers) -> bool:
    """Whether a request carries an API key, right or wrong. A browser cannot send
    one from another site (no CORS), so the cross-site check lets it through, and
    the key middleware judges it: a wrong key there is a 401 counted against its
    address (auth.py), never a cross-site 403 that would tell it apart unthrottled."""
    from vibevoice_pool.api.auth import bearer_of

    return bool(bearer_of(headers))


def install_guards(app, front) -> None:
    """Outermost: the Host allow-list and cross-site refusal (origin.py), and the
    page login's throttle (login_throttle.py) when there is a login."""
    from vibevoice_pool.api.login_throttle import LoginThrottle
    from vibevoice_pool.api.origin import BrowserGuard, allowed_hosts

    cfg = front.cfg
    keys = front.keys
    if keys:
        app.add_middleware(LoginThrottle, on_refused=front.activity.refused)
    hosts = allowed_hosts(cfg.host, cfg.allowed_hosts, share=cfg.share)
    log.info("Answering to the host names: %s", ", ".join(sorted(hosts)))
    app.add_middleware(
        BrowserGuard,
        allowed=hosts,
        key_ok=(carries_key if keys else (lambda _headers: False)),
        cors_origins=front.cors_origins,
        on_refused=front.activity.refused,
        keyed=bool(keys),
    )


def base_url(host: str, port: int) -> str:
    """The URL a bound address serves at: an IPv6 address goes in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(app, cfg: PoolConfig):
    """uvicorn, without signal handlers of its own: the launch's (stopping.py) tell
    it to stop. It waits for open requests a little past grace_s, by when the pool
    has answered every one (serve's stop timer), so none is cut by a cancellation."""
    import uvicorn

    from vibevoice_pool.api.protocol import guarded_protocol

    class Server(uvicorn.Server):
        def capture_signals(self):
            return contextlib.nullcontext()

        async def shutdown(self, sockets=None):
            # Before waiting for open connections: streams that never end on their own
            # (the page's keep-alive) are told to close, or every stop would take grace_s.
            for stopping in getattr(app.state, "on_stopping", ()):
                stopping()
            await super().shutdown(sockets)

    guard = connection_guard(cfg)
    app.state.connections = guard
    return Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="warning",
            timeout_graceful_shutdown=max(1, int(cfg.grace_s)) + STOP_MARGIN_S,
            # deadlines, caps per client and in all, the header size limit
            http=guarded_protocol(guard, max_header_bytes=cfg.max_header_kb * 1024),
            proxy_headers=False,  # the peer is the client (login throttling counts per address)
        )
    )


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before any worker starts: a port in use or a host
    this machine does not have is a ConfigError at once, not after minutes of
    loading. (It listens once the pool is up, start_listening: until then a client is
    refused.)"""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        msg = f"host {host!r}: not an address this machine can listen on ({e})"
        raise ConfigError(msg) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def start_listening(sock: socket.socket, host: str, port: int) -> None:
    """Listen on the socket listen_socket bound. Another server that bound the same port
    (with SO_REUSEADDR, as uvicorn does) while the workers started takes it by listening
    first; this launch's listen then fails: a ConfigError, not a server that logs
    `Serving on` and answers nothing."""
    try:
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        why = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None


def connection_guard(cfg: PoolConfig):
    """The deadlines and the caps of connections.py, from the settings and the file limit."""
    from vibevoice_pool.api.connections import ConnectionGuard, connection_cap, open_fds

    cap = connection_cap(cfg.max_connections, in_use=open_fds())  # workers started by now
    if cap < cfg.max_connections:
        log.warning(
            "max_connections lowered from %d to %d to fit the open-file limit",
            cfg.max_connections,
            cap,
        )
    return ConnectionGuard(
        max_connections=cap,
        header_timeout_s=cfg.header_timeout_s,
        body_timeout_s=cfg.body_timeout_s,
        body_min_rate=cfg.body_min_rate,
        body_deadline_s=cfg.body_deadline_s,
        send_timeout_s=cfg.send_timeout_s,
        client_max_connections=cfg.client_max_connections,
        client_max_streams=cfg.client_max_streams,
    )


def _preload_front() -> None:
    try:
        import vibevoice_pool.ui.page  # noqa: F401
    except Exception:  # the real import in build_app reports it
        pass


def serve(cfg: PoolConfig) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    stopping = Stopping(cfg.grace_s)
    stopping.install()  # Ctrl+C, SIGTERM, SIGHUP: from here to the exit
    if no_init_warning():
        log.warning("%s", no_init_warning())
    try:
        return _serve(cfg, stopping)
    finally:
        stopping.uninstall()


def _serve(cfg: PoolConfig, stopping: Stopping) -> int:
    from vibevoice_pool import audio
    from vibevoice_pool.api.connections import raise_nofile
    from vibevoice_pool.api.metrics import Activity
    from vibevoice_pool.jobs.launch import open_store, start_jobs
    from vibevoice_pool.pool.facade import Pool
    from vibevoice_pool.pool.slots import BootError
    from workers.wire.messages import PoolError

    raise_nofile()  # before the workers' pipes and the clients' sockets take handles
    page_files = private_page_files(cfg.port)  # before Gradio is imported
    audio.set_decode_slots(cfg.max_decodes, cfg.decode_wait_s)
    # The page's imports (Gradio) take seconds: do them while the workers boot.
    threading.Thread(target=_preload_front, name="preload-ui", daemon=True).start()
    try:
        # everything a user can get wrong is refused before any worker boots
        model_path = resolve_model(cfg)
        if cfg.api_keys:
            from vibevoice_pool.api.auth import KeyFileError, load_keys

            try:
                load_keys(cfg.api_keys)
            except KeyFileError as e:
                raise ConfigError(f"api_keys: {e}") from None
        check_openai_voices(cfg)
        check_voices_dir(cfg)
        sock = listen_socket(cfg.host, cfg.port)
        try:
            store, no_jobs = open_store(cfg)  # the jobs data folder (a full disk: no jobs)
            pool = Pool.start(cfg, model_path=model_path)
        except BaseException:
            sock.close()
            raise
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except PoolError as e:
        log.error("%s", e.message)
        return EXIT_CONFIG
    except BootError as e:
        log.error("❌ No worker could start: %s", e)
        return EXIT_BOOT_FAILED
    except Interrupted as e:
        log.info("Stopped before serving.")
        return e.exit_code
    jobs = published = None
    stop_work = StopWork(pool, STOP_MARGIN_S)
    code = 0
    try:
        front = build_front(cfg, pool)
        front.activity = Activity.attach(pool)  # before the jobs: one resumed now is counted
        if store is not None:
            jobs = front.jobs = start_jobs(cfg, pool, front, store)  # durable jobs; the Jobs tab
            stop_work.jobs = jobs
        front.jobs_unavailable = no_jobs
        app = build_app(front)
        server = _uvicorn_server(app, cfg)

        def stop_serving(signum: int) -> None:
            server.handle_exit(signum, None)
            stop_work.start(stopping)

        stopping.serve(stop_serving, lambda: stop_work.now(server))
        port = sock.getsockname()[1]  # the one bound: --port 0 picks a free one
        start_listening(sock, cfg.host, port)
        log.info("Serving on %s (API at /v1, page at /)", base_url(cfg.host, port))
        published = publish_address(cfg.host, port)  # `vibevoice-pool status` finds it
        server.run(sockets=[sock])
    except Interrupted as e:  # a signal before the server was up
        code = e.exit_code
    except ConfigError as e:  # the voices folder, the keys: found only now
        log.error("%s", e)
        code = EXIT_CONFIG
    finally:
        withdraw_address(published)  # no command is sent to a server that is stopping
        left = stopping.left()
        log.info("Shutting down: finishing accepted requests (up to %.0f s)", left)
        stop_work.close(left)  # unfinished jobs run again at the next start
        pool.shutdown(stopping.left())
        sock.close()
        if pool.supervisor.fatal:  # the backend could not go on (its local Ray died)
            code = pool.supervisor.fatal_exit
        if page_files is not None:
            shutil.rmtree(page_files, ignore_errors=True)
        log.info("Stopped.")
    return code


def private_page_files(port: int) -> Path | None:
    """Gradio keeps the page's audio and uploads in one folder, <tmp>/gradio unless
    GRADIO_TEMP_DIR names one: shared by every server on the machine (its files are
    named by content, and a server that stops deletes its own, which another may be
    serving) and open to other users. Unless the variable is set, each server gets
    its own in this user's private folder (mode 0700), one per port: the folder it
    removes as it stops."""
    base = None if os.environ.get("GRADIO_TEMP_DIR") else private_temp()
    if base is None:
        return None
    folder = base / f"gradio-{port or os.getpid()}"
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


def check_voices_dir(cfg: PoolConfig) -> None:
    """ConfigError for a voices folder that cannot be made (before any worker boots)."""
    folder = config_mod.voices_dir(cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"voices_dir {str(folder)!r}: {e.strerror}") from None


def check_openai_voices(cfg: PoolConfig) -> None:
    """ConfigError for an openai_voices setting that cannot be read."""
    from vibevoice_pool.api.openai import parse_openai_map

    try:
        parse_openai_map(cfg.openai_voices)
    except ValueError as e:
        raise ConfigError(f"openai_voices: {e}") from None


def cache_path(cfg: PoolConfig, *parts: str) -> Path:
    return config_mod.default_cache_dir(cfg).joinpath(*parts)
