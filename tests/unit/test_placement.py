"""The replica packer: type fallback, STRICT_PACK, spread, fractional shares, reports."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airi_ray.core.placement import (
    Lease,
    NodeCapacity,
    Packer,
    Pending,
    PlacementError,
    ReplicaNeeds,
    ReplicaRequest,
    pack,
)


def h100(i: int, devices: int = 8) -> NodeCapacity:
    return NodeCapacity(f"h{i}", "H100", devices, 80.0)


def l4(i: int, devices: int = 4) -> NodeCapacity:
    return NodeCapacity(f"l{i}", "L4", devices, 24.0)


def reqs(model: str, n: int, start: int = 0, **needs: object) -> list[ReplicaRequest]:
    kw: dict[str, object] = {"accelerator_types": ("H100", "L4"), **needs}
    return [
        ReplicaRequest(f"{model}-{start + i}", ReplicaNeeds(model, **kw))  # type: ignore[arg-type]
        for i in range(n)
    ]


def test_prefers_first_type_and_overflows_down_the_list() -> None:
    p = Packer([h100(0, devices=2), l4(0, devices=2)])
    out = p.place(reqs("llm", 3))
    assert [x.accelerator_type for x in out.leases] == ["H100", "H100", "L4"]
    assert out.pending == ()
    # H100 frees up: the next replica goes back to the preferred type.
    p.release(out.leases[0])
    [lease] = p.place(reqs("llm", 1, start=3)).leases
    assert lease.accelerator_type == "H100" and lease.devices == (0,)


def test_pending_with_a_reason_instead_of_hanging() -> None:
    p = Packer([h100(0, devices=1), l4(0, devices=1)])
    p.place(reqs("a", 1, accelerator_types=("H100",)))
    out = p.place(reqs("tp", 1, devices=2))
    assert out.leases == ()
    [pending] = out.pending
    assert pending == Pending("tp-0", "tp", "no capacity: needs 2 x H100 or L4, free: H100 0, L4 1")


def test_pending_reason_names_memory_and_missing_types() -> None:
    p = Packer([l4(0)])
    [pending] = p.place(reqs("big", 1, memory_gib=40.0)).pending
    assert pending.reason == (
        "no capacity: needs 1 x H100 or L4 with 40 GiB each, "
        "free: H100 none in the cluster, L4 4 (24 GiB per device, too small)"
    )


def test_tensor_parallel_replica_is_on_one_node_or_pending() -> None:
    # 2 + 2 devices free in total, but never 4 on one node: STRICT_PACK refuses to split.
    p = Packer([h100(0, devices=4), h100(1, devices=4)])
    p.place(reqs("x", 2, start=0, accelerator_types=("H100",), devices=2))
    report = p.report("H100")
    assert report.free_whole_devices == 4 and report.largest_free_block == 2
    [pending] = p.place(reqs("tp", 1, devices=4, accelerator_types=("H100",))).pending
    assert pending.reason == ("no capacity: needs 4 x H100, free: H100 4 (at most 2 on one node)")
    # On an empty node the same replica lands whole, its devices all on that node.
    q = Packer([h100(0, devices=4), h100(1, devices=8)])
    [lease] = q.place(reqs("tp", 1, devices=4, accelerator_types=("H100",))).leases
    assert lease.node_id == "h0" and lease.devices == (0, 1, 2, 3)
    assert lease.memory_gib_per_device == 0.0


def test_tensor_parallel_splits_memory_over_its_devices() -> None:
    p = Packer([l4(0)])
    [lease] = p.place(reqs("m", 1, devices=4, memory_gib=80.0)).leases
    assert lease.memory_gib_per_device == 20.0 and lease.devices == (0, 1, 2, 3)


def test_replicas_of_one_model_spread_across_nodes() -> None:
    p = Packer([h100(i) for i in range(3)])
    out = p.place(reqs("llm", 3, accelerator_types=("H100",)))
    assert sorted(x.node_id for x in out.leases) == ["h0", "h1", "h2"]
    # A fourth goes where there is one, not three.
    [fourth] = p.place(reqs("llm", 1, start=3, accelerator_types=("H100",))).leases
    assert Counter(x.node_id for x in p.leases()).most_common(1)[0][1] == 2
    assert fourth.node_id == "h0"


def test_whole_device_replicas_bin_pack_onto_partly_used_nodes() -> None:
    p = Packer([h100(0), h100(1), h100(2)])
    out = p.place([*reqs("a", 1), *reqs("b", 1), *reqs("c", 1)])
    # Different models: all three fill the same node, leaving two nodes empty.
    assert {x.node_id for x in out.leases} == {"h0"}
    assert p.report("H100").fragmentation == pytest.approx(5 / 21)


def test_two_small_models_share_one_device_by_fraction() -> None:
    p = Packer([l4(0, devices=2)])
    out = p.place(
        [
            *reqs("embed", 1, fraction=0.5, memory_gib=8.0, accelerator_types=("L4",)),
            *reqs("rerank", 1, fraction=0.25, memory_gib=6.0, accelerator_types=("L4",)),
        ]
    )
    a, b = out.leases
    assert (a.node_id, a.devices, a.share) == ("l0", (0,), 0.5)
    assert (b.node_id, b.devices, b.share) == ("l0", (0,), 0.25)
    r = p.report("L4")
    assert r.used_devices == 0.75 and r.free_whole_devices == 1 and r.used_memory_gib == 14.0
    # Stranded: 0.25 of device 0 plus device 1 on the partly used node, of 1.25 free.
    assert r.fragmentation == 1.0


def test_fractions_never_exceed_a_device_or_its_memory() -> None:
    p = Packer([l4(0, devices=2)])
    out = p.place(
        [
            *reqs("a", 1, fraction=0.6, accelerator_types=("L4",)),
            *reqs("b", 1, fraction=0.5, accelerator_types=("L4",)),  # 1.1 > 1: next device
            *reqs("c", 1, fraction=0.3, memory_gib=20.0, accelerator_types=("L4",)),
            *reqs("d", 1, fraction=0.1, memory_gib=20.0, accelerator_types=("L4",)),
        ]
    )
    by = {x.model: x.devices for x in out.leases}
    assert by["a"] != by["b"]
    # c and d fit by share on device 0 (0.6 + 0.3 + 0.1) but not by memory (40 > 24 GiB).
    assert by["c"] != by["d"]
    for d in (0, 1):
        on = [x for x in out.leases if x.devices == (d,)]
        assert sum(x.share for x in on) <= 1.0 + 1e-9
        assert sum(x.memory_gib_per_device for x in on) <= 24.0


def test_fraction_best_fit_picks_the_tightest_device() -> None:
    p = Packer([l4(0, devices=3)])
    p.place(
        [
            *reqs("x", 1, fraction=0.5, accelerator_types=("L4",)),
            *reqs("y", 1, fraction=0.75, accelerator_types=("L4",)),
        ]
    )
    # 0.25 fits both half-used devices; it fills the 0.75 one exactly.
    [lease] = p.place(reqs("z", 1, fraction=0.25, accelerator_types=("L4",))).leases
    y = next(x for x in p.leases() if x.model == "y")
    assert lease.devices == y.devices


def test_release_frees_capacity_and_refuses_unknown_leases() -> None:
    p = Packer([l4(0, devices=1)])
    [a] = p.place(reqs("a", 1, fraction=0.3, accelerator_types=("L4",))).leases
    [b] = p.place(reqs("b", 1, fraction=0.7, accelerator_types=("L4",))).leases
    assert p.report("L4").free_devices == 0.0
    p.release(a)
    p.release(b)
    r = p.report("L4")
    assert (r.used_devices, r.free_whole_devices, r.leases, r.fragmentation) == (0, 1, 0, 0)
    with pytest.raises(PlacementError, match="holds no such lease"):
        p.release(a)
    # Float residue (0.3 + 0.7 - 0.3 - 0.7) left the device whole again.
    [whole] = p.place(reqs("w", 1, accelerator_types=("L4",))).leases
    assert whole.share == 1.0


def test_pack_with_existing_leases_and_report_counts() -> None:
    nodes = [h100(0, devices=2), l4(0, devices=2)]
    held = [Lease("old", "m", "h0", "H100", (0,), 1.0, 40.0)]
    out = pack(nodes, held, reqs("m", 2))
    assert [x.accelerator_type for x in out.leases] == ["H100", "L4"]
    p = Packer(nodes, [*held, *out.leases])
    h, g = p.report("H100"), p.report("L4")
    assert (h.capacity_devices, h.used_devices, h.free_devices, h.leases) == (2, 2.0, 0.0, 2)
    assert h.capacity_memory_gib == 160.0 and h.fragmentation == 0.0
    assert (g.used_devices, g.free_whole_devices, g.fragmentation) == (1.0, 1, 1.0)
    assert list(p.reports()) == ["H100", "L4"]


def test_cpu_is_a_pool_too() -> None:
    p = Packer([NodeCapacity("c0", "CPU", 16, 4.0)])
    out = p.place(reqs("guard", 3, accelerator_types=("CPU",), memory_gib=2.0))
    assert len(out.leases) == 3 and p.report("CPU").used_devices == 3.0


def test_results_come_back_in_request_order_even_if_placed_largest_first() -> None:
    p = Packer([h100(0, devices=4)])
    out = p.place(
        [
            *reqs("small", 1, fraction=0.5, accelerator_types=("H100",)),
            *reqs("tp", 1, devices=4, accelerator_types=("H100",)),
        ]
    )
    # Largest first: the 4-device replica got the node; the small one had no room left.
    assert [x.replica_id for x in out.leases] == ["tp-0"]
    assert [x.replica_id for x in out.pending] == ["small-0"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accelerator_types": ()}, "at least one type"),
        ({"accelerator_types": ("L4", "L4")}, "must not repeat"),
        ({"devices": 0}, "devices must be at least 1"),
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"fraction": 0.5, "devices": 2}, "only with devices=1"),
        ({"memory_gib": -1.0}, "must not be negative"),
    ],
)
def test_bad_needs_are_refused_with_what_is_allowed(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"accelerator_types": ("L4",)}
    with pytest.raises(PlacementError, match=match):
        ReplicaNeeds("m", **{**base, **kwargs})  # type: ignore[arg-type]


def test_bad_nodes_and_leases_are_refused() -> None:
    with pytest.raises(PlacementError, match="devices must be at least 1"):
        NodeCapacity("n", "L4", 0, 24.0)
    with pytest.raises(PlacementError, match="appears twice"):
        Packer([l4(0), l4(0)])
    with pytest.raises(PlacementError, match="not in the cluster"):
        Packer([l4(0)], [Lease("r", "m", "h9", "H100", (0,))])
    with pytest.raises(PlacementError, match="has devices 0..3"):
        Packer([l4(0)], [Lease("r", "m", "l0", "L4", (4,))])
    with pytest.raises(PlacementError, match="below 1 on one device"):
        Packer([l4(0)], [Lease("r", "m", "l0", "L4", (0, 1), 0.5)])
    with pytest.raises(PlacementError, match="does not fit"):
        Packer([l4(0)], [Lease("r", "m", "l0", "L4", (0,)), Lease("s", "m", "l0", "L4", (0,))])
    p = Packer([l4(0)])
    with pytest.raises(PlacementError, match="requested twice"):
        p.place([*reqs("m", 1), *reqs("m", 1)])
    with pytest.raises(PlacementError, match="no pool 'TPU'"):
        p.report("TPU")


def _cluster() -> list[NodeCapacity]:
    return [h100(i) for i in range(6)] + [l4(i) for i in range(6)]


def _mixed(seed: int, n: int) -> list[ReplicaRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choice(["tp", "whole", "frac"])
        model = f"m{rng.randrange(5)}"
        if kind == "tp":
            needs = ReplicaNeeds(model, ("H100", "L4"), devices=rng.choice([2, 4]))
        elif kind == "whole":
            needs = ReplicaNeeds(model, ("L4", "H100"), memory_gib=rng.choice([10.0, 30.0]))
        else:
            needs = ReplicaNeeds(
                model, ("L4",), fraction=rng.choice([0.25, 0.5]), memory_gib=rng.random() * 12
            )
        out.append(ReplicaRequest(f"r{i}", needs))
    return out


def test_deterministic_whatever_the_node_order() -> None:
    requests = _mixed(7, 120)
    nodes = _cluster()
    a = pack(nodes, [], requests)
    b = pack(list(reversed(nodes)), [], requests)
    assert a == b and a.leases and a.pending


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 150))
def test_never_overcommits_a_device(seed: int, n: int) -> None:
    nodes = {x.node_id: x for x in _cluster()}
    p = Packer(list(nodes.values()))
    out = p.place(_mixed(seed, n))
    assert len(out.leases) + len(out.pending) == n
    share: defaultdict[tuple[str, int], float] = defaultdict(float)
    memory: defaultdict[tuple[str, int], float] = defaultdict(float)
    for lease in out.leases:
        node = nodes[lease.node_id]
        assert lease.accelerator_type == node.accelerator_type
        assert len(set(lease.devices)) == len(lease.devices)
        for d in lease.devices:
            share[(lease.node_id, d)] += lease.share
            memory[(lease.node_id, d)] += lease.memory_gib_per_device
    for key, s in share.items():
        assert s <= 1.0 + 1e-9
        assert memory[key] <= nodes[key[0]].memory_gib_per_device + 1e-9
    # Releasing everything gives back an empty cluster.
    for lease in out.leases:
        p.release(lease)
    for r in p.reports().values():
        assert r.used_devices == 0 and r.leases == 0 and r.free_whole_devices == r.capacity_devices


def test_control_plane_modules_are_pure() -> None:
    code = (
        "import sys, airi_ray.core.placement, airi_ray.core.rollout, airi_ray.core.autoscale;"
        "bad = [m for m in ('ray', 'asyncio', 'socket', 'lancedb', 'pyarrow') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
