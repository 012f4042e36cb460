"""Live requests of tenants on real sim servers (two workers, one row each): one
tenant's burst does not hold another's request back, while a server without named
keys keeps its queue in arrival order. The order is read from the server's log
(the dispatcher's "Chose ... for request R" line of each request), never timed."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
from conftest import wait_until
from serving import running_server

OPS = "ops-key-0123456789abcdef"  # the one --api-key: an admin, whom no tenant waits for
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"
ARGS = ("--max-batch-size", "1", "--sim-rtf", "0.05")
LONG = "Speaker 1: " + "a long line that the burst sends again and again " * 4
SHORT = "Speaker 1: hi"
BURST = 6  # two start at once, four wait in the queue


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def post(server, key: str, script: str) -> httpx.Response:
    body = {"script": script, "seed": 1}
    return httpx.post(server.url + "/v1/synthesize", json=body, headers=auth(key), timeout=120)


def dispatch_order(server) -> list[str]:
    return re.findall(r"Chose .* for request (\w+) \(queue", server.log())


def burst_then_one(server, a: str, b: str) -> tuple[list[str], str, list[str]]:
    """`a` sends BURST long requests; once four of them wait in the queue, `b` sends one
    short one. (a's ids, b's id, the order they were dispatched in)."""
    with concurrent.futures.ThreadPoolExecutor(BURST + 1) as pool:
        burst = [pool.submit(post, server, a, LONG) for _ in range(BURST)]
        queued = BURST - 2
        wait_until(
            lambda: server.get("/v1/pool", headers=auth(a)).json()["queue"]["length"] == queued,
            30,
            what=f"{queued} of the burst to wait in the queue",
        )
        one = pool.submit(post, server, b, SHORT).result()
        answers = [f.result() for f in burst]
    assert one.status_code == 200 and all(r.status_code == 200 for r in answers)
    ids = [r.headers["X-Request-Id"] for r in answers]
    return ids, one.headers["X-Request-Id"], dispatch_order(server)


def test_a_tenants_request_starts_before_anothers_queued_burst(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"alice: {ALICE}\nbob: {BOB}\n")
    with running_server(tmp_path, "--api-keys", str(keys), *ARGS, api_key=OPS) as s:
        burst, bobs, order = burst_then_one(s, ALICE, BOB)
    assert set(burst) | {bobs} <= set(order)
    started_first = {rid for rid in order[: order.index(bobs)] if rid in burst}
    # bob's went to the first place that freed: only the two that found a free
    # worker on arrival started before it, none of the four that waited
    assert len(started_first) == 2, (order, bobs)


def test_without_named_keys_the_queue_stays_first_in_first_out(tmp_path):
    with running_server(tmp_path, *ARGS) as s:
        burst, last, order = burst_then_one(s, "", "")
    assert set(burst) | {last} <= set(order)
    assert order.index(last) == len(order) - 1, (order, last)  # behind all of the burst


def test_a_tenant_past_its_share_of_the_queue_gets_429_while_another_is_admitted(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"alice: {ALICE}\nbob: {BOB}\n")
    # a queue of 4: a key's share (owner_queue_share 0.5) is 2 waiting
    args = ("--api-keys", str(keys), "--max-queue", "4", *ARGS)
    with running_server(tmp_path, *args, api_key=OPS) as s:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            alices = [pool.submit(post, s, ALICE, LONG) for _ in range(4)]
            wait_until(
                lambda: s.get("/v1/pool", headers=auth(BOB)).json()["queue"]["length"] == 2,
                30,
                what="two of alice's requests to wait in the queue",
            )
            over = post(s, ALICE, SHORT)
            bobs = pool.submit(post, s, BOB, SHORT)
            assert bobs.result().status_code == 200
            assert all(f.result().status_code == 200 for f in alices)
        metrics = s.get("/metrics", headers=auth(OPS)).text
    assert over.status_code == 429 and over.headers["Retry-After"].isdigit()
    err = over.json()["error"]
    assert err["code"] == "owner_queue_full" and err["type"] == "rate_limit_error"
    assert "'alice'" in err["message"] and "owner_queue_share" in err["message"]
    assert 'vibevoice_pool_refused_total{reason="owner_queue_full"} 1' in metrics
