"""``ModelReplica``: one vLLM engine in a Ray actor, streaming over per-caller channels.

A Ray message per token would cost more than generating it (about 0.7 ms per message
against about 0.1 ms per token of the demo model), so tokens do not travel one stream per
request. Each caller opens one *channel* per replica: a single streaming Ray call that
carries, per wake-up, the new tokens of every request that caller has on this replica, the
way vLLM's engine core sends one message per step to its front end. Requests are submitted
in batches with ``submit``; closing a channel (the caller went away) aborts its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from airi_ray.config import ModelSpec
from airi_ray.core.batching import BatchWindow
from airi_ray.core.errors import InvalidRequest, ReplicaUnavailable
from airi_ray.core.requests import Logprobs
from airi_ray.engines.vllm_engine import Engine, explain_failure
from airi_ray.runtime.cache_events import CacheReporter, new_endpoint
from airi_ray.runtime.outbox import Outbox

logger = logging.getLogger(__name__)

# One channel item: (request_id, new_text, new_token_ids, finish_reason, error_message,
# logprobs); finish_reason "invalid" (this request failed; the engine serves on) or
# "engine_error" (the engine died) carries an error instead of tokens; logprobs is None
# unless the request asked for them.
# A tuple rather than a dataclass: it is pickled once per request per engine step.
Delta = tuple[str, str, list[int], str | None, str | None, Logprobs | None]


# One embedding call waiting for its batch: its inputs, output dimensions and result.
_EmbedCall = tuple[list[list[int]], int | None, "asyncio.Future[Any]"]


class _Channel(Outbox[Delta]):
    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, asyncio.Task[None]] = {}


class ModelReplica:
    """Holds one engine; created by the controller, addressed by its replica id."""

    def __init__(self, replica_id: str, spec: dict[str, Any]) -> None:
        self.replica_id = replica_id
        self.spec = ModelSpec.model_validate(spec)
        self._engine: Any = None
        self._loading: asyncio.Future[Any] | None = None
        self._dead: str | None = None  # why the engine failed, once it has
        self._injected_delay_s = 0.0  # fault injection (``inject_delay``)
        self._channels: dict[str, _Channel] = {}
        self.started_at = time.time()
        self._batch = BatchWindow(
            self.spec.max_batch_size,
            min_wait_s=min(0.001, self.spec.max_batch_wait_ms / 1000),
            max_wait_s=self.spec.max_batch_wait_ms / 1000,
        )
        self._batch_items: dict[str, _EmbedCall] = {}
        self._batch_wake = asyncio.Event()
        self._batcher: asyncio.Task[None] | None = None
        self._cache_reporter: CacheReporter | None = None

    async def start(self) -> dict[str, Any]:
        """Load the engine (slow: weights, warm-up) and report what callers need."""
        # One load, however many callers ask (a restarted controller asks again).
        if self._loading is None:
            endpoint = None
            if self.spec.prefix_cache_view == "engine":
                endpoint = new_endpoint()
                self._cache_reporter = CacheReporter(self.replica_id, endpoint)
            self._loading = asyncio.ensure_future(asyncio.to_thread(Engine, self.spec, endpoint))
        self._engine = await asyncio.shield(self._loading)
        if self._cache_reporter is not None:
            self._cache_reporter.start()
        return {
            "replica_id": self.replica_id,
            "max_model_len": self._engine.max_model_len,
            "kv_capacity_tokens": self._engine.kv_capacity_tokens,
            "step_tokens": getattr(self._engine, "step_tokens", None),
        }

    # -- generation over channels ------------------------------------------------------

    def submit(self, channel_id: str, calls: list[tuple[str, list[int], dict[str, Any]]]) -> None:
        """Start requests ``(request_id, prompt_token_ids, params)``; outputs go to the channel."""
        channel = self._channels.setdefault(channel_id, _Channel())
        for request_id, prompt_ids, params in calls:
            channel.tasks[request_id] = asyncio.create_task(
                self._run(channel, request_id, prompt_ids, params)
            )

    async def _run(
        self, channel: _Channel, request_id: str, prompt_ids: list[int], params: dict[str, Any]
    ) -> None:
        finished = False
        if self._dead is not None:  # every later request would hang on a dead engine
            channel.push(
                (request_id, "", [], "engine_error", f"the engine died: {self._dead}", None)
            )
            channel.tasks.pop(request_id, None)
            return
        try:
            if self._injected_delay_s:
                await asyncio.sleep(self._injected_delay_s)
            limit = self._engine.max_model_len
            if len(prompt_ids) >= limit:  # refused here: some engines die on it instead
                raise ValueError(
                    f"the prompt has {len(prompt_ids)} tokens; this replica's context window "
                    f"is {limit}"
                )
            async for text, ids, finish, lp in self._engine.generate(
                request_id, prompt_ids, params
            ):
                finished = finish is not None
                channel.push((request_id, text, ids, finish, None, lp))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            dead, why = self._failure(e, request_id)
            channel.push((request_id, "", [], "engine_error" if dead else "invalid", why, None))
        else:
            if not finished:  # the engine aborted it (e.g. an abort from another path)
                channel.push((request_id, "", [], "abort", None, None))
        finally:
            channel.tasks.pop(request_id, None)

    def _failure(self, e: Exception, request_id: str) -> tuple[bool, str]:
        """Classify an engine exception: death marks this replica dead for good (the
        controller replaces it); anything else failed this one request only."""
        dead, why = explain_failure(e)
        if dead:
            if self._dead is None:
                logger.error("the engine died serving %s: %s", request_id, e)
                self._dead = why
        else:
            logger.info("request %s failed in the engine: %s", request_id, why)
        return dead, why

    async def open_channel(self, channel_id: str) -> AsyncIterator[list[Delta]]:
        """Stream lists of deltas, one list per wake-up, until the caller closes it."""
        channel = self._channels.setdefault(channel_id, _Channel())
        try:
            async for batch in channel.batches():
                yield batch
        finally:
            # The caller is gone: nobody will read these tokens, stop computing them.
            self._channels.pop(channel_id, None)
            for task in list(channel.tasks.values()):
                task.cancel()

    async def abort(self, request_ids: list[str]) -> None:
        """Abort requests whose callers stopped reading (cancelling the task aborts in vLLM)."""
        for channel in self._channels.values():
            for rid in request_ids:
                task = channel.tasks.pop(rid, None)
                if task is not None:
                    task.cancel()

    def inject_delay(self, seconds: float) -> None:
        """Fault injection for drills (like a service mesh's delay fault): hold every new
        generation ``seconds`` before it reaches the engine; 0 ends it. Reachable only
        through the replica's Ray actor handle, never from the HTTP API."""
        if not 0 <= seconds <= 60:
            raise ValueError(f"delay must be 0 to 60 seconds, got {seconds}")
        self._injected_delay_s = float(seconds)

    # -- embeddings, health, stats -----------------------------------------------------

    async def embed(
        self,
        token_ids: list[list[int]],
        deadline_s: float | None = None,
        dimensions: int | None = None,
    ) -> list[list[float]]:
        """Embed pre-tokenized inputs. Calls arriving within the batching window go to the
        engine as one batch; ``deadline_s`` (seconds from now) caps the wait;
        ``dimensions`` truncates the vectors (Matryoshka models only).

        Raises:
            InvalidRequest: the engine refused these inputs (it serves on).
            ReplicaUnavailable: the engine died (the call is retried elsewhere).
        """
        if self._dead is not None:
            raise ReplicaUnavailable(f"replica {self.replica_id}: the engine died: {self._dead}")
        item_id = uuid.uuid4().hex
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self._batch_items[item_id] = (token_ids, dimensions, future)
        self._batch.add(item_id, now, None if deadline_s is None else now + deadline_s)
        self._batch_wake.set()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._run_batches())
        try:
            return await asyncio.shield(future)
        finally:
            self._batch_items.pop(item_id, None)

    async def _run_batches(self) -> None:
        while len(self._batch):
            now = time.monotonic()
            at = self._batch.next_flush_at(now)
            if at is not None and at > now:
                self._batch_wake.clear()
                with contextlib.suppress(TimeoutError):  # woken early by a new call
                    await asyncio.wait_for(self._batch_wake.wait(), at - now)
                continue
            items = [self._batch_items.get(i) for i in self._batch.take(now)]
            calls = [c for c in items if c is not None and not c[2].done()]
            inputs = [x for ids, _, _ in calls for x in ids]
            dims = [d for ids, d, _ in calls for _ in ids]
            try:
                vectors = await self._engine.embed(inputs, dims) if inputs else []
            except Exception as e:
                await self._fail_batch(calls, e)
                continue
            offset = 0
            for ids, _, future in calls:
                if not future.done():
                    future.set_result(vectors[offset : offset + len(ids)])
                offset += len(ids)

    async def _fail_batch(self, calls: list[_EmbedCall], e: Exception) -> None:
        """A batch failed: if the engine died, all of it; else each call is run alone, so
        only the call that caused it fails (with InvalidRequest, the engine serves on)."""
        dead, why = self._failure(e, "an embedding batch")
        if dead:
            for _, _, future in calls:
                if not future.done():
                    future.set_exception(ReplicaUnavailable(f"replica {self.replica_id}: {why}"))
            return
        if len(calls) == 1:
            _, _, future = calls[0]
            if not future.done():
                future.set_exception(InvalidRequest(f"the engine refused the input: {why}"))
            return
        for call in calls:
            ids, dim, future = call
            if future.done():
                continue
            try:
                future.set_result(await self._engine.embed(ids, [dim] * len(ids)))
            except Exception as one:
                await self._fail_batch([call], one)

    async def probe(self) -> float:
        """A real one-token generation (or one embedding) bounded by the spec's timeout."""
        if self._dead is not None:
            raise RuntimeError(f"the engine died: {self._dead}")
        return await self._engine.probe(self.spec.probe_timeout_s)

    def stats(self) -> dict[str, Any]:
        s = self._engine.stats if self._engine is not None else None
        return {
            "replica_id": self.replica_id,
            "running": s.running if s else 0,
            "waiting": s.waiting if s else 0,
            "kv_cache_usage": s.kv_cache_usage if s else 0.0,
            "prefix_cache_queries": s.prefix_cache_queries if s else 0,
            "prefix_cache_hits": s.prefix_cache_hits if s else 0,
            "channels": len(self._channels),
            "in_flight": sum(len(c.tasks) for c in self._channels.values()),
            "embed_batches": sum(self._batch.batch_sizes.values()),
            "embed_batch_items": sum(k * n for k, n in self._batch.batch_sizes.items()),
            **(self._cache_reporter.stats() if self._cache_reporter is not None else {}),
        }

    def shutdown(self) -> None:
        """Stop the engine and every process it started (its engine core and workers
        would outlive this actor's process otherwise)."""
        import psutil

        children = psutil.Process().children(recursive=True)
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        if self._cache_reporter is not None:  # after the engine: it removes the socket
            self._cache_reporter.stop()
