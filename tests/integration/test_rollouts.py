"""Model versions on a real cluster: a canary under steady load promotes while the
controller is killed in the middle of it (serving goes on, no state is lost); rolling back
to the old version, still warm, is instant, and since that version's engine refuses the
new load's requests, the rollback's canary rolls back by itself; both with zero failed
requests for clients; a rollout that breaks a `requires` constraint is refused.

One extra model, `tiny-roll`: v1 has a 64-token context, v2 a 1024-token one, v4 requires
an embedder version nobody serves. Each version start is an engine start (half a minute
here), so the tests run in order on one module deployment and reuse v1's warm replica.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from airi_ray.core.errors import Conflict, InvalidRequest, NotFound
from airi_ray.runtime import names
from tests.conftest import wait_for

pytestmark = pytest.mark.rollout  # `make test-rollouts`

MODEL = "tiny-roll"
SHORT = "Tell me about the rollout."
# Longer than v1's 64-token context: v1's engine refuses every request of such a load.
LONG = "Tell me about the rollout of model versions. " * 12
DEPLOYED: dict[str, Any] = {}  # the module's app spec


def _model(status: dict[str, Any], name: str = MODEL) -> dict[str, Any]:
    return next(m for m in status["models"] if m["name"] == name)


def _versions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["version"]: v for v in _model(status)["versions"]}


class Load:
    """Steady traffic on ``MODEL`` (about 15 requests a second, light enough that a new
    version's engine still starts quickly on two cores); every failure is kept."""

    def __init__(self, client: Any, prompt: str) -> None:
        self.client = client
        self.prompt = prompt
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.client.chat(MODEL, self.prompt, max_tokens=2, temperature=0.0)
                self.ok += 1
            except Exception as e:  # counted: the test asserts there are none
                self.failures.append(f"{type(e).__name__}: {e}")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.fixture(scope="module")
def rolling(airi_app, client) -> Iterator[Any]:
    spec = copy.deepcopy(airi_app.spec)
    tiny = spec["models"][0]
    spec["models"].append(
        {
            **tiny,
            "name": MODEL,
            "version": "v1",
            "replicas": 1,
            "max_concurrency": 8,
            "placement": {"accelerator_types": ["L4"]},
            "engine": {**tiny["engine"], "max_model_len": 64},
            "versions": {"v2": {"engine": tiny["engine"]}, "v4": {"requires": {"minilm": ">=3"}}},
            "rollout": {
                "strategy": "canary",
                "steps": [50, 100],
                "min_requests_per_step": 6,
                "step_hold_s": 1,
                "max_error_rate_delta": 0.05,
                "max_ttft_p99_ratio": 20,
                "keep_warm_s": 300,
            },
        }
    )
    # Grouped: a deploy that moves tiny-roll is planned as a switch of the group.
    spec["groups"] = [{"name": "pair", "models": [MODEL, "minilm"]}]
    client.deploy(spec)
    DEPLOYED.update(spec)
    try:
        yield client
    finally:
        client.deploy(airi_app.spec)


def test_canary_promotes_under_load_through_a_controller_restart(rolling) -> None:
    client = rolling
    controller = names.get_actor(names.CONTROLLER_NAME)
    before = _versions(client.status())
    assert before["v1"]["state"] == "ready" and before["v1"]["traffic"] == 1.0
    # callers learn each version's weights (a version on others is tokenized with its own)
    assert {v["source"] for v in before.values()} == {DEPLOYED["models"][-1]["model"]}
    with Load(client, SHORT) as load:
        wait_for(lambda: load.ok >= 4, 60, "load on v1")
        status = client.rollout(MODEL, "v2")  # canary, the spec's steps: 50, 100
        assert _model(status)["rollout"]["candidate"] == "v2"
        with pytest.raises(Conflict, match="is rolling out from v1 to v2"):
            client.rollout(MODEL, "v4")
        # The candidate loads, passes its probe, then takes half the traffic.
        wait_for(lambda: _versions(client.status())["v2"]["traffic"] == 0.5, 180, "the 50% step")
        replicas = {r["replica_id"] for r in client.status()["replicas"]}
        ray.kill(controller, no_restart=False)  # it restarts from its saved state
        wait_for(
            lambda: _model(client.status())["rollout"].get("outcome") == "promoted",
            120,
            "promotion after the restart",
        )
        after = client.status()
        assert any("restarted" in e for e in after["events"]), after["events"]
        served_before = load.ok
        wait_for(lambda: load.ok >= served_before + 4, 60, "load on v2")
    assert load.failures == [], load.failures[:3]
    m = _model(after)
    assert m["version"] == "v2"
    # The replicas of before the restart were adopted, not replaced.
    v2_ids = {r["replica_id"] for r in after["replicas"] if r["model"] == f"{MODEL}@v2"}
    assert v2_ids and v2_ids <= replicas
    # v1 takes no traffic; drained, it keeps its replica warm (keep_warm_s).
    v1 = _versions(client.status())["v1"]
    assert (v1["state"], v1["traffic"], v1["ready_replicas"]) == ("draining", 0.0, 1)


def test_a_failing_version_rolls_back_by_itself(rolling) -> None:
    """Back to v1 as a canary under a load of long prompts: v1 is warm, so it takes traffic
    at once (no engine start), and its engine refuses every such request: the canary's
    error rate rolls it back, and clients never see an error."""
    client = rolling
    warm = {r["replica_id"] for r in client.status()["replicas"] if r["model"] == f"{MODEL}@v1"}
    with Load(client, LONG) as load:
        wait_for(lambda: load.ok >= 4, 60, "load on v2")
        client.rollout(MODEL, "v1")
        wait_for(
            lambda: _model(client.status())["rollout"].get("outcome") == "rolled_back",
            240,
            "the rollback of v1",
        )
    assert load.failures == [], load.failures[:3]
    m = _model(client.status())
    assert m["version"] == "v2"
    assert "error rate" in m["rollout"]["reason"], m["rollout"]
    assert _versions(client.status())["v2"]["traffic"] == 1.0
    started = {r["replica_id"] for r in client.status()["replicas"] if r["model"] == f"{MODEL}@v1"}
    assert started == warm  # the warm replica served the canary: no engine start


def test_incompatible_and_unknown_rollouts_are_refused(rolling) -> None:
    client = rolling
    with pytest.raises(Conflict, match="tiny-roll v4 requires minilm >=3"):
        client.rollout(MODEL, "v4")
    with pytest.raises(NotFound, match="no version 'v9'; known versions: v1, v2, v4"):
        client.rollout(MODEL, "v9")
    with pytest.raises(InvalidRequest, match="already serves version 'v2'"):
        client.rollout(MODEL, "v2")
    with pytest.raises(NotFound, match="model 'nope' is not deployed"):
        client.rollout("nope", "v2")
    moved = copy.deepcopy(DEPLOYED)
    entry = next(m for m in moved["models"] if m["name"] == MODEL)
    entry |= {"version": "v4", "requires": {"minilm": ">=3"}, "versions": {"v2": {}}}
    with pytest.raises(Conflict, match="deploy refused: group switch pair refused: .*v4 requires"):
        client.deploy(moved)
    assert _model(client.status())["version"] == "v2"  # nothing moved
