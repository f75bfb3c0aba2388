"""Accelerator pools: the cluster's devices per accelerator type, leased to replicas as
placement-group bundles.

The controller decides where a replica goes with the pure ``Packer`` over every pool (so a
replica can fall back from H100 to L4); the chosen type's ``AcceleratorPool`` actor then
reserves that place as a one-bundle ``STRICT_PACK`` placement group pinned to the node, and
the replica actor is scheduled into the bundle. Releasing the lease removes the group.

Pools are read from Ray's node resources: ``accelerator_type:<T>`` marks a node's devices
(their count is the node's ``GPU`` resource, or, on CPU machines that declare fake
accelerators for tests, the resource's own amount), and every node's CPUs form the ``CPU``
pool.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.util.placement_group import placement_group, remove_placement_group

from airi_ray.core.errors import ReplicaUnavailable
from airi_ray.core.placement import Lease, NodeCapacity

logger = logging.getLogger(__name__)

# Device memory of common accelerators (GiB). Memory needs are checked only on these.
KNOWN_MEMORY_GIB = {
    "H200": 141.0,
    "H100": 80.0,
    "A100": 80.0,
    "L40S": 48.0,
    "A10G": 24.0,
    "L4": 24.0,
    "T4": 16.0,
    "V100": 16.0,
}
UNKNOWN_MEMORY_GIB = 1e6
RESERVE_TIMEOUT_S = 60.0
_ACCEL = "accelerator_type:"


def pool_nodes(nodes: list[dict[str, Any]]) -> list[NodeCapacity]:
    """The pools' nodes from ``ray.nodes()``: one entry per (node, accelerator type) and
    one per node for its CPUs. Node ids are ``<ray node id>/<type>``."""
    out = []
    for n in nodes:
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        gpus = int(res.get("GPU", 0))
        for key, amount in sorted(res.items()):
            if key.startswith(_ACCEL):
                kind = key[len(_ACCEL) :]
                devices = gpus or int(amount)
                if devices > 0:
                    memory = KNOWN_MEMORY_GIB.get(kind, UNKNOWN_MEMORY_GIB)
                    out.append(NodeCapacity(f"{n['NodeID']}/{kind}", kind, devices, memory))
        if int(res.get("CPU", 0)) > 0:
            cpus = int(res["CPU"])
            out.append(NodeCapacity(f"{n['NodeID']}/CPU", "CPU", cpus, UNKNOWN_MEMORY_GIB))
    return out


def bundle_for(lease: Lease, nodes: list[dict[str, Any]], num_cpus: float) -> dict[str, float]:
    """The placement-group bundle of a lease: its share of the devices, the replica's CPUs,
    and a sliver of the node's own resource, which pins the bundle to that node."""
    ray_id = lease.node_id.rsplit("/", 1)[0]
    node = next(n for n in nodes if n["NodeID"] == ray_id)
    amount = len(lease.devices) * lease.share
    bundle: dict[str, float] = {f"node:{node['NodeManagerAddress']}": 0.001}
    if lease.accelerator_type == "CPU":
        bundle["CPU"] = max(amount, num_cpus)
        return bundle
    if node["Resources"].get("GPU", 0) > 0:
        bundle["GPU"] = amount
        bundle[_ACCEL + lease.accelerator_type] = 0.001
    else:
        bundle[_ACCEL + lease.accelerator_type] = amount
    if num_cpus > 0:
        bundle["CPU"] = num_cpus
    return bundle


class AcceleratorPool:
    """One accelerator type's leases: a placement group per leased replica."""

    def __init__(self, accelerator_type: str) -> None:
        self.accelerator_type = accelerator_type
        self._groups: dict[str, tuple[Any, dict[str, Any], dict[str, float]]] = {}

    async def reserve(self, lease: dict[str, Any], bundle: dict[str, float]) -> Any:
        """Reserve ``bundle`` for the lease's replica; returns its placement group.

        Raises:
            ReplicaUnavailable: the bundle did not become ready in time (the resources the
                packer saw as free are taken by something else).
        """
        rid = lease["replica_id"]
        self.release(rid)
        pg = placement_group([bundle], strategy="STRICT_PACK", name=f"airi-{rid}")
        try:
            await asyncio.wait_for(pg.ready(), RESERVE_TIMEOUT_S)
        except TimeoutError:
            remove_placement_group(pg)
            raise ReplicaUnavailable(
                f"no room for {bundle} on {self.accelerator_type} within {RESERVE_TIMEOUT_S:.0f} s"
            ) from None
        self._groups[rid] = (pg, lease, bundle)
        return pg

    def release(self, replica_id: str) -> bool:
        """Free a replica's bundle (its actor, if still there, goes with it)."""
        held = self._groups.pop(replica_id, None)
        if held is None:
            return False
        remove_placement_group(held[0])
        return True

    def leases(self) -> list[dict[str, Any]]:
        return [lease | {"bundle": bundle} for _, lease, bundle in self._groups.values()]

    def ping(self) -> bool:
        return True
