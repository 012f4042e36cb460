"""With an API key, every route but /health and /ready answers 401 without it,
and the page asks for a login (Gradio's own login, the key as the password)."""

from __future__ import annotations

import httpx
import pytest
from serving import ALICE, BOB, named_keys_server, running_server

from vibevoice_pool.api.auth import API_KEY_ENV, resolve_api_key

KEY = "s3cret-key-for-tests"
OPEN = {"/health", "/ready"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("auth"), api_key=KEY) as s:
        yield s


def _routes(srv) -> list[tuple[str, str]]:
    """Every (method, path) of the API, from its own OpenAPI document, plus the rest."""
    spec = srv.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    out = []
    for path, methods in spec["paths"].items():
        concrete = path.replace("{worker_id}", "0").replace("{name}", "x")
        out += [(method.upper(), concrete) for method in methods]
    extra = ["/metrics", "/docs", "/redoc", "/openapi.json", "/ui/stream/not-a-token.wav"]
    return out + [("GET", p) for p in extra]


def test_every_api_route_but_health_and_ready_needs_the_key(srv):
    routes = _routes(srv)
    paths = {p for _, p in routes}
    assert {"/v1/synthesize", "/v1/audio/speech", "/v1/voices", "/v1/pool"} <= paths
    for i, (method, path) in enumerate(routes):
        # a wrong Bearer key is a guess: seven of them stay under the per-address
        # throttle (eight lock this address for 5 minutes; test_tenants.py)
        wrong = ({"Authorization": "Bearer wrong"},) if i < 7 else ()
        for headers in ({}, *wrong, {"Authorization": KEY}):
            r = httpx.request(method, srv.url + path, headers=headers, timeout=10)
            if path in OPEN:
                assert r.status_code == 200, (method, path)
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            if method == "HEAD":
                continue
            assert r.json()["error"]["code"] == "unauthorized"
            said = r.json()["error"]["message"]
            assert "Authorization: Bearer" in said
            if headers.get("Authorization", "").startswith("Bearer "):  # a wrong key, not none
                assert "not one of this server's keys" in said, said


def test_the_key_opens_the_api(srv):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert srv.get("/v1/pool", headers=auth).status_code == 200
    r = srv.post("/v1/synthesize", json={"script": "Speaker 1: hi"}, headers=auth)
    assert r.status_code == 200 and r.content.startswith(b"RIFF")
    assert srv.get("/metrics", headers=auth).text.startswith("# HELP")


def test_the_page_asks_for_a_login_and_the_key_is_the_password(srv):
    page = srv.get("/")
    assert page.status_code == 200 and '"auth_required":true' in page.text  # the login form
    assert srv.get("/config").status_code == 401  # nothing of the page before the login
    assert srv.get("/gradio_api/info").status_code == 401
    assert srv.post("/gradio_api/queue/join", json={}).status_code == 401
    with httpx.Client(base_url=srv.url, timeout=10) as browser:
        wrong = browser.post("/login", data={"username": "me", "password": "nope"})
        assert wrong.status_code >= 400
        ok = browser.post("/login", data={"username": "me", "password": KEY})
        assert ok.status_code == 200
        config = browser.get("/config").json()
        assert not config.get("auth_required")
        assert any(c.get("props", {}).get("elem_id") == "vv-panel" for c in config["components"])
        assert browser.get("/gradio_api/info").status_code == 200


def test_the_key_comes_from_the_flag_or_else_the_environment():
    assert resolve_api_key("flag", {API_KEY_ENV: "env"}) == "flag"
    assert resolve_api_key("", {API_KEY_ENV: " env "}) == "env"
    assert resolve_api_key("", {}) == ""


def test_the_terminal_commands_take_the_key_from_the_environment(
    srv, monkeypatch, capsys, tmp_path
):
    """`vibevoice-pool status` (synth, jobs, scale) against a keyed server: the 401 said
    to send an Authorization header, and $VIBEVOICE_POOL_API_KEY, which it names and
    the container sets, was not read. It is the default of --api-key now, and a 401
    says how to give the key."""
    from vibevoice_pool.cli import main

    monkeypatch.setenv("VIBEVOICE_POOL_OWNER_FILE", str(tmp_path / "owner-token"))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert main(["status", "--url", srv.url]) == 1
    assert "--api-key KEY" in capsys.readouterr().err
    assert main(["jobs", "--url", srv.url]) == 1
    assert "--api-key KEY" in capsys.readouterr().err
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert main(["status", "--url", srv.url, "--json"]) == 0
    assert '"workers"' in capsys.readouterr().out
    assert main(["jobs", "--url", srv.url]) == 0
    assert main(["status", "--url", srv.url, "--api-key", "a-flag-wins-over-it"]) == 1


def test_a_logged_in_client_generates_and_its_live_stream_needs_no_bearer(srv, tmp_path):
    import re

    from gradio_client import Client

    client = Client(
        srv.url,
        auth=("me", KEY),
        download_files=str(tmp_path),
        verbose=False,
        analytics_enabled=False,
    )
    try:
        job = client.submit(
            "Speaker 1: hello", 1, None, None, None, None, 1.3, 5, 1, api_name="/generate"
        )
        _, progress, audio_path = job.result(timeout=120)
    finally:
        client.close()
    assert 'data-state="done"' in progress and audio_path
    url = re.search(r'src="(ui/stream/[^"]+)"', job.outputs()[0][0]).group(1)
    stream = httpx.get(f"{srv.url}/{url}", timeout=30)  # the token is the capability
    assert stream.status_code == 200 and stream.content.startswith(b"RIFF")


# ---- named keys (--api-keys FILE) and the login throttle ------------------------


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    with named_keys_server(tmp_path_factory.mktemp("named")) as s:
        yield s


def test_each_named_key_owns_its_jobs(named):
    alice = {"Authorization": f"Bearer {ALICE}"}
    bob = {"Authorization": f"Bearer {BOB}"}
    assert named.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = named.post("/v1/jobs", json={"script": "Speaker 1: alice's"}, headers=alice)
    assert r.status_code == 202 and "x-owner-token" not in r.headers  # the key is the owner
    job_id = r.json()["id"]
    assert [j["id"] for j in named.get("/v1/jobs", headers=alice).json()["data"]] == [job_id]
    assert named.get("/v1/jobs", headers=bob).json()["data"] == []
    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/audio"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("DELETE", f"/v1/jobs/{job_id}"),
    ):
        r = httpx.request(method, named.url + path, headers=bob, timeout=10)
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["code"] == "not_found"
    assert named.get(f"/v1/jobs/{job_id}", headers=alice).json()["id"] == job_id


def test_every_named_key_logs_in_to_the_page(named):
    with httpx.Client(base_url=named.url, timeout=10) as browser:
        assert browser.post("/login", data={"username": "x", "password": BOB}).status_code == 200
        assert browser.get("/gradio_api/info").status_code == 200


def test_a_keys_name_as_the_user_name_takes_that_key_only():
    from vibevoice_pool.api.auth import Caller, KeyRing, page_login
    from vibevoice_pool.ui.jobs import page_owner

    ring = KeyRing(
        (
            ("k-alice", Caller("alice", "key:alice", "user")),
            ("k-bob", Caller("bob", "key:bob", "user")),
        ),
        named=True,
    )
    check = page_login(ring)
    assert check("alice", "k-alice") and check("someone", "k-bob")
    assert not check("alice", "k-bob")  # bob may not act as alice on the page
    assert not check("alice", "wrong")
    assert page_owner(ring, "alice", "b1") == "key:alice"
    assert page_owner(ring, "someone", "b1") == "browser:b1"
    assert page_owner(KeyRing(), None, "b1") == "browser:b1"


def test_failed_logins_slow_down_then_get_429(tmp_path):
    """On a server of its own: the lock it ends with holds every loopback address for
    300 s, so on the module's shared server any login after it got 429."""
    import time

    took, statuses = [], []
    with named_keys_server(tmp_path) as named:
        with httpx.Client(base_url=named.url, timeout=30) as browser:
            for i in range(8):
                t0 = time.monotonic()
                r = browser.post("/login", data={"username": "x", "password": f"guess-{i}"})
                took.append(time.monotonic() - t0)
                statuses.append(r.status_code)
            assert statuses == [400] * 8
            # From the fourth failure on, each answer waits 0.25 s, doubling up to 2 s.
            # Only lower bounds here: a busy machine may slow any answer, never speed one
            # up (that the first three wait nothing is test_guards' check, on an injected
            # sleep).
            assert min(took[3:]) >= 0.25 and sum(took[3:]) >= 0.25 + 0.5 + 1 + 2 + 2
            locked = browser.post("/login", data={"username": "x", "password": ALICE})
            assert locked.status_code == 429  # the right key too, until the window passes
            assert 250 <= int(locked.headers["retry-after"]) <= 300
            assert "failed logins" in locked.json()["error"]["message"]
        # the API's Bearer keys are not the page login: they still work
        alice = {"Authorization": f"Bearer {ALICE}"}
        assert named.get("/v1/pool", headers=alice).status_code == 200


def test_a_bad_keys_file_stops_the_launch_before_any_worker(tmp_path):
    from conftest import Server

    keys = tmp_path / "keys"
    keys.write_text("alice: short\n")
    s = Server(["--engine", "sim", "--gpus", "cpu:1", "--api-keys", str(keys)], tmp_path)
    try:
        assert s.proc.wait(60) == 2
        assert "shorter than 16" in s.log() and "Initialising" not in s.log()
    finally:
        s.stop()
