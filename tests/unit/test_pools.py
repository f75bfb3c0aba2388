"""Pools read from Ray's node resources, and the bundles leases become."""

from __future__ import annotations

from airi_ray.core.placement import Lease
from airi_ray.runtime.pools import bundle_for, pool_nodes

NODES = [
    {  # a CPU machine with fake accelerators (as the tests declare them)
        "NodeID": "n1",
        "Alive": True,
        "NodeManagerAddress": "10.0.0.1",
        "Resources": {"CPU": 4.0, "accelerator_type:H100": 2.0, "accelerator_type:L4": 4.0},
    },
    {  # a real GPU node: Ray marks the type with 1 and counts the devices as GPU
        "NodeID": "n2",
        "Alive": True,
        "NodeManagerAddress": "10.0.0.2",
        "Resources": {"CPU": 96.0, "GPU": 8.0, "accelerator_type:H100": 1.0},
    },
    {"NodeID": "n3", "Alive": False, "Resources": {"CPU": 8.0}},
]


def test_pools_come_from_node_resources() -> None:
    got = {(n.node_id, n.accelerator_type, n.devices) for n in pool_nodes(NODES)}
    assert got == {
        ("n1/H100", "H100", 2),
        ("n1/L4", "L4", 4),
        ("n1/CPU", "CPU", 4),
        ("n2/H100", "H100", 8),
        ("n2/CPU", "CPU", 96),
    }
    assert next(n for n in pool_nodes(NODES) if n.node_id == "n1/L4").memory_gib_per_device == 24


def test_bundles_pin_the_node_and_take_the_leased_share() -> None:
    fake = Lease("r1", "m", "n1/L4", "L4", (0,), share=0.5)
    assert bundle_for(fake, NODES, num_cpus=0.5) == {
        "node:10.0.0.1": 0.001,
        "accelerator_type:L4": 0.5,
        "CPU": 0.5,
    }
    real = Lease("r2", "m", "n2/H100", "H100", (0, 1))
    assert bundle_for(real, NODES, num_cpus=0) == {
        "node:10.0.0.2": 0.001,
        "GPU": 2.0,
        "accelerator_type:H100": 0.001,
    }
    cpu = Lease("r3", "m", "n1/CPU", "CPU", (0,), share=1.0)
    assert bundle_for(cpu, NODES, num_cpus=2) == {"node:10.0.0.1": 0.001, "CPU": 2}
