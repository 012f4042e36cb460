"""docs/PERFORMANCE.md's soak section from a saved soak run (docs/soak/*.jsonl).

A run of `python -m bench.soak.run` writes one line of facts (machine, date,
command) and one line per round. The newest file under docs/soak/ is the section
`make bench` keeps in the record (it does not run the soak: ten minutes).

    python -m bench.soak.record docs/soak/soak-2026-12-07.jsonl   # print the section
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import common

FOLDER = Path(__file__).resolve().parents[2] / "docs" / "soak"
WARM_S = 360  # the page keeps 5 min of streams and chart samples: flat only after


def newest(folder: Path = FOLDER) -> Path | None:
    files = sorted(folder.glob("*.jsonl"))
    return files[-1] if files else None


def load(path: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return lines[0]["info"], lines[1:]


def _fds(kinds: dict) -> int:
    return sum(kinds.values())


def _warm(rows: list[dict]) -> dict:
    """The first round that ended WARM_S after the run began (else the second)."""
    t0 = rows[0]["t"]
    late = [r for r in rows if r["t"] - t0 >= WARM_S]
    return late[0] if late else rows[min(1, len(rows) - 1)]


def figures(rows: list[dict]) -> dict:
    warm, last = _warm(rows), rows[-1]
    after = [r for r in rows if r["round"] >= warm["round"]]
    grown = last["parent_rss_kb"] - warm["parent_rss_kb"]
    served = max(1, last["requests"] - warm["requests"])
    span = lambda f: (min(map(f, after)), max(map(f, after)))  # noqa: E731
    return {
        "warm_round": warm["round"],
        "rss_kib_per_1000": grown / served * 1000,
        "parent_fds": span(lambda r: _fds(r["parent_fds"])),
        "parent_threads": span(lambda r: r["parent_threads"]),
        "worker_fds": span(lambda r: max(_fds(w["fds"]) for w in r["workers"])),
        "worker_threads": span(lambda r: max(w["threads"] for w in r["workers"])),
        "children": span(lambda r: r["children"]),
        "shm": span(lambda r: len(r["shm_mapped"])),
        "data": span(lambda r: r["data_entries"]),
        "requests": last["requests"],
        "restarts": last["restarts"],
        "errors": sum(len(r["errors"]) for r in rows),
    }


def section(path: Path) -> list[str]:
    info, rows = load(path)
    if not rows:  # a run cut off before its first round
        return []
    f = figures(rows)
    table = []
    for r in rows:
        k = r["parent_fds"]
        table.append(
            [
                str(r["round"]),
                r["fault"],
                str(r["requests"]),
                f"{_fds(k)} ({k['socket']}/{k['pipe']}/{k['file']}/{k['memfd']})",
                str(r["parent_threads"]),
                str(r["parent_rss_kb"] // 1024),
                " ".join(f"{_fds(w['fds'])}/{w['threads']}" for w in r["workers"]),
                " ".join(str(w["rss_kb"] // 1024) for w in r["workers"]),
                str(r["children"]),
                str(len(r["shm_mapped"])),
                str(r["tmp_entries"]),
                str(r["data_entries"]),
            ]
        )
    rng = lambda a: f"{a[0]}" if a[0] == a[1] else f"{a[0]}-{a[1]}"  # noqa: E731
    return [
        "## 7. Soak: what a long-running server holds (`bench/soak`)",
        "",
        f"Run {info['date']} on {info['machine']}, commit {info['revision']}: "
        f"`{info['command']}` ({info['minutes']:.0f} min, file `docs/soak/{Path(path).name}`). "
        "A real server on the tiny model with 2 CPU workers; each round sends the same "
        "mixed traffic (every format whole and streamed, SSE, /v1/synthesize, jobs "
        "followed, fetched, cancelled and deleted, clients that leave mid-stream, "
        "mid-upload and before a whole answer, bad requests, voice uploads and deletes, "
        "status reads, the page's Generate), with a SIGKILL or a SIGSTOP past the hang "
        "timeout of worker 0 before two rounds in three; then, with the pool idle, what "
        "the processes hold, from /proc.",
        "",
        common.table(
            [
                "round",
                "fault",
                "requests",
                "parent fds (sock/pipe/file/memfd)",
                "parent threads",
                "parent RSS MiB",
                "workers fds/threads",
                "workers RSS MiB",
                "children",
                "/dev/shm",
                "tmp entries",
                "data entries",
            ],
            table,
        ),
        "",
        "### Reading the figures",
        "",
        f"- After round {f['warm_round']} (the first {WARM_S // 60} min: the page keeps "
        "5 min of live streams and chart samples), over "
        f"{f['requests']} requests and {f['restarts']} worker deaths in all: parent "
        f"descriptors {rng(f['parent_fds'])}, parent threads {rng(f['parent_threads'])} "
        "(the event loops' executors fill up to their bound), worker descriptors "
        f"{rng(f['worker_fds'])} and threads {rng(f['worker_threads'])}, child processes "
        f"{rng(f['children'])}, /dev/shm segments {rng(f['shm'])}, data folder entries "
        f"{rng(f['data'])}: flat, per request and per fault.",
        f"- Parent RSS: {f['rss_kib_per_1000']:.0f} KiB per 1,000 requests after "
        f"round {f['warm_round']}: a slow climb, one page Generate (a new page session) a "
        "round. Gradio kept each page session's state until it held 10,000 of them; a "
        "run of the page's Generate alone kept about 125 KiB a session once its 5 min of "
        "live streams was full. The page now keeps 500 sessions' state (ui/layout.py "
        "PAGE_SESSIONS, about 60 MiB at most; this run predates it). Workers' RSS moves with "
        "what they run, and a respawned worker starts lower; it does not climb.",
        "- The temp folder grows by the page's Generate: Gradio keeps each answer's "
        "audio file and deletes those older than an hour every 30 min "
        "(`delete_cache=(1800, 3600)`): bounded by an hour of page traffic.",
        f"- Unexpected answers in the whole run: {f['errors']}.",
        "",
    ]


if __name__ == "__main__":
    print("\n".join(section(Path(sys.argv[1]) if len(sys.argv) > 1 else newest())))
