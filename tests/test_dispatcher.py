"""The dispatcher without processes: a real StatusBoard, fake worker links."""

from __future__ import annotations

import numpy as np
import pytest

from vibevoice_pool.pool.dispatcher import Dispatcher
from workers.wire import messages as m
from workers.wire.board import Col, SlotState, StatusBoard, WorkerState


@pytest.fixture
def board():
    b = StatusBoard.create(4)
    yield b
    b.close()


class Link:
    def __init__(self):
        self.sent = []

    def __call__(self, msg):
        self.sent.append(msg)

    def synth(self):
        return [x.request for x in self.sent if isinstance(x, m.Synthesize)]


def up(board, disp, slot, capacity=1, speed=1.0):
    board.set(slot, Col.SLOT_STATE, SlotState.RUNNING)
    board.set(slot, Col.WORKER_STATE, WorkerState.IDLE)
    board.set(slot, Col.CAPACITY, capacity)
    board.set(slot, Col.SPEED, speed)
    link = Link()
    disp.attach(slot, link)
    return link


def req(i, text="Speaker 1: hello", est=1.0):
    return m.Request(id=f"r{i}", turns=(m.Turn(0, text),), seed=i, est_audio_s=est)


def test_late_binding_holds_requests_until_a_slot_is_free(board):
    d = Dispatcher(board)
    link = up(board, d, 0)
    handles = [d.submit(req(i)) for i in range(3)]
    assert [r.id for r in link.synth()] == ["r0"]
    assert d.queue_length() == 2 and board.get(0, Col.INFLIGHT) == 1
    d.on_message(0, m.Chunk("r0", 0, np.zeros(2400, np.float32)))
    d.on_message(0, m.Done("r0", 0.1, 0.1))
    assert handles[0].done and [r.id for r in link.synth()] == ["r0", "r1"]
    assert board.get(0, Col.INFLIGHT) == 1


def test_a_full_queue_refuses_at_once_and_loses_nothing(board):
    d = Dispatcher(board, max_queue=2)
    link = up(board, d, 0)
    accepted = [d.submit(req(i)) for i in range(3)]  # one dispatched, two queued
    with pytest.raises(m.PoolError) as e:
        d.submit(req(9))
    assert e.value.kind == m.ErrorKind.OVERLOADED and e.value.retryable
    for i in range(3):
        d.on_message(0, m.Done(f"r{i}", 0.1, 0.1))
    assert all(h.done for h in accepted)
    assert [r.id for r in link.synth()] == ["r0", "r1", "r2"]


def test_the_dispatcher_bumps_its_columns_at_assignment(board):
    d = Dispatcher(board)
    up(board, d, 0, capacity=4)
    d.submit(req(1, est=3.0))
    d.submit(req(2, est=2.0))
    assert board.get(0, Col.INFLIGHT) == 2
    assert board.get(0, Col.QUEUED_WORK_S) == pytest.approx(5.0)
    d.on_message(0, m.Chunk("r1", 0, np.zeros(24000, np.float32)))  # 1 s made
    assert board.get(0, Col.QUEUED_WORK_S) == pytest.approx(4.0)
    d.on_message(0, m.Done("r1", 1.0, 1.0))
    assert board.get(0, Col.QUEUED_WORK_S) == pytest.approx(2.0)


def test_least_work_sends_work_to_the_faster_worker(board):
    d = Dispatcher(board)
    slow = up(board, d, 0, speed=0.5)
    fast = up(board, d, 1, speed=2.0)
    d.submit(req(1, est=4.0))
    assert fast.synth() and not slow.synth()


def test_a_lost_worker_requeues_its_requests_at_the_head(board):
    d = Dispatcher(board)
    a = up(board, d, 0, capacity=2)
    handles = [d.submit(req(i)) for i in range(3)]
    assert [r.id for r in a.synth()] == ["r0", "r1"]
    moved = d.worker_lost(0, "killed by SIGKILL")
    assert sorted(moved) == ["r0", "r1"]
    b = up(board, d, 1, capacity=3)
    sent = b.synth()
    assert [r.id for r in sent] == ["r0", "r1", "r2"]  # the head first, in order
    assert [r.attempt for r in sent] == [2, 2, 1]
    assert [r.seed for r in sent] == [0, 1, 2]  # same seed on replay
    assert not any(h.done for h in handles)


def test_a_request_that_took_down_two_workers_is_quarantined(board):
    d = Dispatcher(board, max_attempts=2)
    up(board, d, 0)
    h = d.submit(req(1, text="[[crash]]"))
    d.on_message(0, m.Started("r1", at=1.0))
    assert d.worker_lost(0, "killed by SIGKILL") == ["r1"]  # sent back to the queue
    up(board, d, 1)
    d.on_message(1, m.Started("r1", at=2.0))
    assert d.worker_lost(1, "killed by SIGKILL") == []  # quarantined: not sent back
    assert isinstance(h.outcome, m.Failed) and h.outcome.error == m.ErrorKind.WORKER_LOST
    with pytest.raises(m.PoolError, match="2 workers"):
        h.result(0)
    assert d.pending() == 0


def test_a_replayed_stream_skips_audio_already_delivered(board):
    d = Dispatcher(board)
    up(board, d, 0)
    h = d.submit(req(1))
    full = np.arange(30000, dtype=np.float32)
    d.on_message(0, m.Chunk("r1", 0, full[:12000]))
    d.worker_lost(0, "killed")
    up(board, d, 1)
    d.on_message(1, m.Chunk("r1", 0, full[:10000]))  # all already delivered: dropped
    d.on_message(1, m.Chunk("r1", 1, full[10000:20000]))  # 2000 repeated, 8000 new
    d.on_message(1, m.Chunk("r1", 2, full[20000:]))
    d.on_message(1, m.Done("r1", 1.25, 1.0))
    np.testing.assert_array_equal(h.result(0), full)


def test_a_request_still_waiting_in_a_dead_workers_queue_is_not_blamed(board):
    d = Dispatcher(board, max_attempts=2)
    up(board, d, 0, capacity=2)  # r2 is in the worker's queue, behind r1
    running, waiting = d.submit(req(1)), d.submit(req(2))
    d.on_message(0, m.Started("r1", at=1.0))
    for slot in (0, 1):  # two workers die, r2 never started on either
        d.worker_lost(slot, "killed by SIGKILL")
        up(board, d, slot + 1, capacity=2)
        d.on_message(slot + 1, m.Started("r1", at=2.0))
    assert running.outcome.error == m.ErrorKind.WORKER_LOST
    assert not waiting.done


def test_answers_from_a_worker_that_no_longer_holds_the_request_are_ignored(board):
    d = Dispatcher(board)
    up(board, d, 0)
    h = d.submit(req(1))
    d.worker_lost(0, "killed")
    d.on_message(0, m.Done("r1", 1.0, 1.0))  # late message from the dead worker
    assert not h.done


def test_cancel_a_queued_request_and_a_running_one(board):
    d = Dispatcher(board)
    link = up(board, d, 0)
    running, queued = d.submit(req(1)), d.submit(req(2))
    queued.cancel()
    assert queued.outcome.error == m.ErrorKind.CANCELLED
    running.cancel()
    assert isinstance(link.sent[-1], m.Cancel) and link.sent[-1].request_id == "r1"
    d.on_message(0, m.Failed("r1", m.ErrorKind.CANCELLED, "cancelled"))
    assert running.outcome.error == m.ErrorKind.CANCELLED and d.pending() == 0


def test_draining_worker_takes_no_new_work(board):
    d = Dispatcher(board)
    a = up(board, d, 0)
    b = up(board, d, 1)
    d.drain(0)
    for i in range(2):
        d.submit(req(i))
    assert not a.synth() and len(b.synth()) == 1


def test_expired_requests_time_out(board):
    now = [100.0]
    d = Dispatcher(board, clock=lambda: now[0])
    h = d.submit(req(1))  # no worker: waits in the queue
    assert h.submitted_at == 100.0  # the handle reads the dispatcher's clock
    now[0] = 149.0
    d.expire(50.0)
    assert not h.done
    now[0] = 200.0
    d.expire(50.0)
    assert h.outcome.error == m.ErrorKind.TIMEOUT and d.queue_length() == 0


def test_listeners_get_typed_events_in_order(board):
    from vibevoice_pool.pool import events as ev

    d = Dispatcher(board)
    seen = []
    d.subscribe(seen.append)
    up(board, d, 0)
    h = d.submit(req(1))
    d.on_message(0, m.Started("r1", at=5.0))
    d.on_message(0, m.Chunk("r1", 0, np.zeros(2400, np.float32)))
    d.worker_lost(0, "killed")
    up(board, d, 1)
    d.on_message(1, m.Chunk("r1", 0, np.zeros(4800, np.float32)))  # 2400 of them new
    d.on_message(1, m.Done("r1", 0.2, 0.1))
    assert [type(e) for e in seen] == [
        ev.Dispatched,
        ev.Started,
        ev.FirstAudio,  # once: the second worker's new audio is not the first
        ev.Requeued,
        ev.Dispatched,
        ev.Finished,
    ]
    assert [getattr(e, "slot", None) for e in seen] == [0, 0, 0, 0, 1, None]
    assert all(e.handle is h for e in seen)
    assert seen[1].at == 5.0 and seen[3].request.attempt == 2
    assert isinstance(seen[-1].outcome, m.Done) and h.samples == 4800
    with pytest.raises(AttributeError):  # frozen
        seen[0].slot = 3


def test_a_handle_has_several_readers_that_wait_rather_than_poll():
    import asyncio
    import threading

    from vibevoice_pool.pool.handle import RequestHandle

    h = RequestHandle(req(1), lambda _: None)
    pcm = np.ones(2400, np.float32)

    async def read() -> list:
        await h.started()
        return [len(p) async for p in h.stream()]

    async def main():
        readers = [asyncio.create_task(read()) for _ in range(2)]
        await asyncio.sleep(0.05)  # both caught up and waiting: nothing to read yet
        assert len(h._wakers) == 2

        def produce():
            h.push(m.Started("r1"))
            for i in range(3):
                h.push(m.Chunk("r1", i, pcm))
            h.push(m.Done("r1", 0.3, 0.1))

        threading.Thread(target=produce).start()  # from another thread, as the pool does
        got = await asyncio.wait_for(asyncio.gather(*readers), 5)
        late = await read()  # a reader that comes after the end reads it all too
        return got + [late]

    every = [2400, 2400, 2400]
    assert asyncio.run(main()) == [every, every, every]
    assert h.samples == 7200 and not h._wakers and isinstance(h.outcome, m.Done)


def test_a_handle_read_raises_the_typed_error_after_the_audio_before_it():
    import asyncio

    from vibevoice_pool.pool.handle import RequestHandle

    h = RequestHandle(req(1), lambda _: None)
    h.push(m.Started("r1"))
    h.push(m.Chunk("r1", 0, np.ones(100, np.float32)))
    h.push(m.Failed("r1", m.ErrorKind.OUT_OF_MEMORY, "too long", retryable=True))
    got = []

    async def read():
        await h.started()  # it did start: the failure comes later
        async for pcm in h.stream():
            got.append(len(pcm))

    with pytest.raises(m.PoolError) as e:
        asyncio.run(read())
    assert got == [100] and e.value.kind is m.ErrorKind.OUT_OF_MEMORY and e.value.retryable

    early = RequestHandle(req(2), lambda _: None)
    early.push(m.Failed("r2", m.ErrorKind.CANCELLED, "cancelled"))
    with pytest.raises(m.PoolError) as e:
        asyncio.run(early.started())  # failed before any worker began it
    assert e.value.kind is m.ErrorKind.CANCELLED


def test_listeners_run_outside_the_lock_a_slow_one_delays_no_submit(board):
    import threading
    import time

    from vibevoice_pool.pool import events as ev

    d = Dispatcher(board)
    up(board, d, 0, capacity=8)
    holding, seen = threading.Event(), []

    def slow(event) -> None:
        seen.append(type(event))
        if isinstance(event, ev.Finished) and not holding.is_set():
            holding.set()
            time.sleep(1.0)  # the log on a stuck disk, say

    d.subscribe(slow)
    first = d.submit(req(1))
    finisher = threading.Thread(target=d.on_message, args=(0, m.Done("r1", 0.1, 0.1)))
    finisher.start()  # as the supervisor's thread: delivers Finished, held for 1 s
    assert holding.wait(5)
    t0 = time.monotonic()
    second = d.submit(req(2))  # another thread submits while the listener is held
    took = time.monotonic() - t0
    finisher.join(5)
    assert took < 0.5, took
    assert first.done and not second.done and d.pending() == 1
    # nothing is lost: the held thread delivered the second Dispatched after it was done
    assert seen == [ev.Dispatched, ev.Finished, ev.Dispatched]


def test_a_listener_that_raises_is_logged_and_the_rest_still_hear(board, caplog):
    d = Dispatcher(board)
    heard = []

    def broken(event) -> None:
        raise RuntimeError("a bug in a listener")

    d.subscribe(broken)
    d.subscribe(heard.append)
    up(board, d, 0)
    d.submit(req(1))
    assert len(heard) == 1 and "a pool listener failed" in caplog.text
    d.unsubscribe(broken)
    d.on_message(0, m.Done("r1", 0.1, 0.1))
    assert len(heard) == 2


def test_a_remote_traceback_goes_to_the_log_and_never_to_the_client(board, caplog):
    d = Dispatcher(board)
    up(board, d, 0)
    h = d.submit(req(1))
    tb = 'Traceback (most recent call last):\n  File "step.py", line 9, in step\nKeyError: 3\n'
    d.on_message(0, m.Failed("r1", m.ErrorKind.ENGINE_ERROR, "KeyError: 3", traceback=tb))
    assert 'File "step.py", line 9, in step' in caplog.text and "request r1" in caplog.text
    assert h.outcome.traceback == "" and h.outcome.message == "KeyError: 3"
    with pytest.raises(m.PoolError) as e:
        h.result(0)
    assert "Traceback" not in str(e.value) and e.value.traceback == ""


def test_a_burst_of_events_wakes_the_reader_once_and_keeps_their_order(board):
    import asyncio

    d = Dispatcher(board)
    up(board, d, 0)
    handle = d.submit(req(1))
    parts = [np.full(100, k, np.float32) for k in range(3)]

    async def main():
        loop = asyncio.get_running_loop()
        wakes = 0
        real = loop.call_soon_threadsafe

        def counted(callback, *args):
            nonlocal wakes
            wakes += isinstance(getattr(callback, "__self__", None), asyncio.Event)  # a reader's
            return real(callback, *args)

        loop.call_soon_threadsafe = counted
        got = []

        async def read():
            async for pcm in handle.stream():
                got.append(pcm[0])

        reader = asyncio.create_task(read())
        for _ in range(500):  # until it has caught up and waits for the first event
            if handle._wakers:
                break
            await asyncio.sleep(0.01)
        burst = [m.Started("r1", at=1.0)]
        burst += [m.Chunk("r1", k, pcm) for k, pcm in enumerate(parts)]
        burst.append(m.Done("r1", 0.0125, 0.01))
        await asyncio.to_thread(d.on_message, 0, *burst)  # as the supervisor's thread does
        await asyncio.wait_for(reader, 5)
        return wakes, got

    wakes, got = asyncio.run(main())
    assert got == [0.0, 1.0, 2.0] and handle.done
    assert wakes == 1


def test_a_reader_whose_event_loop_closed_does_not_break_the_dispatcher(board):
    import asyncio

    d = Dispatcher(board)
    link = up(board, d, 0)
    gone, nxt = d.submit(req(1)), d.submit(req(2))
    loop = asyncio.new_event_loop()
    reading = gone.stream()
    loop.run_until_complete(asyncio.wait([loop.create_task(anext(reading))], timeout=0.05))
    loop.close()  # closed under a waiting reader, its generator never finished
    d.on_message(0, m.Started("r1", at=1.0))  # the old code raised "Event loop is closed"
    d.on_message(0, m.Done("r1", 0.0, 0.01))
    assert gone.done and [r.id for r in link.synth()] == ["r1", "r2"]
    assert not nxt.done


def test_a_handle_keeps_its_first_start_and_its_first_audio_when_sent_again(board):
    """The queue wait and the first audio are read from the handle (/metrics, the done
    line): admission to the first Started and to the first Chunk, on the dispatcher's
    clock; a request sent back after its worker died keeps both, and the audio a replay
    repeats (trimmed, never pushed) moves neither."""
    now = [100.0]
    d = Dispatcher(board, clock=lambda: now[0])
    h = d.submit(req(1))  # no worker: it waits
    now[0] = 102.0
    assert h.queue_s() is None and h.first_audio_s() is None
    up(board, d, 0)
    now[0] = 103.0
    d.on_message(0, m.Started("r1", at=0.0))
    now[0] = 104.5
    d.on_message(0, m.Chunk("r1", 0, np.zeros(0, np.float32)))  # no audio yet
    assert h.queue_s() == 3.0 and h.first_audio_s() is None
    now[0] = 105.0
    d.on_message(0, m.Chunk("r1", 1, np.zeros(2400, np.float32)))
    d.worker_lost(0, "killed")
    up(board, d, 1)
    now[0] = 110.0
    d.on_message(1, m.Started("r1", at=0.0))
    d.on_message(1, m.Chunk("r1", 0, np.zeros(2400, np.float32)))  # a replay of the same
    now[0] = 111.0
    d.on_message(1, m.Chunk("r1", 1, np.zeros(2400, np.float32)))
    d.on_message(1, m.Done("r1", 0.2, 0.1))
    assert (h.queue_s(), h.first_audio_s(), h.finished_at) == (3.0, 5.0, 111.0)


def test_a_request_that_ends_in_the_queue_waited_until_its_end(board):
    now = [100.0]
    d = Dispatcher(board, clock=lambda: now[0])
    h = d.submit(req(1))
    now[0] = 107.0
    h.cancel()
    assert h.queue_s() == 7.0 and h.started_at is None and h.first_audio_s() is None
