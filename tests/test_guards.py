"""The guards against hostile clients, one at a time with fakes: Host and
cross-site rules (origin.py), named keys (auth.py) and the login throttle
(login_throttle.py); the connection guard's are in test_connections.py. The same
guards face real sockets and a real server in test_hostile.py and test_auth.py."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from vibevoice_pool.api.auth import (
    Caller,
    KeyFileError,
    key_ring,
    load_keys,
    short_key_warning,
    single_key_owner,
)
from vibevoice_pool.api.login_throttle import LoginThrottle, client_key
from vibevoice_pool.api.origin import BrowserGuard, allowed_hosts, host_allowed, is_cross_site


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# ---- origins ------------------------------------------------------------------


def test_host_allow_list():
    hosts = allowed_hosts("127.0.0.1", "tts.example.org, *.lan")
    for ok in ("localhost", "LOCALHOST:7860", "127.0.0.1:1", "[::1]:7860", "tts.example.org",
               "a.b.lan", "localhost."):  # fmt: skip
        assert host_allowed(ok, hosts), ok
    for bad in ("attacker.example", "127.0.0.1.nip.io", "lan", "", "tts.example.org.evil"):
        assert not host_allowed(bad, hosts), bad
    assert host_allowed("anything", allowed_hosts("127.0.0.1", "*"))
    assert host_allowed("x.gradio.live", allowed_hosts("127.0.0.1", "", share=True))


@pytest.mark.parametrize(
    "headers,cross",
    [
        ({}, False),  # curl, the openai package
        ({"sec-fetch-site": "same-origin", "origin": "http://localhost:7860"}, False),
        ({"sec-fetch-site": "none"}, False),  # typed in the address bar
        ({"sec-fetch-site": "cross-site"}, True),
        ({"sec-fetch-site": "same-site"}, True),  # another port of localhost
        ({"origin": "http://localhost:7860"}, False),
        ({"origin": "http://localhost:8000"}, True),
        ({"origin": "http://evil.example"}, True),
        ({"origin": "null"}, True),
        ({"origin": "https://app.example", "sec-fetch-site": "cross-site"}, False),  # CORS
    ],
)
def test_cross_site(headers, cross):
    headers = {"host": "localhost:7860", **headers}
    assert is_cross_site(headers, "http", ("https://app.example",)) is cross


def _guarded(keyed: bool = False) -> TestClient:
    async def ok(_request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST", "DELETE"])])
    keys = key_ring("k" * 20) if keyed else None
    wrapped = BrowserGuard(
        app,
        allowed=allowed_hosts("127.0.0.1", "testserver"),
        key_ok=keys.allows if keys else (lambda _h: False),
        keyed=keyed,
    )
    return TestClient(wrapped)


def test_browser_guard_refusals_are_openai_shaped():
    c = _guarded()
    r = c.get("/v1/pool", headers={"host": "evil.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_host"
    r = c.post("/v1/voices", headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site"
    assert c.get("/v1/pool", headers={"origin": "http://evil.example"}).status_code == 200
    assert c.post("/v1/pool/workers/0/restart").json()["error"]["code"] == "admin_needs_json"
    assert c.post("/v1/pool/workers/0/restart", json={}).status_code == 200


def test_with_a_key_sent_a_cross_site_write_passes():
    c = _guarded(keyed=True)
    evil = {"origin": "http://evil.example"}
    assert c.post("/v1/voices", headers=evil).status_code == 403
    ok = c.post("/v1/voices", headers={**evil, "authorization": "Bearer " + "k" * 20})
    assert ok.status_code == 200
    # a keyed server leaves the admin rule to the key middleware (401 there)
    assert c.post("/v1/pool/workers/0/restart").status_code == 200


# ---- named keys ------------------------------------------------------------------


def test_keys_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text(
        "# team keys\nalice: " + "a" * 20 + "\n\nbob:" + "b" * 24 + "  \n"
        "ops: admin: " + "c" * 20 + "\ncarol: User:" + "d" * 20 + "\n"
    )
    assert load_keys(f) == [
        ("alice", "a" * 20, "user"),  # an entry without a role is a user
        ("bob", "b" * 24, "user"),
        ("ops", "c" * 20, "admin"),
        ("carol", "d" * 20, "user"),
    ]
    ring = key_ring("single-key-for-all", str(f))
    assert ring.named and ring.match("a" * 20) == Caller("alice", "key:alice", "user")
    assert ring.match("b" * 24).owner == "key:bob" and not ring.match("b" * 24).admin
    assert ring.match("c" * 20).admin
    single = ring.match("single-key-for-all")
    assert single.owner == single_key_owner("single-key-for-all") and single.admin
    assert ring.match("a" * 19) is None and ring.match("") is None
    assert not key_ring("") and not key_ring("").named
    for text, words in (
        ("alice " + "a" * 20, "name: key"),
        ("ops: admin: short", "shorter than 16"),
        ("alice: short", "shorter than 16"),
        ("a: " + "x" * 20 + "\na: " + "y" * 20, "given twice"),
        ("a: " + "x" * 20 + "\nb: " + "x" * 20, "another name's key"),
        ("# nothing\n", "holds no keys"),
        ("bad name: " + "x" * 20, "name: key"),
    ):
        f.write_text(text)
        with pytest.raises(KeyFileError, match=words):
            load_keys(f)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_keys(tmp_path / "missing")


# ---- the login throttle -------------------------------------------------------------

GOOD = "the-right-key"


async def fake_login(scope, receive, send):
    """Gradio's /login in small: 200 for the right password, 400 otherwise."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    status = 200 if f"password={GOOD}".encode() in body else 400
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


class Login:
    def __init__(self):
        self.clock = Clock()
        self.slept: list[float] = []

        async def sleep(s):
            self.slept.append(s)

        self.throttle = LoginThrottle(fake_login, clock=self.clock, sleep=sleep)

    def attempt(self, password: str, address: str = "10.0.0.1") -> tuple[int, dict]:
        got: dict = {}
        body = f"username=x&password={password}".encode()
        sent = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return sent.pop(0) if sent else {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                got["status"] = message["status"]
                got["headers"] = dict(message["headers"])

        scope = {"type": "http", "method": "POST", "path": "/login", "client": (address, 5)}
        asyncio.run(self.throttle(scope, receive, send))
        return got["status"], got["headers"]


def test_login_slows_down_then_locks_then_lets_the_key_in_after_the_window():
    login = Login()
    statuses = [login.attempt("guess")[0] for _ in range(8)]
    assert statuses == [400] * 8
    assert login.slept == [0.25, 0.5, 1.0, 2.0, 2.0]  # from the fourth failure on
    status, headers = login.attempt(GOOD)  # locked: even the right key waits
    assert status == 429 and int(headers[b"retry-after"]) == 300
    assert login.attempt("guess", address="10.0.0.2")[0] == 400  # others are not locked
    login.clock.t += 150
    status, headers = login.attempt(GOOD)
    assert status == 429 and int(headers[b"retry-after"]) == 150
    login.clock.t += 151  # the window has passed
    assert login.attempt(GOOD)[0] == 200
    fresh = Login()
    for _ in range(3):
        fresh.attempt("guess")
    assert fresh.attempt(GOOD)[0] == 200
    # a success wipes nothing: a user key must not buy more guesses at the admin key
    assert len(fresh.throttle.failures["10.0.0.1"]) == 3


def test_parallel_guesses_count_before_they_answer():
    login = Login()
    for _ in range(7):
        login.attempt("guess")
    login.throttle._count("10.0.0.1", 1)  # one guess still being checked
    assert login.attempt("guess")[0] == 429  # the eighth is that one, not this
    login.throttle._count("10.0.0.1", -1)  # it answered (without a failure)
    assert login.attempt("guess")[0] == 400
    assert login.attempt("guess")[0] == 429
    assert not login.throttle.pending  # nothing left counted as in flight


# ---- decodes at once ----------------------------------------------------------------


def test_decodes_beyond_the_slots_wait_then_get_overloaded():
    import io

    import numpy as np
    import soundfile as sf

    from vibevoice_pool import audio
    from workers.wire.messages import ErrorKind, PoolError

    buf = io.BytesIO()
    sf.write(buf, np.full(2400, 0.1, np.float32), 24000, format="WAV")
    wav = buf.getvalue()
    audio.set_decode_slots(1, wait_s=0.2)
    try:
        held = audio._decode_slots
        assert held.acquire(timeout=1)  # someone else's decode is running
        with pytest.raises(PoolError) as e:
            audio.decode_upload(wav, max_bytes=10**6, max_seconds=5)
        assert e.value.kind is ErrorKind.OVERLOADED and "decoded at once" in e.value.message
        held.release()
        assert len(audio.decode_upload(wav, max_bytes=10**6, max_seconds=5)) == 2400
    finally:
        audio.set_decode_slots(2)


def test_addresses_that_one_client_can_change_at_will_count_as_one():
    assert client_key("127.0.0.1") == client_key("127.8.9.10") == client_key("::1") == "loopback"
    assert client_key("::ffff:127.0.0.2") == "loopback"
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key("10.0.0.1") != client_key("10.0.0.2")
    login = Login()
    for i in range(8):
        assert login.attempt("guess", address=f"127.0.0.{i + 1}")[0] == 400
    assert login.attempt("guess", address="127.1.2.3")[0] == 429


def test_many_addresses_together_are_capped_but_a_clean_address_is_never_locked_out():
    login = Login()
    login.throttle.global_lock_after = 20
    for i in range(20):  # two failures each from ten addresses: none locked alone
        assert login.attempt("guess", address=f"10.0.1.{i % 10}")[0] == 400
    status, headers = login.attempt(GOOD, address="10.0.1.3")  # one that failed: locked
    assert status == 429 and int(headers[b"retry-after"]) == 300
    # the operator's address has no failure of its own: the others do not lock it out
    assert login.attempt(GOOD, address="10.0.2.1")[0] == 200
    assert login.attempt("guess", address="10.0.2.2")[0] == 400  # a fresh one gets one try
    assert login.attempt("guess", address="10.0.2.2")[0] == 429  # then the global lock


def test_a_short_single_key_gets_a_warning():
    assert "can be guessed" in short_key_warning("q") and "16" in short_key_warning("q")
    assert short_key_warning("k" * 16) == "" and short_key_warning("") == ""


def test_the_page_upload_and_presets_on_disk_meet_the_same_header_checks(tmp_path):
    """The page's voice upload (ui.Page.add_voice) and presets on disk go through
    VoiceLibrary, which decodes with audio.decode_upload like every route."""
    import io

    import numpy as np
    import soundfile as sf

    from vibevoice_pool.voices.library import VoiceLibrary
    from workers.wire.messages import PoolError

    buf = io.BytesIO()
    sf.write(buf, np.zeros((96_000, 8), np.float32), 96_000, format="FLAC")
    bomb = buf.getvalue()
    library = VoiceLibrary(tmp_path, max_bytes=10 << 20, max_seconds=60)
    with pytest.raises(PoolError, match="8 channels"):
        library.add("page-upload", bomb)
    (tmp_path / "dropped.flac").write_bytes(bomb)  # a file put in the folder by hand
    with pytest.raises(PoolError, match="voice preset 'dropped' has 8 channels"):
        library.resolve("dropped")
