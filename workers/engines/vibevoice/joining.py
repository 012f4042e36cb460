"""The prefill of the rows that join a step, one bad row kept from the rest.

The rows that join at a step boundary are prefilled together (one padded batch).
When that raises for any reason but out-of-memory (which the host handles: it
halves the rows), each joining row is prefilled alone, and a row whose own
prefill raises fails by itself with engine_error. The rows already running and
the newcomers that prefill cleanly go on: one request's bad prompt never fails
another caller's request. A row alone is prefilled exactly as in a batch of
one, so its audio is what it would have been had it joined alone: the batch drew
its voices' latent noise from each row's generator before it raised, so each
generator goes back to its state before the batch first.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from workers.engines.row import Row
from workers.wire import messages as m

log = logging.getLogger("vibevoice_pool.worker")


def prefill_joining(engine: Any, rows: list[Row], sink: Any) -> tuple[list[Row], Any]:
    """(the rows that joined, their last hidden states (n, H) or None when none did)."""
    states = [row.state.generator.get_state() for row in rows]
    try:
        return rows, engine._prefill(rows)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:
        _release(engine, rows)
        if len(rows) == 1:
            _fail(rows[0], err, sink)
            return [], None
    kept, hidden = [], []
    for row, state in zip(rows, states, strict=True):
        row.state.generator.set_state(state)  # the noise the batch drew is drawn again
        try:
            hidden.append(engine._prefill([row]))
        except torch.cuda.OutOfMemoryError:
            _release(engine, [row])
            raise
        except Exception as err:
            _release(engine, [row])
            _fail(row, err, sink)
            continue
        kept.append(row)
    return kept, (torch.cat(hidden) if hidden else None)


def _release(engine: Any, rows: list[Row]) -> None:
    """Blocks a failed prefill took (it may have stored some rows' prompts)."""
    for row in rows:
        engine.kv.release_row(row.state)


def _fail(row: Row, err: Exception, sink: Any) -> None:
    log.error("request %s: its prefill failed: %s: %s", row.id, type(err).__name__, err)
    row.fail(sink, m.unexpected(err))
