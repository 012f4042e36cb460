"""Every error in one shape, one table: framework errors (bodies FastAPI cannot
parse, multipart limits, unknown routes and methods, Range errors) answer
OpenAI's {"error": {"message", "type", "code"}} with the right status, the
500s the red team found are 400s, and /openapi.json declares what the routes
answer. Afterwards the server is ready and no worker restarted."""

from __future__ import annotations

import re

import httpx
import pytest
from conftest import ROOT, wait_until
from serving import shared_server, wav_bytes

OK = "Speaker 1: Hello there."
JSON = {"content-type": "application/json"}
DEEP = "[" * 200_000 + "]" * 200_000
BIG_SEED = '{"script": "Speaker 1: hi", "seed": ' + "9" * 5000 + "}"
JOB_RANGE = "JOB"  # the path of a finished job's audio (filled in by the fixture)

# (what, method, path, request kwargs, status, code, words the message must hold)
CASES = [
    # The three 500s of the red-team pass
    ("an offset too large for SQLite", "GET", "/v1/jobs?offset=54933090839859298304", {}, 400,
     "bad_input", "offset: Input should be less than or equal to 9223372036854775807"),
    ("JSON nested 200,000 deep on /v1/voices", "POST", "/v1/voices",
     {"content": DEEP, "headers": JSON}, 400, "bad_input", "nested too deeply"),
    ("JSON nested 200,000 deep on /v1/synthesize", "POST", "/v1/synthesize",
     {"content": DEEP, "headers": JSON}, 400, "bad_input", "nested too deeply"),
    # Bodies FastAPI cannot parse (they were {"detail": ...})
    ("invalid UTF-8", "POST", "/v1/synthesize",
     {"content": b'{"script": "Speaker 1: \xff\xfe"}', "headers": JSON}, 400, "bad_input",
     "not valid UTF-8"),
    ("invalid UTF-8 on /v1/voices", "POST", "/v1/voices",
     {"content": b'{"name": "\xff"}', "headers": JSON}, 400, "bad_input", "not valid UTF-8"),
    ("a 5,000-digit seed", "POST", "/v1/synthesize", {"content": BIG_SEED, "headers": JSON},
     400, "bad_input", "more than 4300 digits"),
    ("a 5,000-digit seed on the jobs route", "POST", "/v1/jobs",
     {"content": BIG_SEED, "headers": JSON}, 400, "bad_input", "more than 4300 digits"),
    ("empty base64 audio", "POST", "/v1/synthesize",
     {"json": {"script": OK, "speakers": [{"audio": ""}]}}, 400, "bad_input",
     "speakers[0].audio is empty"),
    ("empty base64 audio in a job", "POST", "/v1/jobs",
     {"json": {"script": OK, "speakers": [{"audio": ""}]}}, 400, "bad_input",
     "speakers[0].audio is empty"),
    # Multipart limits (they were {"detail": ...})
    ("two files in one voice upload", "POST", "/v1/voices",
     {"files": [("file", ("a.wav", wav_bytes(0.2))), ("file", ("b.wav", wav_bytes(0.2)))],
      "data": {"name": "two"}}, 400, "bad_input", "Maximum number of files is 1"),
    ("too many form fields", "POST", "/v1/voices",
     {"files": {"file": ("a.wav", wav_bytes(0.2))}, "data": {f"f{i}": "x" for i in range(20)}},
     400, "bad_input", "Maximum number of fields is 8"),
    # Unknown routes and methods (they were 404s typed server_error, or the page's 404)
    ("an unknown route", "GET", "/v1/nothing-here", {}, 404, "not_found", "no route"),
    ("an unknown route under a known one", "POST", "/v1/synthesize/more", {"json": {}}, 404,
     "not_found", "no route"),
    ("GET on a POST route", "GET", "/v1/synthesize", {}, 405, "method_not_allowed", "use POST"),
    ("PUT on /v1/voices", "PUT", "/v1/voices", {}, 405, "method_not_allowed", "use GET, POST"),
    ("POST on /health", "POST", "/health", {}, 405, "method_not_allowed", "use GET"),
    ("DELETE on /v1/models", "DELETE", "/v1/models", {}, 405, "method_not_allowed", "use GET"),
    ("an unknown job", "GET", "/v1/jobs/" + "0" * 32, {}, 404, "not_found", "job"),
    ("an unknown model", "GET", "/v1/models/no-such-model", {}, 404, "not_found", "no model"),
    ("draining an unknown worker", "DELETE", "/v1/pool/workers/99", {"headers": JSON}, 404,
     "not_found", "no worker 99"),
    # Range errors on a job's audio (they were plain text)
    ("a Range past the end", "GET", JOB_RANGE, {"headers": {"Range": "bytes=99999999-"}}, 416,
     "range_not_satisfiable", "past the end; the file has"),
    ("a Range that is no range", "GET", JOB_RANGE, {"headers": {"Range": "bytes=abc"}}, 400,
     "bad_input", "the Range header is malformed"),
]  # fmt: skip


@pytest.fixture(scope="module")
def srv(request, tmp_path_factory):
    s = shared_server(request, tmp_path_factory)
    wait_until(lambda: s.get("/ready").json()["ready_workers"] == 2, 60, 0.2, "both workers")
    s.before = s.get("/v1/pool").json()["workers"]
    s.http = httpx.Client(base_url=s.url, timeout=60)  # keeps the jobs' owner cookie
    job = s.http.post("/v1/jobs", json={"script": OK, "format": "wav"}).json()
    wait_until(
        lambda: s.http.get(f"/v1/jobs/{job['id']}").json()["state"] == "done", 60, 0.1, "the job"
    )
    s.job_audio = f"/v1/jobs/{job['id']}/audio"
    yield s
    s.http.close()


@pytest.mark.parametrize(
    "what,method,path,kwargs,status,code,words", CASES, ids=[c[0] for c in CASES]
)
def test_every_error_is_in_openai_shape_with_the_right_status(
    srv, what, method, path, kwargs, status, code, words
):
    path = srv.job_audio if path == JOB_RANGE else path
    r = srv.http.request(method, path, **kwargs)
    assert r.status_code == status, f"{what}: {r.status_code} {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), what
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["code"] == code, what
    assert err["type"] == "invalid_request_error", what
    assert words in err["message"], f"{what}: {err['message']!r}"
    if status == 405:
        assert words.removeprefix("use ") == r.headers["allow"]
    if status == 416:
        assert r.headers["content-range"].startswith("bytes */")


def test_a_valid_range_still_answers_206(srv):
    r = srv.http.get(srv.job_audio, headers={"Range": "bytes=0-3"})
    assert r.status_code == 206 and r.content == b"RIFF"


def test_the_page_still_answers_its_own_paths(srv):
    assert srv.http.get("/").status_code == 200  # the page at / is not an unknown route
    assert srv.http.get("/config").status_code == 200  # nor are Gradio's own routes


def test_openapi_declares_the_real_statuses_and_media_types(srv):
    spec = srv.http.get("/openapi.json").json()
    ops = {(p, m): op for p, item in spec["paths"].items() for m, op in item.items()}
    assert not [k for k, op in ops.items() if "422" in op["responses"]]  # never answered
    synth = ops[("/v1/synthesize", "post")]["responses"]
    assert {"200", "400", "401", "413", "429", "503", "504"} <= set(synth)
    assert {"audio/wav", "audio/mpeg", "audio/ogg", "audio/aac", "audio/flac"} <= set(
        synth["200"]["content"]
    )
    speech = ops[("/v1/audio/speech", "post")]["responses"]
    assert "text/event-stream" in speech["200"]["content"]
    audio = ops[("/v1/jobs/{job_id}/audio", "get")]["responses"]
    assert {"200", "206", "404", "409", "416"} <= set(audio)
    assert "503" in ops[("/ready", "get")]["responses"]
    assert "401" not in ops[("/health", "get")]["responses"]
    error = spec["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["message", "type", "code"]
    assert "multipart/form-data" in ops[("/v1/voices", "post")]["requestBody"]["content"]
    for (path, method), op in ops.items():
        assert "400" in op["responses"], (path, method)


def test_every_operation_of_the_openapi_document_has_its_own_id(srv):
    """OpenAPI: an operationId is unique in the document (client generators name their
    methods by it). GET and HEAD of a job's audio shared one, and FastAPI warned in the
    server's log each time the document was made."""
    spec = srv.http.get("/openapi.json").json()
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    audio = spec["paths"]["/v1/jobs/{job_id}/audio"]
    assert {"get", "head"} <= set(audio)


def codes_of(response: dict) -> set[str]:
    examples = response["content"]["application/json"].get("examples", {})
    return {e["value"]["error"]["code"] for e in examples.values()}


def test_openapi_declares_what_the_guards_answer(srv):
    spec = srv.http.get("/openapi.json").json()
    ops = {(p, m): op["responses"] for p, item in spec["paths"].items() for m, op in item.items()}
    for (path, method), responses in ops.items():
        assert "bad_host" in codes_of(responses["400"]), (path, method)
        assert codes_of(responses["408"]) == {"timeout"}, (path, method)
        assert "too_many_streams" in codes_of(responses["429"]), (path, method)
        assert codes_of(responses["431"]) == {"headers_too_large"}, (path, method)
        if method in ("post", "put", "patch", "delete"):
            assert "cross_site" in codes_of(responses["403"]), (path, method)
        elif path == "/metrics":
            assert codes_of(responses["403"]) == {"admin_only"}  # a user key
        else:
            assert "403" not in responses, (path, method)
        if path not in ("/health", "/ready"):
            assert "key_throttled" in codes_of(responses["429"]), (path, method)
    admin = [k for k in ops if k[0].startswith("/v1/pool/workers")]
    assert admin  # the worker routes are in the schema
    for key in admin:
        want = {"cross_site", "admin_needs_json", "admin_only"}
        assert codes_of(ops[key]["403"]) == want, key
    assert "forbidden" in codes_of(ops[("/v1/voices", "post")]["403"])
    assert {"owner_limit", "key_throttled"} <= codes_of(ops[("/v1/jobs", "post")]["429"])
    for key in [("/v1/synthesize", "post"), ("/v1/audio/speech", "post")]:  # a key's share
        assert {"overloaded", "owner_queue_full"} <= codes_of(ops[key]["429"]), key
    assert codes_of(ops[("/v1/jobs", "post")]["507"]) == {"disk_limit", "disk_full"}
    assert "admin_needs_json" not in codes_of(ops[("/v1/jobs", "post")]["403"])
    for key in [k for k in ops if k[0] in ("/login", "/login/") and k[1] == "post"]:
        assert codes_of(ops[key]["429"]) == {"login_throttled", "too_many_streams"}, key
    headers = ops[("/v1/jobs", "post")]["202"]["headers"]
    assert {"X-Owner-Token", "Location"} <= set(headers)
    # a voice a body names that does not exist, a sample that is no sound file
    for key in [("/v1/synthesize", "post"), ("/v1/jobs", "post"), ("/v1/audio/speech", "post")]:
        assert codes_of(ops[key]["404"]) == {"voice_not_found"}, key
    for key in [("/v1/synthesize", "post"), ("/v1/jobs", "post"), ("/v1/voices", "post")]:
        assert codes_of(ops[key]["415"]) == {"unsupported_audio"}, key

    # what the guards answer is what the schema says: a foreign Host, a cross-site write
    r = srv.http.get("/v1/pool", headers={"Host": "attacker.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_host"
    r = srv.http.post(
        "/v1/pool/workers/0/restart", json={}, headers={"Origin": "http://attacker.example"}
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site"
    r = srv.http.post(
        "/v1/pool/workers/0/restart", content=b"x", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_needs_json"
    r = httpx.post(srv.url + "/v1/jobs", json={"script": OK}, timeout=60)  # no owner cookie
    assert r.status_code == 202 and len(r.headers["x-owner-token"]) >= 22


def test_afterwards_the_server_is_ready_and_no_worker_restarted(srv):
    assert srv.get("/ready").status_code == 200
    after = srv.get("/v1/pool").json()["workers"]
    assert [(w["pid"], w["restarts"]) for w in after] == [
        (w["pid"], w["restarts"]) for w in srv.before
    ]
    good = srv.post("/v1/synthesize", json={"script": OK})
    assert good.status_code == 200 and good.content.startswith(b"RIFF")


def test_an_unforeseen_failure_is_a_500_in_the_same_shape(tmp_path):
    from fastapi.testclient import TestClient

    from vibevoice_pool.api.app import create_app
    from vibevoice_pool.api.metrics import Activity
    from vibevoice_pool.api.speech import Front
    from vibevoice_pool.config import build
    from vibevoice_pool.voices.library import VoiceLibrary

    class NoPool:
        def status(self) -> dict:
            return {"queue": {"length": 0, "max": 1}, "workers": []}

    voices = VoiceLibrary(tmp_path, max_bytes=1 << 20, max_seconds=60)
    app = create_app(Front(NoPool(), voices, build({"engine": "sim"}), activity=Activity()))

    @app.get("/v1/broken")
    async def broken():
        return {}["missing"]  # a bug: KeyError

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/broken")
        assert r.status_code == 500
        assert r.json() == {
            "error": {
                "message": "the server failed on this request (KeyError)",
                "type": "server_error",
                "param": None,
                "code": "internal_error",
            }
        }
        assert client.get("/v1/voices").status_code == 200  # and it goes on serving


def test_a_file_answers_ranges_as_rfc_9110_says(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vibevoice_pool.api.errors import FileAnswer

    data = bytes(range(100))
    (tmp_path / "a.wav").write_bytes(data)
    app = FastAPI()
    app.get("/a.wav")(lambda: FileAnswer(tmp_path / "a.wav", media_type="audio/wav"))
    c = TestClient(app)

    # 14.2: an origin server MUST ignore a Range in a unit it does not know (it was 400)
    r = c.get("/a.wav", headers={"Range": "items=0-9"})
    assert r.status_code == 200 and r.content == data and "content-range" not in r.headers
    # 14.1.1: a Range is satisfiable when one of its ranges is: 206 with those (it was 416)
    r = c.get("/a.wav", headers={"Range": "bytes=0-9,200-300"})
    assert r.status_code == 206 and r.content == data[:10]
    assert r.headers["content-range"] == "bytes 0-9/100"
    r = c.get("/a.wav", headers={"Range": "bytes=500-,0-9,20-29"})
    assert r.status_code == 206 and r.headers["content-type"].startswith("multipart/byteranges")
    assert b"bytes 0-9/100" in r.content and b"bytes 20-29/100" in r.content
    assert b"/100\r\n\r\n" + data[20:30] in r.content
    # none in the file: 416, and a malformed one is still 400
    r = c.get("/a.wav", headers={"Range": "bytes=100-,200-300"})
    assert r.status_code == 416 and r.headers["content-range"] == "bytes */100"
    assert c.get("/a.wav", headers={"Range": "bytes=0-9,30-20"}).status_code == 400
    r = c.get("/a.wav", headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == data[-10:]


def test_a_file_evaluates_preconditions_before_its_range(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vibevoice_pool.api.errors import FileAnswer

    data = bytes(range(100))
    (tmp_path / "a.wav").write_bytes(data)
    app = FastAPI()
    app.get("/a.wav")(lambda: FileAnswer(tmp_path / "a.wav", media_type="audio/wav"))
    app.head("/a.wav")(lambda: FileAnswer(tmp_path / "a.wav", media_type="audio/wav"))
    c = TestClient(app)
    first = c.get("/a.wav")
    etag, modified = first.headers["etag"], first.headers["last-modified"]

    # RFC 9110 13.1.2: a cached copy whose ETag matches is 304, with no body (it was 200)
    for method in ("GET", "HEAD"):
        r = c.request(method, "/a.wav", headers={"If-None-Match": f'"x", W/{etag}'})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    r = c.get("/a.wav", headers={"If-None-Match": etag, "Range": "bytes=0-9"})
    assert r.status_code == 304  # before the Range (13.2.2)
    assert c.get("/a.wav", headers={"If-Modified-Since": modified}).status_code == 304
    assert c.get("/a.wav", headers={"If-None-Match": '"x"'}).content == data
    # 13.1.1: If-Match with no ETag of this file is 412 (it was 200)
    r = c.get("/a.wav", headers={"If-Match": '"x"'})
    assert r.status_code == 412 and r.json()["error"]["code"] == "precondition_failed"
    assert c.get("/a.wav", headers={"If-Match": f"W/{etag}"}).status_code == 412  # strong only
    r = c.get("/a.wav", headers={"If-Match": etag, "Range": "bytes=0-9"})
    assert r.status_code == 206 and r.content == data[:10]
    old = "Mon, 01 Jan 2001 00:00:00 GMT"
    assert c.get("/a.wav", headers={"If-Unmodified-Since": old}).status_code == 412
    # 13.1.4: 412 only when the file is newer than the date; its own date passes
    assert c.get("/a.wav", headers={"If-Unmodified-Since": modified}).content == data
    assert c.get("/a.wav", headers={"If-Modified-Since": old}).content == data
    assert c.get("/a.wav", headers={"If-Modified-Since": "not a date"}).content == data


def test_the_readmes_error_list_names_every_status_the_api_declares():
    """README's **Errors** paragraph is where an operator looks a status up: each one
    /openapi.json can declare has its words there (502, 431 and 500 had none)."""
    from vibevoice_pool.api.openapi_doc import WHY

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    errors = readme[readme.index("**Errors**") : readme.index("**Long scripts")]
    assert sorted(set(WHY) - set(re.findall(r"\b[1-5]\d\d\b", errors))) == []
