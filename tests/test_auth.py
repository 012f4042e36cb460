"""With an API key, every route but /health and /ready answers 401 without it,
and the page asks for a login (Gradio's own login, the key as the password)."""

from __future__ import annotations

import httpx
import pytest
from serving import running_server

from vibevoice_pool.auth import API_KEY_ENV, resolve_api_key

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
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, srv.url + path, headers=headers, timeout=10)
            if path in OPEN:
                assert r.status_code == 200, (method, path)
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            if method == "HEAD":
                continue
            assert r.json()["error"]["code"] == "unauthorized"
            assert "Authorization: Bearer" in r.json()["error"]["message"]


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
