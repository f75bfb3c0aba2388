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
one that does not exist, so ids cannot be probed. Everything is also held in memory
(materialised from the log at start), so reads cost no I/O; a restarted actor reloads the
log and serves on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict, defaultdict
from typing import Any

from airi_ray.core.errors import Conflict, InvalidRequest, NotFound
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

Identity = tuple[str, str, str, int, str]


def _check_id(what: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise InvalidRequest(f"{what} must be a string of 1 to {MAX_ID_CHARS} characters")
    return value


def _check_seq(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        raise InvalidRequest(f"{what} must be a non-negative integer, got {value!r}")
    return value


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
    """

    def __init__(self, uri: str | None = None, log: RecordLog | None = None) -> None:
        if log is None:
            if uri is None:
                raise ValueError("ContextStore needs a storage uri or a log")
            log = LanceRecordLog(uri)
        self._log = log
        self._records: dict[Identity, Record] = {}
        self._turns: dict[tuple[str, str], dict[int, Record]] = defaultdict(dict)
        # (tenant, conversation id, request id) -> the turns that request appended
        self._appends: dict[tuple[str, str, str], list[Record]] = {}
        self._runs: dict[str, list[Record]] = defaultdict(list)  # run id -> events, checkpoints
        self._traces: OrderedDict[str, list[Record]] = OrderedDict()  # trace id -> span batches
        self._trace_keys: dict[str, set[str]] = defaultdict(set)  # run/request id -> trace ids
        self._pending: dict[Identity, tuple[Record, asyncio.Future[None]]] = {}
        self._queue: list[Record] = []
        self._writer: asyncio.Task[None] | None = None
        self.commits = 0
        start = time.perf_counter()
        for r in log.load():
            self._index(r)
        logger.info(
            "context store: %d records loaded in %.2fs",
            len(self._records),
            time.perf_counter() - start,
        )

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
        if request_id is not None:
            first = self._appends.get((tenant, conversation_id, request_id))
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
        key = (tenant, conversation_id, request_id)
        self._appends[key] = records  # a retry arriving meanwhile waits for these
        try:
            await self._write(records)
        except BaseException:
            if self._appends.get(key) is records:
                del self._appends[key]
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
        turns = self._turns.get((tenant, conversation_id))
        if not turns:
            raise NotFound(f"conversation {conversation_id!r} not found")
        out = []
        for r in sorted(turns.values(), key=lambda r: r.seq):
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
        return max([*self._turns.get((tenant, conversation_id), {}), *used], default=-1) + 1

    # -- graph runs ------------------------------------------------------------------------

    async def run_event(self, tenant: str, run_id: str, seq: int, event: dict[str, Any]) -> None:
        """Record a run's event (started with its graph and inputs, finished, failed...)."""
        await self._write([self._run_record("run", tenant, run_id, seq, "event", event)])

    async def checkpoint(
        self, tenant: str, run_id: str, step: int, node: str, data: dict[str, Any]
    ) -> None:
        """Record a node's completion: its output and the run state after it."""
        await self._write([self._run_record("checkpoint", tenant, run_id, step, node, data)])

    async def run(self, tenant: str, run_id: str) -> dict[str, Any]:
        """A run's events and checkpoints, in order.

        Raises:
            NotFound: no such run for this tenant.
        """
        records = self._runs.get(run_id)
        if not records or records[0].tenant != tenant:
            raise NotFound(f"run {run_id!r} not found")
        events = [json.loads(r.body) for r in records if r.kind == "run"]
        checkpoints = [
            {"step": r.seq, "node": r.name, **json.loads(r.body)}
            for r in records
            if r.kind == "checkpoint"
        ]
        return {"run_id": run_id, "events": events, "checkpoints": checkpoints}

    def _run_record(
        self, kind: str, tenant: str, run_id: str, seq: int, name: str, data: dict[str, Any]
    ) -> Record:
        _check_id("tenant", tenant)
        _check_id("run_id", run_id)
        owner = self._runs.get(run_id)
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
                self._records.pop(o.identity, None)
                for s in json.loads(o.body):
                    for attr in ("airi.run_id", "airi.request_id"):
                        key = s.get("attributes", {}).get(attr)
                        if key and key in self._trace_keys:
                            self._trace_keys[key].discard(o.key)
                            if not self._trace_keys[key]:
                                del self._trace_keys[key]

    # -- writing ---------------------------------------------------------------------------

    async def _write(self, records: list[Record]) -> None:
        """Queue ``records`` for the next group commit and wait until it is durable."""
        waits = []
        new: list[tuple[Record, asyncio.Future[None]]] = []
        for r in records:
            done = self._records.get(r.identity)
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
                    _, fut = self._pending.pop(r.identity)
                    fut.set_exception(RuntimeError(f"the context store could not commit: {e}"))
                continue
            for r in group:
                self._index(r)
                _, fut = self._pending.pop(r.identity)
                fut.set_result(None)
            self.commits += 1
            if self.commits % COMPACT_EVERY == 0:
                await self._compact()

    async def _compact(self) -> None:
        try:
            if len(self._traces) >= TRACES_KEPT:
                oldest = min(r.at for r in next(iter(self._traces.values())))
                await asyncio.to_thread(self._log.prune, "trace", oldest)
            await asyncio.to_thread(self._log.compact)
        except Exception:  # compaction only saves space; the data is safe without it
            logger.exception("context store compaction failed")

    def _index(self, r: Record) -> None:
        self._records[r.identity] = r
        if r.kind == "turn":
            self._turns[(r.tenant, r.key)][r.seq] = r
            request_id = json.loads(r.body).get("request_id")
            if request_id is not None:
                appended = self._appends.setdefault((r.tenant, r.key, request_id), [])
                if all(a.identity != r.identity for a in appended):
                    appended.append(r)
                    appended.sort(key=lambda a: a.seq)
        elif r.kind in ("run", "checkpoint"):
            self._runs[r.key].append(r)
        elif r.kind == "trace":
            self._index_trace(r)

    # -- introspection ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "records": len(self._records),
            "conversations": len(self._turns),
            "runs": len(self._runs),
            "traces": len(self._traces),
            "commits": self.commits,
            "pending": len(self._pending),
            "pid": os.getpid(),
        }

    async def ping(self) -> bool:
        return True
