"""`vibevoice-pool launch`: resolve the model, start the pool, serve HTTP.

resolve model (tiny model built once into the cache when asked for)
Pool.start(cfg)            -> BootError: exit non-zero with the first cause
FastAPI app (+ Gradio page at / when the UI is present)
uvicorn until SIGINT/SIGTERM (its handlers only set a flag), then:
  stop accepting, let open requests finish (grace_s), drain the pool,
  stop the workers, exit 0
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from vibevoice_pool import config as config_mod
from vibevoice_pool.config import ConfigError, PoolConfig

log = logging.getLogger("vibevoice_pool")

EXIT_BOOT_FAILED = 3
EXIT_CONFIG = 2


def resolve_model(cfg: PoolConfig) -> str:
    """The model path the workers load ('' for the sim engine)."""
    if cfg.engine == "sim":
        return ""
    if cfg.tiny_model:
        from workers.checkpoints.tiny import ensure_tiny_model

        path = ensure_tiny_model(config_mod.default_cache_dir(cfg) / "tiny-model")
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
    return cfg.model_path


CORS_ENV = "VIBEVOICE_POOL_CORS_ORIGINS"  # comma-separated origins; unset: no CORS


def build_front(cfg: PoolConfig, pool, environ=None):
    """The Front every route uses. The API key and CORS origins are read here, at
    launch: --api-key, else $VIBEVOICE_POOL_API_KEY; --cors-origins, else
    $VIBEVOICE_POOL_CORS_ORIGINS."""
    from vibevoice_pool.api.auth import (
        KeyFileError,
        key_ring,
        resolve_api_key,
        short_key_warning,
    )
    from vibevoice_pool.api.speech import Front
    from vibevoice_pool.voices import VoiceLibrary, prepare_voices
    from workers.checkpoints.tiny import is_tiny_model

    env = os.environ if environ is None else environ
    key = resolve_api_key(cfg.api_key, env)
    if key != cfg.api_key:
        cfg = cfg.replace(api_key=key)
    try:
        keys = key_ring(key, cfg.api_keys)
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


def _uvicorn_server(app, cfg: PoolConfig):
    """uvicorn, with signal handlers that only set its exit flag. (Stock uvicorn
    re-raises the signal after its shutdown, which would kill this process
    before the pool drains and turn a clean stop into exit code -15.)"""
    import contextlib
    import signal
    import threading

    import uvicorn

    from vibevoice_pool.api.protocol import guarded_protocol

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

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
            timeout_graceful_shutdown=max(1, int(cfg.grace_s)),
            # deadlines, caps per client and in all, the header size limit
            http=guarded_protocol(guard, max_header_bytes=cfg.max_header_kb * 1024),
            proxy_headers=False,  # the peer is the client (login throttling counts per address)
        )
    )


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
    from vibevoice_pool import audio
    from vibevoice_pool.api.connections import raise_nofile
    from vibevoice_pool.jobs.launch import open_store, start_jobs
    from vibevoice_pool.pool.facade import Pool
    from vibevoice_pool.pool.slots import BootError
    from workers.wire.messages import PoolError

    raise_nofile()  # before the workers' pipes and the clients' sockets take handles
    audio.set_decode_slots(cfg.max_decodes, cfg.decode_wait_s)
    # The page's imports (Gradio) take seconds: do them while the workers boot.
    threading.Thread(target=_preload_front, name="preload-ui", daemon=True).start()
    try:
        model_path = resolve_model(cfg)
        if cfg.api_keys:  # a bad keys file is refused before any worker boots
            from vibevoice_pool.api.auth import KeyFileError, load_keys

            try:
                load_keys(cfg.api_keys)
            except KeyFileError as e:
                raise ConfigError(f"api_keys: {e}") from None
        check_openai_voices(cfg)
        # the jobs data folder: refused before any worker boots (a full disk: no jobs)
        store, no_jobs = open_store(cfg)
        pool = Pool.start(cfg, model_path=model_path)
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except PoolError as e:
        log.error("%s", e.message)
        return EXIT_CONFIG
    except BootError as e:
        log.error("❌ No worker could start: %s", e)
        return EXIT_BOOT_FAILED
    jobs = None
    try:
        front = build_front(cfg, pool)
        if store is not None:
            jobs = front.jobs = start_jobs(cfg, pool, front, store)  # durable jobs; the Jobs tab
        front.jobs_unavailable = no_jobs
        app = build_app(front)
        server = _uvicorn_server(app, cfg)
        log.info("Serving on http://%s:%d (API at /v1, page at /)", cfg.host, cfg.port)
        server.run()
    finally:
        log.info("Shutting down: finishing accepted requests (up to %.0f s)", cfg.grace_s)
        if jobs is not None:
            jobs.stop(cfg.grace_s)  # unfinished jobs run again at the next start
        pool.shutdown()
        log.info("Stopped.")
    return 0


def check_openai_voices(cfg: PoolConfig) -> None:
    """ConfigError for an openai_voices setting that cannot be read."""
    from vibevoice_pool.voices import parse_openai_map

    try:
        parse_openai_map(cfg.openai_voices)
    except ValueError as e:
        raise ConfigError(f"openai_voices: {e}") from None


def cache_path(cfg: PoolConfig, *parts: str) -> Path:
    return config_mod.default_cache_dir(cfg).joinpath(*parts)
