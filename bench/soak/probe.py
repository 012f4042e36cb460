"""What a running server holds, read from /proc: the figures a soak compares round
to round.

    snapshot(parent_pid, worker_pids, tmp_dir, data_dir) -> dict of counts

Descriptors are counted by kind (socket, pipe, file, memfd, shm, anon, other), for
the parent and for each worker; threads and RSS from /proc/PID/status; the server's
descendants (the zygote, the watchdog, the resource tracker, the workers); the
/dev/shm segments any of them maps or holds open; the entries under the server's
own temp folder and data folder.
"""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("socket", "pipe", "file", "memfd", "shm", "anon", "other")


def fd_kinds(pid: int) -> dict[str, int]:
    """The open descriptors of `pid` by kind ({} when it is gone)."""
    counts = dict.fromkeys(KINDS, 0)
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return {}
    for fd in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed between the listing and the look
            continue
        counts[_kind(target)] += 1
    return counts


KINDS = (  # a descriptor's kind, by how its link begins (first match)
    ("socket:", "socket"),
    ("pipe:", "pipe"),
    ("/memfd:", "memfd"),
    ("/dev/shm/", "shm"),
    ("anon_inode:", "anon"),
    ("/", "file"),
)


def _kind(target: str) -> str:
    return next((kind for start, kind in KINDS if target.startswith(start)), "other")


def status(pid: int) -> dict[str, int]:
    """Threads and RSS (KiB) of `pid`."""
    out = {"threads": 0, "rss_kb": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return out
    for line in text.splitlines():
        if line.startswith("Threads:"):
            out["threads"] = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            out["rss_kb"] = int(line.split()[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every live process under `pid` (children's children too)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for t in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            for k in map(int, kids):
                if k not in found:
                    found.append(k)
                    todo.append(k)
    return found


def shm_names(pids: list[int]) -> set[str]:
    """The /dev/shm entries that any of `pids` maps or holds open."""
    names: set[str] = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[5] if line.count(" ") >= 5 else ""
                if path.startswith("/dev/shm/"):
                    names.add(path.strip())
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("/dev/shm/"):
                    names.add(target)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return names


def tree_entries(folder: Path) -> int:
    """Files and folders under `folder` (0 when it does not exist)."""
    n = 0
    for _root, dirs, files in os.walk(folder):
        n += len(dirs) + len(files)
    return n


def snapshot(parent: int, workers: list[int], tmp_dir: Path, data_dir: Path) -> dict:
    """The round's figures: the parent, each worker, the whole tree, the folders."""
    tree = descendants(parent)
    row = {"parent_fds": fd_kinds(parent), **{f"parent_{k}": v for k, v in status(parent).items()}}
    row["workers"] = [{"pid": w, "fds": fd_kinds(w), **status(w)} for w in workers]
    row["children"] = len(tree)
    others = [p for p in tree if p not in workers]  # the zygote, the watchdog, the tracker
    row["others"] = [{"pid": p, "fds": sum(fd_kinds(p).values()), **status(p)} for p in others]
    row["tree_rss_kb"] = sum(status(p)["rss_kb"] for p in [parent, *tree])
    row["shm_mapped"] = sorted(shm_names([parent, *tree]))
    row["shm_total"] = len(os.listdir("/dev/shm"))  # every user's: noisy on a shared machine
    row["tmp_entries"] = tree_entries(tmp_dir)
    row["data_entries"] = tree_entries(data_dir)
    return row
