"""The keys of `--api-keys FILE`, read again when the file changes: no restart to
revoke, add or re-role a key.

    LiveKeys(api_key, path)   what the routes, the key middleware and the page's
                              login ask (match, by_name, named, ...), answered from
                              the KeyRing of the file's last good reading (plus the
                              one --api-key, which never changes)
    refresh()                 on the request path, at most once a CHECK_S: the file's
                              (device, inode, size, mtime) against the last seen; a
                              change is read again. An editor's write-and-rename is a
                              new inode; a symlink swapped (a mounted secret) too
    a reading that fails      the keys in force stay; one error line (the file's
                              line and why, from auth.load_keys); read again only
                              once the file changes again
    a file removed            the keys in force stay (never a server open to all);
                              one error line; read again once it is back
    counts                    reloads and failed reloads, for /metrics
                              (metrics.KeysCollector)

A revoked key's jobs and voices belong to its name ("key:<name>"), not to the key:
they stay, and a key given that name again gets them back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from vibevoice_pool.api.auth import Caller, KeyFileError, KeyRing, load_keys, ring_of

CHECK_S = 1.0  # the file's stat at most this often; a revoked key works at most this long
log = logging.getLogger("vibevoice_pool")


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)  # follows a symlink: a swapped link's target is a new inode
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class LiveKeys:
    """The keys in force: the keys file's last good reading, checked for a change at
    most once a CHECK_S by whichever request comes. Thread-safe (the page's login
    runs in Gradio's threads)."""

    named = True  # each name owns its own jobs, even by id

    def __init__(self, api_key: str, path: str | os.PathLike, clock=time.monotonic):
        """Reads the file once: KeyFileError if it cannot be used (the launch stops)."""
        self.api_key = api_key
        self.path = Path(path).expanduser()
        self.clock = clock
        self.reloads = 0  # readings after the first that took effect
        self.failures = 0  # readings after the first that failed (bad, unreadable, gone)
        self._lock = threading.Lock()
        try:
            self._seen: object = _stamp(self.path)
        except OSError as e:
            raise KeyFileError(f"cannot read the keys file {self.path}: {e.strerror}") from None
        self._entries = load_keys(self.path)
        self._ring = ring_of(api_key, self._entries, named=True)
        self._checked = clock()

    # ---- what KeyRing answers, from the keys in force ---------------------

    @property
    def ring(self) -> KeyRing:
        """The keys in force now, the file checked first if CHECK_S has passed."""
        self.refresh()
        return self._ring

    def __bool__(self) -> bool:
        return True  # a file that reads holds a key; a later bad reading keeps them

    @property
    def entries(self):
        return self.ring.entries

    def match(self, given: str) -> Caller | None:
        return self.ring.match(given)

    def caller(self, headers) -> Caller | None:
        return self.ring.caller(headers)

    def by_name(self, name: str | None) -> Caller | None:
        return self.ring.by_name(name)

    def owner_of(self, headers) -> str | None:
        return self.ring.owner_of(headers)

    def allows(self, headers) -> bool:
        return self.ring.allows(headers)

    # ---- reading the file again --------------------------------------------

    def refresh(self) -> None:
        """Read the file again if it changed since the last look (at most once a
        CHECK_S; a request that finds another thread looking uses the keys in force)."""
        if self.clock() - self._checked < CHECK_S or not self._lock.acquire(blocking=False):
            return
        try:
            self._checked = self.clock()
            try:
                stamp: object = _stamp(self.path)
            except OSError as e:
                stamp = ("gone", e.errno)
                if stamp != self._seen:
                    self._seen = stamp
                    self._failed(f"cannot read the keys file {self.path}: {e.strerror}")
                return
            if stamp == self._seen:
                return
            self._seen = stamp
            try:
                entries = load_keys(self.path)
            except KeyFileError as e:
                self._failed(str(e))
                return
            self._took(entries)
        finally:
            self._lock.release()

    def _failed(self, why: str) -> None:
        self.failures += 1
        log.error(
            "API keys not reloaded: %s. The %d keys read before stay in force; the file "
            "is read again when it changes",
            why,
            len(self._entries),
        )

    def _took(self, entries: list[tuple[str, str, str]]) -> None:
        before = {name: (key, role) for name, key, role in self._entries}
        after = {name: (key, role) for name, key, role in entries}
        added = sorted(after.keys() - before.keys())
        removed = sorted(before.keys() - after.keys())
        rekeyed = sorted(n for n in after.keys() & before.keys() if after[n][0] != before[n][0])
        reroled = sorted(
            f"{n} ({after[n][1]})"
            for n in after.keys() & before.keys()
            if after[n][1] != before[n][1]
        )
        self._entries = entries
        self._ring = ring_of(self.api_key, entries, named=True)
        self.reloads += 1

        def said(names: list[str]) -> str:
            return ", ".join(names) or "none"

        log.info(
            "API keys reloaded from %s: %d keys; added: %s; removed: %s; new key: %s; new role: %s",
            self.path,
            len(entries),
            said(added),
            said(removed),
            said(rekeyed),
            said(reroled),
        )
