"""The call path every model call takes: acquire a lease, stream from the replica, release.

``CallPath`` lives in the caller's process (an ingress replica, a driver using the Python
client, the graph executor) and is bound to one asyncio loop. Per request it enters at
the scheduler's front door (the tenant's limits that need no tokens: request shape, ACL,
concurrency, budget, requests/minute), tokenizes (applying the chat template; a long
prompt on a worker thread, so the loop keeps serving other streams), refuses what cannot
fit the context window, acquires a lease from the scheduler, streams tokens straight from
the chosen replica over that replica's channel, and releases the lease with the real
usage. A request whose replica dies before it produced a token is retried on another
replica.

Messages to actors are coalesced per event-loop turn (submits per replica, releases to
the scheduler): a Ray call costs about as much as generating several tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import math
import os
import random
import time
import uuid
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import ray
from opentelemetry import trace as otel_trace

from airi_ray.config import SYSTEM_TENANT
from airi_ray.core.context import ChunkLike, ContextWindow, build_context
from airi_ray.core.errors import (
    AiriError,
    ContextWindowExceeded,
    InvalidRequest,
    ModelNotFound,
    ReplicaUnavailable,
    SchedulerStarting,
    StaleState,
)
from airi_ray.core.policy import (
    AuditEvent,
    FilterConfig,
    FilterSet,
    SemanticFilter,
    allows,
    finding_events,
    refusal_event,
    semantic_windows,
)
from airi_ray.core.quality import is_refusal
from airi_ray.core.requests import (
    CallOptions,
    ChatMessage,
    GenerationParams,
    Logprobs,
    Position,
    Usage,
    probe_head,
    refuse_long_head,
    resolve_max_tokens,
    words_floor,
)
from airi_ray.core.retries import (
    MAX_ATTEMPTS,
    Failure,
    Migration,
    Replay,
    Retry,
    after_failure,
    continued_params,
    migration,
    replayable,
    scheduler_retry_delay,
)
from airi_ray.core.scheduling import AcquireRequest, Lease, block_hashes
from airi_ray.engines.source import resolve_model_source
from airi_ray.obs.tracing import Span, tracing
from airi_ray.runtime.background import soon, spawn
from airi_ray.runtime.names import (
    CONTEXT_STORE_NAME,
    CONTROLLER_NAME,
    OBSERVER_NAME,
    SCHEDULER_NAME,
    get_actor,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
# The scheduler takes back what a caller holds once it is silent for CallerBook's ttl
# (10 s): an idle caller says it is alive well within that.
HEARTBEAT_S = 2.0
MODEL_INFO_TTL_S = 5.0
# Waits between asks for fresh model infos while the controller restarts (about 8 s in all).
WINDOW_REFRESH_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)
MAX_EMBEDDING_INPUTS = 2048  # per request, as OpenAI caps it
DEFAULT_OPTIONS = CallOptions()
FILTER_FIELDS = set(FilterConfig.__dataclass_fields__)
OBSERVE_EVERY_S = 0.25  # finished calls go to the observer in batches at most this often
REFUSAL_PREFIX_CHARS = 200  # refusals show at the start of an answer
# Prompts longer than this are rendered and tokenized on the call path's worker thread: the
# tokenizer takes about 0.3 us a character (16k characters: 5 ms), which on the event loop
# would stall every stream the process serves. Shorter ones cost less than the thread hop.
OFFLOAD_CHARS = 2_048
TEMPLATE_TOKENS = 8  # chat-template tokens around one message, at most, for the models we serve
DEFAULT_RESERVE_TOKENS = 512  # kept for the answer when a fitted call sets no max_tokens


def token_ids(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer(text)["input_ids"]``, holding the GIL as briefly as it can.

    A fast tokenizer's Rust ``encode_batch`` lets go of the GIL while it works, but the
    ``transformers`` wrapper around it spends as long again in Python building attention
    masks and a ``BatchEncoding``, with the GIL held: on the worker thread that is time the
    event loop cannot run. Called straight, the Rust tokenizer gives the same ids (the
    wrapper's own ``__call__`` makes this very call) with the GIL held only to copy them.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    ids: list[int] = backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    return ids


def _draw_seed() -> int:
    """A sampling seed for a request that has none (``replayable``): any is as fair."""
    return random.getrandbits(63)


def _count_tokens(tokenizer: Any, text: str) -> int:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(backend.encode_batch([text], add_special_tokens=False)[0])


def _words_floor(tokenizer: Any, text: str) -> int | None:
    """``words_floor`` for this tokenizer: at least this many tokens, or None (unknown)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pre = backend.pre_tokenizer
    if pre is not None and type(pre).__name__ == "ByteLevel" and not pre.use_regex:
        return None  # one pre-token for the whole text
    name = type(pre).__name__ if pre is not None else None
    return words_floor(text, name, backend.normalizer is not None)


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(source))
    # The first call clears truncation and padding settings saved with the tokenizer, a
    # write that would race a call on the worker thread; later calls only read.
    tokenizer("warm-up")
    return tokenizer


def unwrap_error(e: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error, if there is one."""
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, AiriError):
        return e.cause
    return e


def _log_failure(what: str) -> Callable[[Any], None]:
    """A done-callback for a message whose answer nobody awaits: its failure is logged,
    not lost (a release the scheduler failed to apply is a slot the model lacks)."""

    def check(fut: Any) -> None:
        try:
            err = fut.exception()
        except BaseException as e:  # cancelled: the process is closing
            err = e
        if err is not None and not isinstance(err, asyncio.CancelledError):
            logger.warning("sending %s to the scheduler failed: %s", what, err)

    return check


class ReplicaDied(Exception):
    """The replica's actor died while serving the request."""


class _Coalescer(Generic[T]):
    """Collects items during one event-loop turn (or ``delay_s``) and hands them to
    ``flush`` as one list."""

    def __init__(self, flush: Callable[[list[T]], None], delay_s: float = 0.0) -> None:
        self._flush = flush
        self._delay_s = delay_s
        self._items: list[T] = []

    def add(self, item: T) -> None:
        if not self._items:
            # Sent outside the adding call's context: a batch holds other calls' messages
            # (and a release), which must not be cancelled with that one call.
            soon(self.flush, self._delay_s)  # or collect for a while, for messages that may wait
        self._items.append(item)

    def flush(self) -> None:
        """Hand over what is collected now (also what a closing caller still holds)."""
        items, self._items = self._items, []
        if items:
            self._flush(items)


MAX_REFRESH_BACKOFF_S = 30.0  # the longest wait between refreshes that fail


class Cached(Generic[T]):
    """A value fetched at most once per ``ttl_s``; concurrent callers share one fetch.

    A stale value is returned at once while a refresh runs in the background, so a burst
    of requests neither waits for nor multiplies the fetch; ``get(fresh=True)`` waits. A
    refresh that fails keeps the stale value and says so in the log (``what`` names the
    value there), and the next one waits a backoff (doubling from ``ttl_s`` up to
    ``MAX_REFRESH_BACKOFF_S``), so an unreachable source is not asked once per request.

    With ``max_age_s``, a value older than that is not served at all: ``get`` raises
    ``StaleState`` (503) saying since when refreshes fail. A key ring that cannot be
    refreshed would otherwise keep revoked keys working and refuse new ones for as long
    as the controller is unreachable.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[T]],
        ttl_s: float,
        what: str = "a cached value",
        max_age_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._what = what
        self._ttl_s = ttl_s
        self._max_age_s = max_age_s
        self._clock = clock
        self._value: T | None = None
        self._at = -math.inf
        self._task: asyncio.Future[None] | None = None
        self._failures = 0
        self._retry_at = -math.inf
        self._error: BaseException | None = None

    async def get(self, fresh: bool = False) -> T:
        now = self._clock()
        due = now - self._at > self._ttl_s and now >= self._retry_at
        if (due or fresh) and (self._task is None or self._task.done()):
            self._task = spawn(self._load())
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        too_old = self._max_age_s is not None and now - self._at > self._max_age_s
        if self._task is not None:
            if fresh or self._value is None:
                await asyncio.shield(self._task)
            elif too_old:  # worth waiting for: it is refused otherwise
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._task)
        assert self._value is not None
        if self._max_age_s is not None and self._clock() - self._at > self._max_age_s:
            raise StaleState(
                f"{self._what} could not be refreshed for {self._clock() - self._at:.0f}s "
                f"(last error: {type(self._error).__name__}: {self._error}); it is not used "
                f"once older than {self._max_age_s:.0f}s. Retry when the controller is back"
            )
        return self._value

    async def _load(self) -> None:
        try:
            value = await self._fetch()
        except Exception as e:
            self._failures += 1
            self._error = e
            backoff = min(self._ttl_s * 2**self._failures, MAX_REFRESH_BACKOFF_S)
            self._retry_at = self._clock() + backoff
            if self._value is not None:
                logger.warning(
                    "refreshing %s failed (%d in a row), still using the one from %.0fs ago; "
                    "next try in %.1fs: %s: %s",
                    self._what,
                    self._failures,
                    self._clock() - self._at,
                    backoff,
                    type(e).__name__,
                    e,
                )
            raise
        self._value = value
        self._at = self._clock()
        self._failures = 0
        self._retry_at = -math.inf
        self._error = None


# What a request's queue holds: (text, token_ids, finish_reason, error, logprobs).
_Item = tuple[str, list[int], str | None, str | None, Logprobs | None]


def _merge_logprobs(a: Logprobs | None, b: Logprobs | None) -> Logprobs | None:
    if a is None or b is None:
        return a or b
    return Logprobs(a.tokens + b.tokens, a.prompt or b.prompt)


class ReplicaChannel:
    """This process's single stream from one replica, demultiplexed to its requests."""

    def __init__(self, replica_id: str, handle: Any, channel_id: str) -> None:
        self.replica_id = replica_id
        self._handle = handle
        self._channel_id = channel_id
        self._queues: dict[str, asyncio.Queue[_Item | BaseException]] = {}
        self._submits = _Coalescer[tuple[str, list[int], dict[str, Any]]](self._send_submits)
        self._aborts = _Coalescer[str](self._send_aborts)
        self._reader: asyncio.Task[None] | None = None
        self.dead: BaseException | None = None

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: dict[str, Any]
    ) -> AsyncIterator[tuple[str, list[int], str | None, Logprobs | None]]:
        """Yield ``(text, token_ids, finish_reason, logprobs)``; leaving early aborts the
        request."""
        if self.dead is not None:
            raise ReplicaDied(str(self.dead))
        if self._reader is None:
            self._reader = spawn(self._read())
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[request_id] = queue
        self._submits.add((request_id, prompt_ids, params))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                text, ids, finish, error, lp = item
                while not queue.empty() and finish is None:  # merge what piled up meanwhile
                    more = queue.get_nowait()
                    if isinstance(more, BaseException):
                        queue.put_nowait(more)
                        break
                    text, ids, finish, error = text + more[0], ids + more[1], more[2], more[3]
                    lp = _merge_logprobs(lp, more[4])
                if finish == "invalid":
                    raise InvalidRequest(f"the engine refused the request: {error}")
                if finish == "engine_error":  # like a dead replica: retried if nothing was sent
                    raise ReplicaDied(f"replica {self.replica_id}: {error}")
                finished = finish is not None
                yield text, ids, finish, lp
        finally:
            self._queues.pop(request_id, None)
            if not finished and self.dead is None:
                self._aborts.add(request_id)

    def _send_submits(self, calls: list[tuple[str, list[int], dict[str, Any]]]) -> None:
        ref = self._handle.submit.remote(self._channel_id, calls)
        ref.future().add_done_callback(lambda f: self._on_send_done(f, [c[0] for c in calls]))

    def _send_aborts(self, request_ids: list[str]) -> None:
        self._handle.abort.remote(request_ids).future().add_done_callback(lambda f: f.exception())

    def _on_send_done(self, fut: Any, request_ids: list[str]) -> None:
        err = fut.exception()
        if err is not None:  # the replica could not take them: their callers see why
            loop = self._reader.get_loop() if self._reader else None
            if loop is not None:
                loop.call_soon_threadsafe(self._fail, request_ids, ReplicaDied(str(err)))

    def _fail(self, request_ids: list[str], err: BaseException) -> None:
        for rid in request_ids:
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(err)

    async def _read(self) -> None:
        gen = self._handle.open_channel.options(num_returns="streaming").remote(self._channel_id)
        try:
            async for ref in gen:
                for rid, text, ids, finish, error, lp in await ref:
                    q = self._queues.get(rid)
                    if q is not None:
                        q.put_nowait((text, ids, finish, error, lp))
            raise RuntimeError("the replica closed the channel")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.dead = e
            self._fail(list(self._queues), ReplicaDied(f"replica {self.replica_id}: {e}"))

    def close(self) -> None:
        """Stop reading. A caller drops a channel when its replica failed one of its
        requests (died, refused a submit, engine error): the requests still waiting on it
        fail the same way, to be retried elsewhere if nothing was sent, instead of waiting
        for a reader that is gone."""
        if self._reader is not None:
            self._reader.cancel()
        if self.dead is None:
            self.dead = ReplicaDied(f"replica {self.replica_id}: channel closed")
        self._fail(list(self._queues), ReplicaDied(f"replica {self.replica_id} failed"))


@dataclass
class ModelInfo:
    """A served model as callers see it. ``version`` and ``source`` are the stable
    version's; ``sources`` maps every served version to its weights (and so its tokenizer
    and chat template), which may differ from the stable's during a rollout."""

    name: str
    version: str
    task: str
    source: str
    max_model_len: int | None
    ready_replicas: int
    tokenizer: Any = None
    sources: dict[str, str] = field(default_factory=dict)
    tool_parser: str | None = None


def _token_ids(value: Any, vocab_size: int, what: str) -> list[int] | None:
    """``value`` as token ids if it is a list of them (None if it is a text).

    Raises:
        InvalidRequest: neither a text nor ids, or an id outside the vocabulary.
    """
    if isinstance(value, str):
        return None
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise InvalidRequest(f"{what} must be a string or a list of token ids")
    bad = next((t for t in value if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"{what} has token id {bad}, outside the model's vocabulary (0 to {vocab_size - 1})"
        )
    return list(value)


@dataclass
class LogprobSink:
    """The log-probabilities a generation has produced, for callers that asked for them:
    ``take()`` hands over those that arrived since the last take (the stream's chunk)."""

    prompt: list[Position] | None = None
    tokens: list[Position] = field(default_factory=list)
    _taken: int = 0

    def add(self, lp: Logprobs) -> None:
        if lp.prompt is not None:
            self.prompt = lp.prompt
        self.tokens.extend(lp.tokens)

    def take(self) -> list[Position]:
        new, self._taken = self.tokens[self._taken :], len(self.tokens)
        return new


@dataclass
class Generation:
    """A streamed generation; iterate for ``(text, n_tokens, finish_reason)``, then read
    usage (and ``logprobs``, if the call asked for them)."""

    request_id: str
    model: str
    usage: Usage = field(default_factory=Usage)
    logprobs: LogprobSink = field(default_factory=LogprobSink)
    prompt_text: str | None = None  # a completion's prompt as the model read it (for echo)
    _stream: AsyncIterator[tuple[str, int, str | None]] | None = None

    def __aiter__(self) -> AsyncIterator[tuple[str, int, str | None]]:
        assert self._stream is not None
        return self._stream

    async def text(self) -> str:
        return "".join([t async for t, _, _ in self])


@dataclass(slots=True)
class _Entry:
    """A request let in at the scheduler's front door (``CallPath._enter``): the caller
    hands it back unless its generation's stream starts, which then owns it."""

    request_id: str
    open: bool = True


@dataclass
class _Watch:
    """What the call path observes of one call for traces and quality signals."""

    on: bool  # observed at all (not when observability is off, nor the runtime's own calls)
    span: Span | None = None
    text: str | None = None  # the prompt, when sampled for the input-drift detector
    filtered: bool = False  # a policy filter redacted part of the input


@contextlib.contextmanager
def _checking_input(watch: _Watch, model: str) -> Iterator[None]:
    """The call's span current, and a policy span inside it, while its input is checked."""
    with (
        tracing.use(watch.span),
        tracing.span("policy input", "policy", {"airi.model": model}, child_only=True),
    ):
        yield


class _SetUp:
    """One call's set-up, until its stream (or lease) takes over: a failure hands back the
    front-door entry it got, if it got one, and ends the call's span failed.

    A call whose door checks were deferred to ``acquire`` (``deferred``) and that is
    refused before it gets there is counted at the door now, as if it had entered first:
    a refusal for length still costs the tenant a request, and the door's own refusal (a
    429 over the request rate, say) is the one the caller sees.
    """

    def __init__(self, path: CallPath, request_id: str, watch: _Watch) -> None:
        self.path = path
        self.request_id = request_id
        self.watch = watch
        self.entered = False
        self.deferred: AcquireRequest | None = None

    async def __aenter__(self) -> _SetUp:
        return self

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        if error is None:
            return
        if self.entered:
            self.path._leave(self.request_id)
        elif self.deferred is not None and isinstance(error, AiriError):
            refusal = await self.path._count_refused(self.deferred)
            if refusal is not None:
                tracing.end_failed(self.watch.span, refusal)
                raise refusal from error
        tracing.end_failed(self.watch.span, error)


def _door(
    request_id: str, model: str, tenant: str, params: GenerationParams, shape: tuple[int, int]
) -> AcquireRequest:
    """What the scheduler's front door checks of a generation: its shape, no tokens yet."""
    return AcquireRequest(
        request_id,
        model,
        tenant,
        requested_max_tokens=params.max_tokens,
        messages=shape[0],
        stop=len(params.stop),
        prompt_chars=shape[1],
    )


def _caller_name() -> str:
    """A unique caller id that says whose it is (the actor or driver, and its pid), so a
    lease left behind names the process that holds it."""
    try:
        ctx = ray.get_runtime_context()
        who = ctx.get_actor_name() or ("driver" if ctx.get_actor_id() is None else "actor")
    except Exception:  # not connected yet: the id stays unique all the same
        who = "process"
    return f"{who}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class StoreSink:
    """The tracing sink of this process: sends finished traces to the context store, in
    one fire-and-forget call (the store is looked up again after a failure)."""

    def __init__(self) -> None:
        self._store: Any = None

    def __call__(self, traces: list[tuple[str, str, list[dict[str, Any]]]]) -> None:
        try:
            if self._store is None:
                self._store = get_actor(CONTEXT_STORE_NAME)
            self._store.add_traces.remote(traces)
        except Exception:
            self._store = None
            raise


trace_sink = StoreSink()


class CallPath:
    """Runs model calls from this process; one per asyncio loop."""

    def __init__(self) -> None:
        tracing.configure(tracing.enabled, sink=trace_sink)  # spans of calls from here
        self.caller_id = _caller_name()
        self._scheduler = get_actor(SCHEDULER_NAME)
        self._controller = get_actor(CONTROLLER_NAME)
        self._channels: dict[str, ReplicaChannel] = {}
        self._handles: dict[str, Any] = {}
        self._models: dict[str, ModelInfo] = {}
        self._tokenizers: dict[str, Any] = {}
        self._model_infos = Cached(self._fetch_models, MODEL_INFO_TTL_S, "model infos")
        self._model_acl = Cached(
            self._controller.model_acl.remote, MODEL_INFO_TTL_S, "the model ACLs"
        )
        self._filter_specs = Cached(
            self._controller.filter_config.remote, MODEL_INFO_TTL_S, "the content filters"
        )
        self._filter_sets: dict[str, FilterSet] = {}  # by the spec's JSON
        self._semantic_filters: dict[str, SemanticFilter] = {}
        self._tokenizer_lock = asyncio.Lock()
        # One thread: fast tokenizers release the GIL while they work, and one thread
        # bounds what long prompts take from the loop's core.
        self._cpu_pool = concurrent.futures.ThreadPoolExecutor(1, "airi-tokenize")
        self._entries = _Coalescer[tuple[AcquireRequest, asyncio.Future[None]]](self._send_entries)
        self._acquires = _Coalescer[AcquireRequest](self._send_acquires)
        self._pending: dict[str, asyncio.Future[Lease]] = {}  # request -> its lease, to come
        # Requests queued in the scheduler (acquired, no lease yet): sent again to a
        # restarted scheduler, which lost its queues.
        self._queued: dict[str, AcquireRequest] = {}
        self._requeued: set[str] = set()  # failed on a replica, waiting for another
        self._grants: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        # Requests holding a lease this caller has not handed back yet: every heartbeat
        # names them, and the scheduler takes back any other lease it books under this
        # caller (a release that never arrived cannot hold a slot for good).
        self._held: set[str] = set()
        # The replica and KV-token cost of each held lease, sent with the heartbeats: a
        # restarted scheduler counts the calls still running on each replica.
        self._placed: dict[str, tuple[str, int]] = {}
        self._releases = _Coalescer[tuple[str, dict[str, Any], bool]](self._send_releases)
        # Leases whose first tokens are out: their replicas' prefill budgets have room.
        self._prefills = _Coalescer[str](
            lambda ids: (
                self._scheduler.prefilled.remote(ids)
                .future()
                .add_done_callback(_log_failure("prefills"))
            )
        )
        self._audit_events = _Coalescer[AuditEvent](
            lambda items: self._scheduler.audit.remote(items)
        )
        self._obs_config = Cached(
            self._controller.observability.remote, MODEL_INFO_TTL_S, "the observability config"
        )
        self._observations = _Coalescer[dict[str, Any]](self._send_observations, OBSERVE_EVERY_S)
        self._observer: Any = None

    # -- models and tokenizers -----------------------------------------------------------

    async def list_models(self, refresh: bool = False) -> list[ModelInfo]:
        self._models = await self._model_infos.get(fresh=refresh)
        return list(self._models.values())

    async def visible_models(self, tenant: str | None, refresh: bool = False) -> list[ModelInfo]:
        """The served models ``tenant`` may call (its model ACL); None: all of them."""
        infos = await self.list_models(refresh)
        if tenant is None:
            return infos
        acl = (await self._model_acl.get()).get(tenant) or []
        return [i for i in infos if allows(acl, i.name)]

    async def _fetch_models(self) -> dict[str, ModelInfo]:
        infos = await self._controller.models.remote()
        fields = ModelInfo.__dataclass_fields__
        return {
            i["name"]: ModelInfo(
                **{k: v for k, v in i.items() if k in fields and k != "sources"},
                sources={v["version"]: v["source"] for v in i.get("versions", [])},
            )
            for i in infos
        }

    async def warm(self) -> None:
        """Load model infos and tokenizers now, so the first request does not pay for them."""
        for info in await self.list_models(refresh=True):
            info.tokenizer = await self._tokenizer(info.source)
            for source in set(info.sources.values()) - {info.source}:
                await self._tokenizer(source)  # a version under rollout with other weights

    async def model(self, name: str, task: str, tenant: str | None = None) -> ModelInfo:
        """The model's info; refreshes once before deciding it does not exist. The
        refusal names only the models ``tenant`` may call."""
        if not isinstance(name, str) or not name:
            raise InvalidRequest("model must be a non-empty string naming a deployed model")
        for refresh in (False, True):
            await self.list_models(refresh)
            info = self._models.get(name)
            if info is not None:
                break
        else:
            visible = [i.name for i in await self.visible_models(tenant)]
            known = ", ".join(sorted(visible)) or "none"
            raise ModelNotFound(f"The model `{name}` does not exist; deployed models: {known}")
        if info.task != task:
            what = "chat/completions" if task == "generate" else "embeddings"
            raise InvalidRequest(
                f"model {name!r} serves {info.task!r}, it cannot be used for {what}"
            )
        if info.max_model_len is None:
            raise ReplicaUnavailable(f"model {name!r} has no ready replica yet; retry shortly")
        if info.tokenizer is None:
            info.tokenizer = await self._tokenizer(info.source)
        return info

    async def fit(
        self,
        model: str,
        tenant: str | None,
        system: str,
        chunks: Sequence[ChunkLike],
        turns: Sequence[Mapping[str, str]],
        max_tokens: int | None,
    ) -> ContextWindow:
        """``build_context`` in ``model``'s window and tokenizer: the system prompt, the
        chunks that fit (best first) and the newest turns that fit, with ``max_tokens``
        (or ``DEFAULT_RESERVE_TOKENS``, at most a quarter of the window) kept for the
        answer. Each message counts ``TEMPLATE_TOKENS`` more for the chat template."""
        info = await self.model(model, "generate", tenant)
        assert info.max_model_len is not None
        tokenizer, window = info.tokenizer, info.max_model_len
        reserve = max_tokens or min(DEFAULT_RESERVE_TOKENS, window // 4)

        def count(text: str) -> int:
            return _count_tokens(tokenizer, text) + TEMPLATE_TOKENS

        def fit() -> ContextWindow:
            return build_context(system, chunks, turns, window, count, reserve)

        chars = len(system) + sum(len(c.text) for c in chunks) + sum(len(str(t)) for t in turns)
        return await self._cpu(chars, fit)

    async def _window_for(self, info: ModelInfo, prompt_tokens: int, params: Any) -> ModelInfo:
        """``info``, fetched again when the call does not fit its cached context window:
        a rollout may have just changed the window (the cached info lives a few seconds)."""
        assert info.max_model_len is not None
        if prompt_tokens + (params.max_tokens or 1) <= info.max_model_len:
            return info
        for delay in (*WINDOW_REFRESH_BACKOFF_S, None):
            try:
                await self.list_models(refresh=True)
                break
            except ray.exceptions.RayError:
                # The controller is restarting (``Cached`` has logged it), and the cached
                # window may be from before a rollout changed it: a restart takes seconds,
                # so ask again before deciding on the cached window.
                if delay is None:
                    return info
                await asyncio.sleep(delay)
        fresh = self._models.get(info.name)
        if fresh is None or fresh.max_model_len is None or fresh.source != info.source:
            return info
        fresh.tokenizer = info.tokenizer
        return fresh

    async def _tokenizer(self, source: str) -> Any:
        # One load per source, off the event loop; concurrent first requests wait for it
        # (importing transformers from several threads at once fails).
        async with self._tokenizer_lock:
            if source not in self._tokenizers:
                self._tokenizers[source] = await asyncio.to_thread(_load_tokenizer, source)
        return self._tokenizers[source]

    # -- generation --------------------------------------------------------------------

    async def chat(
        self,
        model: str,
        messages: list[ChatMessage],
        params: GenerationParams,
        tenant: str,
        options: CallOptions = DEFAULT_OPTIONS,
        cap: Callable[[int], int] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Generation:
        """Start a chat generation (iterate it to run it). ``cap`` maps the prompt's length
        to the most output tokens allowed (a graph run's token budget); ``tools`` (OpenAI
        function tools) go to the chat template, which shows them to the model.
        """
        info = await self.model(model, "generate", tenant)
        if getattr(info.tokenizer, "chat_template", None) is None:
            raise InvalidRequest(f"model {model!r} has no chat template; use completions instead")
        rid = f"req-{uuid.uuid4().hex}"
        shape = (len(messages), sum(len(m.content) for m in messages))
        watch = await self._watch(model, tenant, rid)
        async with _SetUp(self, rid, watch) as setup:
            filters, contents = await self._admit(
                setup,
                _door(rid, model, tenant, params, shape),
                [(m.content, "document" if m.role == "tool" else "prompt") for m in messages],
                semantic=[m.content for m in messages if m.role in ("user", "tool")],
                defer_door=True,
            )
            if watch.text is not None:
                users = [c for m, c in zip(messages, contents, strict=True) if m.role == "user"]
                watch.text = users[-1] if users else None
            turns = [m.turn(c) for m, c in zip(messages, contents, strict=True)]
            # Assistant turns are left out: a template may drop part of them (reasoning).
            said = [c for m, c in zip(messages, contents, strict=True) if m.role != "assistant"]
            info = await self._probe(info, said, params)

            def render(tokenizer: Any) -> list[int]:
                # As ``apply_chat_template(tokenize=True)`` does, without its GIL-bound
                # wrapper: render, then tokenize with no special tokens added.
                text = tokenizer.apply_chat_template(
                    turns, tools=tools or None, add_generation_prompt=True, tokenize=False
                )
                return token_ids(tokenizer, text, add_special_tokens=False)

            ids = await self._cpu(shape[1], render, info.tokenizer)
            info = await self._window_for(info, len(ids), params)
            return self._generation(
                info,
                ids,
                params,
                tenant,
                options,
                filters,
                cap,
                shape,
                rid,
                watch,
                render,
                entered=setup.entered,
            )

    async def complete(
        self,
        model: str,
        prompt: str,
        params: GenerationParams,
        tenant: str,
        options: CallOptions = DEFAULT_OPTIONS,
        cap: Callable[[int], int] | None = None,
    ) -> Generation:
        """Start a completion of ``prompt``: a text, or token ids of the model's tokenizer
        (the tenant's filters read them as the text they decode to)."""
        info = await self.model(model, "generate", tenant)
        given_ids = _token_ids(prompt, len(info.tokenizer), "prompt")
        text = info.tokenizer.decode(given_ids) if given_ids is not None else prompt
        rid = f"req-{uuid.uuid4().hex}"
        shape = (0, len(text))
        watch = await self._watch(model, tenant, rid)
        async with _SetUp(self, rid, watch) as setup:
            filters, [clean] = await self._admit(
                setup,
                _door(rid, model, tenant, params, shape),
                [(text, "prompt")],
                semantic=[text],
                defer_door=True,
            )
            if watch.text is not None:
                watch.text = clean

            def encode(tokenizer: Any) -> list[int]:
                return token_ids(tokenizer, clean)

            if given_ids is not None and clean == text:
                ids, remake = given_ids, None  # the ids are the only form of this prompt
            else:
                info = await self._probe(info, [clean], params)
                ids, remake = await self._cpu(len(clean), encode, info.tokenizer), encode
            info = await self._window_for(info, len(ids), params)
            g = self._generation(
                info,
                ids,
                params,
                tenant,
                options,
                filters,
                cap,
                shape,
                rid,
                watch,
                remake,
                entered=setup.entered,
            )
            g.prompt_text = clean
            return g

    # -- the front door and the worker thread -------------------------------------------

    async def _enter(self, request: AcquireRequest) -> None:
        """Charge the tenant's limits that need no tokens (request shape, ACL, concurrency,
        budget, requests/minute) before the prompt is filtered and tokenized: a flood of
        prompts refused for their length then costs its tenant its rate, not every tenant
        the CPU. Raises the refusal. Entered requests of one loop turn go together.

        The entry is this caller's until a generation's stream takes it over: a call that
        fails before that hands it back (``_leave``).
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.add(request.request_id)  # a heartbeat names it: it is not lost
        self._entries.add((request, future))
        try:
            await future
        except asyncio.CancelledError:
            self._leave(request.request_id)
            raise
        except BaseException:
            self._held.discard(request.request_id)
            raise

    async def _cheap_set_up(self, door: AcquireRequest, semantic: bool) -> bool:
        """Whether a call's set-up costs too little to be worth charging first: a prompt
        short enough to tokenize on the loop (``OFFLOAD_CHARS``) and no semantic filter,
        which would embed it on a model first. A flood of such calls costs the loop about
        what the door's own round trip would."""
        if door.prompt_chars > OFFLOAD_CHARS:
            return False
        if not semantic:
            return True
        spec = await self._filter_spec(door.tenant, door.model)
        return spec is None or not spec["semantic_model"]

    async def _count_refused(self, door: AcquireRequest) -> AiriError | None:
        """Count a call refused before ``acquire`` at the door, as if it had entered first
        (``_SetUp``): returns the door's own refusal, if it has one."""
        try:
            await self._enter(door)
        except AiriError as e:
            return e
        self._leave(door.request_id)
        return None

    def _leave(self, request_id: str) -> None:
        """Hand back an entry whose call never reached ``acquire`` (it counted as a request)."""
        self._releases.add((request_id, {"error": "refused"}, False))

    def _abandoned(self, loop: asyncio.AbstractEventLoop, entry: _Entry) -> None:
        """A generation was dropped: hand its entry back if its stream never started. Runs
        wherever the collector freed it, so it goes through the loop's thread-safe door."""
        if entry.open:
            with contextlib.suppress(RuntimeError):  # the loop closed: so did the caller
                loop.call_soon_threadsafe(self._leave, entry.request_id)

    def _send_entries(self, items: list[tuple[AcquireRequest, asyncio.Future[None]]]) -> None:
        spawn(self._enter_batch(items))

    async def _enter_batch(self, items: list[tuple[AcquireRequest, asyncio.Future[None]]]) -> None:
        try:
            results: list[BaseException | None] = await self._ask_scheduler(
                lambda: self._scheduler.enter.remote(self.caller_id, [r for r, _ in items])
            )
        except Exception as e:
            results = [unwrap_error(e)] * len(items)
        for (_, future), result in zip(items, results, strict=True):
            if future.done():  # its caller gave up meanwhile and handed the entry back
                continue
            if result is None:
                future.set_result(None)
            else:
                future.set_exception(result)

    async def _probe(self, info: ModelInfo, texts: list[str], params: Any) -> ModelInfo:
        """Refuse a prompt whose head alone is over the context window (``probe_head``)
        before tokenizing all of it; returns ``info``, fetched again if a rollout may have
        changed the window."""
        for text in texts:
            assert info.max_model_len is not None
            head = probe_head(text, info.max_model_len)
            if head is None:
                continue
            n = _words_floor(info.tokenizer, head)
            if n is None or n < info.max_model_len:
                n = await self._cpu(len(head), _count_tokens, info.tokenizer, head)
            if n >= info.max_model_len:
                info = await self._window_for(info, n, params)
                assert info.max_model_len is not None
                refuse_long_head(info.name, head, n, info.max_model_len)
        return info

    async def _cpu(self, chars: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: here for a short input, on the worker thread for a long one."""
        if chars <= OFFLOAD_CHARS:
            return fn(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cpu_pool, functools.partial(fn, *args))

    # -- content filters ---------------------------------------------------------------

    async def _filter_spec(self, tenant: str, model: str | None) -> dict[str, Any] | None:
        spec: dict[str, Any] | None = (await self._filter_specs.get()).get(tenant)
        if spec is None or (model is not None and not allows(spec["models"], model)):
            return None  # none, or not for this model (None: whatever models they cover)
        return spec

    async def _filters(self, tenant: str, model: str | None) -> FilterSet | None:
        """The tenant's content filters for ``model`` (None: whichever models they cover),
        compiled once per configuration."""
        spec = await self._filter_spec(tenant, model)
        if spec is None:
            return None
        key = json.dumps(spec, sort_keys=True)
        filters = self._filter_sets.get(key)
        if filters is None:
            if len(self._filter_sets) > 256:  # configurations come and go with deploys
                self._filter_sets.clear()
            config = {k: v for k, v in spec.items() if k in FILTER_FIELDS}
            config["blocklist"] = tuple(config["blocklist"])
            filters = self._filter_sets[key] = FilterSet(FilterConfig(**config))
        return filters

    async def _semantic_check(
        self, tenant: str, model: str, texts: list[str], request_id: str
    ) -> None:
        """Embed the user's text with the tenant's semantic-filter model and compare it
        with the blocked examples; raises ContentBlocked on a match (``block``)."""
        spec = await self._filter_spec(tenant, model)
        if spec is None or not spec["semantic_model"] or not texts:
            return
        embedder = spec["semantic_model"]
        key = json.dumps([spec[k] for k in sorted(spec) if k.startswith("semantic_")])
        semantic = self._semantic_filters.get(key)
        if semantic is None:
            vectors, _ = await self.embed(embedder, list(spec["semantic_examples"]), SYSTEM_TENANT)
            semantic = SemanticFilter(
                vectors,
                spec["semantic_threshold"],
                [f"example {i + 1}" for i in range(len(vectors))],
                action=spec["semantic_action"],
                status=spec["blocked_status"],
            )
            if len(self._semantic_filters) > 256:
                self._semantic_filters.clear()
            self._semantic_filters[key] = semantic
        windows = semantic_windows(texts)
        if not windows:
            return
        # The runtime's own call: outside the tenant's ACL and limits, like the filter itself.
        vectors, _ = await self.embed(embedder, windows, SYSTEM_TENANT)
        for vector in vectors:
            try:
                finding = semantic.check(vector)
            except AiriError as e:
                self._audit([refusal_event(e, tenant=tenant, model=model, request_id=request_id)])
                raise
            if finding is not None:
                self._audit([AuditEvent(tenant, model, "semantic", "flag", request_id)])

    async def check_text(self, tenant: str, text: str, where: str, model: str = "*") -> str:
        """Pass ``text`` through the tenant's input filters for ``model`` (``*``: filters
        that apply to every model), as a call would: returns it redacted, or raises
        ContentBlocked. ``where``: ``prompt`` (user text) or ``document`` (retrieved text)."""
        if not isinstance(text, str):
            raise InvalidRequest(f"a policy check takes text, got {type(text).__name__}")
        rid = f"chk-{uuid.uuid4().hex}"
        await self._semantic_check(tenant, model, [text], rid)
        return self._filter_input(
            await self._filters(tenant, model), text, where, tenant, model, rid
        )

    async def input_filters(self, tenant: str, model: str | None) -> FilterSet | None:
        """The tenant's input filters for ``model``, for keeping what a model was (or will
        be) sent, as in a stored conversation; ``None``: the tenant's filters whichever
        models they cover, for turns stored with no model (any model may read them later)."""
        return await self._filters(tenant, model)

    async def _admit(
        self,
        setup: _SetUp,
        door: AcquireRequest,
        inputs: list[tuple[str, str]],
        semantic: list[str] | None = None,
        defer_door: bool = False,
    ) -> tuple[FilterSet | None, list[str]]:
        """The set-up every model call shares, under the call's span and a policy span: the
        scheduler's front door (``door``: shape, ACL, limits; no tokens counted yet), the
        tenant's filters for the model, the semantic check of ``semantic`` texts, and the
        ``inputs`` ``(text, where)`` as the filters pass them (redacted), in order.

        With ``defer_door``, a call whose set-up is cheap (``_cheap_set_up``) skips the
        door: ``acquire`` makes the same checks in the same scheduler call, one round trip
        fewer, and ``setup`` counts a refusal before that at the door (``_SetUp``).
        """
        model, tenant, rid = door.model, door.tenant, door.request_id
        with _checking_input(setup.watch, model):
            if defer_door and await self._cheap_set_up(door, bool(semantic)):
                setup.deferred = door
            else:
                await self._enter(door)
                setup.entered = True
            filters = await self._filters(tenant, model)
            if semantic:
                await self._semantic_check(tenant, model, semantic, rid)
            clean = [self._filter_input(filters, t, w, tenant, model, rid) for t, w in inputs]
        setup.watch.filtered = any(c != t for c, (t, _) in zip(clean, inputs, strict=True))
        return filters, clean

    def _filter_input(
        self,
        filters: FilterSet | None,
        text: str,
        where: str,
        tenant: str,
        model: str,
        request_id: str,
    ) -> str:
        """The text as the tenant's filters pass it (redacted), or ContentBlocked."""
        if filters is None:
            return text
        try:
            result = filters.check_input(text, where=where)
        except AiriError as e:
            self._audit([refusal_event(e, tenant=tenant, model=model, request_id=request_id)])
            raise
        self._audit(
            finding_events(result.findings, tenant=tenant, model=model, request_id=request_id)
        )
        return result.text

    def _audit(self, events: Iterable[AuditEvent]) -> None:
        """Log each refusal, redaction and flag (never the text), and have the scheduler
        count them, as it counts its own refusals."""
        actions = set()
        for e in events:
            logger.info("policy %s", e)
            self._audit_events.add(e)
            actions.add(f"{e.action}:{e.rule}")
        span = otel_trace.get_current_span()
        if actions and span.is_recording():  # the trace shows what policy did to the call
            span.set_attribute("airi.policy", ",".join(sorted(actions)))

    def _generation(
        self,
        info: ModelInfo,
        prompt_ids: list[int],
        params: GenerationParams,
        tenant: str,
        options: CallOptions,
        filters: FilterSet | None = None,
        cap: Callable[[int], int] | None = None,
        shape: tuple[int, int] = (0, 0),
        request_id: str | None = None,
        watch: _Watch | None = None,
        encode: Callable[[Any], list[int]] | None = None,
        entered: bool = False,
    ) -> Generation:
        """``prompt_ids`` are the stable version's tokens; ``encode(tokenizer)`` makes them
        again for a version whose weights differ (None: the ids are the only form).
        ``entered``: the call holds a front-door entry, which its stream takes over."""
        assert info.max_model_len is not None
        if not prompt_ids:
            raise InvalidRequest(
                f"the prompt is empty (0 tokens for model {info.name!r}); send some text"
            )
        if filters is not None and (
            params.logprobs is not None or params.extra.get("prompt_logprobs") is not None
        ):
            raise InvalidRequest(
                "logprobs are not available where the tenant's content filters apply: they "
                "would show the tokens the filters hold back; leave out logprobs"
            )
        max_tokens = resolve_max_tokens(
            info.name, len(prompt_ids), params.max_tokens, info.max_model_len
        )
        if cap is not None:
            max_tokens = min(max_tokens, cap(len(prompt_ids)))
        g = Generation(request_id=request_id or f"req-{uuid.uuid4().hex}", model=info.name)
        g.usage.prompt_tokens = len(prompt_ids)
        entry = _Entry(g.request_id, open=entered)
        request = AcquireRequest(
            g.request_id,
            info.name,
            tenant,
            len(prompt_ids),
            max_tokens,
            priority=options.priority,
            deadline_s=options.deadline_s,
            session_id=options.session_id,
            prefix_hashes=block_hashes(prompt_ids),
            requested_max_tokens=params.max_tokens,
            messages=shape[0],
            stop=len(params.stop),
            prompt_chars=shape[1],
        )
        # The stream gets the usage, not ``g``: a generator holding the object that holds
        # it is a cycle, which only the cyclic collector frees, so an abandoned stream
        # would keep its lease until a collection happened to run.
        g._stream = self._stream(
            g.usage,
            g.logprobs,
            request,
            prompt_ids,
            # A stream that would migrate by replay needs a seed to give the same text.
            replayable(params.to_dict() | {"max_tokens": max_tokens}, _draw_seed),
            filters,
            watch,
            lambda version: self._ids_for(info, version, prompt_ids, encode),
            entry,
        )
        if entered:  # handed back if never streamed
            # Watched on the stream, not on ``g``: ``g.__aiter__()`` hands the stream out
            # and ``g`` may be freed before the stream's first step takes the entry over.
            weakref.finalize(g._stream, self._abandoned, asyncio.get_running_loop(), entry)
        return g

    async def _ids_for(
        self,
        info: ModelInfo,
        version: str,
        ids: T,
        encode: Callable[[Any], T] | None,
    ) -> T:
        """The input as ``version`` reads it. During a rollout to other weights (another
        tokenizer and chat template) the stable version's tokens would be another text to
        it, so they are made again with its own tokenizer once the lease names the
        version. Admission counted the stable's tokens: close, not exact, for that call."""
        source = info.sources.get(version, info.source)
        if encode is None or source == info.source:
            return ids
        return encode(await self._tokenizer(source))

    async def _stream(
        self,
        usage: Usage,
        sink: LogprobSink,
        request: AcquireRequest,
        prompt_ids: list[int],
        params: dict[str, Any],
        filters: FilterSet | None = None,
        watch: _Watch | None = None,
        ids_for: Callable[[str], Awaitable[list[int]]] | None = None,
        entry: _Entry | None = None,
    ) -> AsyncIterator[tuple[str, int, str | None]]:
        if entry is not None:
            entry.open = False  # the acquire below settles it, however it ends
        start = time.perf_counter()
        # Answers pass the tenant's filters as they stream: a rolling hold-back window
        # catches a match split across chunks, without waiting for the whole answer.
        out = filters.stream() if filters is not None else None
        head = ""  # the answer's start, where refusals show
        lease: Lease | None = None
        served_at = first_at = None
        # What the client has, should the stream move to another replica mid-way: the
        # answer's tokens, and its length before the filters (what a replay skips).
        sent_ids: list[int] = []
        sent_chars = 0
        replay: Replay | None = None
        call_params = params
        try:
            lease = await self._wait(self._acquire(request), request.request_id)
            served_at = time.perf_counter()
            while True:
                usage.extra["version"] = lease.version
                ids = prompt_ids if ids_for is None else await ids_for(lease.version)
                usage.prompt_tokens = len(ids)
                call_ids = ids + sent_ids if sent_ids and replay is None else ids
                try:
                    channel = self._channel(lease.replica_id)
                    prefilled = False
                    async for text, new_ids, finish, lp in channel.generate(
                        request.request_id, call_ids, call_params
                    ):
                        if not prefilled:  # this lease's prompt no longer waits
                            self._prefills.add(request.request_id)
                            prefilled = True
                        if replay is not None:
                            text, new_ids, k = replay.take(text, new_ids)
                            if lp is not None and k:
                                lp = Logprobs(lp.tokens[k:])
                            if not new_ids and finish is None:
                                continue
                        if lp is not None:
                            sink.add(lp)
                        if usage.ttft_s is None:
                            first_at = time.perf_counter()
                            usage.ttft_s = first_at - start
                        n = len(new_ids)
                        sent_ids += new_ids
                        sent_chars += len(text)
                        usage.completion_tokens += n
                        usage.finish_reason = finish
                        if out is not None:
                            text = out.feed(text) + (out.finish() if finish is not None else "")
                        if len(head) < REFUSAL_PREFIX_CHARS:
                            head += text
                        yield text, n, finish
                    return
                except Exception as e:
                    if isinstance(e, ReplicaDied):
                        self._drop_channel(lease.replica_id)
                        failure = Failure.REPLICA_DIED
                    else:
                        failure = (
                            Failure.REFUSED if isinstance(e, InvalidRequest) else Failure.OTHER
                        )
                    if failure is Failure.REPLICA_DIED and len(sent_ids) >= params["max_tokens"]:
                        usage.finish_reason = "length"  # it died having sent them all
                        yield (out.finish() if out is not None else ""), 0, "length"
                        return
                    lease = await self._retry_elsewhere(lease, usage, e, failure)
                    served_at = time.perf_counter()
                    if not sent_ids:
                        continue
                    # Mid-stream: go on where the dead replica stopped.
                    if migration(params) is Migration.CONTINUE:
                        call_params = continued_params(params, len(sent_ids))
                    else:
                        replay = Replay(sent_chars, len(sent_ids))
        except BaseException as e:
            usage.error = usage.error or type(e).__name__
            raise
        finally:
            usage.e2e_s = time.perf_counter() - start
            if lease is not None:
                self._release(lease, usage, usage.error in ("replica_died", "no_replica"))
            if out is not None:
                self._audit(
                    finding_events(
                        out.findings,
                        tenant=request.tenant,
                        model=request.model,
                        request_id=request.request_id,
                    )
                )
                if watch is not None and out.findings:
                    watch.filtered = True
            if watch is not None and watch.on:
                service_s = first_at - served_at if first_at and served_at else None
                self._observe(watch, "generate", request, lease, usage, service_s, is_refusal(head))

    async def embed(
        self,
        model: str,
        texts: list[str] | list[list[int]],
        tenant: str,
        options: CallOptions = DEFAULT_OPTIONS,
        where: str = "prompt",
        dimensions: int | None = None,
    ) -> tuple[list[list[float]], Usage]:
        """Embed ``texts`` (texts, or token ids of the model's tokenizer) on one replica;
        returns vectors and usage. The tenant's input filters apply first (``where``:
        ``prompt``, or ``document`` for ingested text); ``dimensions`` truncates the vectors
        of a Matryoshka model (others refuse it)."""
        if not isinstance(texts, list) or not texts:
            raise InvalidRequest(
                "input must be a non-empty string, list of strings, or list of token ids"
            )
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequest(
                f"input has {len(texts)} items; at most {MAX_EMBEDDING_INPUTS} per request"
            )
        if dimensions is not None and (
            isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
        ):
            raise InvalidRequest(f"dimensions must be a positive integer, got {dimensions!r}")
        info = await self.model(model, "embed", tenant)
        assert info.max_model_len is not None
        vocab = len(info.tokenizer)
        given = [_token_ids(t, vocab, f"input[{i}]") for i, t in enumerate(texts)]
        if any(g == [] for g in given):
            raise InvalidRequest("input has an empty list of token ids; send at least one")
        decoded = [
            info.tokenizer.decode(g) if g is not None else str(t)
            for g, t in zip(given, texts, strict=True)
        ]
        rid = f"emb-{uuid.uuid4().hex}"
        watch = await self._watch(model, tenant, rid, sample=False)
        async with _SetUp(self, rid, watch) as setup:
            _, clean = await self._admit(
                setup,
                AcquireRequest(rid, model, tenant, inputs=len(texts)),
                [(t, where) for t in decoded],
            )
            # Token ids stay as given unless a filter changed their text.
            kept = [
                g if g is not None and c == d else None
                for g, c, d in zip(given, clean, decoded, strict=True)
            ]

            def encode(tokenizer: Any) -> list[list[int]]:
                fresh = iter(
                    tokenizer([c for c, k in zip(clean, kept, strict=True) if k is None] or [""])[
                        "input_ids"
                    ]
                )
                return [k if k is not None else list(next(fresh)) for k in kept]

            ids = await self._cpu(sum(map(len, clean)), encode, info.tokenizer)
            for i, x in enumerate(ids):
                if len(x) > info.max_model_len:
                    raise ContextWindowExceeded(
                        f"input[{i}] has {len(x)} tokens; model {model!r} embeds at most "
                        f"{info.max_model_len}"
                    )
        usage = Usage(prompt_tokens=sum(len(x) for x in ids))
        start = time.perf_counter()
        request = AcquireRequest(
            rid,
            model,
            tenant,
            usage.prompt_tokens,
            0,
            priority=options.priority,
            deadline_s=options.deadline_s,
            inputs=len(ids),
            version=options.version,
        )
        lease: Lease | None = None
        vectors: list[list[float]] | None = None
        served_at = None
        try:
            lease = await self._wait(self._acquire(request), request.request_id)
            while True:
                served_at = time.perf_counter()
                try:
                    sent = await self._ids_for(info, lease.version, ids, encode)
                    vectors = await self._handle(lease.replica_id).embed.remote(
                        sent, options.deadline_s, dimensions
                    )
                    usage.ttft_s = time.perf_counter() - start
                    usage.extra["version"] = lease.version  # which vector space they are in
                    return vectors, usage
                except Exception as e:
                    cause = unwrap_error(e)
                    if isinstance(e, (ray.exceptions.RayActorError, ReplicaDied)) or isinstance(
                        cause, ReplicaUnavailable
                    ):
                        failure = Failure.REPLICA_DIED
                    elif isinstance(cause, InvalidRequest):
                        failure = Failure.REFUSED
                    else:
                        failure = Failure.OTHER
                    # A refusal reaches the caller as the replica's InvalidRequest, unwrapped.
                    raised = cause if failure is Failure.REFUSED else e
                    lease = await self._retry_elsewhere(lease, usage, raised, failure)
        except BaseException as e:
            usage.error = usage.error or type(e).__name__
            raise
        finally:
            usage.e2e_s = time.perf_counter() - start
            if lease is not None:
                self._release(lease, usage, usage.error == "no_replica")
            if watch.on:
                # An embedding model's input embedding is its own output: the first vector.
                service_s = time.perf_counter() - served_at if served_at and vectors else None
                self._observe(
                    watch, "embed", request, lease, usage, service_s, vector=(vectors or [None])[0]
                )

    # -- observation -------------------------------------------------------------------------

    async def _watch(self, model: str, tenant: str, request_id: str, sample: bool = True) -> _Watch:
        """Start observing a call (its span, its drift sample); not when observability is
        off, nor for the runtime's own calls (system tenant)."""
        try:
            config = await self._obs_config.get()
        except Exception:  # a restarting controller: observe as configured last
            config = self._obs_config._value or {"enabled": True, "otlp_endpoint": None}
        tracing.configure(config["enabled"], config.get("otlp_endpoint"))
        if not config["enabled"] or tenant == SYSTEM_TENANT:
            return _Watch(on=False)
        span = tracing.start(
            f"model_call {model}",
            "model_call",
            {"airi.model": model, "airi.tenant": tenant, "airi.request_id": request_id},
        )
        drift = config.get("drift") or {}
        sampled = sample and drift.get("embedder") and random.random() < drift.get("sample", 0)
        return _Watch(True, span, "" if sampled else None)

    def _observe(
        self,
        watch: _Watch,
        task: str,
        request: AcquireRequest,
        lease: Lease | None,
        usage: Usage,
        service_s: float | None,
        refused: bool = False,
        vector: list[float] | None = None,
    ) -> None:
        """End the call's span; send its quality record to the observer (batched)."""
        ms = 1000.0
        tracing.end(
            watch.span,
            error=usage.error,
            version=lease.version if lease else None,
            replica=lease.replica_id if lease else None,
            queue_ms=lease.queue_wait_s * ms if lease else None,
            ttft_ms=usage.ttft_s * ms if usage.ttft_s is not None else None,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens if task == "generate" else None,
            finish_reason=usage.finish_reason,
            refused=refused or None,
        )
        if not watch.on or lease is None:  # a refusal before any replica: not a model's doing
            return
        self._observations.add(
            {
                "request_id": request.request_id,
                "task": task,
                "model": lease.model,
                "version": lease.version,
                "replica": lease.replica_id,
                "tenant": request.tenant,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "ttft_s": usage.ttft_s,
                "service_s": service_s,
                "load": lease.replica_in_flight,
                "finish_reason": usage.finish_reason,
                "error": usage.error,
                "refused": refused,
                "filtered": watch.filtered,
                "text": watch.text or None,
                "vector": vector,
                "at": time.time(),
            }
        )

    def signal(self, kind: str, model: str, version: str, value: float) -> None:
        """A quality signal of a model version (``relevance`` of a retrieval, credited to the
        embedder; ``grounding`` of an answer, to the generator), for the observer."""
        if self._obs_config._value and self._obs_config._value["enabled"]:
            value = min(max(float(value), -1.0), 1.0)
            self._observations.add(
                {"signal": kind, "model": model, "version": version, "value": value}
            )

    def _send_observations(self, records: list[dict[str, Any]]) -> None:
        try:
            if self._observer is None:
                self._observer = get_actor(OBSERVER_NAME)
            self._observer.record.remote(records)
        except Exception as e:  # observing never fails a call
            self._observer = None
            logger.debug("%d observations dropped: %s", len(records), e)

    # -- leases, handles, channels ---------------------------------------------------------

    def _acquire(self, request: AcquireRequest) -> asyncio.Future[Lease]:
        """Ask for a lease; requests of one event-loop turn go to the scheduler together."""
        future = self._expect_grant(request.request_id)
        self._acquires.add(request)
        return future

    async def _retry_elsewhere(
        self, lease: Lease, usage: Usage, cause: BaseException, failure: Failure
    ) -> Lease:
        """The lease's call failed: the next lease, as the retry rule
        (``core.retries.after_failure``) has it, or ``cause`` raised again. A retry
        goes back to the head of the tenant's queue (the scheduler takes the old lease
        back): off a canary onto the stable version, whatever the error, so clients do not
        pay for a bad canary (the rollout sees it in its error rate and rolls back); off a
        dead replica onto another of its version, which a stream that died mid-way must
        keep (the tokens sent are that version's)."""
        retry = after_failure(
            failure,
            canary=lease.canary,
            tokens_sent=usage.completion_tokens,
            requeues=lease.requeues,
        )
        if retry is Retry.RAISE:
            raise cause
        if retry is Retry.DIED_MIDWAY:
            usage.error = "replica_died"
            raise ReplicaUnavailable(
                f"the replica serving model {lease.model!r} died after "
                f"{usage.completion_tokens} tokens were sent, on the last of the "
                f"{MAX_ATTEMPTS} replicas a request may use"
            ) from cause
        if retry is Retry.MIGRATE:
            logger.warning(
                "replica %s died after %d tokens of %s; the stream goes on on another",
                lease.replica_id,
                usage.completion_tokens,
                lease.request_id,
            )
            try:
                return await self._wait(
                    self._requeue(lease.request_id, pin_version=True), lease.request_id
                )
            except ReplicaUnavailable as e:
                usage.error = "replica_died"
                raise ReplicaUnavailable(
                    f"the replica serving model {lease.model!r} died after "
                    f"{usage.completion_tokens} tokens were sent, and {e}"
                ) from cause
        if retry is Retry.GIVE_UP:
            usage.error = "no_replica"
            raise ReplicaUnavailable(
                f"model {lease.model!r}: {MAX_ATTEMPTS} replicas failed before answering"
            ) from cause
        other_version = retry is Retry.STABLE_VERSION
        if other_version:
            logger.debug(
                "canary %s of %s failed a request (%s); retried on the stable version",
                lease.version,
                lease.model,
                type(cause).__name__,
            )
        else:
            logger.warning("replica %s failed before answering; requeued", lease.replica_id)
        return await self._wait(self._requeue(lease.request_id, other_version), lease.request_id)

    async def _requeue(
        self, request_id: str, other_version: bool = False, pin_version: bool = False
    ) -> Lease:
        """Put a request whose replica failed it back in the queue; wait for its new
        lease."""
        future = self._expect_grant(request_id)
        try:
            lease: Lease | None = await self._scheduler.requeue.remote(
                self.caller_id, request_id, other_version, pin_version
            )
        except Exception as e:  # refused, or the scheduler is gone (it lost the lease)
            self._pending.pop(request_id, None)
            raise unwrap_error(e) from None
        if lease is not None:
            self._pending.pop(request_id, None)
            self._hold(lease)
            return lease
        if not future.done():
            self._requeued.add(request_id)
        return await future

    def _expect_grant(self, request_id: str) -> asyncio.Future[Lease]:
        """A future for the request's lease, registered before the scheduler is asked, so
        a grant arriving on the stream ahead of the reply finds it."""
        if self._grants is None or self._grants.done():
            self._grants = spawn(self._read_grants())
        if self._keepalive is None or self._keepalive.done():
            self._keepalive = spawn(self._heartbeats())
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        return future

    async def _wait(self, lease: Awaitable[Lease], request_id: str) -> Lease:
        """Await a lease. A caller that gives up meanwhile (e.g. an HTTP client hung up)
        hands back a lease granted meanwhile, or takes its request out of the queue."""
        try:
            return await lease
        except asyncio.CancelledError:
            self._pending.pop(request_id, None)
            self._queued.pop(request_id, None)
            self._requeued.discard(request_id)
            self._releases.add((request_id, {"error": "cancelled"}, False))
            raise

    def _send_acquires(self, requests: list[AcquireRequest]) -> None:
        spawn(self._acquire_batch(requests))

    async def _acquire_batch(self, requests: list[AcquireRequest]) -> None:
        try:
            results = await self._ask_scheduler(
                lambda: self._scheduler.acquire.remote(self.caller_id, requests)
            )
        except Exception as e:
            self._resolve([(r.request_id, unwrap_error(e)) for r in requests])
            return
        for r, x in zip(requests, results, strict=True):
            if x is None and r.request_id in self._pending:  # queued: its lease is to come
                self._queued[r.request_id] = r
        self._resolve(
            [(r.request_id, x) for r, x in zip(requests, results, strict=True) if x is not None]
        )

    async def _ask_scheduler(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` (one call to the scheduler), asked again while the scheduler is
        being restarted, for up to ``SCHEDULER_WAIT_S`` (``scheduler_retry_delay``).

        Raises:
            ReplicaUnavailable: the scheduler did not come back in time.
        """
        lost_at: float | None = None
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as raised:
                e = unwrap_error(raised)
                lost = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)
                if not isinstance(e, (*lost, SchedulerStarting)):
                    raise
                now = time.monotonic()
                lost_at = now if lost_at is None else lost_at
                delay = scheduler_retry_delay(attempt, now - lost_at)
                if delay is None:
                    raise ReplicaUnavailable(f"lost the scheduler: {e}") from None
                if attempt == 0:
                    logger.warning("the scheduler is unavailable (%s); asking again", e)
                await asyncio.sleep(delay)
                attempt += 1

    async def _read_grants(self) -> None:
        """This process's one stream of grants for its queued requests. When the stream
        breaks (the scheduler died, or took this caller back), the queued requests are
        sent again to the scheduler Ray restarted, and a new stream is opened."""
        gen = self._scheduler.grants.options(num_returns="streaming").remote(self.caller_id)
        try:
            async for ref in gen:
                self._resolve(await ref)
            raise RuntimeError("the scheduler closed the grant stream")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning("grant stream lost (%s); queued requests are sent again", e)
            await self._requeue_lost(e)

    async def _requeue_lost(self, cause: BaseException) -> None:
        """The scheduler lost its queues: once it answers again (a heartbeat, which also
        lets it adopt the leases this caller holds), queue the waiting requests there
        again. A request waiting to go on on another replica after its own failed cannot
        be queued again (the new scheduler knows no lease of it): it fails."""
        try:
            await self._ask_scheduler(
                lambda: self._scheduler.heartbeat.remote(self.caller_id, *self._holding())
            )
        except Exception as e:
            err = ReplicaUnavailable(f"lost the scheduler while waiting for a replica: {e}")
            self._queued.clear()
            self._resolve([(rid, err) for rid in list(self._pending)])
            return
        self._grants = spawn(self._read_grants())
        again = [r for rid, r in self._queued.items() if rid in self._pending]
        self._queued.clear()
        stranded = [rid for rid in self._requeued if rid in self._pending]
        err = ReplicaUnavailable(
            f"lost the scheduler while waiting for another replica after a failure: {cause}"
        )
        self._resolve([(rid, err) for rid in stranded])
        if again:
            await self._acquire_batch(again)

    def _hold(self, lease: Lease) -> None:
        """A lease is this caller's until it is released: its heartbeats name it, and
        where it runs."""
        self._held.add(lease.request_id)
        self._placed[lease.request_id] = (lease.replica_id, lease.cost_tokens)

    def _holding(self) -> tuple[list[str], dict[str, tuple[str, int]]]:
        """What a heartbeat says this caller holds: its entries and leases, and where
        each lease runs."""
        return sorted(self._held), dict(self._placed)

    async def _heartbeats(self) -> None:
        """Tell the scheduler every HEARTBEAT_S that this caller is alive: the leases of a
        caller that falls silent are taken back (it ended or died without releasing)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                ref = self._scheduler.heartbeat.remote(self.caller_id, *self._holding())
                ref.future().add_done_callback(_log_failure("a heartbeat"))
            except Exception as e:  # a restarting scheduler: the next beat reaches it
                logger.debug("heartbeat not sent: %s", e)

    def _resolve(self, results: list[tuple[str, Lease | BaseException]]) -> None:
        for rid, result in results:
            future = self._pending.pop(rid, None)
            self._queued.pop(rid, None)
            self._requeued.discard(rid)
            if future is None or future.done():
                if isinstance(result, Lease):  # its caller gave up meanwhile: hand it back
                    self._releases.add((rid, {"error": "cancelled"}, False))
                continue
            if isinstance(result, Lease):
                self._hold(result)
                future.set_result(result)
            else:
                self._held.discard(rid)  # refused, or expired in the queue: nothing held
                future.set_exception(result)

    def _send_releases(self, items: list[tuple[str, dict[str, Any], bool]]) -> None:
        for rid, _, _ in items:
            self._held.discard(rid)
            self._placed.pop(rid, None)
        ref = self._scheduler.release.remote(items, self.caller_id)
        ref.future().add_done_callback(_log_failure("releases"))

    def _release(self, lease: Lease, usage: Usage, replica_failed: bool) -> None:
        d = {k: v for k, v in vars(usage).items() if k != "extra"}
        self._releases.add((lease.request_id, d, replica_failed))

    def _handle(self, replica_id: str) -> Any:
        if replica_id not in self._handles:
            try:
                self._handles[replica_id] = get_actor(replica_id)
            except ValueError:
                raise ReplicaDied(f"replica {replica_id} no longer exists") from None
        return self._handles[replica_id]

    def _channel(self, replica_id: str) -> ReplicaChannel:
        ch = self._channels.get(replica_id)
        if ch is None or ch.dead is not None:
            ch = ReplicaChannel(replica_id, self._handle(replica_id), self.caller_id)
            self._channels[replica_id] = ch
        return ch

    async def close(self) -> None:
        """Send what is still collected (releases, observations), close the grant stream
        and every replica channel of this process, and tell the scheduler this caller is
        gone, so it takes back whatever is still queued or leased under it."""
        self._observations.flush()
        tasks = [t for t in [self._grants, self._keepalive] if t is not None]
        for replica_id in list(self._channels):
            ch = self._channels[replica_id]
            if ch._reader is not None:
                tasks.append(ch._reader)
            self._drop_channel(replica_id)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Calls ended by dropping the channels release in their own finally blocks; one
        # more turn of the loop lets them, then everything goes before the goodbye (Ray
        # keeps one caller's calls to an actor in order).
        await asyncio.sleep(0)
        self._releases.flush()
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)
        try:
            await asyncio.wait_for(self._scheduler.caller_gone.remote(self.caller_id), 10)
        except Exception as e:  # the scheduler takes back a silent caller's leases anyway
            logger.debug("caller_gone not delivered: %s", e)

    def _drop_channel(self, replica_id: str) -> None:
        ch = self._channels.pop(replica_id, None)
        self._handles.pop(replica_id, None)
        if ch is not None:
            ch.close()
