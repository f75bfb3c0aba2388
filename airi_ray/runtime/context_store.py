"""``ContextStore``: conversations and graph-run state, durable on LanceDB.

A write is acknowledged only once the log has committed it. Concurrent writes are
grouped: while one commit runs, the next writes queue up and go together in the next one
(a LanceDB commit costs about the same for one row as for sixteen). Every write carries an
idempotency key (conversation id and turn number; run id, step and node), so a retry of a
write that was committed but not acknowledged is answered from the store and never
duplicated; the same key with different content is a ``Conflict``. An append may also
carry the request id it belongs to (``request_id``): the id is written in each turn's
record, so a retried request (a new append of the same turns, which would get new numbers)
is answered with the first append's numbers, before and after a restart.

Reads are scoped to the tenant: another tenant's conversation or run is "not found", like
one that does not exist, so ids cannot be probed.

What is held in memory is bounded: the recent traces (``TRACES_KEPT``, read at start by
kind) and the records of at most ``max_hot_keys`` hot keys (conversations, runs, LangGraph
threads), least recently used first out. Start-up reads nothing else, so it costs the same
over a thousand turns as over a million. A key not held is read from the log when it is
used (off the event loop; concurrent uses share one read), before anything is decided for
it, so numbering, idempotency and fencing see every record of it; a key with a write in
flight (or in use by a call) is never evicted. A listing across a tenant's LangGraph threads
reads them from the log for the call, without holding them.

Compaction (pruning old traces, dropping deleted threads, merging the log's files) runs in
a background task every ``COMPACT_EVERY`` commits, one at a time: commits, and so write
acknowledgements, never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import AsyncIterator
from typing import Any

from airi_ray.core import checkpoints as lg
from airi_ray.core.claims import FIRST_TOKEN, check_token, next_token
from airi_ray.core.errors import Conflict, InvalidRequest, NotFound
from airi_ray.data import checkpoints as lg_records
from airi_ray.data.records import LanceRecordLog, Record, RecordLog

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
MAX_ID_CHARS = 256
MAX_TURN_CHARS = 1_000_000
MAX_TURNS_PER_WRITE = 256
MAX_FINISH_CHARS = 32
COMPACT_EVERY = 256  # commits between compactions of the log
TRACES_KEPT = 5000  # recent traces for `airi trace`; older ones are pruned at compaction
MAX_SPANS_PER_WRITE = 10_000
MAX_LG_PAYLOAD_CHARS = 16_000_000  # one serialized checkpoint, metadata or channel value
MAX_LG_ITEMS_PER_WRITE = 10_000  # channel values of one checkpoint, writes of one task
MAX_LG_THREADS_PER_PRUNE = 1000
PRUNE_STRATEGIES = ("keep_latest", "delete")
# Keys (conversations, runs, LangGraph threads) whose records are held; beyond it the least
# recently used idle ones are evicted (a call may pin more for its duration).
MAX_HOT_KEYS = 10_000

Identity = tuple[str, str, str, int, str]
# What is loaded and evicted together: ("conversation", tenant, id), ("run", "", run id: run
# ids are global, another tenant's is "not found"), ("thread", tenant, LangGraph thread id).
HotKey = tuple[str, str, str]
_SPACE_KINDS: dict[str, tuple[str, ...]] = {
    "conversation": ("turn",),
    "run": ("run", "checkpoint", "claim"),
    "thread": lg_records.KINDS,
}
_SPACE_OF = {kind: space for space, kinds in _SPACE_KINDS.items() for kind in kinds}


def _hot_key(r: Record) -> HotKey | None:
    """The key ``r`` is held under; None for a trace (traces are all held)."""
    space = _SPACE_OF.get(r.kind)
    if space is None:
        return None
    return (space, "" if space == "run" else r.tenant, r.key)


def _check_id(what: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise InvalidRequest(f"{what} must be a string of 1 to {MAX_ID_CHARS} characters")
    return value


def _check_ns(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"checkpoint_ns must be a string of at most {MAX_ID_CHARS} characters")
    return value


def _check_payload(what: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_LG_PAYLOAD_CHARS:
        raise InvalidRequest(
            f"{what} must be a serialized string of at most {MAX_LG_PAYLOAD_CHARS} characters"
        )
    return value


def _check_seq(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        raise InvalidRequest(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _seq(r: Record) -> int:
    return r.seq


def _check_turn(i: int, t: Any) -> tuple[str, str, Any, str | None]:
    """A turn's role, content, seq (None: the next number) and the finish reason of an
    answer, or InvalidRequest."""
    if not isinstance(t, dict) or not {"role", "content"} <= t.keys():
        raise InvalidRequest(f"turns[{i}] must be an object with role and content")
    if t["role"] not in ROLES:
        raise InvalidRequest(f"turns[{i}].role must be one of {', '.join(ROLES)}")
    content = t["content"]
    if not isinstance(content, str) or len(content) > MAX_TURN_CHARS:
        raise InvalidRequest(
            f"turns[{i}].content must be a string of at most {MAX_TURN_CHARS} characters"
        )
    finish = t.get("finish_reason")
    if finish is not None and not (isinstance(finish, str) and 0 < len(finish) <= MAX_FINISH_CHARS):
        raise InvalidRequest(
            f"turns[{i}].finish_reason must be a string of 1 to {MAX_FINISH_CHARS} characters"
        )
    return t["role"], content, t.get("seq"), finish


def _check_retry(
    request_id: str, first: list[Record], turns: list[tuple[str, str, Any, str | None]]
) -> None:
    """A retried append brings the turns of the first: the same roles, and the same content
    but for the assistant's (a retried chat answers again; the first answer is kept)."""
    same = len(first) == len(turns) and all(
        r.name == role and (role == "assistant" or json.loads(r.body)["content"] == content)
        for r, (role, content, _, _) in zip(first, turns, strict=False)
    )
    if not same:
        raise Conflict(
            f"request id {request_id!r} already appended other turns to this conversation; "
            "a retry must resend the same turns, a new request needs a new id"
        )


class ContextStore:
    """Durable conversations (ordered turns) and graph runs (events and checkpoints).

    Args:
        uri: LanceDB storage URI (a local folder or object storage).
        log: a record log to use instead (tests, the in-process executor).
        max_hot_keys: conversations, runs and LangGraph threads held in memory at most
            (idle ones; see ``MAX_HOT_KEYS``).
    """

    def __init__(
        self,
        uri: str | None = None,
        log: RecordLog | None = None,
        max_hot_keys: int = MAX_HOT_KEYS,
    ) -> None:
        if log is None:
            if uri is None:
                raise ValueError("ContextStore needs a storage uri or a log")
            log = LanceRecordLog(uri)
        if max_hot_keys < 1:
            raise ValueError(f"max_hot_keys must be at least 1, got {max_hot_keys}")
        self._log = log
        self.max_hot_keys = max_hot_keys
        # hot key -> its records by identity (for idempotency), least recently used first
        self._hot: OrderedDict[HotKey, dict[Identity, Record]] = OrderedDict()
        self._loading: dict[HotKey, asyncio.Task[None]] = {}
        self._pins: Counter[HotKey] = Counter()  # keys in use by a call
        self._busy: Counter[HotKey] = Counter()  # keys with records being committed
        self._trace_records: dict[Identity, Record] = {}
        self._turns: dict[tuple[str, str], dict[int, Record]] = {}
        # (tenant, conversation id) -> request id -> the turns that request appended
        self._appends: dict[tuple[str, str], dict[str, list[Record]]] = {}
        self._runs: dict[str, list[Record]] = {}  # run id -> events, checkpoints
        self._claims: dict[str, int] = {}  # run id -> its committed fencing token
        self._claiming: dict[str, int] = {}  # run id -> the token of a claim being committed
        self._traces: OrderedDict[str, list[Record]] = OrderedDict()  # trace id -> span batches
        self._trace_keys: dict[str, set[str]] = defaultdict(set)  # run/request id -> trace ids
        self._lg = lg.CheckpointIndex()  # LangGraph threads (see core/checkpoints.py)
        self._lg_dead: dict[tuple[str, str], int] = {}  # (tenant, thread) -> seqs to drop below
        self._pending: dict[Identity, tuple[Record, asyncio.Future[None]]] = {}
        self._queue: list[Record] = []
        self._writer: asyncio.Task[None] | None = None
        self._compactor: asyncio.Task[None] | None = None
        self.commits = 0
        self.loads = 0  # keys read from the log
        start = time.perf_counter()
        for r in log.load_kinds(("trace",)):  # the only records held from the start
            self._index(r)
        logger.info(
            "context store: %d trace records loaded in %.2fs",
            len(self._trace_records),
            time.perf_counter() - start,
        )

    # -- hot keys --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _using(self, *keys: HotKey) -> AsyncIterator[None]:
        """Hold ``keys`` (reading those not held from the log) for the body of the block;
        none of them is evicted before it ends."""
        for k in keys:
            self._pins[k] += 1
        try:
            # A held key is used at once, without yielding to the loop (so calls on it keep
            # the order they came in); cold ones are read side by side.
            cold = [k for k in keys if not self._touch(k)]
            if len(cold) == 1:
                await self._load(cold[0])
            elif cold:
                await asyncio.gather(*(self._load(k) for k in cold))
            yield
        finally:
            for k in keys:
                self._pins[k] -= 1
                if not self._pins[k]:
                    del self._pins[k]
            self._evict()

    def _touch(self, k: HotKey) -> bool:
        """Whether ``k`` is held (then it becomes the most recently used)."""
        if k in self._hot:
            self._hot.move_to_end(k)
            return True
        return False

    async def _load(self, k: HotKey) -> None:
        if self._touch(k):  # read by another call meanwhile
            return
        task = self._loading.get(k)
        if task is None:  # the first miss reads; concurrent misses wait for the same read
            task = asyncio.get_running_loop().create_task(self._read(k))
            self._loading[k] = task
        await asyncio.shield(task)

    async def _read(self, k: HotKey) -> None:
        space, tenant, key = k
        try:
            records = await asyncio.to_thread(
                self._log.load_key, _SPACE_KINDS[space], key, tenant or None
            )
        finally:
            del self._loading[k]
        # No write to ``k`` can have been committed meanwhile: every write holds its key.
        self._hot[k] = {}
        if space == "conversation":
            self._turns[(tenant, key)] = {}
            self._appends[(tenant, key)] = {}
        elif space == "run":
            self._runs[key] = []
        for r in sorted(records, key=_seq):  # tombstones apply in any order; turns sort
            self._index(r)
        self.loads += 1

    def _evict(self) -> None:
        """Forget the least recently used idle keys beyond ``max_hot_keys``."""
        excess = len(self._hot) - self.max_hot_keys
        victims: list[HotKey] = []
        for k in self._hot:  # oldest first
            if len(victims) >= excess:
                break
            if k not in self._pins and k not in self._busy:
                victims.append(k)
        for k in victims:
            self._forget(k)

    def _forget(self, k: HotKey) -> None:
        space, tenant, key = k
        del self._hot[k]
        if space == "conversation":
            del self._turns[(tenant, key)]
            del self._appends[(tenant, key)]
        elif space == "run":
            del self._runs[key]
            self._claims.pop(key, None)
        else:
            self._lg.forget(tenant, key)

    def _stored(self, identity: Identity) -> Record | None:
        """The committed record of ``identity`` (its key is held when this is asked)."""
        if identity[0] == "trace":
            return self._trace_records.get(identity)
        kind, tenant, key = identity[:3]
        space = _SPACE_OF[kind]
        held = self._hot.get((space, "" if space == "run" else tenant, key))
        return None if held is None else held.get(identity)

    # -- conversations ---------------------------------------------------------------------

    async def append_turns(
        self,
        tenant: str,
        conversation_id: str,
        turns: list[dict[str, Any]],
        request_id: str | None = None,
    ) -> list[int]:
        """Append turns ``{"role", "content", "seq"?, "finish_reason"?}`` (why an answer
        ended, kept to replay it) to a conversation; returns their
        sequence numbers once durable. A turn with a ``seq`` already stored with the same
        role and content is a retry and is not stored twice; one without ``seq`` gets the
        next number.

        Args:
            request_id: the request these turns come from (an ``Idempotency-Key``). An
                append with a request id already appended to this conversation is a retry:
                nothing is stored and the first append's numbers come back. The retry may
                carry another answer (a retried chat generates again): the first is kept.

        Raises:
            InvalidRequest: a bad id, role, content or seq.
            Conflict: a ``seq`` already used for different content, or a request id
                already used for other turns (other roles, or other non-assistant content).
        """
        _check_id("tenant", tenant)
        _check_id("conversation_id", conversation_id)
        if request_id is not None:
            _check_id("request_id", request_id)
        if not isinstance(turns, list) or not 0 < len(turns) <= MAX_TURNS_PER_WRITE:
            raise InvalidRequest(f"turns must be a list of 1 to {MAX_TURNS_PER_WRITE} turns")
        checked = [_check_turn(i, t) for i, t in enumerate(turns)]
        async with self._using(("conversation", tenant, conversation_id)):
            return await self._append_turns(tenant, conversation_id, checked, request_id)

    async def _append_turns(
        self,
        tenant: str,
        conversation_id: str,
        checked: list[tuple[str, str, Any, str | None]],
        request_id: str | None,
    ) -> list[int]:
        if request_id is not None:
            first = self._appends[(tenant, conversation_id)].get(request_id)
            if first is not None:
                _check_retry(request_id, first, checked)
                await self._write(first)  # waits if the first append is still committing
                return [r.seq for r in first]
        next_seq = self._next_seq(tenant, conversation_id)
        records = []
        for i, (role, content, seq, finish) in enumerate(checked):
            if seq is None:
                seq, next_seq = next_seq, next_seq + 1
            fields = {"content": content}
            if request_id is not None:
                fields["request_id"] = request_id
            if finish is not None:
                fields["finish_reason"] = finish
            body = json.dumps(fields, ensure_ascii=False)
            seq = _check_seq(f"turns[{i}].seq", seq)
            records.append(Record("turn", tenant, conversation_id, seq, role, body, time.time()))
        if request_id is None:
            await self._write(records)
            return [r.seq for r in records]
        appends = self._appends[(tenant, conversation_id)]
        appends[request_id] = records  # a retry arriving meanwhile waits for these
        try:
            await self._write(records)
        except BaseException:
            if appends.get(request_id) is records:
                del appends[request_id]
            raise
        return [r.seq for r in records]

    async def conversation(
        self, tenant: str, conversation_id: str, last: int | None = None
    ) -> list[dict[str, Any]]:
        """The conversation's turns in order (the ``last`` ones only, if given): ``seq``,
        ``role``, ``content``, ``at`` and, for turns appended with them, ``request_id``
        and ``finish_reason``.

        Raises:
            NotFound: no such conversation for this tenant.
        """
        _check_id("tenant", tenant)
        _check_id("conversation_id", conversation_id)
        async with self._using(("conversation", tenant, conversation_id)):
            turns = sorted(self._turns[(tenant, conversation_id)].values(), key=_seq)
        if not turns:
            raise NotFound(f"conversation {conversation_id!r} not found")
        out = []
        for r in turns:
            body = json.loads(r.body)
            turn = {"seq": r.seq, "role": r.name, "content": body["content"], "at": r.at}
            for extra in ("request_id", "finish_reason"):
                if extra in body:
                    turn[extra] = body[extra]
            out.append(turn)
        return out[-last:] if last else out

    def _next_seq(self, tenant: str, conversation_id: str) -> int:
        used = [
            s
            for (k, t, c, s, _n) in self._pending
            if (k, t, c) == ("turn", tenant, conversation_id)
        ]
        return max([*self._turns[(tenant, conversation_id)], *used], default=-1) + 1

    # -- graph runs ------------------------------------------------------------------------

    async def run_event(
        self,
        tenant: str,
        run_id: str,
        seq: int,
        event: dict[str, Any],
        token: int | None = None,
    ) -> None:
        """Record a run's event (started with its graph and inputs, finished, failed...).

        ``token`` is the writing execution's fencing token (``claim_run``); None writes
        unfenced, for a writer that never resumes runs.

        Raises:
            Fenced: ``token`` is older than the run's: another execution claimed it.
        """
        _check_id("tenant", tenant)
        _check_id("run_id", run_id)
        async with self._using(("run", "", run_id)):
            record = self._run_record("run", tenant, run_id, seq, "event", event)
            self._fence(run_id, token)
            await self._write([record])

    async def checkpoint(
        self,
        tenant: str,
        run_id: str,
        step: int,
        node: str,
        data: dict[str, Any],
        token: int | None = None,
    ) -> None:
        """Record a node's completion: its output and the run state after it.

        Raises:
            Fenced: ``token`` is older than the run's: another execution claimed it.
        """
        _check_id("tenant", tenant)
        _check_id("run_id", run_id)
        async with self._using(("run", "", run_id)):
            record = self._run_record("checkpoint", tenant, run_id, step, node, data)
            self._fence(run_id, token)
            await self._write([record])

    async def claim_run(self, tenant: str, run_id: str, owner: str) -> int:
        """Claim a run for a new execution (a resume); returns its fencing token once the
        claim is durable. From the moment of the call, writes under an older token are
        refused, so every write of an earlier execution that the store accepted is in
        ``run`` when this returns.

        Raises:
            NotFound: no such run for this tenant.
            InvalidRequest: a bad owner.
        """
        _check_id("owner", owner)
        _check_id("tenant", tenant)
        _check_id("run_id", run_id)
        async with self._using(("run", "", run_id)):
            records = self._runs.get(run_id)
            if not records or records[0].tenant != tenant:
                raise NotFound(f"run {run_id!r} not found")
            token = next_token(self._claims.get(run_id, FIRST_TOKEN), self._claiming.get(run_id))
            body = json.dumps({"owner": owner})
            self._claiming[run_id] = token  # from now on, older tokens are refused
            try:
                await self._write(
                    [Record("claim", tenant, run_id, token, owner, body, time.time())]
                )
            finally:
                if self._claiming.get(run_id) == token:
                    del self._claiming[run_id]
            return token

    def _fence(self, run_id: str, token: int | None) -> None:
        if token is None:
            return
        current = self._claims.get(run_id, FIRST_TOKEN)
        check_token(run_id, token, max(current, self._claiming.get(run_id, FIRST_TOKEN)))

    async def run(self, tenant: str, run_id: str) -> dict[str, Any]:
        """A run's events (by seq) and checkpoints, the next free event seq
        (``next_event_seq``) and the run's current fencing token (``token``).

        Raises:
            NotFound: no such run for this tenant.
        """
        _check_id("tenant", tenant)
        _check_id("run_id", run_id)
        async with self._using(("run", "", run_id)):
            records = list(self._runs[run_id])
            token = self._claims.get(run_id, FIRST_TOKEN)
        if not records or records[0].tenant != tenant:
            raise NotFound(f"run {run_id!r} not found")
        # By seq, not by load order: a compacted log need not keep the order of appends.
        events = [json.loads(r.body) for r in sorted(records, key=_seq) if r.kind == "run"]
        checkpoints = [
            {"step": r.seq, "node": r.name, **json.loads(r.body)}
            for r in records
            if r.kind == "checkpoint"
        ]
        next_seq = max((r.seq for r in records if r.kind == "run"), default=-1) + 1
        return {
            "run_id": run_id,
            "events": events,
            "checkpoints": checkpoints,
            "next_event_seq": next_seq,
            "token": token,
        }

    def _run_record(
        self, kind: str, tenant: str, run_id: str, seq: int, name: str, data: dict[str, Any]
    ) -> Record:
        owner = self._runs[run_id]
        if owner and owner[0].tenant != tenant:
            raise NotFound(f"run {run_id!r} not found")
        body = json.dumps(data, ensure_ascii=False, default=str)
        return Record(kind, tenant, run_id, _check_seq("seq", seq), name, body, time.time())

    # -- traces ----------------------------------------------------------------------------

    async def add_traces(self, traces: list[tuple[str, str, list[dict[str, Any]]]]) -> None:
        """Keep finished spans ``(tenant, trace id, spans)`` of traces (sent in batches by
        ``airi_ray/obs/tracing.py``) for ``airi trace``; beyond ``TRACES_KEPT`` traces
        the oldest are dropped."""
        if not isinstance(traces, list) or not traces:
            raise InvalidRequest("traces must be a non-empty list of (tenant, trace id, spans)")
        records = []
        for tenant, trace_id, spans in traces:
            _check_id("trace_id", trace_id)
            if not isinstance(spans, list) or not 0 < len(spans) <= MAX_SPANS_PER_WRITE:
                raise InvalidRequest(f"spans must be a list of 1 to {MAX_SPANS_PER_WRITE} spans")
            # The first span's id makes the batch's identity: a resent batch is kept once.
            seq = int(spans[0]["span_id"], 16) & (2**62 - 1)
            body = json.dumps(spans, ensure_ascii=False, default=str)
            records.append(Record("trace", tenant, trace_id, seq, "spans", body, time.time()))
        await self._write(records)

    async def trace(self, tenant: str, target: str) -> list[dict[str, Any]]:
        """The spans of the traces of a run or request id (or of a trace id), by start.

        Raises:
            NotFound: no such trace for this tenant (kept traces only).
        """
        ids = self._trace_keys.get(target, set()) | ({target} if target in self._traces else set())
        spans = [
            s
            for trace_id in sorted(ids)
            for r in self._traces.get(trace_id, [])
            if r.tenant == tenant
            for s in json.loads(r.body)
        ]
        if not spans:
            raise NotFound(
                f"no trace of {target!r}: give a graph run id, a request id or a trace id of "
                f"one of the last {TRACES_KEPT} traces"
            )
        return sorted(spans, key=lambda s: s["start_ns"])

    def _index_trace(self, r: Record) -> None:
        batches = self._traces.setdefault(r.key, [])
        batches.append(r)
        for s in json.loads(r.body):
            for attr in ("airi.run_id", "airi.request_id"):
                key = s.get("attributes", {}).get(attr)
                if key:
                    self._trace_keys[key].add(r.key)
        while len(self._traces) > TRACES_KEPT:
            _, old = self._traces.popitem(last=False)
            for o in old:
                self._trace_records.pop(o.identity, None)
                for s in json.loads(o.body):
                    for attr in ("airi.run_id", "airi.request_id"):
                        key = s.get("attributes", {}).get(attr)
                        if key and key in self._trace_keys:
                            self._trace_keys[key].discard(o.key)
                            if not self._trace_keys[key]:
                                del self._trace_keys[key]

    # -- LangGraph checkpoints -------------------------------------------------------------
    # The store side of ``airi_ray.langgraph.AiriCheckpointSaver``: payloads arrive serialized
    # by LangGraph's serde; the decisions (live generation, first write wins, listing) are
    # ``airi_ray.core.checkpoints``; the record layout is ``airi_ray.data.checkpoints``.

    async def lg_put(
        self,
        tenant: str,
        thread_id: str,
        ns: str,
        checkpoint: dict[str, Any],
        blobs: list[list[Any]],
    ) -> None:
        """Store a checkpoint of a LangGraph thread and the channel values it changed, once
        durable. The same checkpoint sent again is a retry; a changed one replaces it.

        Args:
            checkpoint: ``{"checkpoint_id", "parent_id", "checkpoint", "metadata", "meta",
                "versions"}``: the serialized checkpoint (without channel values) and
                metadata, the metadata as JSON (for filters), and ``{channel: version}``.
            blobs: ``[channel, version, value]`` for each new channel version; value None
                is an empty channel.

        Raises:
            InvalidRequest: a bad id, namespace, payload or version.
        """
        _check_id("tenant", tenant)
        _check_id("thread_id", thread_id)
        ns = _check_ns(ns)
        if not isinstance(checkpoint, dict):
            raise InvalidRequest("checkpoint must be an object")
        parent = checkpoint.get("parent_id")
        if parent is not None:
            _check_id("parent_id", parent)
        meta, versions = checkpoint.get("meta"), checkpoint.get("versions")
        if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
            raise InvalidRequest("checkpoint.meta must be an object with string keys")
        if not isinstance(versions, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in versions.items()
        ):
            raise InvalidRequest("checkpoint.versions must map channel names to version strings")
        if not isinstance(blobs, list) or len(blobs) > MAX_LG_ITEMS_PER_WRITE:
            raise InvalidRequest(f"blobs must be a list of at most {MAX_LG_ITEMS_PER_WRITE}")
        async with self._using(("thread", tenant, thread_id)):
            generation = self._lg.generation(tenant, thread_id)
            saved = lg.Saved(
                thread_id,
                ns,
                _check_id("checkpoint_id", checkpoint.get("checkpoint_id")),
                parent,
                _check_payload("checkpoint.checkpoint", checkpoint.get("checkpoint")),
                _check_payload("checkpoint.metadata", checkpoint.get("metadata")),
                meta,
                versions,
                generation,
            )
            items: list[lg.Item] = []
            for i, b in enumerate(blobs):
                if not isinstance(b, list) or len(b) != 3:
                    raise InvalidRequest(f"blobs[{i}] must be [channel, version, value]")
                channel, version, value = b
                _check_id(f"blobs[{i}] channel", channel)
                _check_id(f"blobs[{i}] version", version)
                if value is not None:
                    _check_payload(f"blobs[{i}] value", value)
                items.append(lg.Blob(thread_id, ns, channel, version, value, generation))
            kept = lg.next_checkpoint(
                self._lg.checkpoint(tenant, thread_id, ns, saved.checkpoint_id), saved
            )
            # Blobs first: one commit holds them all, but a reader of the index never sees a
            # checkpoint whose values are still missing.
            await self._lg_write(tenant, [*items, *([kept] if kept else [])])

    async def lg_put_writes(
        self,
        tenant: str,
        thread_id: str,
        ns: str,
        checkpoint_id: str,
        task_id: str,
        writes: list[list[Any]],
        task_path: str = "",
    ) -> None:
        """Store a task's writes ``[channel, idx, value]`` against a checkpoint, once
        durable. A regular write (``idx >= 0``) whose ``(task_id, idx)`` is stored already
        is kept as first written; a special one (``idx < 0``) replaces the stored one.

        Raises:
            InvalidRequest: a bad id, namespace, index or payload.
        """
        _check_id("tenant", tenant)
        _check_id("thread_id", thread_id)
        ns = _check_ns(ns)
        _check_id("checkpoint_id", checkpoint_id)
        _check_id("task_id", task_id)
        if not isinstance(task_path, str) or len(task_path) > MAX_ID_CHARS * 16:
            raise InvalidRequest(f"task_path must be a string of at most {MAX_ID_CHARS * 16}")
        if not isinstance(writes, list) or len(writes) > MAX_LG_ITEMS_PER_WRITE:
            raise InvalidRequest(f"writes must be a list of at most {MAX_LG_ITEMS_PER_WRITE}")
        async with self._using(("thread", tenant, thread_id)):
            generation = self._lg.generation(tenant, thread_id)
            incoming = []
            for i, w in enumerate(writes):
                if not isinstance(w, list) or len(w) != 3:
                    raise InvalidRequest(f"writes[{i}] must be [channel, idx, value]")
                channel, idx, value = w
                _check_id(f"writes[{i}] channel", channel)
                if isinstance(idx, bool) or not isinstance(idx, int) or not -100 <= idx < 2**31:
                    raise InvalidRequest(
                        f"writes[{i}] idx must be an integer from -100, got {idx!r}"
                    )
                incoming.append(
                    lg.Write(
                        thread_id,
                        ns,
                        checkpoint_id,
                        task_id,
                        idx,
                        channel,
                        _check_payload(f"writes[{i}] value", value),
                        task_path,
                        generation,
                    )
                )
            if len({w.slot for w in incoming}) != len(incoming):
                raise InvalidRequest("writes has two writes with the same idx")
            existing = self._lg.writes_of(tenant, thread_id, ns, checkpoint_id)
            await self._lg_write(tenant, lg.plan_writes(existing, incoming))

    async def lg_get(
        self, tenant: str, thread_id: str, ns: str, checkpoint_id: str | None = None
    ) -> dict[str, Any] | None:
        """A checkpoint of the tenant's thread (its newest in ``ns`` without an id), with
        its channel values and pending writes; None if there is none (or the thread is
        another tenant's)."""
        _check_id("thread_id", thread_id)
        ns = _check_ns(ns)
        if checkpoint_id is not None:
            _check_id("checkpoint_id", checkpoint_id)
        async with self._using(("thread", tenant, thread_id)):
            found = self._lg.get(tenant, thread_id, ns, checkpoint_id)
        return None if found is None else lg_records.found_to_dict(found)

    async def lg_list(
        self,
        tenant: str,
        thread_id: str | None = None,
        ns: str | None = None,
        checkpoint_id: str | None = None,
        filter: dict[str, Any] | None = None,
        before: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """The tenant's checkpoints newest first: of one thread (all of them if None), of
        one namespace (all if None), with metadata equal to ``filter`` on each of its keys,
        older than checkpoint id ``before``, at most ``limit``.

        Raises:
            InvalidRequest: a bad id, filter or limit.
        """
        if thread_id is not None:
            _check_id("thread_id", thread_id)
        if ns is not None:
            ns = _check_ns(ns)
        if checkpoint_id is not None:
            _check_id("checkpoint_id", checkpoint_id)
        if before is not None:
            _check_id("before", before)
        if filter is not None and (
            not isinstance(filter, dict) or not all(isinstance(k, str) for k in filter)
        ):
            raise InvalidRequest("filter must be an object of metadata keys and values")
        if limit is not None:
            _check_seq("limit", limit)
        query: dict[str, Any] = dict(
            ns=ns, checkpoint_id=checkpoint_id, filter=filter, before=before, limit=limit
        )
        if thread_id is not None:
            async with self._using(("thread", tenant, thread_id)):
                found = self._lg.listing(tenant, thread_id=thread_id, **query)
        else:
            cold = await self._cold_threads(tenant)
            found = lg.newest_first(
                [*self._lg.listing(tenant, **query), *cold.listing(tenant, **query)], limit
            )
        return [lg_records.found_to_dict(f) for f in found]

    async def _cold_threads(self, tenant: str) -> lg.CheckpointIndex:
        """The tenant's LangGraph threads that are not held, read from the log for one call
        (a scan of the tenant's checkpoint records, not kept)."""
        records = await asyncio.to_thread(self._log.load_kinds, lg_records.KINDS, tenant)
        cold = lg.CheckpointIndex()
        for r in records:  # held threads are answered from memory: they have every write
            if ("thread", tenant, r.key) in self._hot:
                continue
            if r.kind == lg_records.TOMBSTONE:
                cold.tombstone(tenant, r.key, r.seq)
            else:
                cold.add(tenant, lg_records.from_record(r))
        return cold

    async def lg_delete_thread(self, tenant: str, thread_id: str) -> None:
        """Delete the tenant's thread (every namespace, checkpoint and write), once durable:
        a tombstone hides it at once; compaction drops its records later."""
        _check_id("tenant", tenant)
        _check_id("thread_id", thread_id)
        async with self._using(("thread", tenant, thread_id)):
            if self._lg.items(tenant, thread_id):
                generation = self._lg.generation(tenant, thread_id)
                await self._write(
                    [lg_records.tombstone(tenant, thread_id, generation, time.time())]
                )

    async def lg_copy_thread(self, tenant: str, source: str, target: str) -> None:
        """Copy every checkpoint and write of the tenant's thread ``source`` to ``target``
        (a missing source copies nothing).

        Raises:
            InvalidRequest: a bad id, or ``source`` equal to ``target``.
        """
        _check_id("tenant", tenant)
        _check_id("source", source)
        _check_id("target", target)
        if source == target:
            raise InvalidRequest("copy_thread needs two different thread ids")
        async with self._using(("thread", tenant, source), ("thread", tenant, target)):
            generation = self._lg.generation(tenant, target)
            moved = [
                dataclasses.replace(i, thread_id=target, generation=generation)
                for i in self._lg.items(tenant, source)
            ]
            items: list[lg.Item] = [i for i in moved if isinstance(i, lg.Blob)]
            writes: dict[tuple[str, str], list[lg.Write]] = defaultdict(list)
            for i in moved:
                if isinstance(i, lg.Write):
                    writes[(i.ns, i.checkpoint_id)].append(i)
            for (ns, cid), group in writes.items():
                items.extend(lg.plan_writes(self._lg.writes_of(tenant, target, ns, cid), group))
            for i in moved:
                if isinstance(i, lg.Saved):
                    kept = lg.next_checkpoint(
                        self._lg.checkpoint(tenant, target, i.ns, i.checkpoint_id), i
                    )
                    items.extend([kept] if kept else [])
            await self._lg_write(tenant, items)

    async def lg_prune(self, tenant: str, thread_ids: list[str], strategy: str) -> None:
        """Prune the tenant's threads: ``keep_latest`` keeps the newest checkpoint of each
        namespace (its writes and values), ``delete`` deletes the threads. One commit: a
        tombstone and the kept items at the thread's next generation.

        Raises:
            InvalidRequest: a bad id or an unknown strategy.
        """
        _check_id("tenant", tenant)
        if strategy not in PRUNE_STRATEGIES:
            raise InvalidRequest(f"strategy must be one of {', '.join(PRUNE_STRATEGIES)}")
        if not isinstance(thread_ids, list) or len(thread_ids) > MAX_LG_THREADS_PER_PRUNE:
            raise InvalidRequest(
                f"thread_ids must be a list of at most {MAX_LG_THREADS_PER_PRUNE} ids"
            )
        threads = list(dict.fromkeys(_check_id("thread_id", t) for t in thread_ids))
        async with self._using(*(("thread", tenant, t) for t in threads)):
            records = []
            for thread_id in threads:
                if self._lg.items(tenant, thread_id):
                    latest = strategy == "keep_latest"
                    kept = self._lg.latest_items(tenant, thread_id) if latest else []
                    records.extend(self._lg_rewrite(tenant, thread_id, kept))
            await self._write(records)

    async def lg_delete_for_runs(self, tenant: str, run_ids: list[str]) -> None:
        """Delete the tenant's checkpoints made by the runs ``run_ids`` (metadata
        ``run_id``), with their writes, in every thread and namespace. One commit: each
        affected thread is rewritten (a tombstone, then what is left at the next
        generation), so this costs the size of those threads.

        Raises:
            InvalidRequest: a bad run id, or too many.
        """
        _check_id("tenant", tenant)
        if not isinstance(run_ids, list) or len(run_ids) > MAX_LG_THREADS_PER_PRUNE:
            raise InvalidRequest(f"run_ids must be a list of at most {MAX_LG_THREADS_PER_PRUNE}")
        runs = {_check_id("run_id", r) for r in run_ids}
        if not runs:
            return
        cold = await self._cold_threads(tenant)
        candidates = {*self._lg.threads_of_runs(tenant, runs), *cold.threads_of_runs(tenant, runs)}
        async with self._using(*(("thread", tenant, t) for t in sorted(candidates))):
            records = []
            for thread_id in self._lg.threads_of_runs(tenant, runs):  # every candidate is held
                kept = self._lg.items_without_runs(tenant, thread_id, runs)
                records.extend(self._lg_rewrite(tenant, thread_id, kept))
            await self._write(records)

    def _lg_rewrite(self, tenant: str, thread_id: str, kept: list[lg.Item]) -> list[Record]:
        """The records that replace a thread by ``kept``: a tombstone of its generation and
        the kept items at the next one (to commit together)."""
        now = time.time()
        generation = self._lg.generation(tenant, thread_id)
        return [
            lg_records.tombstone(tenant, thread_id, generation, now),
            *(
                lg_records.to_record(tenant, dataclasses.replace(i, generation=generation + 1), now)
                for i in kept
            ),
        ]

    async def _lg_write(self, tenant: str, items: list[lg.Item]) -> None:
        """Write items; one whose record is stored already (or being committed) with other
        content is not written again: the first one wins (blobs, regular writes)."""
        now = time.time()
        records = []
        for item in items:
            r = lg_records.to_record(tenant, item, now)
            pending = self._pending.get(r.identity)
            if pending is not None:
                records.append(pending[0])  # wait for the one being committed
            elif self._stored(r.identity) is None:
                records.append(r)
        await self._write(records)

    def _index_lg(self, r: Record, held: dict[Identity, Record]) -> None:
        thread = (r.tenant, r.key)
        if r.kind == lg_records.TOMBSTONE:
            self._lg.tombstone(r.tenant, r.key, r.seq)
            # The dead records need no idempotency any more: free them now.
            dead = [i for i in held if i[0] in lg_records.ITEM_KINDS and i[3] <= r.seq]
            for identity in dead:
                del held[identity]
            if dead:
                self._drop_later(thread, r.seq + 1)
        elif r.seq < self._lg.generation(r.tenant, r.key):
            # Read after its thread's tombstone: the drop had not run yet (a restart).
            held.pop(r.identity, None)
            self._drop_later(thread, self._lg.generation(r.tenant, r.key))
        else:
            self._lg.add(r.tenant, lg_records.from_record(r))

    def _drop_later(self, thread: tuple[str, str], below: int) -> None:
        """Have compaction drop the thread's item records of generations below ``below``."""
        self._lg_dead[thread] = max(self._lg_dead.get(thread, 0), below)

    async def _compact_lg(self) -> None:
        """Drop the records of deleted LangGraph threads from the log."""
        for (tenant, thread_id), below in list(self._lg_dead.items()):
            await asyncio.to_thread(self._log.drop, lg_records.ITEM_KINDS, tenant, thread_id, below)
            if self._lg_dead.get((tenant, thread_id)) == below:
                del self._lg_dead[(tenant, thread_id)]

    # -- writing ---------------------------------------------------------------------------

    async def _write(self, records: list[Record]) -> None:
        """Queue ``records`` for the next group commit and wait until it is durable."""
        waits = []
        new: list[tuple[Record, asyncio.Future[None]]] = []
        for r in records:
            done = self._stored(r.identity)
            if done is None:
                pending = self._pending.get(r.identity)
                if pending is not None:
                    done = pending[0]
                    waits.append(pending[1])
            if done is not None:
                if done.body != r.body:
                    raise Conflict(
                        f"{r.kind} {r.key!r} #{r.seq} {r.name!r} is already stored with "
                        "different content; a retry must resend the same content"
                    )
                continue
            if any(r.identity == n.identity for n, _ in new):
                raise InvalidRequest(f"{r.kind} #{r.seq} {r.name!r} appears twice in one write")
            new.append((r, asyncio.get_running_loop().create_future()))
        for r, fut in new:
            self._pending[r.identity] = (r, fut)
            if (k := _hot_key(r)) is not None:
                self._busy[k] += 1  # not evicted before its commit is indexed
            self._queue.append(r)
            waits.append(fut)
        if new and (self._writer is None or self._writer.done()):
            self._writer = asyncio.get_running_loop().create_task(self._commit_loop())
        if waits:
            await asyncio.gather(*[asyncio.shield(f) for f in waits])

    async def _commit_loop(self) -> None:
        """Commit what is queued, one group per commit, until the queue is empty."""
        while self._queue:
            group, self._queue = self._queue, []
            try:
                await asyncio.to_thread(self._log.append, group)
            except Exception as e:  # not durable: fail these writes, keep serving
                logger.exception("context store commit of %d records failed", len(group))
                for r in group:
                    self._settle(r).set_exception(
                        RuntimeError(f"the context store could not commit: {e}")
                    )
                continue
            for r in group:
                self._index(r)
                self._settle(r).set_result(None)
            self.commits += 1
            if self.commits % COMPACT_EVERY == 0:
                self._start_compaction()

    def _settle(self, r: Record) -> asyncio.Future[None]:
        """Take ``r`` out of the writes in flight; returns the future its writers wait on."""
        _, fut = self._pending.pop(r.identity)
        if (k := _hot_key(r)) is not None:
            self._busy[k] -= 1
            if not self._busy[k]:
                del self._busy[k]
        return fut

    def _start_compaction(self) -> None:
        """Compact in the background unless a compaction is running: commits go on."""
        if self._compactor is None or self._compactor.done():
            self._compactor = asyncio.get_running_loop().create_task(self._compact())

    async def _compact(self) -> None:
        """Prune old traces, drop deleted threads, merge the log's files (on threads: the
        commit loop keeps committing meanwhile; LanceDB rebases appends over it)."""
        try:
            if len(self._traces) >= TRACES_KEPT:
                oldest = min(r.at for r in next(iter(self._traces.values())))
                await asyncio.to_thread(self._log.prune, "trace", oldest)
            await self._compact_lg()
            await asyncio.to_thread(self._log.compact)
        except Exception:  # compaction only saves space; the data is safe without it
            logger.exception("context store compaction failed")

    def _index(self, r: Record) -> None:
        if r.kind == "trace":
            self._trace_records[r.identity] = r
            self._index_trace(r)
            return
        k = _hot_key(r)
        held = self._hot.get(k) if k is not None else None
        if held is None:  # an unknown kind, or a key not held: the log has it
            return
        held[r.identity] = r
        if r.kind == "turn":
            self._turns[(r.tenant, r.key)][r.seq] = r
            request_id = json.loads(r.body).get("request_id")
            if request_id is not None:
                appended = self._appends[(r.tenant, r.key)].setdefault(request_id, [])
                if all(a.identity != r.identity for a in appended):
                    appended.append(r)
                    appended.sort(key=lambda a: a.seq)
        elif r.kind in ("run", "checkpoint"):
            self._runs[r.key].append(r)
        elif r.kind == "claim":
            self._claims[r.key] = max(self._claims.get(r.key, FIRST_TOKEN), r.seq)
        elif r.kind in lg_records.KINDS:
            self._index_lg(r, held)

    # -- introspection ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "records": sum(map(len, self._hot.values())) + len(self._trace_records),
            "hot_keys": len(self._hot),
            "conversations": len(self._turns),
            "runs": len(self._runs),
            "traces": len(self._traces),
            "commits": self.commits,
            "loads": self.loads,
            "compacting": self._compactor is not None and not self._compactor.done(),
            "pending": len(self._pending),
            "pid": os.getpid(),
        }

    async def ping(self) -> bool:
        return True
