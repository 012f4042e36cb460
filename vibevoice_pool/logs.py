"""Log set-up for the parent: text (the old demo's lines, with their marks) or
JSON lines. A line about a request carries its id in the message and, for
JSON, as a field when the caller passes `extra={"request_id": ...}`; a
request's end line carries its times too (TIMES: `extra={"queue_s": ...}`).

The parent logs from its hot threads (the dispatcher logs while it holds its
lock, the event loop logs per request), so no thread of those writes to
stderr itself: a record is formatted where it is logged and handed to a queue,
and one listener thread writes it. A slow or stuck log reader (a full pipe, a
paused terminal) then delays the log, never the pool. The listener is flushed
and stopped at exit."""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import sys

from workers.host.log_lines import JsonFormatter

_listener: logging.handlers.QueueListener | None = None
# a request's times on its end line (pool/facade.py): seconds from its admission to a
# worker's first start, to its first audio and to its end; the audio it made
TIMES = ("queue_s", "first_audio_s", "total_s", "audio_s")


class Json(JsonFormatter):
    """The JSON lines the workers write too, with a request's TIMES when the line
    has them."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        times = {k: getattr(record, k) for k in TIMES if hasattr(record, k)}
        if not times:
            return line
        return json.dumps({**json.loads(line), **times}, ensure_ascii=False)


class _Enqueue(logging.handlers.QueueHandler):
    """Resolves the message and the traceback in the logging thread (they may
    refer to objects that change later) and keeps the record's fields for the
    writer's formatter."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Root logging to stderr through the listener thread (see the module doc)."""
    global _listener
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    stop()
    records: queue.SimpleQueue = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level)
    logging.getLogger("vibevoice_pool").setLevel(level)


def stop() -> None:
    """Write what is queued and stop the listener (at exit, or before a new setup)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(stop)
