"""/metrics: parses with prometheus_client's own parser, holds per-worker series,
and counts what really happened (outcomes, refusals, latency, restarts)."""

from __future__ import annotations

import pytest
from conftest import wait_until
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from vibevoice_pool.api.app import create_app
from vibevoice_pool.api.speech import Front
from vibevoice_pool.voices.library import VoiceLibrary, ensure_demo_voices


def scrape(client) -> dict[str, list]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(samples, name: str, **labels) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert found, f"no sample {name} {labels}"
    return sum(found)


@pytest.fixture
def api(sim_pool, tmp_path):
    ensure_demo_voices(tmp_path / "voices")
    with sim_pool(gpus="cpu:2", sim_rtf=0.02) as pool:
        voices = VoiceLibrary(
            tmp_path / "voices", max_bytes=pool.cfg.max_upload_bytes, max_seconds=60
        )
        with TestClient(create_app(Front(pool, voices, pool.cfg))) as client:
            yield client


def test_metrics_parse_and_hold_per_worker_series(api):
    for text in ("Speaker 1: one two three", "Speaker 1: four five six seven"):
        assert api.post("/v1/synthesize", json={"script": text}).status_code == 200
    failed = api.post("/v1/synthesize", json={"script": "Speaker 1: [[error]] boom"})
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error"
    assert api.post("/v1/synthesize", json={"script": ""}).status_code == 400

    m = scrape(api)
    for family in (
        "vibevoice_pool_worker_up",
        "vibevoice_pool_worker_inflight",
        "vibevoice_pool_worker_queued_work_seconds",
        "vibevoice_pool_worker_restarts",
        "vibevoice_pool_worker_memory_used_bytes",
        "vibevoice_pool_worker_memory_total_bytes",
        "vibevoice_pool_worker_utilization_ratio",
        "vibevoice_pool_worker_heartbeat_age_seconds",
        "vibevoice_pool_worker_audio_seconds",
        "vibevoice_pool_worker_busy_seconds",
    ):
        workers = {s.labels["worker"] for s in m[family]}
        assert workers == {"0", "1"}, family
    assert value(m["vibevoice_pool_worker_up"], "vibevoice_pool_worker_up") == 2

    def memory_seen():  # the device monitor samples once a second
        name = "vibevoice_pool_worker_memory_total_bytes"
        return all(value(scrape(api)[name], name, worker=w) > 0 for w in ("0", "1"))

    wait_until(memory_seen, 15, 0.2, "the monitor's first memory sample")
    requests = m["vibevoice_pool_worker_requests"]
    assert value(requests, "vibevoice_pool_worker_requests_total", outcome="completed") == 2
    assert value(requests, "vibevoice_pool_worker_requests_total", outcome="engine_error") == 1
    assert value(m["vibevoice_pool_requests"], "vibevoice_pool_requests_total") == 3
    audio = value(
        m["vibevoice_pool_worker_audio_seconds"], "vibevoice_pool_worker_audio_seconds_total"
    )
    assert audio > 1.0
    assert (
        value(m["vibevoice_pool_worker_busy_seconds"], "vibevoice_pool_worker_busy_seconds_total")
        > 0
    )
    assert value(
        m["vibevoice_pool_audio_delivered_seconds"], "vibevoice_pool_audio_delivered_seconds_total"
    ) == pytest.approx(audio, abs=0.01)
    latency = m["vibevoice_pool_request_duration_seconds"]
    assert value(latency, "vibevoice_pool_request_duration_seconds_count") == 3
    assert value(latency, "vibevoice_pool_request_duration_seconds_bucket", le="+Inf") == 3
    assert (
        value(m["vibevoice_pool_refused"], "vibevoice_pool_refused_total", reason="bad_input") == 1
    )
    assert value(m["vibevoice_pool_queue_length"], "vibevoice_pool_queue_length") == 0
    assert value(m["vibevoice_pool_queue_max"], "vibevoice_pool_queue_max") == 50
    states = [s for s in m["vibevoice_pool_worker_state"] if s.value == 1]
    assert sorted((s.labels["worker"], s.labels["state"]) for s in states) == [
        ("0", "ready"),
        ("1", "ready"),
    ]


def test_a_crash_shows_as_a_requeue_a_lost_request_and_a_restart(api):
    r = api.post("/v1/synthesize", json={"script": "Speaker 1: [[crash]] down it goes"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "worker_lost"

    def restarted():
        m = scrape(api)
        total = value(m["vibevoice_pool_worker_restarts"], "vibevoice_pool_worker_restarts_total")
        return m if total >= 2 else None

    m = wait_until(restarted, 30, 0.3, "both crashed workers to be respawned")
    assert value(m["vibevoice_pool_requeued"], "vibevoice_pool_requeued_total") == 1
    assert (
        value(m["vibevoice_pool_requests"], "vibevoice_pool_requests_total", outcome="worker_lost")
        == 1
    )


def test_a_row_resumed_after_a_sigkill_is_counted_with_the_steps_it_kept(
    sim_pool, tmp_path, caplog
):
    """A streamed sim row whose worker is SIGKILLed mid-row resumes from its history
    on the other worker: its audio is whole, and /metrics counts the resume and the
    steps it did not run again; the log's resume line carries the request and the
    worker and device it resumed on (the JSON lines' fields)."""
    import os
    import signal

    import numpy as np

    from vibevoice_pool.script import parse_script
    from workers.engines.sim import tone
    from workers.wire.board import Col

    caplog.set_level("INFO", logger="vibevoice_pool")
    ensure_demo_voices(tmp_path / "voices")
    with sim_pool(gpus="cpu:2", sim_rtf=0.2) as pool:  # 0.1 s a step of 0.5 s
        voices = VoiceLibrary(tmp_path / "voices", max_bytes=1 << 20, max_seconds=60)
        with TestClient(create_app(Front(pool, voices, pool.cfg))) as client:
            text = "Speaker 1: " + "a line of words " * 12
            h = pool.submit(pool.make_request(parse_script(text), seed=5, stream=True))
            wait_until(lambda: h.samples >= 3 * 24_000, 30, 0.005, "3 s of audio")
            os.kill(int(pool.board.get(h.worker, Col.PID)), signal.SIGKILL)
            got = h.result(timeout=60)
            assert np.array_equal(got, tone(5, 0, len(got)))
            assert h.resumed == 1  # what the page shows
            said = [r for r in caplog.records if " resumed on worker " in r.getMessage()]
            assert len(said) == 1, said
            assert (said[0].request_id, said[0].worker) == (h.id, h.worker)
            assert said[0].device == f"cpu:{h.worker}"
            assert len(got) / 24_000 == pytest.approx(h.request.est_audio_s, abs=0.01)
            m = scrape(client)
            resumed = value(
                m["vibevoice_pool_resumes"], "vibevoice_pool_resumes_total", outcome="resumed"
            )
            assert resumed == 1
            kept = value(
                m["vibevoice_pool_resume_steps"], "vibevoice_pool_resume_steps_total", kind="kept"
            )
            assert kept >= 6  # 0.5 s a step, at least 3 s sent before the kill
            made = m["vibevoice_pool_worker_audio_seconds"]
            per_worker = [
                value(made, "vibevoice_pool_worker_audio_seconds_total", worker=str(w))
                for w in (0, 1)
            ]  # each worker its own share: the killed one made at least the first 3 s
            assert sum(per_worker) == pytest.approx(len(got) / 24_000, abs=1e-3)
            assert min(per_worker) >= 3.0


def test_a_row_preempted_on_one_worker_and_finished_on_another_leaves_the_first_idle(
    sim_pool, tmp_path
):
    """Every place held by job rows: an interactive request preempts one, which resumes
    on the other worker. The first worker's busy seconds stop once it is idle, and each
    worker is credited the audio it made (the preempting worker's row was never taken
    off it: its busy seconds grew for ever, and its audio went to the other worker)."""
    import time
    from dataclasses import replace

    from vibevoice_pool.pool import events as ev
    from vibevoice_pool.script import parse_script
    from workers.wire import messages as m

    ensure_demo_voices(tmp_path / "voices")
    with sim_pool(gpus="cpu:2", sim_rtf=0.1, max_batch_size=1) as pool:
        voices = VoiceLibrary(tmp_path / "voices", max_bytes=1 << 20, max_seconds=60)
        with TestClient(create_app(Front(pool, voices, pool.cfg))) as client:

            def job(seed):
                req = pool.make_request(parse_script("Speaker 1: " + "words " * 40), seed=seed)
                return pool.submit(replace(req, priority=m.Priority.BATCH.value))

            before_resume = {}  # request id -> samples it had when it began again elsewhere
            pool.subscribe(
                lambda e: (
                    isinstance(e, ev.Started)
                    and e.request.resume is not None
                    and before_resume.setdefault(e.request.id, e.handle.samples)
                )
            )
            jobs = [job(1), job(2)]
            wait_until(lambda: all(h.samples > 0 for h in jobs), 30, 0.02, "both jobs")
            first = [h.worker for h in jobs]
            long = pool.make_request(parse_script("Speaker 1: " + "words " * 150), seed=3)
            interactive = pool.submit(long)
            for h in [*jobs, interactive]:
                h.result(timeout=120)
            moved = [h for h, w in zip(jobs, first, strict=True) if h.worker != w]
            assert len(moved) == 1 and pool.dispatcher.counters["preempted"] == 1
            lost = first[jobs.index(moved[0])]  # the worker the job row was preempted on

            def busy():
                return value(
                    scrape(client)["vibevoice_pool_worker_busy_seconds"],
                    "vibevoice_pool_worker_busy_seconds_total",
                    worker=str(lost),
                )

            idle = busy()
            time.sleep(1.0)
            assert busy() == idle  # idle: it no longer counts busy time
            made = scrape(client)["vibevoice_pool_worker_audio_seconds"]
            audio = {
                w: value(made, "vibevoice_pool_worker_audio_seconds_total", worker=str(w))
                for w in (0, 1)
            }
            total = sum(len(h.audio()) for h in [*jobs, interactive]) / m.SAMPLE_RATE
            assert sum(audio.values()) == pytest.approx(total, abs=1e-3)
            # the worker that kept the interactive row made it and the preempted row's start
            expected = (len(interactive.audio()) + before_resume[moved[0].id]) / m.SAMPLE_RATE
            assert audio[lost] == pytest.approx(expected, abs=1e-3)


DOCS = ("README.md", "docs/OPERATIONS.md", "docs/DEPLOY.md", "docs/RAY.md", "docs/MODEL.md")


@pytest.fixture
def api_with_jobs(sim_pool, tmp_path):
    """The API of a server that runs jobs (its /metrics has the jobs' series too)."""
    from vibevoice_pool.jobs.launch import start_jobs
    from vibevoice_pool.jobs.store import JobStore

    ensure_demo_voices(tmp_path / "voices")
    with sim_pool(gpus="cpu:2", sim_rtf=0.02) as pool:
        voices = VoiceLibrary(tmp_path / "voices", max_bytes=1 << 20, max_seconds=60)
        front = Front(pool, voices, pool.cfg)
        front.jobs = start_jobs(pool.cfg, pool, front, JobStore.open(tmp_path / "data"))
        try:
            with TestClient(create_app(front)) as client:
                yield client
        finally:
            front.jobs.stop()


def test_every_metric_and_label_the_docs_name_is_exported(api_with_jobs):
    """What an operator alerts on is what the docs name: each series they write
    (`vibevoice_pool_resumes_total{outcome="resumed"|"replayed"}`) is in /metrics,
    each label value too, and `state="recovering"` of the worker state."""
    import re

    from conftest import ROOT

    api = api_with_jobs

    text = "\n".join((ROOT / d).read_text() for d in DOCS)
    name = r"(vibevoice_pool_[a-z_]*[a-z])(?![a-z_]*\*)"  # not a prefix: vibevoice_pool_worker_*
    named = re.findall(name + r'(?:\{(\w+)="([^}]*)"\})?', text)
    assert len({n for n, _, _ in named}) >= 6  # the docs do name them
    assert api.post("/v1/synthesize", json={"script": "Speaker 1: hello"}).status_code == 200
    assert api.post("/v1/synthesize", json={"script": ""}).status_code == 400  # a refusal
    key = {"Idempotency-Key": "docs-0123456789abcdef"}  # a key sent again with another body
    assert api.post("/v1/jobs", json={"script": "Speaker 1: a"}, headers=key).status_code == 202
    assert api.post("/v1/jobs", json={"script": "Speaker 1: b"}, headers=key).status_code == 409
    r = api.get("/metrics")
    series: dict[str, list[dict]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            series.setdefault(s.name, []).append(s.labels)
    for name, label, values in named:
        assert name in series, name
        for v in values.replace('"', "").split("|") if label else ():
            assert any(labels.get(label) == v for labels in series[name]), (name, label, v)
    states = {labels["state"] for labels in series["vibevoice_pool_worker_state"]}
    assert "recovering" in states and "backoff" not in states


@pytest.mark.slow
def test_jobs_made_replayed_refused_and_ended_are_counted(server, tmp_path):
    """On a real launch with jobs: an Idempotency-Key sent again is a replay, with
    another body a 409 counted among the refusals; a done, a failed and a cancelled
    job each count once in their state (a second cancel of the ended job is no end)."""
    import httpx

    s = server("--engine", "sim", "--gpus", "cpu:2", "--data-dir", str(tmp_path / "data"))

    def post(body: dict, key: str | None = None) -> httpx.Response:
        return s.post("/v1/jobs", json=body, headers={"Idempotency-Key": key} if key else {})

    def scraped() -> dict[str, list]:
        r = s.get("/metrics")
        assert r.status_code == 200
        return {f.name: f.samples for f in text_string_to_metric_families(r.text)}

    key = "retry-0123456789abcdef"
    first = post({"script": "Speaker 1: once only"}, key)
    assert first.status_code == 202, first.text
    again = post({"script": "Speaker 1: once only"}, key)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    other = post({"script": "Speaker 1: another body"}, key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    failing = post({"script": "Speaker 1: [[error]] boom"})
    long = post({"script": "Speaker 1: " + "a long story to tell. " * 200})
    assert failing.status_code == long.status_code == 202
    for _ in range(2):  # once cancelled, the second answers the ended job as it is
        r = s.post(f"/v1/jobs/{long.json()['id']}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    assert s.get("/v1/jobs/" + "0" * 32).status_code == 404

    def ended():
        m = scraped()
        done = value(
            m["vibevoice_pool_jobs_ended"], "vibevoice_pool_jobs_ended_total", state="done"
        )
        failed = value(
            m["vibevoice_pool_jobs_ended"], "vibevoice_pool_jobs_ended_total", state="failed"
        )
        return m if done == 1 and failed == 1 else None

    m = wait_until(ended, 60, 0.25, "the short job done and the failing one failed")
    assert value(m["vibevoice_pool_jobs_created"], "vibevoice_pool_jobs_created_total") == 3
    assert value(m["vibevoice_pool_jobs_replayed"], "vibevoice_pool_jobs_replayed_total") == 1
    ends = m["vibevoice_pool_jobs_ended"]
    assert value(ends, "vibevoice_pool_jobs_ended_total", state="cancelled") == 1
    refused = m["vibevoice_pool_refused"]
    name = "vibevoice_pool_refused_total"
    assert value(refused, name, reason="idempotency_key_reused") == 1
    assert value(refused, name, reason="not_found") == 1
