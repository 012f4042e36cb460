"""The keys of `--api-keys FILE`, read again when the file changes: no restart to
revoke, add or re-role a key.

    LiveKeys(api_key, path)   what the routes, the key middleware and the page's
                              login ask (match, by_name, named, ...), answered from
                              the KeyRing of the file's last good reading (plus the
                              one --api-key, which never changes)
    the watcher thread        once a CHECK_S, check(): the file's (device, inode,
                              size, mtime) against the last seen; a change is read
                              again. An editor's write-and-rename is a new inode; a
                              symlink swapped (a mounted secret) too. A request never
                              touches the file: a keys file on a hung network file
                              system stalls the watcher, never the event loop
    a reading that fails      the keys in force stay; one error line (the file's
                              line and why, from auth.load_keys); read again only
                              once the file changes again
    a file removed            the keys in force stay (never a server open to all);
                              one error line; read again once it is back
    counts                    reloads and failed reloads, for /metrics
                              (metrics.KeysCollector)
    revoked_name(key)         the name a key was revoked from (the last REVOKED_KEPT,
                              kept as digests): the middleware answers it 401
                              `key_revoked` and does not count it as a wrong key, so
                              a client left with an old key does not get its
                              address (a NAT, a proxy) throttled for everyone
    on_revoke(fn)             fn(names) after a reading that took keys away: the
                              names removed or given a new key (PageSessions ends
                              the page's logins made with them)

A revoked key's jobs and voices belong to its name ("key:<name>"), not to the key:
they stay, and a key given that name again gets them back.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Callable

from vibevoice_pool.api.auth import Caller, KeyFileError, KeyRing, load_keys, ring_of

CHECK_S = 1.0  # the watcher's stat of the file this often; a revoked key works about this long
REVOKED_KEPT = 1024  # revoked keys remembered (as digests), the oldest forgotten first
log = logging.getLogger("vibevoice_pool")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)  # follows a symlink: a swapped link's target is a new inode
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class LiveKeys:
    """The keys in force: the keys file's last good reading, checked for a change
    once a CHECK_S by a watcher thread of its own. Thread-safe (the page's login runs
    in Gradio's threads)."""

    named = True  # each name owns its own jobs, even by id

    def __init__(self, api_key: str, path: str | os.PathLike, watch: bool = True):
        """Reads the file once: KeyFileError if it cannot be used (the launch stops).
        watch=False starts no watcher: the file is read again only by check()."""
        self.api_key = api_key
        self.path = Path(path).expanduser()
        self.reloads = 0  # readings after the first that took effect
        self.failures = 0  # readings after the first that failed (bad, unreadable, gone)
        self._lock = threading.Lock()
        self._on_revoke: list[Callable[[frozenset[str]], None]] = []
        try:
            self._seen: object = _stamp(self.path)
        except OSError as e:
            raise KeyFileError(f"cannot read the keys file {self.path}: {e.strerror}") from None
        self._entries = load_keys(self.path)
        self._ring = ring_of(api_key, self._entries, named=True)
        self._revoked: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._closed = threading.Event()
        if watch:
            threading.Thread(target=self._watch, name="api-keys-watch", daemon=True).start()

    # ---- what KeyRing answers, from the keys in force ---------------------

    @property
    def ring(self) -> KeyRing:
        """The keys in force now (the watcher swaps in a new reading whole)."""
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

    def revoked_name(self, given: str) -> str | None:
        """The name `given` was a key of, if a reading of the file took it away."""
        return self._revoked.get(_digest(given)) if given and self._revoked else None

    # ---- reading the file again --------------------------------------------

    def on_revoke(self, fn: Callable[[frozenset[str]], None]) -> None:
        """Call fn(names) after each reading that took keys away (removed, or given a
        new key), outside the lock, in the watcher's thread."""
        self._on_revoke.append(fn)

    def check(self) -> None:
        """Read the file again if it changed since the last look (the watcher's call,
        once a CHECK_S; a test's)."""
        with self._lock:
            revoked = self._look()
        if revoked:
            for fn in self._on_revoke:
                fn(revoked)

    def close(self) -> None:
        """Stop the watcher (the keys in force stay)."""
        self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(CHECK_S):
            try:
                self.check()
            except Exception:  # a bug must not end the watching: the next look may do
                log.exception("API keys: the look at %s failed", self.path)

    def _look(self) -> frozenset[str]:
        """The file read again if it changed: the names whose old key no longer works."""
        try:
            stamp: object = _stamp(self.path)
        except OSError as e:
            stamp = ("gone", e.errno)
            if stamp != self._seen:
                self._seen = stamp
                self._failed(f"cannot read the keys file {self.path}: {e.strerror}")
            return frozenset()
        if stamp == self._seen:
            return frozenset()
        self._seen = stamp
        try:
            entries = load_keys(self.path)
        except KeyFileError as e:
            self._failed(str(e))
            return frozenset()
        return self._took(entries)

    def _failed(self, why: str) -> None:
        self.failures += 1
        log.error(
            "API keys not reloaded: %s. The %d keys read before stay in force; the file "
            "is read again when it changes",
            why,
            len(self._entries),
        )

    def _took(self, entries: list[tuple[str, str, str]]) -> frozenset[str]:
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
        for name in removed + rekeyed:  # the old key: told apart from a guess from now on
            self._revoked[_digest(before[name][0])] = name
        for key, _ in after.values():  # a key given again works again
            self._revoked.pop(_digest(key), None)
        while len(self._revoked) > REVOKED_KEPT:
            self._revoked.popitem(last=False)
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
        return frozenset(removed) | frozenset(rekeyed)


class PageSessions:
    """The page's logins, ended with their key. Gradio keeps a login as a session
    token that maps to the user name only, and never asks the key again: a page
    logged in with a key the file then dropped would go on working. So each login's
    key name is noted under its user name (`logged_in`, from auth.page_login), and
    when names are revoked (LiveKeys.on_revoke) every session under a user name that
    one of them logged in with ends: its next request is a 401, its page the login
    form. Another key's session under that same user name ends too (it logs in
    again); a session under another user name stays."""

    def __init__(self):
        self.app = None  # Gradio's app (its `tokens`: session token -> user name), once mounted
        self._lock = threading.Lock()
        self._names: dict[str, set[str]] = {}  # user name -> key names it logged in with

    def logged_in(self, user: str, caller: Caller) -> None:
        with self._lock:
            self._names.setdefault(user, set()).add(caller.name)

    def revoke(self, names: frozenset[str]) -> None:
        with self._lock:
            users = {u for u, used in self._names.items() if used & names}
            for user in users:
                del self._names[user]
        tokens = getattr(self.app, "tokens", None)
        if not users or tokens is None:
            return
        ended = [token for token, user in list(tokens.items()) if user in users]
        for token in ended:
            tokens.pop(token, None)
        if ended:
            log.info(
                "Page logins ended with their keys: %d sessions (user names: %s)",
                len(ended),
                ", ".join(sorted(users)),
            )
