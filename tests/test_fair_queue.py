"""The admission queue's discipline (pool/fair_queue.py), alone and in the dispatcher
(a real StatusBoard, fake worker links): a tenant's one request behind another's
burst leaves first, the rows sent back keep the head, one owner is FIFO."""

from __future__ import annotations

import numpy as np
import pytest
from test_dispatcher import board, req, up  # noqa: F401  (board: a fixture)

from vibevoice_pool.pool.dispatcher import Dispatcher
from vibevoice_pool.pool.fair_queue import FairQueue, OwnerQueueFull, owner_cap
from workers.wire import messages as m


class J:
    """What the queue reads of a dispatcher's job."""

    def __init__(self, seq: int, owner: str = ""):
        self.seq, self.owner = seq, owner
        self.held = self.front = False
        self.request = m.Request(id=f"{owner or 'none'}{seq}", turns=(m.Turn(0, "hi"),))

    def __repr__(self) -> str:
        return self.request.id


def drain(q: FairQueue, bind: bool = False) -> list[str]:
    """The order the queue gives its requests up in (`bind`: each taken holds a place)."""
    out = []
    while q:
        job = q.peek()
        q.remove(job)
        if bind:
            q.bound(job)
        out.append(job.request.id)
    return out


def test_one_owner_is_first_in_first_out():
    q = FairQueue()
    for i in range(5):
        q.push(J(i))
    assert drain(q, bind=True) == ["none0", "none1", "none2", "none3", "none4"]


def test_the_owner_holding_fewer_places_goes_first_the_older_on_a_tie():
    q = FairQueue()
    burst = [J(i, "a") for i in range(4)]
    for job in burst:
        q.push(job)
    q.bound(burst[0])  # a's first is on a worker
    q.remove(burst[0])
    q.push(J(9, "b"))  # b arrives behind a's burst
    assert q.peek().request.id == "b9"  # b holds 0 places, a holds 1
    # taken in turns: each pick binds, so the owners even out
    assert drain(q, bind=True) == ["b9", "a1", "a2", "a3"]
    q.push(J(10, "a"))
    q.push(J(11, "b"))
    assert q.held("a") == 4 and q.held("b") == 1
    assert drain(q) == ["b11", "a10"]


def test_a_place_given_up_counts_no_more():
    q = FairQueue()
    a, b = J(1, "a"), J(2, "b")
    q.bound(a)
    q.push(J(3, "a"))
    q.push(b)
    assert q.peek() is b
    q.remove(b)
    q.bound(b)
    q.bound(b)  # counted once
    q.released(a)
    assert q.held("a") == 0 and q.held("b") == 1
    assert q.peek().request.id == "a3"


def test_rows_sent_back_keep_the_head_of_the_queue():
    q = FairQueue()
    waiting = J(5, "b")
    q.push(waiting)
    back = [J(1, "a"), J(2, "a")]
    for job in back:
        q.bound(job)
    for job in reversed(back):  # as worker_lost does: newest first, to the front
        q.push_front(job)
    assert q.held("a") == 0  # sent back: no place held any more
    assert drain(q) == ["a1", "a2", "b5"]


def test_first_picks_the_fair_one_among_those_accepted_and_remove_finds_any():
    q = FairQueue()
    jobs = [J(1, "a"), J(2, "a"), J(3, "b"), J(4, "b")]
    for job in jobs:
        q.push(job)
    q.bound(J(0, "a"))
    assert q.first(lambda j: j.seq != 3) is jobs[3]  # b holds fewer: its first accepted
    assert q.first(lambda j: j.owner == "a") is jobs[0]
    assert q.first(lambda j: False) is None
    q.remove(jobs[1])  # from the middle of a line
    assert len(q) == 3 and q.queued("a") == 1
    with pytest.raises(ValueError):
        q.remove(jobs[1])
    q.clear()
    assert not q and len(q) == 0 and q.peek() is None


def finish(d: Dispatcher, rid: str) -> None:
    d.on_message(0, m.Chunk(rid, 0, np.zeros(2400, np.float32)))
    d.on_message(0, m.Done(rid, 0.1, 0.1))


def test_a_tenants_request_behind_anothers_burst_starts_at_the_next_free_place(board):  # noqa: F811
    d = Dispatcher(board)
    link = up(board, d, 0)
    for i in range(4):
        d.submit(req(i, est=20.0), owner="key:a")
    d.submit(req(9, est=1.0), owner="key:b")
    assert [r.id for r in link.synth()] == ["r0"]
    finish(d, "r0")
    assert [r.id for r in link.synth()] == ["r0", "r9"]  # b's, not a's r1
    finish(d, "r9")
    finish(d, "r1")
    finish(d, "r2")
    assert [r.id for r in link.synth()] == ["r0", "r9", "r1", "r2", "r3"]


def test_requests_without_an_owner_keep_their_order(board):  # noqa: F811
    d = Dispatcher(board)
    link = up(board, d, 0)
    for i in range(4):
        d.submit(req(i))
    for i in range(3):
        finish(d, f"r{i}")
    assert [r.id for r in link.synth()] == ["r0", "r1", "r2", "r3"]


def test_a_lost_workers_rows_go_before_another_tenants_request(board):  # noqa: F811
    d = Dispatcher(board)
    up(board, d, 0, capacity=2)
    d.submit(req(0), owner="key:a")
    d.submit(req(1), owner="key:a")
    d.submit(req(2), owner="key:b")  # waits: both places are a's
    d.worker_lost(0, "killed by SIGKILL")
    link = up(board, d, 1, capacity=3)
    sent = link.synth()
    assert [r.id for r in sent] == ["r0", "r1", "r2"] and sent[0].attempt == 2


def test_on_a_tie_the_owner_served_longer_ago_goes_first():
    q = FairQueue()
    for i in range(3):
        q.push(J(i, "a"))
    q.push(J(7, "b"))
    q.push(J(8, "c"))
    # one place at a time: each request is answered before the next is picked
    order = []
    while q:
        job = q.peek()
        q.remove(job)
        q.bound(job)
        q.released(job)
        order.append(job.request.id)
    assert order == ["a0", "b7", "c8", "a1", "a2"]


def test_owner_cap_is_a_share_of_the_queue_at_least_one_and_zero_is_none():
    assert owner_cap(0.5, 50) == 25 and owner_cap(0.5, 1) == 1 and owner_cap(1.0, 7) == 7
    assert owner_cap(0.0, 50) == 0
    q = FairQueue(owner_cap=2)
    for i in range(2):
        q.push(J(i, "a"))
        q.push(J(10 + i))
    assert q.full_for("a") and not q.full_for("b")
    assert not q.full_for("")  # no owner: held to the queue's size alone
    q.remove(q.first(lambda j: j.owner == "a"))
    assert not q.full_for("a")
    assert not FairQueue(owner_cap=0).full_for("a")


def test_an_owner_past_its_share_is_refused_while_another_is_admitted(board):  # noqa: F811
    d = Dispatcher(board, max_queue=4, owner_max_queued=2)
    link = up(board, d, 0)
    for i in range(3):  # one starts, two wait: a's share
        d.submit(req(i), owner="key:a")
    with pytest.raises(OwnerQueueFull) as e:
        d.submit(req(3), owner="key:a")
    err = e.value
    assert err.kind == m.ErrorKind.OVERLOADED and err.retryable and err.code == "owner_queue_full"
    assert "'a'" in err.message and "owner_queue_share" in err.message
    assert d.counters["refused_owner_queue_full"] == 1
    d.submit(req(4), owner="key:b")  # b is still admitted
    d.submit(req(5))  # and a request without an owner
    with pytest.raises(m.PoolError) as full:
        d.submit(req(6), owner="key:b")  # the queue itself is full now: plain overloaded
    assert full.value.kind == m.ErrorKind.OVERLOADED and not isinstance(full.value, OwnerQueueFull)
    for rid in ("r0", "r4", "r5"):  # the owners take turns: a went, then b, then none
        finish(d, rid)
    assert [r.id for r in link.synth()] == ["r0", "r4", "r5", "r1"]
    d.submit(req(7), owner="key:a")  # r1 left the queue: a has one waiting, room for one
    with pytest.raises(OwnerQueueFull):
        d.submit(req(8), owner="key:a")
