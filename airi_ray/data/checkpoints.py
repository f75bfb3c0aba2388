"""LangGraph checkpoint items as context store records, and back.

Record layout (``key`` is the thread id, ``seq`` the thread's generation, see
``airi_ray/core/checkpoints.py``; ``name`` is a JSON list so that it is unique per item):

| kind | name | body |
|---|---|---|
| ``lg_checkpoint`` | ``[ns, checkpoint_id, rev]`` | parent, checkpoint, metadata, meta, versions |
| ``lg_write`` | ``[ns, checkpoint_id, task_id, idx, rev]`` | channel, value, task_path |
| ``lg_blob`` | ``[ns, channel, version]`` | value (null: an empty channel) |
| ``lg_tombstone`` | ``"thread"`` | ``{}``: the thread's items of generation ``<= seq`` are dead |
"""

from __future__ import annotations

import json
from typing import Any

from airi_ray.core.checkpoints import Blob, Found, Item, Saved, Write
from airi_ray.data.records import Record

CHECKPOINT = "lg_checkpoint"
WRITE = "lg_write"
BLOB = "lg_blob"
TOMBSTONE = "lg_tombstone"
ITEM_KINDS = (CHECKPOINT, WRITE, BLOB)
KINDS = (*ITEM_KINDS, TOMBSTONE)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def to_record(tenant: str, item: Item, at: float) -> Record:
    """The record that stores ``item`` for ``tenant``."""
    if isinstance(item, Saved):
        name = _dumps([item.ns, item.checkpoint_id, item.rev])
        body = {
            "parent": item.parent_id,
            "checkpoint": item.checkpoint,
            "metadata": item.metadata,
            "meta": dict(item.meta),
            "versions": dict(item.versions),
        }
        kind = CHECKPOINT
    elif isinstance(item, Write):
        name = _dumps([item.ns, item.checkpoint_id, item.task_id, item.idx, item.rev])
        body = {"channel": item.channel, "value": item.value, "task_path": item.task_path}
        kind = WRITE
    else:
        name = _dumps([item.ns, item.channel, item.version])
        body = {"value": item.value}
        kind = BLOB
    return Record(kind, tenant, item.thread_id, item.generation, name, _dumps(body), at)


def tombstone(tenant: str, thread_id: str, generation: int, at: float) -> Record:
    """The record that deletes the thread's items of ``generation`` and older."""
    return Record(TOMBSTONE, tenant, thread_id, generation, "thread", "{}", at)


def from_record(r: Record) -> Item:
    """The item a ``lg_checkpoint``, ``lg_write`` or ``lg_blob`` record stores."""
    name = json.loads(r.name)
    body = json.loads(r.body)
    if r.kind == CHECKPOINT:
        ns, checkpoint_id, rev = name
        return Saved(
            r.key,
            ns,
            checkpoint_id,
            body["parent"],
            body["checkpoint"],
            body["metadata"],
            body["meta"],
            body["versions"],
            r.seq,
            rev,
        )
    if r.kind == WRITE:
        ns, checkpoint_id, task_id, idx, rev = name
        return Write(
            r.key,
            ns,
            checkpoint_id,
            task_id,
            idx,
            body["channel"],
            body["value"],
            body["task_path"],
            r.seq,
            rev,
        )
    assert r.kind == BLOB, r.kind
    ns, channel, version = name
    return Blob(r.key, ns, channel, version, body["value"], r.seq)


def found_to_dict(found: Found) -> dict[str, Any]:
    """A checkpoint as the store answers it (plain data, so it crosses Ray as is)."""
    s = found.saved
    return {
        "thread_id": s.thread_id,
        "ns": s.ns,
        "checkpoint_id": s.checkpoint_id,
        "parent_id": s.parent_id,
        "checkpoint": s.checkpoint,
        "metadata": s.metadata,
        "values": dict(found.values),
        "writes": [[w.task_id, w.channel, w.value] for w in found.writes],
    }
