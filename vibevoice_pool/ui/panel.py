"""The GPU status panel: what it shows of each worker, as HTML and as a text table.

Input is the `/v1/pool` JSON (`Pool.status()`), so the page (in-process) and
`vibevoice-pool status --url` (over HTTP, as a table) show the same content. One block per
worker, in the old multi-GPU demo's format that users know:

    ✅ GPU 0: NVIDIA GeForce RTX 4090
       📊 Queue: 2 | Memory: [████████░░░░░░░░░░░░] 40.5% (16.2/40.0GB)
       ⚡ Utilisation: [██████████░░░░░░░░░░] 50.2%
       🔁 Restarts: 0 | 🎙️ Request: #12

No Gradio import: the terminal client uses this module too.
"""

from __future__ import annotations

import html
import unicodedata
from dataclasses import dataclass

from vibevoice_pool.pool.states import Shown, shown_state
from vibevoice_pool.ui.i18n import t

BAR_WIDTH = 20
GB = 1e9  # the old demo's GB (16.2/40.0GB)

MARK = {
    Shown.READY.value: "✅",
    Shown.BUSY.value: "🔄",
    Shown.RECOVERING.value: "♻️",
    Shown.STARTING.value: "⏳",
    Shown.FAILED.value: "❌",
    Shown.UNAVAILABLE.value: "⛔",
    Shown.DRAINING.value: "⏸️",
    Shown.STOPPED.value: "⏹️",
}


@dataclass(frozen=True)
class WorkerView:
    """One worker's block of the panel, ready to render."""

    id: int
    state: str  # a Shown word (pool/states.py)
    title: str  # "GPU 0: NVIDIA H100" / "Worker 0 (cpu:0): SimEngine x1"
    short: str  # "GPU 0" / "Worker 0": chart legends
    queue: int  # requests the worker holds (running, or batched)
    mem_frac: float
    mem_used_gb: float
    mem_total_gb: float
    util: float  # percent
    restarts: int
    current: int | None  # board number of the request it is working on
    pid: int | None
    error: str
    rows: int = 0  # rows the engine runs now (continuous batching)

    @property
    def mark(self) -> str:
        return MARK.get(self.state, "❔")


def _labels(worker: dict, gpu_workers: dict[str, int], lang: str = "en") -> tuple[str, str]:
    """(title, short label) of a worker, in `lang` ("GPU" stays as it is)."""
    device = str(worker.get("device", ""))
    name = worker.get("name") or ""
    if device.startswith("cuda:"):
        short = f"GPU {device.split(':', 1)[1]}"
        if gpu_workers.get(device, 0) > 1:
            short += f" #{worker['id']}"
        label = short
    else:
        short = f"{t(lang, 'worker')} {worker['id']}"
        label = f"{short} ({device})"
    return (f"{label}: {name}" if name else label), short


def views(status: dict, lang: str = "en") -> list[WorkerView]:
    workers = status.get("workers", [])
    per_device: dict[str, int] = {}
    for w in workers:
        per_device[str(w.get("device"))] = per_device.get(str(w.get("device")), 0) + 1
    out = []
    for w in workers:
        total = w.get("mem_total_bytes") or 0
        used = w.get("mem_used_bytes") or 0
        title, short = _labels(w, per_device, lang)
        out.append(
            WorkerView(
                id=int(w["id"]),
                state=shown_state(w),
                title=title,
                short=short,
                queue=int(w.get("inflight") or 0),
                mem_frac=used / total if total else 0.0,
                mem_used_gb=used / GB,
                mem_total_gb=total / GB,
                util=float(w.get("util") or 0.0),
                restarts=int(w.get("restarts") or 0),
                current=w.get("current_request"),
                pid=w.get("pid"),
                error=w.get("error") or "",
                rows=int(w.get("batch_rows") or 0),
            )
        )
    return out


def bar(frac: float, width: int = BAR_WIDTH) -> str:
    frac = max(0.0, min(1.0, frac))
    full = int(round(frac * width))
    return "█" * full + "░" * (width - full)


def _lines(v: WorkerView, lang: str) -> list[str]:
    current = f"#{v.current}" if v.current else t(lang, "idle")
    if v.current and v.rows > 1:
        current += f" (+{v.rows - 1})"  # the other rows running beside it
    lines = [
        f"{v.mark} {v.title} [{t(lang, 'state.' + v.state)}]",
        f"   📊 {t(lang, 'queue')}: {v.queue} | {t(lang, 'memory')}: [{bar(v.mem_frac)}] "
        f"{100 * v.mem_frac:.1f}% ({v.mem_used_gb:.1f}/{v.mem_total_gb:.1f}GB)",
        f"   ⚡ {t(lang, 'util')}: [{bar(v.util / 100)}] {v.util:.1f}%",
        f"   🔁 {t(lang, 'restarts')}: {v.restarts} | 🎙️ {t(lang, 'current')}: {current}",
    ]
    if v.error and v.state in ("failed", "recovering", "starting"):
        lines.append(f"   ⚠️ {v.error}")
    return lines


TABLE_BAR = 10


def _width(text: str) -> int:
    """Terminal columns: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cell(text: str, width: int) -> str:
    while _width(text) > width:
        text = text[:-2] + "…"
    return text + " " * (width - _width(text))


def render_table(status: dict, lang: str = "en") -> str:
    """The panel as a table for a terminal (`vibevoice-pool status`): a row a worker."""
    q = status.get("queue", {})
    head = [
        (t(lang, "worker"), 36),
        (t(lang, "state"), 12),
        (t(lang, "queue"), 6),
        (t(lang, "memory"), 33),
        (t(lang, "util"), 20),
        (t(lang, "restarts"), 9),
        (t(lang, "current"), 8),
    ]
    out = [
        t(lang, "panel_title"),
        t(lang, "admission", n=q.get("length", 0), max=q.get("max", 0))
        + f"   policy {status.get('policy', '?')}",
        "",
        "   " + " ".join(_cell(name, width) for name, width in head).rstrip(),
    ]
    blocks = views(status, lang)
    for v in blocks:
        mem = (
            f"[{bar(v.mem_frac, TABLE_BAR)}] {100 * v.mem_frac:5.1f}% "
            f"{v.mem_used_gb:.1f}/{v.mem_total_gb:.1f}GB"
        )
        util = f"[{bar(v.util / 100, TABLE_BAR)}] {v.util:5.1f}%"
        cells = [
            v.title,
            t(lang, "state." + v.state),
            str(v.queue),
            mem,
            util,
            str(v.restarts),
            f"#{v.current}" if v.current else t(lang, "idle"),
        ]
        row = " ".join(_cell(c, w) for c, (_, w) in zip(cells, head, strict=True)).rstrip()
        out.append(f"{v.mark} {row}")
        if v.error and v.state in ("failed", "recovering", "starting"):
            out.append(f"   ⚠️ {v.error}")
    if not blocks:
        out.append(t(lang, "no_workers"))
    return "\n".join(out) + "\n"


def _level(frac: float) -> str:
    return "hi" if frac >= 0.9 else "mid" if frac >= 0.6 else "lo"


def render_html(status: dict, lang: str = "en") -> str:
    """The panel for the page: one block per worker, with data-* attributes to find it."""
    q = status.get("queue", {})
    e = html.escape
    parts = [
        '<div class="vv-panel" data-workers="{}">'.format(len(status.get("workers", []))),
        f'<div class="vv-panel-title">{e(t(lang, "panel_title"))}</div>',
        f'<div class="vv-admission" data-queue="{int(q.get("length", 0))}">'
        f"{e(t(lang, 'admission', n=q.get('length', 0), max=q.get('max', 0)))}</div>",
    ]
    blocks = views(status, lang)
    if not blocks:
        parts.append(f"<div>{e(t(lang, 'no_workers'))}</div>")
    for v in blocks:
        head, *rest = _lines(v, lang)
        parts.append(
            f'<div class="vv-worker vv-{e(v.state)}" data-worker="{v.id}" '
            f'data-state="{e(v.state)}" data-pid="{v.pid or ""}" '
            f'data-restarts="{v.restarts}">'
            f'<div class="vv-worker-title">{e(head)}</div>'
            f'<pre class="vv-mem-{_level(v.mem_frac)} vv-util-{_level(v.util / 100)}">'
            f"{e(chr(10).join(rest))}</pre></div>"
        )
    parts.append("</div>")
    return "".join(parts)


PANEL_CSS = """
.vv-panel { font-size: 0.9em; }
.vv-panel-title { font-weight: 600; font-size: 1.1em; margin-bottom: 4px; }
.vv-admission { margin-bottom: 8px; opacity: 0.85; }
.vv-worker { border: 1px solid var(--border-color-primary); border-radius: 8px;
             padding: 6px 10px; margin-bottom: 8px; }
.vv-worker-title { font-weight: 600; }
.vv-worker pre { margin: 2px 0 0 0; padding: 0; background: none; border: none;
                 font-family: var(--font-mono), monospace; white-space: pre-wrap;
                 font-size: 0.8em; line-height: 1.45; }
.vv-busy { border-color: #3b82f6; }
.vv-recovering, .vv-starting { border-color: #f59e0b; }
.vv-failed, .vv-unavailable { border-color: #ef4444; }
"""
