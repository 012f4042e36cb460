"""The admission queue's discipline: which waiting request leaves it next, and how
much of it one owner may hold (the dispatcher calls these under its lock).

    head lane   requests sent back (their worker died, they were preempted or
                moved off a removed worker): they leave first, in the order the
                dispatcher puts them there (push_front), as they always did
    lines       the new requests, one line per owner (a named key's tenant; ""
                for a request without one: no keys, the one --api-key, the page,
                a job), each oldest first

    peek() -> job       the next to leave: the head lane's first; else the first of
                        the line whose owner holds the fewest requests in the pool
                        (bound to a worker: queued there or running); on a tie, the
                        owner whose last request was bound longer ago (never: first),
                        so owners take turns even for one free place; so a tenant
                        that sends one request behind another's burst starts at the
                        next free place
    first(accept)       the same, among the requests `accept` takes (the interactive
                        request that may preempt a batch row)
    bound / released    a request took or gave up its place on a worker (bound
                        also marks its owner's turn)
    full_for(owner)     a named owner has `owner_cap` requests waiting already: its
                        next is refused (OwnerQueueFull, HTTP 429 owner_queue_full),
                        while the others are still admitted

A pick looks at the first request of each owner's line: O(owners waiting), not
O(queue). With one owner (a server without named keys) it is the FIFO it was.
A job needs `.owner`, `.seq` (arrival order), and `.held` and `.front`, two flags
this queue keeps (False to start: bound to a worker, in the head lane). The counts
keep one entry per owner ever seen (the keys file's names).
"""

from __future__ import annotations

import collections
import math
from typing import Callable, Iterator

from workers.wire import messages as m


class OwnerQueueFull(m.PoolError):
    """A named key has its share of the admission queue waiting (owner_queue_share):
    answered 429 `owner_queue_full` with Retry-After; other keys are still admitted."""

    code = "owner_queue_full"

    def __init__(self, owner: str, cap: int):
        name = owner.removeprefix("key:")
        why = f"key {name!r} has {cap} requests waiting, its share of the queue"
        hint = "(owner_queue_share); retry once one of them has started"
        super().__init__(m.ErrorKind.OVERLOADED, f"{why} {hint}", retryable=True)


def owner_cap(share: float, max_queue: int) -> int:
    """The places of the queue one owner may hold: `share` of them, at least one; 0 (no
    cap) for a share of 0."""
    return max(1, math.floor(share * max_queue)) if share > 0 else 0


class FairQueue:
    def __init__(self, owner_cap: int = 0):
        self.owner_cap = owner_cap  # 0: no cap
        self._n = 0  # requests waiting, all lanes
        self._head: collections.deque = collections.deque()
        self._lines: dict[str, collections.deque] = {}  # only owners with some waiting
        self._queued: dict[str, int] = {}  # owner -> requests waiting, all lanes
        self._held: dict[str, int] = {}  # owner -> requests bound to a worker
        self._turn = 0
        self._served: dict[str, int] = {}  # owner -> the turn its last request was bound

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator:
        """The head lane, then each owner's line (not the order they leave in)."""
        yield from self._head
        for line in self._lines.values():
            yield from line

    def push(self, job) -> None:
        """A new request joins the back of its owner's line."""
        line = self._lines.get(job.owner)
        if line is None:
            line = self._lines[job.owner] = collections.deque()
        line.append(job)
        self._queued[job.owner] = self._queued.get(job.owner, 0) + 1
        self._n += 1

    def push_front(self, job) -> None:
        """A request sent back goes to the head of the queue (before the head lane's
        others); it no longer holds a place on a worker."""
        self.released(job)
        self._head.appendleft(job)
        job.front = True
        self._queued[job.owner] = self._queued.get(job.owner, 0) + 1
        self._n += 1

    def peek(self):
        """The request that leaves next, or None."""
        if self._head:
            return self._head[0]
        if len(self._lines) < 2:  # one owner waiting (or none): its oldest
            return next((line[0] for line in self._lines.values()), None)
        held, served = self._held, self._served
        best, best_key = None, None
        for owner, line in self._lines.items():
            key = (held.get(owner, 0), served.get(owner, 0), line[0].seq)
            if best_key is None or key < best_key:
                best, best_key = line[0], key
        return best

    def first(self, accept: Callable[[object], bool]):
        """The request that would leave next among those `accept` takes, or None."""
        hit = self.peek()  # most often the next to leave is one it takes
        if hit is None or accept(hit):
            return hit
        hit = next((j for j in self._head if accept(j)), None)
        if hit is not None:
            return hit
        best, best_key = None, None
        for owner, line in self._lines.items():
            job = next((j for j in line if accept(j)), None)
            if job is not None:
                key = (self._held.get(owner, 0), self._served.get(owner, 0), job.seq)
                if best_key is None or key < best_key:
                    best, best_key = job, key
        return best

    def remove(self, job) -> None:
        """`job` leaves the queue (picked, cancelled, expired, preempting); a
        ValueError if it is not in it, as deque.remove."""
        if job.front:
            if self._head and self._head[0] is job:
                self._head.popleft()
            else:
                self._head.remove(job)
            job.front = False
        else:
            line = self._lines.get(job.owner)
            if line is None:
                raise ValueError(f"request {job.request.id} is not in the queue")
            if line[0] is job:
                line.popleft()
            else:
                line.remove(job)
            if not line:
                del self._lines[job.owner]
        self._queued[job.owner] -= 1
        self._n -= 1

    def clear(self) -> None:
        for job in self._head:
            job.front = False
        self._head.clear()
        self._lines.clear()
        self._queued.clear()
        self._n = 0

    def bound(self, job) -> None:
        """`job` took a place on a worker: its owner holds one more, and had its turn."""
        self._turn += 1
        self._served[job.owner] = self._turn
        if not job.held:
            job.held = True
            self._held[job.owner] = self._held.get(job.owner, 0) + 1

    def released(self, job) -> None:
        """`job` gave its place up (back to the queue, or answered)."""
        if job.held:
            job.held = False
            self._held[job.owner] -= 1

    def held(self, owner: str) -> int:
        """Requests of `owner` bound to a worker (queued there or running)."""
        return self._held.get(owner, 0)

    def queued(self, owner: str) -> int:
        """Requests of `owner` waiting in this queue."""
        return self._queued.get(owner, 0)

    def full_for(self, owner: str) -> bool:
        """A named owner has its share of the queue (`owner_cap`) waiting already; a
        request without an owner is held to the queue's size alone."""
        return bool(owner) and 0 < self.owner_cap <= self._queued.get(owner, 0)
