"""How log lines look, for the parent and for each worker: text, or one JSON object
a line (`--log-format json`). Workers and the parent write to the same stderr, so
both use this formatter: a log shipper reading JSON lines meets no plain text.

    JsonFormatter(worker=None)        ts, level, logger, msg; request_id, worker and
                                      device when the record carries them (or the
                                      worker's own slot); exc with the traceback
    setup_worker(level, fmt, slot)    a worker's root logging to stderr
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None):
        super().__init__()
        self.worker = worker  # a worker's lines say whose they are

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "job_id", "worker", "device"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if self.worker is not None:
            out.setdefault("worker", self.worker)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted already, where it was logged
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False)


def setup_worker(level: str, fmt: str, slot: int) -> None:
    """A worker's lines on stderr: `worker N` in text, a `worker` field in JSON.
    Python's warnings go through it too (not raw lines among the JSON)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker=slot))
        logging.captureWarnings(True)
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s worker {slot} %(levelname)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
