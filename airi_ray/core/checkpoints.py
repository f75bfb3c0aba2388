"""LangGraph checkpoints in the context store: what is live, what a listing returns, which
repeated write is kept.

The store keeps three kinds of items per ``(tenant, thread)``: checkpoints (the serialized
checkpoint without its channel values, its metadata, its parent), channel values ("blobs",
one per channel version, so an unchanged channel is not stored again with every checkpoint)
and the writes of a task against a checkpoint. Payloads are opaque strings here: LangGraph's
serializer makes them in the saver; this module only decides.

A thread has a *generation*. Deleting it (a tombstone of generation ``g``) kills every item
of generation ``<= g`` at once, whatever order the log hands the records back in, and new
items are written at ``g + 1``; a later compaction may drop the dead records.

Which item wins when one is written again:

- a blob, or a regular write ``(task_id, idx >= 0)``: the first one (LangGraph's contract:
  a task's writes are replayed on retry and must not change what was recorded);
- a checkpoint, or a special write (``idx < 0``: error, interrupt, scheduled, resume): the
  last one, by revision (``rev``), as LangGraph's own savers upsert them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Saved:
    """One checkpoint: ``checkpoint`` and ``metadata`` are serialized; ``meta`` is the JSON
    form of the metadata (for filters) and ``versions`` the channel versions it reads."""

    thread_id: str
    ns: str
    checkpoint_id: str
    parent_id: str | None
    checkpoint: str
    metadata: str
    meta: Mapping[str, Any]
    versions: Mapping[str, str]
    generation: int = 0
    rev: int = 0


@dataclass(frozen=True, slots=True)
class Write:
    """A task's write to a channel, pending against checkpoint ``checkpoint_id``."""

    thread_id: str
    ns: str
    checkpoint_id: str
    task_id: str
    idx: int
    channel: str
    value: str
    task_path: str = ""
    generation: int = 0
    rev: int = 0

    @property
    def slot(self) -> tuple[str, int]:
        return (self.task_id, self.idx)


@dataclass(frozen=True, slots=True)
class Blob:
    """A channel's value at a version; ``value`` None is LangGraph's "empty" channel."""

    thread_id: str
    ns: str
    channel: str
    version: str
    value: str | None
    generation: int = 0


Item = Saved | Write | Blob


@dataclass(frozen=True, slots=True)
class Found:
    """A checkpoint with what a ``CheckpointTuple`` needs: its channel values and its
    pending writes in ``writes_sort_key`` order (task path, task id, idx)."""

    saved: Saved
    values: Mapping[str, str]
    writes: tuple[Write, ...]


@dataclass
class _Thread:
    generation: int = 0
    checkpoints: dict[tuple[str, str], Saved] = field(default_factory=dict)  # (ns, id)
    writes: dict[tuple[str, str], dict[tuple[str, int], Write]] = field(default_factory=dict)
    blobs: dict[tuple[str, str, str], Blob] = field(default_factory=dict)  # (ns, ch, ver)


def matches(meta: Mapping[str, Any], filter: Mapping[str, Any] | None) -> bool:
    """Whether metadata ``meta`` has every key of ``filter`` with an equal value."""
    return not filter or all(k in meta and meta[k] == v for k, v in filter.items())


def plan_writes(
    existing: Mapping[tuple[str, int], Write], incoming: Iterable[Write]
) -> list[Write]:
    """The writes of ``incoming`` to store, given those already stored for the checkpoint.

    A regular write whose slot ``(task_id, idx)`` is taken is dropped (first write wins);
    a special write (``idx < 0``) that differs from the stored one replaces it with the
    next revision; one equal to it is a retry and is dropped.
    """
    out: list[Write] = []
    for w in incoming:
        old = existing.get(w.slot)
        if old is None:
            out.append(replace(w, rev=0))
        elif w.idx < 0 and (old.channel, old.value, old.task_path) != (
            w.channel,
            w.value,
            w.task_path,
        ):
            out.append(replace(w, rev=old.rev + 1))
    return out


def next_checkpoint(existing: Saved | None, incoming: Saved) -> Saved | None:
    """The checkpoint record to store for ``incoming``: None when the stored one is equal
    (a retry), else ``incoming`` at the next revision."""
    if existing is None:
        return replace(incoming, rev=0)
    if _content(existing) == _content(incoming):
        return None
    return replace(incoming, rev=existing.rev + 1)


def _newest(s: Saved) -> tuple[str, str, str]:
    return (s.checkpoint_id, s.thread_id, s.ns)


def newest_first(found: Iterable[Found], limit: int | None = None) -> list[Found]:
    """Listings of disjoint threads merged in ``listing``'s order, at most ``limit``."""
    out = sorted(found, key=lambda f: _newest(f.saved), reverse=True)
    return out if limit is None else out[:limit]


def _content(s: Saved) -> tuple[Any, ...]:
    return (s.parent_id, s.checkpoint, s.metadata, dict(s.meta), dict(s.versions))


class CheckpointIndex:
    """The live checkpoints, writes and blobs of every tenant's threads (in memory).

    The store holds its hot threads here: it loads a thread's records on demand and
    ``forget``s a thread it evicts; ``listing`` then covers the threads held.
    """

    def __init__(self) -> None:
        self._threads: dict[tuple[str, str], _Thread] = {}

    # -- applying records ------------------------------------------------------------------

    def generation(self, tenant: str, thread_id: str) -> int:
        """The generation new items of the thread are written at."""
        t = self._threads.get((tenant, thread_id))
        return t.generation if t else 0

    def add(self, tenant: str, item: Item) -> bool:
        """Apply one stored item; returns False when it is dead or loses to a stored one."""
        t = self._thread(tenant, item.thread_id, item.generation)
        if item.generation < t.generation:
            return False
        if isinstance(item, Saved):
            key = (item.ns, item.checkpoint_id)
            old = t.checkpoints.get(key)
            if old is not None and old.rev >= item.rev:
                return False
            t.checkpoints[key] = item
        elif isinstance(item, Write):
            slots = t.writes.setdefault((item.ns, item.checkpoint_id), {})
            old_w = slots.get(item.slot)
            if old_w is not None and (item.idx >= 0 or old_w.rev >= item.rev):
                return False
            slots[item.slot] = item
        else:
            bkey = (item.ns, item.channel, item.version)
            if bkey in t.blobs:
                return False
            t.blobs[bkey] = item
        return True

    def forget(self, tenant: str, thread_id: str) -> None:
        """Stop holding the thread (it stays in the log)."""
        self._threads.pop((tenant, thread_id), None)

    def tombstone(self, tenant: str, thread_id: str, generation: int) -> None:
        """Kill the thread's items of ``generation`` and older."""
        self._thread(tenant, thread_id, generation + 1)

    def _thread(self, tenant: str, thread_id: str, generation: int) -> _Thread:
        """The thread's state, moved on to ``generation`` (dropping older items) if newer."""
        t = self._threads.setdefault((tenant, thread_id), _Thread())
        if generation > t.generation:
            t.generation = generation
            t.checkpoints = {k: v for k, v in t.checkpoints.items() if v.generation >= generation}
            t.writes = {
                k: kept
                for k, slots in t.writes.items()
                if (kept := {s: w for s, w in slots.items() if w.generation >= generation})
            }
            t.blobs = {k: v for k, v in t.blobs.items() if v.generation >= generation}
        return t

    # -- reading ---------------------------------------------------------------------------

    def get(
        self, tenant: str, thread_id: str, ns: str, checkpoint_id: str | None = None
    ) -> Found | None:
        """The checkpoint ``checkpoint_id`` of the thread's namespace, or its newest."""
        t = self._threads.get((tenant, thread_id))
        if t is None:
            return None
        if checkpoint_id is None:
            ids = [cid for (n, cid) in t.checkpoints if n == ns]
            if not ids:
                return None
            checkpoint_id = max(ids)
        saved = t.checkpoints.get((ns, checkpoint_id))
        return None if saved is None else self._found(t, saved)

    def listing(
        self,
        tenant: str,
        *,
        thread_id: str | None = None,
        ns: str | None = None,
        checkpoint_id: str | None = None,
        filter: Mapping[str, Any] | None = None,
        before: str | None = None,
        limit: int | None = None,
    ) -> list[Found]:
        """The tenant's checkpoints newest first (by checkpoint id, which LangGraph makes
        time-ordered), of one thread and namespace if given, whose metadata ``matches``
        ``filter``, older than checkpoint ``before``, at most ``limit`` of them."""
        if limit is not None and limit <= 0:
            return []
        if thread_id is None:
            threads = [t for (ten, _), t in self._threads.items() if ten == tenant]
        else:
            one = self._threads.get((tenant, thread_id))
            threads = [one] if one else []
        picked = [
            (t, s)
            for t in threads
            for s in t.checkpoints.values()
            if (ns is None or s.ns == ns)
            and (checkpoint_id is None or s.checkpoint_id == checkpoint_id)
            and (before is None or s.checkpoint_id < before)
            and matches(s.meta, filter)
        ]
        picked.sort(key=lambda ts: _newest(ts[1]), reverse=True)
        if limit is not None:
            picked = picked[:limit]
        return [self._found(t, s) for t, s in picked]

    def writes_of(
        self, tenant: str, thread_id: str, ns: str, checkpoint_id: str
    ) -> dict[tuple[str, int], Write]:
        """The stored writes of one checkpoint by slot ``(task_id, idx)``."""
        t = self._threads.get((tenant, thread_id))
        return dict(t.writes.get((ns, checkpoint_id), {})) if t else {}

    def checkpoint(self, tenant: str, thread_id: str, ns: str, checkpoint_id: str) -> Saved | None:
        t = self._threads.get((tenant, thread_id))
        return t.checkpoints.get((ns, checkpoint_id)) if t else None

    def items(self, tenant: str, thread_id: str) -> list[Item]:
        """Every live item of the thread (to copy it)."""
        t = self._threads.get((tenant, thread_id))
        if t is None:
            return []
        writes = [w for slots in t.writes.values() for w in slots.values()]
        return [*t.checkpoints.values(), *writes, *t.blobs.values()]

    def latest_items(self, tenant: str, thread_id: str) -> list[Item]:
        """The newest checkpoint of each namespace of the thread, with its writes and the
        blobs it reads: what ``prune(keep_latest)`` keeps."""
        t = self._threads.get((tenant, thread_id))
        if t is None:
            return []
        newest: dict[str, Saved] = {}
        for s in t.checkpoints.values():
            if s.ns not in newest or s.checkpoint_id > newest[s.ns].checkpoint_id:
                newest[s.ns] = s
        return self._kept(t, newest.values())

    def items_without_runs(self, tenant: str, thread_id: str, run_ids: set[str]) -> list[Item]:
        """The thread's checkpoints whose metadata ``run_id`` is not in ``run_ids``, with
        their writes and the blobs they read: what ``delete_for_runs`` keeps."""
        t = self._threads.get((tenant, thread_id))
        if t is None:
            return []
        return self._kept(
            t, [s for s in t.checkpoints.values() if s.meta.get("run_id") not in run_ids]
        )

    def threads_of_runs(self, tenant: str, run_ids: set[str]) -> list[str]:
        """The tenant's threads with a checkpoint of one of ``run_ids`` (metadata ``run_id``)."""
        return sorted(
            thread_id
            for (ten, thread_id), t in self._threads.items()
            if ten == tenant
            and any(s.meta.get("run_id") in run_ids for s in t.checkpoints.values())
        )

    @staticmethod
    def _kept(t: _Thread, kept: Iterable[Saved]) -> list[Item]:
        out: list[Item] = []
        blobs: dict[tuple[str, str, str], Blob] = {}
        for s in kept:
            out.append(s)
            out.extend(t.writes.get((s.ns, s.checkpoint_id), {}).values())
            for ch, ver in s.versions.items():
                if (b := t.blobs.get((s.ns, ch, ver))) is not None:
                    blobs[(s.ns, ch, ver)] = b
        return out + list(blobs.values())

    def _found(self, t: _Thread, saved: Saved) -> Found:
        values = {}
        for ch, ver in saved.versions.items():
            b = t.blobs.get((saved.ns, ch, ver))
            if b is not None and b.value is not None:
                values[ch] = b.value
        writes = sorted(
            t.writes.get((saved.ns, saved.checkpoint_id), {}).values(),
            key=lambda w: (w.task_path, w.task_id, w.idx),
        )
        return Found(saved, values, tuple(writes))
