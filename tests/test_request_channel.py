"""The request channel: the dispatcher's own writes to a worker's pipe."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
from conftest import wait_until

from vibevoice_pool.pool.channel import RequestChannel

CTX = multiprocessing.get_context("spawn")


def big(i: int) -> tuple[int, np.ndarray]:
    return i, np.full(100_000, i, dtype=np.float32)  # 400 KB each


def test_a_worker_that_reads_nothing_never_blocks_the_sender_and_order_is_kept():
    ch = RequestChannel(CTX)
    try:
        done = threading.Event()

        def flood():
            for i in range(20):  # 8 MB: far more than any pipe holds
                ch.put(big(i))
            ch.put("last")
            done.set()

        threading.Thread(target=flood, daemon=True).start()
        assert done.wait(30), "put() blocked on a reader that reads nothing"
        assert ch.deferred > 0 and ch.pending() > 0
        got = [ch.reader.recv() for _ in range(21)]
        assert [g[0] for g in got[:20]] == list(range(20)) and got[20] == "last"
        for i, samples in got[:20]:
            assert samples.shape == (100_000,) and samples[0] == i and samples[-1] == i
        assert ch.pending() == 0
    finally:
        ch.close()


def test_small_messages_go_straight_into_the_pipe():
    ch = RequestChannel(CTX)
    try:
        for i in range(100):
            ch.put(("cancel", i))
        assert ch.deferred == 0
        assert [ch.reader.recv()[1] for _ in range(100)] == list(range(100))
    finally:
        ch.close()


def test_a_reader_that_is_gone_makes_puts_drop_quietly():
    ch = RequestChannel(CTX)
    ch.put(big(0))
    ch.reader_sent()  # nobody holds the read end now: EPIPE from here on
    for i in range(5):
        ch.put(big(i))  # must neither raise nor block
    wait_until(lambda: ch.pending() == 0, 10, what="the outbox to be dropped")
    ch.close()
    try:
        ch.put("after close")
    except ValueError as e:
        assert "closed" in str(e)
    else:
        raise AssertionError("put() after close() must refuse")
