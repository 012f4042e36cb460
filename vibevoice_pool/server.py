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
        from workers.tiny import ensure_tiny_model

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


def build_front(cfg: PoolConfig, pool):
    from vibevoice_pool.api import MAX_UPLOAD_BYTES, MAX_VOICE_SECONDS, Front
    from vibevoice_pool.voices import VoiceLibrary, ensure_demo_voices

    folder = config_mod.voices_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    made = ensure_demo_voices(folder)
    if made:
        log.info(
            "Wrote %d demo voices to %s (put your own wav/mp3/flac/ogg there)", len(made), folder
        )
    voices = VoiceLibrary(folder, max_bytes=MAX_UPLOAD_BYTES, max_seconds=MAX_VOICE_SECONDS)
    return Front(pool, voices, cfg)


def build_app(front):
    from vibevoice_pool.api import create_app

    app = create_app(front)
    try:
        from vibevoice_pool import ui
    except ImportError:
        return app
    return ui.mount(app, front)


def _uvicorn_server(app, cfg: PoolConfig):
    """uvicorn, with signal handlers that only set its exit flag. (Stock uvicorn
    re-raises the signal after its shutdown, which would kill this process
    before the pool drains and turn a clean stop into exit code -15.)"""
    import contextlib
    import signal
    import threading

    import uvicorn

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

    return Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="warning",
            timeout_graceful_shutdown=max(1, int(cfg.grace_s)),
        )
    )


def serve(cfg: PoolConfig) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from vibevoice_pool.pool import Pool
    from vibevoice_pool.supervisor import BootError

    try:
        model_path = resolve_model(cfg)
        pool = Pool.start(cfg, model_path=model_path)
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except BootError as e:
        log.error("❌ No worker could start: %s", e)
        return EXIT_BOOT_FAILED
    try:
        server = _uvicorn_server(build_app(build_front(cfg, pool)), cfg)
        log.info("Serving on http://%s:%d (API at /v1, page at /)", cfg.host, cfg.port)
        server.run()
    finally:
        log.info("Shutting down: finishing accepted requests (up to %.0f s)", cfg.grace_s)
        pool.shutdown()
        log.info("Stopped.")
    return 0


def cache_path(cfg: PoolConfig, *parts: str) -> Path:
    return config_mod.default_cache_dir(cfg).joinpath(*parts)
