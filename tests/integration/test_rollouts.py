"""Model versions on a real cluster: a canary under steady load promotes while the
controller is killed in the middle of it (serving goes on, no state is lost); a version
whose engine refuses the traffic rolls back by itself; both with zero failed requests for
clients; a rollout that breaks a `requires` constraint is refused.

One extra model, `tiny-roll`, with three versions of the tiny generator: v2 is v1 under a
new label, v3 has a 64-token context (every request of the load below is longer, so the
engine refuses it), v4 requires an embedder version nobody serves. Each version start is
an engine start (half a minute here), so the tests run in order on one module deployment.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from airi_ray.core.errors import Conflict, InvalidRequest, NotFound
from airi_ray.runtime import actors
from tests.conftest import wait_for

MODEL = "tiny-roll"
# Longer than v3's 64-token context: v3's engine refuses every request of the load.
PROMPT = "Tell me about the rollout of model versions. " * 12
DEPLOYED: dict[str, Any] = {}  # the module's app spec


def _model(status: dict[str, Any], name: str = MODEL) -> dict[str, Any]:
    return next(m for m in status["models"] if m["name"] == name)


def _versions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["version"]: v for v in _model(status)["versions"]}


class Load:
    """Steady traffic on ``MODEL`` (about 15 requests a second, light enough that a new
    version's engine still starts quickly on two cores); every failure is kept."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.client.chat(MODEL, PROMPT, max_tokens=2, temperature=0.0)
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
            "versions": {
                "v2": {},
                "v3": {"engine": {**tiny["engine"], "max_model_len": 64}},
                "v4": {"requires": {"minilm": ">=3"}},
            },
            "rollout": {
                "strategy": "canary",
                "steps": [50, 100],
                "min_requests_per_step": 6,
                "step_hold_s": 1,
                "max_error_rate_delta": 0.05,
                "max_ttft_p99_ratio": 20,
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
    controller = actors.get_actor(actors.CONTROLLER_NAME)
    before = _versions(client.status())
    assert before["v1"]["state"] == "ready" and before["v1"]["traffic"] == 1.0
    with Load(client) as load:
        wait_for(lambda: load.ok >= 4, 60, "load on v1")
        status = client.rollout(MODEL, "v2")  # canary, the spec's steps: 50, 100
        assert _model(status)["rollout"]["candidate"] == "v2"
        with pytest.raises(Conflict, match="is rolling out from v1 to v2"):
            client.rollout(MODEL, "v3")
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
    # v1 drains, retires, its replica stops; then status no longer lists it.
    wait_for(lambda: "v1" not in _versions(client.status()), 60, "v1 drained and retired")
    assert not [r for r in client.status()["replicas"] if r["model"] == f"{MODEL}@v1"]


def test_a_failing_version_rolls_back_by_itself(rolling) -> None:
    client = rolling
    with Load(client) as load:
        client.rollout(MODEL, "v3")
        wait_for(
            lambda: _model(client.status())["rollout"].get("outcome") == "rolled_back",
            240,
            "the rollback of v3",
        )
    assert load.failures == [], load.failures[:3]
    m = _model(client.status())
    assert m["version"] == "v2"
    assert "error rate" in m["rollout"]["reason"], m["rollout"]
    assert _versions(client.status())["v2"]["traffic"] == 1.0


def test_incompatible_and_unknown_rollouts_are_refused(rolling) -> None:
    client = rolling
    with pytest.raises(Conflict, match="tiny-roll v4 requires minilm >=3"):
        client.rollout(MODEL, "v4")
    with pytest.raises(NotFound, match="no version 'v9'; known versions: v1, v2, v3, v4"):
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
