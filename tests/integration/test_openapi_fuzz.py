"""Schemathesis drives every operation of the app's own ``/openapi.json`` with requests
built from its schemas (valid ones and near misses): never a 5xx, and no replica is taken
for dead or replaced by anything it sent.

``AIRI_FUZZ_EXAMPLES`` sets the examples per operation: 25 in ``make test``, 100 in
``make test-fuzz``.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import KEY

EXAMPLES = int(os.environ.get("AIRI_FUZZ_EXAMPLES", "25"))
MAX_TOKENS = 8  # a generated call that reaches the engine stays short
GENERATES = ("/v1/chat/completions", "/v1/completions")


def _replicas(client: Any) -> list[str]:
    return sorted(r["replica_id"] for r in client.status()["replicas"] if r["state"] == "ready")


def _check(case: Any) -> None:
    if case.path in GENERATES and isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                case.body[field] = MAX_TOKENS
        case.body.setdefault("max_tokens", MAX_TOKENS)
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} answered {response.status_code}: "
        f"{response.text[:500]}; body {str(case.body)[:500]}"
    )
    if response.status_code >= 400 and case.path.startswith("/v1/"):
        error = response.json()["error"]  # OpenAI's error shape, with a message
        assert error["message"] and error["type"]


def test_no_request_the_schema_allows_gets_a_5xx_or_harms_a_replica(airi_app, client) -> None:
    # Hypothesis is driven from inside one test (rather than schemathesis' pytest plugin,
    # whose lazy fixture loader breaks on this pytest): one run per operation.
    before = _replicas(client)
    schema = schemathesis.openapi.from_url(f"{airi_app.base_url}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same requests every run: a failure is reproducible
            database=None,
        )
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            _check(case)

        try:
            run()
        except AssertionError as e:
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n".join(failures)
    assert _replicas(client) == before
