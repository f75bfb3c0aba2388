"""A model engine: vLLM's ``AsyncLLM`` (continuous batching) behind a small interface.

The replica actor talks to this class only, so the engine arguments, the sampling and
pooling parameter types and the stats plumbing of vLLM live in this one module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from airi_ray.config import ModelSpec
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.requests import Logprobs, Position
from airi_ray.engines.source import resolve_model_source

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineStats:
    """Engine state read from vLLM's scheduler stats (updated every engine step)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int = 0  # tokens found there, cumulative
    steps: int = 0


def _positions(token_ids: Any, logprobs: Any, top: int | None) -> list[Position]:
    out: list[Position] = []
    for tid, step in zip(token_ids, logprobs or [], strict=False):
        if step is None:
            out.append(("", None, []))
            continue
        mine = step.get(tid)
        ranked = sorted(step.items(), key=lambda kv: kv[1].rank or 0)[: top or 0]
        out.append(
            (
                (mine.decoded_token or "") if mine else "",
                max(mine.logprob, -9999.0) if mine else None,
                [(p.decoded_token or "", max(p.logprob, -9999.0)) for _, p in ranked],
            )
        )
    return out


def _stat_logger_class(stats: EngineStats) -> Any:
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    # Subclassing vLLM's Prometheus logger (without its set-up) tells vLLM a Prometheus
    # logger is present, so it does not add its own: airi exports its own metrics, and
    # vLLM's per-step Prometheus updates cost about 5% of a CPU replica's time.
    class _Recorder(PrometheusStatLogger):  # type: ignore[misc]
        """Copies vLLM's per-step scheduler stats into ``stats``."""

        def __init__(self, vllm_config: Any, engine_indexes: Any = None) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kw: Any) -> None:
            if scheduler_stats is None:
                return
            stats.running = scheduler_stats.num_running_reqs
            stats.waiting = scheduler_stats.num_waiting_reqs
            stats.kv_cache_usage = scheduler_stats.kv_cache_usage
            pc = scheduler_stats.prefix_cache_stats
            stats.prefix_cache_queries += pc.queries
            stats.prefix_cache_hits += pc.hits
            stats.steps += 1

        def record_sleep_state(self, *args: Any, **kw: Any) -> None:
            pass

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def log(self) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder


# A long prompt's prefill chunk per engine step, as a share of the context window: 1/8.
LONG_PREFILL_SHARE = 8


def engine_args(spec: ModelSpec, kv_events_endpoint: str | None = None) -> Any:
    """The ``AsyncEngineArgs`` of a model spec; unknown engine keys are refused by name.

    ``kv_events_endpoint``: a ZMQ address the engine publishes its KV cache events on
    (``prefix_cache_view: engine``), None for none.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    allowed = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(spec.engine) - allowed)
    if unknown:
        raise InvalidRequest(
            f"model {spec.name!r}: unknown vLLM engine arguments {', '.join(unknown)} "
            "(see vLLM's AsyncEngineArgs for the allowed names)"
        )
    kwargs: dict[str, Any] = {
        "model": resolve_model_source(spec.model),
        "max_num_seqs": spec.max_concurrency,
        "disable_log_stats": True,  # our stat logger still receives every step
        "enable_log_requests": False,
    }
    if spec.task == "embed":
        kwargs["runner"] = "pooling"
    else:
        # Guided JSON without optional whitespace: a grammar that allows any whitespace
        # lets a model pad its JSON with newlines until max_tokens cuts it off unparsed.
        # vLLM reads this per engine, not per request (override: engine.structured_outputs_config).
        kwargs["structured_outputs_config"] = {
            "backend": "xgrammar",
            "disable_any_whitespace": True,
        }
    kwargs.update(spec.engine)
    if isinstance(kwargs.get("structured_outputs_config"), dict):
        from vllm.config import StructuredOutputsConfig

        kwargs["structured_outputs_config"] = StructuredOutputsConfig(
            **kwargs["structured_outputs_config"]
        )
    if kv_events_endpoint is not None:
        from vllm.config.kv_events import KVEventsConfig

        kwargs["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=kv_events_endpoint
        )
    args = AsyncEngineArgs(**kwargs)
    if spec.task == "generate" and "long_prefill_token_threshold" not in spec.engine:
        # A step computes at most this much of any one prompt while others wait (vLLM's
        # chunked prefill): a long prompt then slows each step it shares with another
        # tenant's call by a little, over several steps, not by a whole prefill at once.
        window = spec.engine.get("max_model_len") or args.create_model_config().max_model_len
        args.long_prefill_token_threshold = max(int(window) // LONG_PREFILL_SHARE, 16)
    return args


def explain_failure(e: BaseException) -> tuple[bool, str]:
    """Whether an exception from the engine means the engine died, and what to tell.

    Only vLLM's ``EngineDeadError`` (its engine core is gone) is death: every other
    exception failed one request (a value the engine refused, an overflow, a grammar that
    does not compile) and the engine serves on. vLLM wraps such a failure of
    ``generate`` in ``EngineGenerateError``, whose cause says what went wrong.
    """
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    if isinstance(e, EngineDeadError):
        return True, f"the engine died: {e}"
    cause: BaseException = e
    while isinstance(cause, EngineGenerateError) and cause.__cause__ is not None:
        cause = cause.__cause__
    return False, f"{type(cause).__name__}: {cause}".rstrip(": ")


class Engine:
    """One vLLM engine serving generation or embeddings for one model spec."""

    def __init__(self, spec: ModelSpec, kv_events_endpoint: str | None = None) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self.spec = spec
        self.stats = EngineStats()
        self._llm = AsyncLLM.from_engine_args(
            engine_args(spec, kv_events_endpoint), stat_loggers=[_stat_logger_class(self.stats)]
        )
        self.max_model_len: int = self._llm.model_config.max_model_len
        # Tokens the KV cache holds, as the engine core sized it (None if it did not say).
        cache = self._llm.vllm_config.cache_config
        self.kv_capacity_tokens: int | None = (
            cache.num_gpu_blocks * cache.block_size if cache.num_gpu_blocks else None
        )
        # Tokens one engine step computes at most (prefill chunks and decodes together).
        self.step_tokens: int | None = self._llm.vllm_config.scheduler_config.max_num_batched_tokens

    def _sampling(self, params: dict[str, Any]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        kwargs = dict(params)
        kwargs["stop"] = kwargs.get("stop") or None
        guide = kwargs.pop("structured_outputs", None)
        if guide is not None:
            kwargs["structured_outputs"] = StructuredOutputsParams(**guide)
        # vLLM's own constructor validates every value (ValueError: a 400 for this request).
        return SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any]
    ) -> AsyncIterator[tuple[str, list[int], str | None, Logprobs | None]]:
        """Stream ``(new_text, new_token_ids, finish_reason, logprobs)`` per engine step;
        ``logprobs`` is None unless the request asked for them. The ids let a stream go
        on on another replica should this one die.

        Closing the iterator early aborts the request in the engine.
        """
        sampling = self._sampling(params)
        want = sampling.logprobs is not None or sampling.prompt_logprobs is not None
        prompt = {"prompt_token_ids": prompt_token_ids}
        first = True
        async for out in self._llm.generate(prompt, sampling, request_id):
            c = out.outputs[0]
            lp = None
            if want:
                lp = Logprobs(
                    tokens=_positions(c.token_ids, c.logprobs, sampling.logprobs),
                    prompt=(
                        self._prompt_positions(prompt_token_ids, out.prompt_logprobs, sampling)
                        if first and sampling.prompt_logprobs is not None
                        else None
                    ),
                )
            first = False
            yield c.text, list(c.token_ids), c.finish_reason if out.finished else None, lp

    def _prompt_positions(self, ids: list[int], logprobs: Any, sampling: Any) -> list[Position]:
        # vLLM gives no entry for the first prompt token (nothing comes before it).
        head = self._llm.tokenizer.decode(ids[:1]) if ids else ""
        rest = _positions(ids[1:], list(logprobs or [])[1:], sampling.prompt_logprobs)
        return [(head, None, []), *rest]

    async def embed(
        self, token_ids: list[list[int]], dimensions: list[int | None] | None = None
    ) -> list[list[float]]:
        """Embed pre-tokenized inputs, all at once (the engine batches them); ``dimensions``
        (one per input) truncates Matryoshka embeddings, where the model has them."""
        from vllm import PoolingParams

        dims = dimensions or [None] * len(token_ids)

        async def one(ids: list[int], dim: int | None) -> list[float]:
            rid = f"embed-{uuid.uuid4().hex}"
            result = None
            params = PoolingParams(task="embed", dimensions=dim)
            async for out in self._llm.encode({"prompt_token_ids": ids}, params, rid):
                result = out
            assert result is not None
            return [float(x) for x in result.outputs.data.tolist()]

        return list(
            await asyncio.gather(*(one(ids, d) for ids, d in zip(token_ids, dims, strict=True)))
        )

    async def abort(self, request_ids: list[str]) -> None:
        await self._llm.abort(request_ids)

    async def probe(self, timeout_s: float) -> float:
        """One real token (or one embedding) within ``timeout_s``; returns seconds taken.

        An engine can hang while its process looks alive; only real work proves it serves.
        """
        start = time.perf_counter()
        rid = f"probe-{uuid.uuid4().hex}"

        async def run() -> None:
            if self.spec.task == "embed":
                await self.embed([[0, 1]])
                return
            async for _ in self.generate(rid, [0], {"max_tokens": 1, "temperature": 0.0}):
                pass

        try:
            await asyncio.wait_for(run(), timeout_s)
        except TimeoutError:
            await self.abort([rid])
            raise
        return time.perf_counter() - start

    def shutdown(self) -> None:
        self._llm.shutdown()
