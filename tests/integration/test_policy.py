"""Tenant policy on the scheduler path: ACLs, rate limits and budgets for every surface."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray

from airi_ray.config import parse_spec
from airi_ray.runtime import actors
from tests.conftest import OTHER_KEY

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def limit_tenant_b(airi_app) -> Iterator[Any]:
    """Apply extra policy fields to tenant-b for one test, then restore the spec."""
    scheduler = actors.get_actor(actors.SCHEDULER_NAME)

    def apply(**fields: Any) -> None:
        spec = copy.deepcopy(airi_app.spec)
        spec["tenants"][1].update(fields)
        ray.get(scheduler.configure.remote(parse_spec(spec).model_dump()))

    yield apply
    ray.get(scheduler.configure.remote(parse_spec(airi_app.spec).model_dump()))


def post(app, path: str, body: dict[str, Any], key: str = OTHER_KEY) -> httpx.Response:
    return httpx.post(
        f"{app.base_url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def test_a_model_outside_the_tenants_acl_is_refused_on_every_surface(
    airi_app, limit_tenant_b
) -> None:
    import airi_ray as airi
    from airi_ray.core.policy import PermissionDenied

    limit_tenant_b(models=["mini*"])
    r = post(airi_app, "/v1/chat/completions", CHAT)
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["type"] == "permission_error"
    assert "may not use model 'tiny-chat'" in error["message"] and "mini*" in error["message"]
    ok = post(airi_app, "/v1/embeddings", {"model": "minilm", "input": "tents"})
    assert ok.status_code == 200
    client = airi.connect("auto", api_key=OTHER_KEY)
    try:
        with pytest.raises(PermissionDenied, match="may not use model 'tiny-chat'"):
            client.chat("tiny-chat", "hi", max_tokens=2)
    finally:
        client.close()


def test_over_the_request_rate_answers_429_and_other_tenants_are_unaffected(
    airi_app, limit_tenant_b, client
) -> None:
    limit_tenant_b(rpm=2)
    assert [post(airi_app, "/v1/chat/completions", CHAT).status_code for _ in range(2)] == [
        200,
        200,
    ]
    refused = post(airi_app, "/v1/chat/completions", CHAT)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert "over its 2 requests/minute limit" in refused.json()["error"]["message"]
    # Tenant a has no limit and is served meanwhile.
    assert client.chat("tiny-chat", "hi", max_tokens=2).usage.completion_tokens > 0
    metrics = httpx.get(f"{airi_app.base_url}/metrics").text
    assert 'airi_policy_refusals_total{model="tiny-chat",rule="rpm",tenant="tenant-b"}' in metrics


def test_a_spent_budget_answers_429_naming_the_budget(airi_app, limit_tenant_b) -> None:
    limit_tenant_b(budget_tokens=5, budget_period_s=3600)
    first = post(airi_app, "/v1/chat/completions", CHAT)  # charged with its real tokens
    assert first.status_code == 200
    refused = post(airi_app, "/v1/chat/completions", CHAT)
    assert refused.status_code == 429, refused.text
    message = refused.json()["error"]["message"]
    assert "budget of 5 tokens per hour" in message, message
    assert refused.json()["error"]["code"] == "budget_exceeded"
