"""The record of the Ray Serve peer section: its table, as the run printed it."""

from __future__ import annotations

from bench import common


def section(sec, img_dir=None, rel="") -> list[str]:
    out = ["## 5. A peer, side by side: Ray Serve", ""]
    if sec is None:
        return out + ["`python -m bench.ray_peer.run` was not run in this run.", ""]
    if "data" not in sec:
        return out + common.failed("ray", sec)
    data = sec["data"]
    if "skipped" in data:
        return out + [f"Not measured: {data['skipped']}.", ""]
    return out + [
        "`python -m bench.ray_peer.run` (its own table, as it prints it; see its docstring for "
        "the set-up):",
        "",
        data.get("table", "").rstrip(),
        "",
    ]
