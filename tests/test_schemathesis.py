"""Schemathesis against /openapi.json of a real sim server: for every operation
a bounded number of generated requests (valid and invalid ones), none may get
a 5xx, every answer must be one the schema declares (status, content type,
headers, body), a request the schema allows must not be refused and one it
refuses must not be accepted. The statuses that count as "not refused" are the
project's schemathesis.toml (the one relaxation there, 415 for a voice sample
of random bytes, is explained in it), which a run by hand reads as well.

Derandomized (the same cases every run) and bounded (EXAMPLES per operation)
so that it stays well under a minute on two cores. Not fuzzed: the worker
management routes (adding, draining and restarting workers; test_api.py and
the scaling tests drive them), which would spend the run spawning processes.
The server is this module's own: the fuzzer may add and delete voice presets.
"""

from __future__ import annotations

import os
import re

import pytest
import schemathesis
from conftest import ROOT
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serving import running_server

# per operation and mode (valid, invalid); FUZZ_EXAMPLES=500 for a longer run by hand
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,  # a valid request: not refused (see schemathesis.toml)
    negative_data_rejection,  # an invalid one: not accepted
]
NOT_FUZZED = r"^/v1/pool/workers"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    args = ("--sim-rtf", "0.002", "--max-text-chars", "300")
    with running_server(tmp_path_factory.mktemp("fuzz"), *args) as s:
        yield s


def _fuzz(operation, url: str, mode: GenerationMode) -> None:
    """EXAMPLES generated cases of one operation, each checked by CHECKS."""

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the case as found
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        case.call_and_validate(base_url=url, checks=CHECKS, timeout=30)

    run()


def test_no_server_error_and_every_answer_as_declared(api):
    config = SchemathesisConfig.from_path(ROOT / "schemathesis.toml")
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json", config=config)
    operations = [r.ok() for r in schema.get_all_operations()]
    fuzzed = [op for op in operations if not re.match(NOT_FUZZED, op.path)]
    assert len(fuzzed) >= 15  # every route but the worker management ones
    failures = []
    for operation in fuzzed:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, api.url, mode)
            except Unsatisfiable:  # nothing to make invalid (no body, no query): no such cases
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, FailureGroup) as e:  # a failed check: collect, then report
                failures.append(f"{operation.label} ({mode.value}): {e}")
    assert not failures, "\n\n".join(failures)


def test_the_server_is_still_ready_afterwards(api):
    assert api.get("/ready").status_code == 200
    assert "Traceback" not in api.log()
