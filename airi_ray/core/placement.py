"""Where model replicas go: which node, which devices, what share of a device.

The cluster is a list of nodes, each with some devices of one accelerator type (``H100``,
``L4``, ... and ``CPU``, whose "devices" are the CPU slots a replica may take). All nodes
of one type form a pool. A replica states its needs (``ReplicaNeeds``): how many devices,
or what fraction of one, how much memory, and an ordered list of acceptable types. The
``Packer`` places replicas and hands out ``Lease`` values; what it cannot place it reports
as ``Pending`` with a reason naming what was needed and what is free, so a caller never
waits on capacity that does not exist.

Rules, in the order they decide:

1. Type order: a replica goes to the first type in its list with room, then falls back
   down the list.
2. STRICT_PACK: a replica spanning several devices (tensor parallelism) takes whole free
   devices on ONE node, or none at all.
3. Spread: among the nodes with room, fewer replicas of the same model on the node wins,
   so one node failing takes down as few replicas of a model as possible.
4. Best fit: a fractional replica joins the partly used device it fills most tightly
   (sum of shares <= 1 and the memory fits); a whole-device replica takes the node with the
   fewest free devices left that still fits, so partly used nodes fill up before empty
   ones are broken into. Ties go to the lowest node id, then the lowest device index.

A batch of requests is placed largest first (devices, then fraction, then memory), the
usual first-fit-decreasing order: small replicas filling gaps after the big ones are placed
strand less capacity than the other way round. Results come back in the request order.

Fragmentation (``PoolReport.fragmentation``) is the share of a pool's free capacity that is
stranded: the free share of partly used devices (only fractional replicas can use it) plus
the whole free devices on partly used nodes (a replica needing a whole node cannot use
them). 0 means every free unit is in an empty node; 1 means none is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Shares and GiB are floats; sums like 0.1 + 0.2 + 0.7 must still count as fitting in 1.
_EPS = 1e-9


class PlacementError(ValueError):
    """A node, a replica's needs or a lease is invalid, or a lease is not held."""


@dataclass(frozen=True)
class NodeCapacity:
    """One node of the cluster: its devices of one accelerator type.

    Attributes:
        node_id: unique in the cluster.
        accelerator_type: the pool the node belongs to (``H100``, ``L4``, ``CPU``...).
        devices: how many devices (CPU slots for ``CPU``).
        memory_gib_per_device: memory of each device (all devices of a node are alike).
    """

    node_id: str
    accelerator_type: str
    devices: int
    memory_gib_per_device: float

    def __post_init__(self) -> None:
        if not self.node_id or not self.accelerator_type:
            raise PlacementError(
                f"a node needs a non-empty node_id and accelerator_type, got "
                f"{self.node_id!r} and {self.accelerator_type!r}"
            )
        if self.devices < 1:
            raise PlacementError(
                f"node {self.node_id}: devices must be at least 1, got {self.devices}"
            )
        if self.memory_gib_per_device <= 0:
            raise PlacementError(
                f"node {self.node_id}: memory_gib_per_device must be positive, "
                f"got {self.memory_gib_per_device}"
            )


@dataclass(frozen=True)
class ReplicaNeeds:
    """What one replica of a model needs.

    Attributes:
        model: the model (replicas of one model are spread across nodes).
        accelerator_types: acceptable types, best first.
        devices: whole devices on one node (tensor parallelism when more than one).
        fraction: share of one device, 0 < fraction <= 1; below 1 only with one device.
        memory_gib: the replica's device memory; split evenly over its devices.
    """

    model: str
    accelerator_types: tuple[str, ...]
    devices: int = 1
    fraction: float = 1.0
    memory_gib: float = 0.0

    def __post_init__(self) -> None:
        where = f"model {self.model}"
        if not self.accelerator_types:
            raise PlacementError(f"{where}: accelerator_types must name at least one type")
        if len(set(self.accelerator_types)) != len(self.accelerator_types):
            raise PlacementError(
                f"{where}: accelerator_types must not repeat a type, got "
                f"{list(self.accelerator_types)}"
            )
        if self.devices < 1:
            raise PlacementError(f"{where}: devices must be at least 1, got {self.devices}")
        if not 0.0 < self.fraction <= 1.0:
            raise PlacementError(f"{where}: fraction must be in (0, 1], got {self.fraction}")
        if self.fraction < 1.0 and self.devices != 1:
            raise PlacementError(
                f"{where}: a fraction below 1 is allowed only with devices=1, got "
                f"fraction={self.fraction} with devices={self.devices}"
            )
        if self.memory_gib < 0:
            raise PlacementError(f"{where}: memory_gib must not be negative, got {self.memory_gib}")

    @property
    def memory_gib_per_device(self) -> float:
        return self.memory_gib / self.devices


@dataclass(frozen=True)
class ReplicaRequest:
    """A replica to place: its id (unique among requests and leases) and its needs."""

    replica_id: str
    needs: ReplicaNeeds


@dataclass(frozen=True)
class Lease:
    """A replica's place: node, device indexes, the share of each device and its memory.

    A whole-device replica has ``share`` 1.0; a fractional one has one device and its
    fraction. The runtime turns a lease into a placement-group bundle on ``node_id``.
    """

    replica_id: str
    model: str
    node_id: str
    accelerator_type: str
    devices: tuple[int, ...]
    share: float = 1.0
    memory_gib_per_device: float = 0.0


@dataclass(frozen=True)
class Pending:
    """A replica that could not be placed, and why (``no capacity: needs ..., free: ...``)."""

    replica_id: str
    model: str
    reason: str


@dataclass(frozen=True)
class PackResult:
    """What one ``place`` call decided: the new leases and the replicas left pending."""

    leases: tuple[Lease, ...] = ()
    pending: tuple[Pending, ...] = ()


@dataclass(frozen=True)
class PoolReport:
    """One pool's (accelerator type's) capacity, use and fragmentation, in devices.

    ``largest_free_block`` is the most whole free devices on one node: the largest
    tensor-parallel replica that fits now. See the module docstring for ``fragmentation``.
    """

    accelerator_type: str
    nodes: int
    capacity_devices: int
    used_devices: float
    free_devices: float
    free_whole_devices: int
    largest_free_block: int
    capacity_memory_gib: float
    used_memory_gib: float
    leases: int
    fragmentation: float


@dataclass(slots=True)
class _Node:
    cap: NodeCapacity
    share: list[float]  # leased share per device
    memory: list[float]  # leased GiB per device
    free: int  # devices with nothing leased
    models: dict[str, int] = field(default_factory=dict)  # replicas per model here

    @classmethod
    def of(cls, cap: NodeCapacity) -> _Node:
        return cls(cap, [0.0] * cap.devices, [0.0] * cap.devices, cap.devices)

    def take(self, lease: Lease) -> None:
        for d in lease.devices:
            if self.share[d] == 0.0:
                self.free -= 1
            self.share[d] += lease.share
            self.memory[d] += lease.memory_gib_per_device
        self.models[lease.model] = self.models.get(lease.model, 0) + 1

    def give_back(self, lease: Lease) -> None:
        for d in lease.devices:
            self.share[d] -= lease.share
            self.memory[d] -= lease.memory_gib_per_device
            if self.share[d] <= _EPS:
                # Float residue from fractions must not leave a device looking partly used.
                self.share[d] = 0.0
                self.memory[d] = 0.0
                self.free += 1
        left = self.models[lease.model] - 1
        if left:
            self.models[lease.model] = left
        else:
            del self.models[lease.model]

    def fits(self, lease: Lease) -> bool:
        mem_cap = self.cap.memory_gib_per_device + _EPS
        return all(
            self.share[d] + lease.share <= 1.0 + _EPS
            and self.memory[d] + lease.memory_gib_per_device <= mem_cap
            for d in lease.devices
        )


class Packer:
    """The cluster's nodes and the leases on them; places and releases replicas.

    Args:
        nodes: the cluster, any order (ties are broken by node id, so the order does not
            change any decision).
        leases: leases already held, e.g. restored after a restart.

    Raises:
        PlacementError: two nodes share an id, or a lease names an unknown node or device,
            repeats a replica id or does not fit next to the others.
    """

    def __init__(self, nodes: Sequence[NodeCapacity], leases: Iterable[Lease] = ()) -> None:
        self._nodes: dict[str, _Node] = {}
        for cap in sorted(nodes, key=lambda n: n.node_id):
            if cap.node_id in self._nodes:
                raise PlacementError(f"node ids must be unique; {cap.node_id} appears twice")
            self._nodes[cap.node_id] = _Node.of(cap)
        # Per type, the nodes in id order: the scan order of every decision.
        self._pools: dict[str, list[_Node]] = {}
        for node in self._nodes.values():
            self._pools.setdefault(node.cap.accelerator_type, []).append(node)
        self._leases: dict[str, Lease] = {}
        for lease in leases:
            self._restore(lease)

    def leases(self) -> tuple[Lease, ...]:
        """Every lease held, in replica id order."""
        return tuple(self._leases[r] for r in sorted(self._leases))

    def place(self, requests: Sequence[ReplicaRequest]) -> PackResult:
        """Place replicas; the placed ones hold their leases until ``release``.

        Returns:
            The new leases and the pending replicas, each in request order.

        Raises:
            PlacementError: a replica id repeats or already holds a lease.
        """
        seen: set[str] = set()
        for r in requests:
            if r.replica_id in seen or r.replica_id in self._leases:
                raise PlacementError(
                    f"replica {r.replica_id} is requested twice or already holds a lease; "
                    "each replica id may hold one lease"
                )
            seen.add(r.replica_id)
        order = sorted(
            range(len(requests)),
            key=lambda i: (
                -requests[i].needs.devices,
                -requests[i].needs.fraction,
                -requests[i].needs.memory_gib,
                i,
            ),
        )
        outcome: dict[int, Lease | Pending] = {}
        for i in order:
            lease = self._place_one(requests[i])
            if lease is None:
                outcome[i] = Pending(
                    requests[i].replica_id, requests[i].needs.model, self._why(requests[i].needs)
                )
            else:
                self._nodes[lease.node_id].take(lease)
                self._leases[lease.replica_id] = lease
                outcome[i] = lease
        placed = [outcome[i] for i in range(len(requests))]
        return PackResult(
            tuple(x for x in placed if isinstance(x, Lease)),
            tuple(x for x in placed if isinstance(x, Pending)),
        )

    def release(self, lease: Lease) -> None:
        """Free a retired replica's devices.

        Raises:
            PlacementError: this lease is not held (never granted, or released already).
        """
        if self._leases.get(lease.replica_id) != lease:
            raise PlacementError(
                f"replica {lease.replica_id} holds no such lease; release only a lease that "
                "place() granted and that was not released yet"
            )
        del self._leases[lease.replica_id]
        self._nodes[lease.node_id].give_back(lease)

    def report(self, accelerator_type: str) -> PoolReport:
        """Capacity, use and fragmentation of one pool.

        Raises:
            PlacementError: no node has this accelerator type.
        """
        nodes = self._pools.get(accelerator_type)
        if nodes is None:
            raise PlacementError(
                f"no pool {accelerator_type!r}; the pools are {sorted(self._pools)}"
            )
        used = stranded = mem_cap = mem_used = 0.0
        devices = free_whole = largest = leases = 0
        for n in nodes:
            devices += n.cap.devices
            node_used = sum(n.share)
            used += node_used
            free_whole += n.free
            largest = max(largest, n.free)
            leases += sum(n.models.values())
            mem_cap += n.cap.memory_gib_per_device * n.cap.devices
            mem_used += sum(n.memory)
            if node_used > 0:
                stranded += n.free + sum(1.0 - s for s in n.share if s > 0.0)
        capacity = float(devices)
        free = max(capacity - used, 0.0)
        return PoolReport(
            accelerator_type=accelerator_type,
            nodes=len(nodes),
            capacity_devices=devices,
            used_devices=round(used, 6),
            free_devices=round(free, 6),
            free_whole_devices=free_whole,
            largest_free_block=largest,
            capacity_memory_gib=mem_cap,
            used_memory_gib=round(mem_used, 6),
            leases=leases,
            fragmentation=round(stranded / free, 6) if free > _EPS else 0.0,
        )

    def reports(self) -> dict[str, PoolReport]:
        """``report`` for every pool, by type name."""
        return {t: self.report(t) for t in sorted(self._pools)}

    # -- internals ------------------------------------------------------------------------

    def _restore(self, lease: Lease) -> None:
        node = self._nodes.get(lease.node_id)
        if node is None or node.cap.accelerator_type != lease.accelerator_type:
            raise PlacementError(
                f"lease of replica {lease.replica_id} names node {lease.node_id} of type "
                f"{lease.accelerator_type}, which is not in the cluster"
            )
        if lease.replica_id in self._leases:
            raise PlacementError(f"replica {lease.replica_id} holds two leases; one is allowed")
        bad = [d for d in lease.devices if not 0 <= d < node.cap.devices]
        if not lease.devices or bad or len(set(lease.devices)) != len(lease.devices):
            raise PlacementError(
                f"lease of replica {lease.replica_id} names devices {list(lease.devices)}; "
                f"node {lease.node_id} has devices 0..{node.cap.devices - 1}, each named once"
            )
        if not 0.0 < lease.share <= 1.0 or (lease.share < 1.0 and len(lease.devices) != 1):
            raise PlacementError(
                f"lease of replica {lease.replica_id} has share {lease.share} on "
                f"{len(lease.devices)} devices; a share must be in (0, 1], below 1 on one device"
            )
        if not node.fits(lease):
            raise PlacementError(
                f"lease of replica {lease.replica_id} does not fit on node {lease.node_id} "
                "next to the leases already restored"
            )
        node.take(lease)
        self._leases[lease.replica_id] = lease

    def _place_one(self, request: ReplicaRequest) -> Lease | None:
        needs = request.needs
        for accelerator_type in needs.accelerator_types:
            nodes = self._pools.get(accelerator_type, [])
            if needs.fraction < 1.0:
                lease = _best_share(request, nodes)
            else:
                lease = _best_whole(request, nodes)
            if lease is not None:
                return lease
        return None

    def _why(self, needs: ReplicaNeeds) -> str:
        """``no capacity: needs 2 x H100 or L4, free: H100 0, L4 1`` with the details that
        explain it (memory too small, too few free devices on any one node)."""
        kinds = " or ".join(needs.accelerator_types)
        if needs.fraction < 1.0:
            wanted = f"a {needs.fraction:g} share of one {kinds}"
        else:
            wanted = f"{needs.devices} x {kinds}"
        if needs.memory_gib > 0:
            wanted += f" with {needs.memory_gib_per_device:g} GiB each"
        free: list[str] = []
        for t in needs.accelerator_types:
            nodes = self._pools.get(t)
            if not nodes:
                free.append(f"{t} none in the cluster")
                continue
            whole = sum(n.free for n in nodes)
            text = f"{t} {whole}"
            mem = max(n.cap.memory_gib_per_device for n in nodes)
            if needs.memory_gib_per_device > mem + _EPS:
                text += f" ({mem:g} GiB per device, too small)"
            elif needs.fraction < 1.0:
                best = max((1.0 - s for n in nodes for s in n.share if s < 1.0), default=0.0)
                text += f" whole, largest free share {best:.2f}"
            elif needs.devices > 1 and whole >= needs.devices:
                text += f" (at most {max(n.free for n in nodes)} on one node)"
            free.append(text)
        return f"no capacity: needs {wanted}, free: {', '.join(free)}"


def pack(
    nodes: Sequence[NodeCapacity], leases: Iterable[Lease], requests: Sequence[ReplicaRequest]
) -> PackResult:
    """Place ``requests`` next to the ``leases`` already held; see ``Packer.place``."""
    return Packer(nodes, leases).place(requests)


def _best_whole(request: ReplicaRequest, nodes: list[_Node]) -> Lease | None:
    """Whole free devices on one node: fewest replicas of the model, then tightest fit."""
    needs = request.needs
    k = needs.devices
    mem = needs.memory_gib_per_device
    best: _Node | None = None
    best_key = (0, 0)
    for n in nodes:
        if n.free < k or mem > n.cap.memory_gib_per_device + _EPS:
            continue
        key = (n.models.get(needs.model, 0), n.free)
        if best is None or key < best_key:
            best, best_key = n, key
    if best is None:
        return None
    devices = tuple(d for d, s in enumerate(best.share) if s == 0.0)[:k]
    return Lease(
        request.replica_id,
        needs.model,
        best.cap.node_id,
        best.cap.accelerator_type,
        devices,
        1.0,
        mem,
    )


def _best_share(request: ReplicaRequest, nodes: list[_Node]) -> Lease | None:
    """A share of one device: fewest replicas of the model on the node, then a partly used
    device left with the least free share, then a free device on the fullest node."""
    needs = request.needs
    f = needs.fraction
    mem = needs.memory_gib
    best: tuple[int, int, float, int] | None = None
    best_at: tuple[_Node, int] | None = None
    for n in nodes:
        mem_cap = n.cap.memory_gib_per_device + _EPS
        if mem > mem_cap:
            continue
        spread = n.models.get(needs.model, 0)
        if best is not None and spread > best[0]:
            continue
        first_free = -1
        for d, s in enumerate(n.share):
            if s == 0.0:
                if first_free < 0:
                    first_free = d
            elif s + f <= 1.0 + _EPS and n.memory[d] + mem <= mem_cap:
                # Rounded so float residue cannot break a tie that should go by node id.
                key = (spread, 0, round(1.0 - s - f, 9), n.free)
                if best is None or key < best:
                    best, best_at = key, (n, d)
        if first_free >= 0:
            key = (spread, 1, 1.0 - f, n.free)
            if best is None or key < best:
                best, best_at = key, (n, first_free)
    if best_at is None:
        return None
    node, d = best_at
    return Lease(
        request.replica_id,
        needs.model,
        node.cap.node_id,
        node.cap.accelerator_type,
        (d,),
        f,
        mem,
    )
