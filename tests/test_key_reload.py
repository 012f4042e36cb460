"""The --api-keys file is read again when it changes, on a real server (the tiny
model): a key removed is refused within seconds, a key added works, a role changes,
an editor's write-and-rename is seen, a broken edit or a removed file keeps the keys
in force, and the page's login follows the file.

Every edit waits for its own log line ("API keys reloaded" or "not reloaded"),
polled with the admin key that no edit removes. A wrong Bearer key counts against
the address (eight lock it for 5 minutes): each test sends one at most, and polls
with a right key instead."""

from __future__ import annotations

import os
import threading

import httpx
import pytest
from conftest import Server, pid_alive, wait_until
from prometheus_client.parser import text_string_to_metric_families

OPS = "ops-key-0123456789abcdef0123"  # the admin no edit removes
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
BOB_NEW = "bob-key-ZYXWVUTSRQPONMLKJI"  # as long as BOB: the file keeps its size
CAROL = "carol-key-0123456789abcdef"
BASE = {"ops": ("admin", OPS), "alice": ("user", ALICE), "bob": ("user", BOB)}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def keys_text(keys: dict[str, tuple[str, str]]) -> str:
    return "# who may call\n" + "".join(f"{n}: {r}: {k}\n" for n, (r, k) in keys.items())


@pytest.fixture(scope="module")
def srv(tiny_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("key-reload")
    path = tmp / "keys"
    path.write_text(keys_text(BASE))
    args = ["--tiny-model", "--cache-dir", str(tiny_cache), "--gpus", "cpu:1"]
    s = Server([*args, "--api-keys", str(path)], tmp)
    pids: list[int] = []
    try:
        s.wait_ready(300)
        pids = [w["pid"] for w in s.get("/v1/pool", headers=bearer(OPS)).json()["workers"]]
        s.keys = path
        yield s
    finally:
        s.stop()
        for pid in pids:
            wait_until(lambda p=pid: not pid_alive(p), 15, what=f"worker {pid} to exit")


def said(s: Server) -> int:
    """How many readings of the keys file the log tells of, good or bad."""
    log = s.log()
    return log.count("API keys reloaded") + log.count("API keys not reloaded")


def edit(s: Server, write) -> str:
    """Change the keys file with `write()`; wait (polling with the admin key) for the
    server's line about its reading; that line."""
    before = said(s)
    write()

    def seen():
        assert s.get("/v1/pool", headers=bearer(OPS)).status_code == 200
        return said(s) > before

    wait_until(seen, 30, 0.2, "the server to read the keys file again")
    return [ln for ln in s.log().splitlines() if "API keys" in ln and "reloaded" in ln][-1]


def rewrite(s: Server, keys: dict) -> str:
    return edit(s, lambda: s.keys.write_text(keys_text(keys)))


def status(s: Server, key: str, path: str = "/v1/pool") -> int:
    return s.get(path, headers=bearer(key)).status_code


def counts(s: Server) -> dict[str, float]:
    text = s.get("/metrics", headers=bearer(OPS)).text
    return {
        f.name: f.samples[0].value
        for f in text_string_to_metric_families(text)
        if f.name.startswith("vibevoice_pool_keys_")
    }


def test_a_key_removed_is_refused_within_seconds_and_one_added_works(srv):
    rewrite(srv, BASE)
    assert status(srv, BOB) == 200 and status(srv, ALICE, "/metrics") == 403
    reloads = counts(srv)["vibevoice_pool_keys_reloads"]
    srv.keys.write_text(
        keys_text({"ops": BASE["ops"], "alice": ("admin", ALICE), "carol": ("user", CAROL)})
    )
    # polled with bob's key: the one wrong key this test sends is the last poll
    wait_until(lambda: status(srv, BOB) == 401, 30, 0.2, "bob's key to be refused")
    assert status(srv, CAROL) == 200  # added
    assert status(srv, ALICE, "/metrics") == 200  # alice is an admin now
    line = [ln for ln in srv.log().splitlines() if "API keys reloaded" in ln][-1]
    assert "3 keys" in line and "added: carol" in line and "removed: bob" in line, line
    assert "new role: alice (admin)" in line, line
    assert not any(k in srv.log() for k in (OPS, ALICE, BOB, CAROL))  # never the keys
    assert counts(srv)["vibevoice_pool_keys_reloads"] == reloads + 1


def test_an_editors_write_and_rename_is_read(srv):
    """Bob's key rotated by a write to a new file renamed over the old, which is given
    the old one's size and time: only its inode tells it apart."""
    rewrite(srv, BASE)
    assert status(srv, BOB) == 200
    old = os.stat(srv.keys)
    new = srv.keys.with_name("keys.new")

    def rename_over():
        new.write_text(keys_text({**BASE, "bob": ("user", BOB_NEW)}))
        os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))
        assert os.stat(new).st_size == old.st_size
        os.replace(new, srv.keys)

    line = edit(srv, rename_over)
    assert "new key: bob" in line, line
    assert status(srv, BOB_NEW) == 200
    assert status(srv, BOB) == 401


def test_a_broken_edit_keeps_the_keys_in_force_until_it_is_mended(srv):
    rewrite(srv, BASE)
    failed = counts(srv)["vibevoice_pool_keys_reload_failures"]
    lines = srv.log().count("API keys not reloaded")
    broken = keys_text({"ops": BASE["ops"], "alice": BASE["alice"]}) + "bob: short\n"
    line = edit(srv, lambda: srv.keys.write_text(broken))
    assert "API keys not reloaded" in line and "line 4" in line and "shorter than 16" in line
    assert "3 keys read before stay in force" in line, line
    for key in (OPS, ALICE, BOB):
        assert status(srv, key) == 200
    assert counts(srv)["vibevoice_pool_keys_reload_failures"] == failed + 1
    for _ in range(3):  # one line for the bad file, however many requests follow
        assert status(srv, ALICE) == 200
    assert srv.log().count("API keys not reloaded") == lines + 1
    rewrite(srv, {"ops": BASE["ops"], "alice": BASE["alice"]})  # mended: read again
    assert status(srv, BOB) == 401


def test_a_removed_file_keeps_the_keys_and_never_opens_the_server(srv):
    rewrite(srv, BASE)
    line = edit(srv, lambda: srv.keys.unlink())
    assert "not reloaded" in line and "No such file" in line and str(srv.keys) in line, line
    assert status(srv, BOB) == 200 and status(srv, ALICE) == 200
    assert srv.get("/v1/pool").status_code == 401  # no key: still refused
    rewrite(srv, {"ops": BASE["ops"], "alice": BASE["alice"]})  # back, without bob
    assert status(srv, BOB) == 401


def test_the_page_login_follows_the_file(srv):
    rewrite(srv, BASE)
    with httpx.Client(base_url=srv.url, timeout=10) as browser:
        assert browser.post("/login", data={"username": "x", "password": BOB}).status_code == 200
    rewrite(srv, {"ops": BASE["ops"], "alice": BASE["alice"], "carol": ("user", CAROL)})
    with httpx.Client(base_url=srv.url, timeout=10) as browser:
        assert browser.post("/login", data={"username": "x", "password": BOB}).status_code == 400
        assert browser.post("/login", data={"username": "y", "password": CAROL}).status_code == 200
        assert browser.get("/gradio_api/info").status_code == 200


def test_a_name_taken_out_and_given_back_has_its_jobs_again(srv):
    """What a key made belongs to its name: bob's job outlives bob's removal, no
    other key sees it, and a new key under the name bob lists and reads it."""
    rewrite(srv, BASE)
    r = srv.post("/v1/jobs", json={"script": "Speaker 1: mine"}, headers=bearer(BOB))
    assert r.status_code == 202
    job = r.json()["id"]
    rewrite(srv, {"ops": BASE["ops"], "alice": BASE["alice"]})
    assert srv.get(f"/v1/jobs/{job}", headers=bearer(ALICE)).status_code == 404
    rewrite(srv, {**BASE, "bob": ("user", BOB_NEW)})
    listed = srv.get("/v1/jobs", headers=bearer(BOB_NEW)).json()["data"]
    assert [j["id"] for j in listed] == [job]
    assert srv.get(f"/v1/jobs/{job}", headers=bearer(BOB_NEW)).json()["id"] == job


def test_a_page_logged_in_with_a_removed_key_is_logged_out(srv):
    """Gradio keeps a login as a session token that never asks the key again: a page
    logged in with bob's key went on working after bob left the file. Now the
    sessions under the user names bob's key logged in with end; alice's stay."""
    rewrite(srv, BASE)
    pages = {user: httpx.Client(base_url=srv.url, timeout=10) for user in ("x", "bob", "alice")}
    try:
        for user, key in (("x", BOB), ("bob", BOB), ("alice", ALICE)):
            r = pages[user].post("/login", data={"username": user, "password": key})
            assert r.status_code == 200
            assert pages[user].get("/gradio_api/info").status_code == 200
        rewrite(srv, {"ops": BASE["ops"], "alice": BASE["alice"]})

        def logged_out():
            return all(pages[u].get("/gradio_api/info").status_code == 401 for u in ("x", "bob"))

        wait_until(logged_out, 10, 0.2, "bob's page sessions to end")
        assert pages["alice"].get("/gradio_api/info").status_code == 200
        assert "Page logins ended with their keys: 2 sessions (user names: bob, x)" in srv.log()
    finally:
        for page in pages.values():
            page.close()


# ---- LiveKeys alone, on an injected clock --------------------------------------------


def test_a_request_never_waits_on_the_keys_file(tmp_path, monkeypatch):
    """A keys file on a hung network file system stalled the request that came a
    second after the last look: its stat ran on the request path, in the event loop.
    The file is now looked at by a watcher thread of its own; a request answers from
    the keys in force while that look hangs, and the change is taken once it ends."""
    from vibevoice_pool.api import live_keys

    path = tmp_path / "keys"
    path.write_text(keys_text(BASE))
    keys = live_keys.LiveKeys("", path, watch=False)
    stat, hung, go = live_keys._stamp, threading.Event(), threading.Event()

    def hanging(p):
        hung.set()
        go.wait(60)
        return stat(p)

    monkeypatch.setattr(live_keys, "_stamp", hanging)
    path.write_text(keys_text({"ops": BASE["ops"]}))
    watcher = threading.Thread(target=keys.check, daemon=True)
    watcher.start()
    assert hung.wait(10)
    answered = []
    asker = threading.Thread(target=lambda: answered.append(keys.match(BOB)), daemon=True)
    asker.start()
    asker.join(10)
    assert answered and answered[0].name == "bob"  # the keys in force, while the look hangs
    go.set()
    watcher.join(10)
    assert keys.match(BOB) is None and keys.match(OPS).name == "ops"
    assert (keys.reloads, keys.failures) == (1, 0)


def test_the_watcher_takes_a_change_by_itself(tmp_path):
    """No request is needed for a change to be read: the watcher looks once a CHECK_S."""
    from vibevoice_pool.api.live_keys import LiveKeys

    path = tmp_path / "keys"
    path.write_text(keys_text(BASE))
    keys = LiveKeys("", path)
    try:
        path.write_text(keys_text({"ops": BASE["ops"]}))
        wait_until(lambda: keys.reloads == 1, 10, 0.05, "the watcher to read the file")
        assert keys.match(BOB) is None
    finally:
        keys.close()


def test_a_swapped_symlink_is_read(tmp_path):
    """A mounted secret (Kubernetes) is a symlink to a folder swapped for a new one:
    the path's own stat is that of the file it leads to now."""
    from vibevoice_pool.api.live_keys import LiveKeys

    for name, keys in (("v1", BASE), ("v2", {"ops": BASE["ops"], "carol": ("user", CAROL)})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keys").write_text(keys_text(keys))
    (tmp_path / "data").symlink_to("v1")
    keys = LiveKeys("", tmp_path / "data" / "keys", watch=False)
    assert keys.match(BOB) is not None
    (tmp_path / "data.new").symlink_to("v2")
    os.replace(tmp_path / "data.new", tmp_path / "data")
    keys.check()
    assert keys.match(BOB) is None and keys.match(CAROL).owner == "key:carol"


def test_a_client_left_with_a_revoked_key_is_told_so_and_locks_no_one_out(srv):
    """A client still sending a key the file took away counted as guessing keys: after
    eight its address got 429 `key_throttled` for every key, the good ones of the
    others behind the same NAT or proxy included. The server knows that key: it is
    now 401 `key_revoked`, naming whose it was, and is not counted as a guess."""
    rewrite(srv, BASE)
    rewrite(srv, {"ops": BASE["ops"], "alice": BASE["alice"]})  # bob's key revoked
    answers = [srv.get("/v1/pool", headers=bearer(BOB)) for _ in range(12)]
    assert {r.status_code for r in answers} == {401}
    error = answers[-1].json()["error"]
    assert error["code"] == "key_revoked" and "'bob'" in error["message"], error
    assert status(srv, ALICE, "/v1/jobs") == 200  # the same address: not throttled
    rewrite(srv, BASE)  # bob's key given back: it works again
    assert status(srv, BOB, "/v1/jobs") == 200
