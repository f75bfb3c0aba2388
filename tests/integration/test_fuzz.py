"""Fuzzed request bodies and headers: never a 5xx, and the runtime answers afterwards."""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import KEY

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = {
    "model": st.sampled_from(["tiny-chat", "minilm", "nope", ""]) | JSON,
    # Small or absurd budgets: a fuzzed call that does reach the engine stays short.
    "max_tokens": st.integers(-5, 8) | st.integers(10**6, 10**12) | JSON,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "robot"]) | JSON, "content": JSON}
        ),
        max_size=3,
    )
    | JSON,
    "prompt": st.text(max_size=60) | JSON,
    "input": st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=3) | JSON,
    "temperature": st.floats(-3, 3, allow_nan=False) | JSON,
    "stream": st.booleans() | JSON,
    "stop": st.lists(st.text(max_size=5), max_size=6) | JSON,
    "n": st.integers(-1, 3) | JSON,
    "priority": st.sampled_from(["interactive", "batch", "vip"]) | JSON,
    "session_id": st.text(max_size=300) | JSON,
}
BODIES = (
    st.fixed_dictionaries({}, optional=FIELDS).map(lambda d: {"max_tokens": 4, **d}) | JSON
).map(lambda b: json.dumps(b).encode()) | st.binary(max_size=200)
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "Authorization": st.sampled_from([f"Bearer {KEY}", "Bearer x", "Basic abc", ""])
        # Printable ASCII without outer spaces: what an HTTP client can send at all.
        | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300).map(
            str.strip
        ),
        "Content-Type": st.sampled_from(["application/json", "text/plain", "x/y"]),
    },
)
PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=PATHS, body=BODIES, headers=HEADERS)
def test_fuzzed_requests_never_get_a_5xx(airi_app, path: str, body: bytes, headers: Any) -> None:
    r = httpx.post(f"{airi_app.base_url}{path}", content=body, headers=headers, timeout=120)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "error" in r.json() and "message" in r.json()["error"]


def test_the_engine_answers_after_the_fuzzing(oai) -> None:
    r = oai.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert r.choices[0].message.content is not None
