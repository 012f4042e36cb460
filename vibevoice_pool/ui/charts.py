"""The page's line charts of the last minutes, and the sampler that feeds them.

History   a daemon thread reading `Pool.status()` and the audio delivered
          (metrics.Activity) once a second, keeping `keep_s` of samples:
          per-worker utilisation and memory, the admission queue length,
          and audio seconds produced per second (over a 5 s window).
render()  four small inline SVG line charts: no plotting library in the
          browser, nothing to load, cheap to refresh.
"""

from __future__ import annotations

import collections
import html
import threading
import time
from dataclasses import dataclass

from vibevoice_pool.ui.i18n import t

RATE_WINDOW_S = 5.0
COLORS = ("#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")
W, H, PAD_L, PAD_B, PAD_T = 300, 120, 34, 16, 8


@dataclass(frozen=True)
class Sample:
    t: float
    util: dict[int, float]  # worker -> percent
    mem: dict[int, float]  # worker -> percent of its device's memory
    queue: int
    rate: float  # audio seconds per second


class History:
    def __init__(
        self,
        pool,
        activity,
        *,
        interval_s: float = 1.0,
        keep_s: float = 300.0,
        clock=time.monotonic,
    ):
        self.pool = pool
        self.activity = activity
        self.interval_s = interval_s
        self.keep_s = keep_s
        self.clock = clock
        self._lock = threading.Lock()
        self._samples: collections.deque[Sample] = collections.deque()
        self._delivered: collections.deque[tuple[float, float]] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ui-history", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception:  # the pool shut down under us; the next tick tells
                if self._stop.is_set():
                    return
            self._stop.wait(self.interval_s)

    def sample_once(self) -> Sample:
        now = self.clock()
        status = self.pool.status()
        delivered = self.activity.delivered_seconds()
        util, mem = {}, {}
        for w in status["workers"]:
            util[w["id"]] = float(w.get("util") or 0.0)
            total = w.get("mem_total_bytes") or 0
            mem[w["id"]] = 100.0 * (w.get("mem_used_bytes") or 0) / total if total else 0.0
        with self._lock:
            self._delivered.append((now, delivered))
            while len(self._delivered) > 1 and now - self._delivered[1][0] >= RATE_WINDOW_S:
                self._delivered.popleft()
            t0, d0 = self._delivered[0]
            rate = (delivered - d0) / (now - t0) if now > t0 else 0.0
            sample = Sample(now, util, mem, status["queue"]["length"], max(0.0, rate))
            self._samples.append(sample)
            while self._samples and now - self._samples[0].t > self.keep_s:
                self._samples.popleft()
        return sample

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)


def _chart(
    title: str,
    series: list[tuple[str, str, list[tuple[float, float]]]],
    now: float,
    span_s: float,
    y_max: float | None,
    lang: str,
    unit: str = "",
) -> str:
    """One SVG line chart; series are (label, color, [(t, value)])."""
    e = html.escape
    top = y_max
    if top is None:
        peak = max((v for _, _, pts in series for _, v in pts), default=0.0)
        top = max(1.0, peak * 1.15)
    pw, ph = W - PAD_L - 4, H - PAD_B - PAD_T

    def xy(tt: float, v: float) -> str:
        x = PAD_L + pw * (1 - min(span_s, max(0.0, now - tt)) / span_s)
        y = PAD_T + ph * (1 - min(1.0, max(0.0, v / top)))
        return f"{x:.1f},{y:.1f}"

    lines = []
    for label, color, pts in series:
        if len(pts) >= 2:
            path = " ".join(xy(tt, v) for tt, v in pts)
            lines.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{path}">'
                f"<title>{e(label)}</title></polyline>"
            )
    top_label = f"{top:.0f}" if top >= 10 else f"{top:.1f}"
    minutes = max(1, round(span_s / 60))
    legend = "".join(
        f'<span class="vv-legend"><i style="background:{c}"></i>{e(label)}</span>'
        for label, c, _ in series
        if len(series) > 1
    )
    return (
        f'<div class="vv-chart"><div class="vv-chart-title">{e(title)}</div>'
        f'<svg viewBox="0 0 {W} {H}" width="100%" role="img" aria-label="{e(title)}">'
        f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + ph}" class="vv-axis"/>'
        f'<line x1="{PAD_L}" y1="{PAD_T + ph}" x2="{PAD_L + pw}" y2="{PAD_T + ph}" class="vv-axis"/>'
        f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" text-anchor="end" class="vv-tick">'
        f"{e(top_label + unit)}</text>"
        f'<text x="{PAD_L - 4}" y="{PAD_T + ph}" text-anchor="end" class="vv-tick">0</text>'
        f'<text x="{PAD_L}" y="{H - 3}" class="vv-tick">{e(t(lang, "chart.ago", m=minutes))}</text>'
        f'<text x="{PAD_L + pw}" y="{H - 3}" text-anchor="end" class="vv-tick">'
        f"{e(t(lang, 'chart.now'))}</text>"
        f"{''.join(lines)}</svg><div>{legend}</div></div>"
    )


def render(samples: list[Sample], labels: dict[int, str], lang: str, span_s: float = 300.0) -> str:
    """The four charts as one HTML block; `labels` names each worker ("GPU 0")."""
    if not samples:
        return f'<div class="vv-charts vv-empty">{html.escape(t(lang, "chart.empty"))}</div>'
    now = samples[-1].t
    ids = sorted(labels)

    def per_worker(field: str):
        return [
            (
                labels[i],
                COLORS[n % len(COLORS)],
                [(s.t, getattr(s, field).get(i, 0.0)) for s in samples],
            )
            for n, i in enumerate(ids)
        ]

    charts = [
        _chart(t(lang, "chart.util"), per_worker("util"), now, span_s, 100.0, lang, "%"),
        _chart(t(lang, "chart.mem"), per_worker("mem"), now, span_s, 100.0, lang, "%"),
        _chart(
            t(lang, "chart.queue"),
            [("queue", COLORS[0], [(s.t, s.queue) for s in samples])],
            now,
            span_s,
            None,
            lang,
        ),
        _chart(
            t(lang, "chart.rate"),
            [("rate", COLORS[1], [(s.t, s.rate) for s in samples])],
            now,
            span_s,
            None,
            lang,
        ),
    ]
    return f'<div class="vv-charts">{"".join(charts)}</div>'


CHARTS_CSS = """
.vv-charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr));
             gap: 10px; }
.vv-chart-title { font-size: 0.85em; font-weight: 600; }
.vv-axis { stroke: var(--body-text-color-subdued); stroke-width: 1; }
.vv-tick { font-size: 9px; fill: var(--body-text-color-subdued); }
.vv-legend { font-size: 0.75em; margin-right: 8px; white-space: nowrap; }
.vv-legend i { display: inline-block; width: 10px; height: 3px; margin-right: 3px;
               vertical-align: middle; }
"""
