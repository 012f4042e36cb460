"""The server's state on disk across versions and damage: a job store written by an
older or a newer version, a migration killed half-way, damaged files at launch."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import Server

from vibevoice_pool.jobs.schema import SCHEMA_VERSION
from vibevoice_pool.jobs.store import JobError, JobErrorKind, JobStore

T0 = 1_000_000.0


def add_job(store: JobStore, job_id: str) -> None:
    store.create(
        job_id,
        owner="me",
        body={"script": "Speaker 1: hi"},
        fmt="wav",
        seed=1,
        est_audio_s=1.0,
        est_bytes=10,
        at=T0,
    )


def from_a_newer_version(data) -> None:
    """The store in `data` as a newer version could leave it: a higher user_version
    and a column this version does not know."""
    store = JobStore.open(data)
    add_job(store, "kept")
    store.close()
    conn = sqlite3.connect(data / "jobs.db")
    conn.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()


def test_a_store_from_a_newer_version_is_refused_and_left_as_it_is(tmp_path):
    data = tmp_path / "data"
    from_a_newer_version(data)
    before = (data / "jobs.db").read_bytes()
    with pytest.raises(JobError) as e:
        JobStore.open(data)
    assert e.value.kind is JobErrorKind.DATA_DIR
    assert f"version {SCHEMA_VERSION + 1}" in e.value.message
    assert f"up to {SCHEMA_VERSION}" in e.value.message and "newer" in e.value.message
    assert (data / "jobs.db").read_bytes() == before  # not written: the newer one reads it
    conn = sqlite3.connect(data / "jobs.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")  # as the operator's newer one...
    conn.commit()
    conn.close()
    store = JobStore.open(data)  # ...the folder's lock was let go with the refusal
    assert store.get("kept") is not None
    store.close()


def test_a_launch_on_a_newer_store_stops_with_one_line_before_any_worker(tmp_path):
    from_a_newer_version(tmp_path / "cache" / "data")  # the default --data-dir
    s = Server(["--engine", "sim", "--gpus", "cpu:1"], tmp_path)
    try:
        assert s.proc.wait(60) == 2
        log = s.log()
        assert "Traceback" not in log and "Initialising" not in log
        lines = [line for line in log.splitlines() if "newer vibevoice-pool" in line]
        assert len(lines) == 1 and f"version {SCHEMA_VERSION + 1}" in lines[0]
    finally:
        s.stop()
