"""What crosses a Ray stream: each item a replica yields is a list, the messages
one step made for the request, and the parent's stream thread unpacks it.

No Ray cluster: the replica (SlotReplica with the sim engine) runs in process,
and the parent's side (Streams._run) reads a fake Serve stream. One item per
step is what makes the Ray backend cheaper per request (each item is a Ray
object and a round of Serve's streaming; docs/RAY.md).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from conftest import wait_until

from vibevoice_pool.pool.devices import Placement
from vibevoice_pool.ray.streams import Slot, Stream, Streams
from workers.engines.contract import EngineSpec
from workers.host.ray_replica import SlotReplica
from workers.wire import messages as m
from workers.wire.board import Col, StatusBoard, WorkerState


def request(rid: str, text: str = "a" * 30) -> m.Request:
    return m.Request(id=rid, turns=(m.Turn(0, text),), seed=1, max_audio_s=60)


# ---- the replica: what one step made goes out as one item ----------------------


def test_a_step_s_messages_leave_the_replica_as_one_item_in_order():
    """The sim engine makes one 0.5 s chunk a step; the step that makes the last
    chunk also ends the row: that chunk and the Done leave as one list, and the
    request's messages, read item by item, come in the order they were made
    (each message used to be an item of its own)."""
    replica = SlotReplica(EngineSpec(engine="sim", sim_rtf=0.0, sim_chunk_s=0.5))

    async def items():
        return [item async for item in replica.synthesize(request("r1"))]  # 1.7 s

    got = asyncio.run(items())
    assert all(isinstance(item, list) for item in got), got
    flat = [msg for item in got for msg in item]
    assert [type(x) for x in flat] == [m.Started, m.Chunk, m.Chunk, m.Chunk, m.Chunk, m.Done]
    assert [c.seq for c in flat[1:5]] == [0, 1, 2, 3]
    last = got[-1]  # the last step's chunk and the Done (earlier ones may share it)
    assert [type(x) for x in last[-2:]] == [m.Chunk, m.Done] and last[-2].seq == 3
    assert len(got) <= 5  # never more items than the engine thread's flushes


def test_started_leaves_before_the_step_it_joins_has_run():
    """Nothing waits for more: a row's Started goes out once it is scheduled, not
    with what the step makes. Here the step never returns (the sim's [[hang]]),
    and Started still arrives, alone."""
    replica = SlotReplica(EngineSpec(engine="sim", sim_rtf=0.0))

    async def first():
        gen = replica.synthesize(request("stuck", "[[hang]] a stuck step"))
        return await asyncio.wait_for(gen.__anext__(), 30)

    item = asyncio.run(first())
    assert [type(x) for x in item] == [m.Started] and item[0].id == "stuck"


# ---- the parent: a stream's items unpacked, in order ---------------------------


class Dispatcher:
    def __init__(self):
        self.got: list[tuple[int, object]] = []
        self.on_each = None  # called with each message, after it is recorded

    def on_message(self, index: int, msg) -> None:
        self.got.append((index, msg))
        if self.on_each is not None:
            self.on_each(msg)


class Response:
    """A Serve response generator: yields the given items; records a cancel."""

    def __init__(self, items):
        self.items = items
        self.cancelled = threading.Event()

    def __iter__(self):
        return iter(self.items)

    def cancel(self):
        self.cancelled.set()


class Handle:
    def __init__(self, response: Response):
        self.response = response

    def remote(self, request):
        return self.response


@pytest.fixture
def parent():
    board = StatusBoard.create(2)
    dispatcher = Dispatcher()
    streams = Streams(board, dispatcher, lambda *a: None, threading.Event())
    yield streams, board, dispatcher
    streams.close()
    board.close()


def run_stream(streams: Streams, items) -> tuple[Slot, Stream, Response]:
    slot = Slot(index=1, placement=Placement("cpu:1", None), engine=EngineSpec(engine="sim"))
    slot.attached = True
    response = Response(items)
    stream = Stream(request("r1"), slot.generation, Handle(response))
    slot.streams["r1"] = stream
    streams._run(slot, stream)
    return slot, stream, response


def step_items():
    pcm = np.zeros(12000, dtype=np.float32)
    started = m.Started("r1", 1.0)
    chunks = [m.Chunk("r1", i, pcm) for i in range(3)]
    done = m.Done("r1", 1.5, 0.2)
    return [[started], [chunks[0]], [chunks[1], chunks[2], done]], [started, *chunks, done]


def test_the_parent_unpacks_each_item_in_order_to_the_dispatcher(parent):
    streams, board, dispatcher = parent
    items, msgs = step_items()
    slot, _, _ = run_stream(streams, items)
    assert [msg for _, msg in dispatcher.got] == msgs  # in order, no Failed added
    assert {index for index, _ in dispatcher.got} == {1}
    assert board.get(1, Col.COMPLETED) == 1 and board.get(1, Col.AUDIO_S) == 1.5
    assert board.get(1, Col.WORKER_STATE) == WorkerState.IDLE and slot.busy_rows == 0
    assert "r1" not in slot.streams


def test_a_stream_that_ends_without_a_row_end_still_fails_the_request(parent):
    streams, board, dispatcher = parent
    items, msgs = step_items()
    run_stream(streams, [items[0], items[1]])
    got = [msg for _, msg in dispatcher.got]
    assert got[:2] == msgs[:2] and len(got) == 3
    assert isinstance(got[2], m.Failed) and got[2].error == m.ErrorKind.ENGINE_ERROR
    assert "without an answer" in got[2].message and board.get(1, Col.FAILED) == 1


def test_a_stream_made_stale_mid_item_drops_the_rest_and_is_cancelled(parent):
    """The slot is lost while an item is being delivered (the dispatcher marks the
    stream stale on its first chunk): the item's later messages are dropped, as a
    later item's were, and the Serve call is cancelled."""
    streams, board, dispatcher = parent
    items, msgs = step_items()
    holder: dict = {}

    def lose_on_first_chunk(msg):
        if isinstance(msg, m.Chunk):
            holder["stream"].stale = True

    dispatcher.on_each = lose_on_first_chunk
    slot = Slot(index=1, placement=Placement("cpu:1", None), engine=EngineSpec(engine="sim"))
    slot.attached = True
    response = Response([items[0], [msgs[1], msgs[2], msgs[3], msgs[4]]])
    stream = holder["stream"] = Stream(request("r1"), 0, Handle(response))
    streams._run(slot, stream)
    assert [msg for _, msg in dispatcher.got] == msgs[:2]  # Started, the first chunk
    wait_until(response.cancelled.is_set, 10, what="the Serve call to be cancelled")
    assert board.get(1, Col.COMPLETED) == 0
