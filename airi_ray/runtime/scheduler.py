"""``GlobalScheduler``: the actor around ``core.scheduling.Scheduler``.

It hands out leases (``acquire``), takes them back with usage (``release``, batched by
callers), puts requests whose replica died before their first token back at the head of
their tenant's queue (``requeue``), keeps the replica views the controller pushes, and owns
the runtime metrics, because every model call passes through it whatever surface it came
from. Every decision is the core's; this class only delivers grants to waiting callers
(one stream per caller), expires requests that wait too long, and applies tenant policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from airi_ray.config import ANONYMOUS_TENANT, SYSTEM_TENANT, AppSpec
from airi_ray.core.accounting import (
    Accounting,
    Kind,
    UsageRecord,
    earlier_windows,
    keep_since,
    rebuild,
    recent_since,
    summarize,
)
from airi_ray.core.callers import CallerBook
from airi_ray.core.errors import (
    AiriError,
    InvalidRequest,
    ReplicaUnavailable,
    SchedulerStarting,
)
from airi_ray.core.kv_events import CacheDelta
from airi_ray.core.policy import (
    Admission,
    AuditEvent,
    PolicyEngine,
    TenantPolicy,
    refusal_event,
)
from airi_ray.core.requests import Usage, cap_priority
from airi_ray.core.scheduling import AcquireRequest, Lease, ReplicaView, Scheduler
from airi_ray.core.stats import RateWindow, SampleWindow, percentile
from airi_ray.data.usage import UsageLog
from airi_ray.obs.metrics import RuntimeMetrics, UsageLogCollector
from airi_ray.runtime.outbox import Outbox
from airi_ray.runtime.usage_writer import UsageWriter

logger = logging.getLogger(__name__)

SIGNAL_WINDOW_S = 30.0
# How a call that ended this way counts for its version's error rate (rollouts): the
# caller leaving is not the version's fault.
_NOT_VERSION_ERRORS = frozenset({"CancelledError", "GeneratorExit", "caller_gone", "release_lost"})
MAX_VERSION_SAMPLES = 10_000
# How long a call admitted by the previous process (after a restart) holds its tenant's
# concurrency slot without any caller naming it in a heartbeat: callers beat every 2s.
ORPHAN_GRACE_S = 20.0
# Releases that reach a restarted scheduler before its first ``configure`` (which loads
# the usage records): kept until then, to charge their calls' real tokens.
MAX_EARLY_RELEASES = 10_000


@dataclasses.dataclass
class _VersionStats:
    """One version's calls since its model's traffic split last changed."""

    requests: int = 0
    errors: int = 0
    ttfts: list[float] = dataclasses.field(default_factory=list)

    def add(self, error: bool, ttft_s: float | None) -> None:
        self.requests += 1
        self.errors += error
        if ttft_s is not None and len(self.ttfts) < MAX_VERSION_SAMPLES:
            self.ttfts.append(ttft_s)


# One caller's undelivered grants: ``(request_id, Lease | AiriError)`` pairs.
_Grants = Outbox[tuple[str, Lease | AiriError]]


class GlobalScheduler:
    """Leases for model calls. A caller (one ``CallPath``) sends its acquires in batches
    and reads the grants of its queued requests from one stream (``grants``): a waiting
    request costs the caller no Ray call of its own, however long the queue."""

    def __init__(self, durable: bool = False) -> None:
        self.core = Scheduler()
        self.queue_timeout_s = 60.0
        self.metrics = RuntimeMetrics(lambda: self.core.stats(time.monotonic()))
        self._callers: dict[str, _Grants] = {}
        self._waiting: dict[str, tuple[str, float]] = {}  # request -> (caller, expiry)
        self._expiry: list[tuple[float, str]] = []  # heap over ``_waiting``'s expiries
        # Each caller's queued and leased requests, and when it was last heard from: a
        # caller that went away without handing them back is found here (see callers.py).
        self.callers = CallerBook()
        # Tenant limits (ACL, rate limits, budgets, concurrency) on every call, whatever
        # surface it came from; an admission is settled with the real tokens at release.
        self.policy = PolicyEngine()
        self._admissions: dict[str, Admission] = {}
        # Requests let in by ``enter`` and not yet queued by ``acquire``: when they entered.
        self._entered: dict[str, float] = {}
        self._expirer: asyncio.Task[None] | None = None
        self.config_version: str | None = None  # of the spec last applied
        # Models of the first spec whose replicas the controller has not yet sent (None:
        # no spec yet). Until it has sent them all, requests are answered with
        # SchedulerStarting: a restarted process knows no tenant or replica yet, and would
        # refuse what it should serve.
        self._views_to_come: set[str] | None = None
        self._stable: dict[str, str | None] = {}  # per model, as last set with its split
        # Recent TTFTs and arrivals per model: the autoscaler's latency and traffic signals.
        self._ttfts: dict[str, SampleWindow] = defaultdict(lambda: SampleWindow(SIGNAL_WINDOW_S))
        self._arrivals: dict[str, RateWindow] = defaultdict(lambda: RateWindow(SIGNAL_WINDOW_S))
        # Per model and version, since the split last changed: what a rollout judges.
        self._versions: dict[str, dict[str, _VersionStats]] = defaultdict(
            lambda: defaultdict(_VersionStats)
        )
        # Durable accounting (``core.accounting``): with ``durable``, every admission and
        # settle is recorded in the storage URI's usage log, and the first ``configure``
        # rebuilds budgets, rate buckets, VTC counters and the admissions in flight from
        # it, so a restart forgets at most the batch not yet written.
        self._durable = durable
        self.usage: UsageWriter | None = None
        self._policies: list[TenantPolicy] = []
        # Calls the previous process admitted that may still run (after a restart): not
        # yet named by a heartbeat (-> when their slot is given up), and named (-> when).
        self._orphans: dict[str, float] = {}
        self._adopted: dict[str, float] = {}
        self._early_releases: dict[str, tuple[int, int]] = {}  # before the rebuild
        self.metrics.registry.register(UsageLogCollector(self.usage_stats))

    def needs_config(self, version: str) -> bool:
        """Whether this scheduler lacks the spec ``version`` (e.g. it just restarted), or
        its usage log could not be opened yet (then each ``configure`` tries again)."""
        return self.config_version != version or (self._durable and self.usage is None)

    def configure(self, spec: dict[str, Any], version: str | None = None) -> None:
        """Apply the app spec's scheduler, tenant and model routing settings."""
        app = AppSpec.model_validate(spec)
        if self._views_to_come is None:  # the first spec of this process
            self._views_to_come = {m.name for m in app.models}
        self.config_version = version
        s = app.scheduler
        core = self.core
        if s.policy != core.policy and not any(core.queue_depth(m) for m in core.models()):
            core.set_policy(s.policy)
        core.max_queue_per_model = s.max_queue_per_model
        core.max_queued_per_tenant = s.max_queued_per_tenant
        core.output_weight = s.output_weight
        core.prefix_load_margin = s.prefix_load_margin
        core.routing = s.routing
        core.set_tenants(
            {t.name: t.weight for t in app.tenants},
            {t.name: t.max_queued for t in app.tenants if t.max_queued is not None},
        )
        for m in app.models:
            core.set_preferred_accelerators(m.name, m.accelerators)
            core.set_cold_start(m.name, m.autoscale is not None and m.autoscale.scale_to_zero)
        self.queue_timeout_s = s.queue_timeout_s
        policies = [
            TenantPolicy(
                name=t.name,
                models=tuple(t.models),
                graphs=tuple(t.graphs),
                priority=t.priority,
                weight=t.weight,
                rpm=t.rpm,
                tpm=t.tpm,
                budget_tokens=t.budget_tokens,
                budget_period_s=t.budget_period_s,
                max_concurrent=t.max_concurrent,
                **t.shape_limits(),
            )
            for t in app.tenants
        ]
        if app.ingress.auth == "none" and ANONYMOUS_TENANT not in {t.name for t in app.tenants}:
            policies.append(TenantPolicy(name=ANONYMOUS_TENANT))
        policies.append(TenantPolicy(name=SYSTEM_TENANT))
        self.policy.set_policies(policies)
        self._policies = policies
        if self._durable:
            self._open_usage(app.storage.resolved_uri(), {m.name for m in app.models})

    # -- durable accounting ----------------------------------------------------------------

    def _open_usage(self, uri: str, models: set[str]) -> None:
        """Open the usage log at ``uri``; the first time in this process, rebuild the
        tenants' accounting from it. A storage error is logged and leaves accounting in
        memory only until the next ``configure`` (``needs_config`` asks for one)."""
        if self.usage is not None:
            if self.usage.log.uri != uri:  # the spec moved the storage: write there now
                try:
                    self.usage.log = UsageLog(uri)
                except Exception:
                    logger.exception("cannot open the usage log at %s; keeping the old one", uri)
            self.usage.start()
            return
        wall = time.time()
        since = recent_since(wall)  # older records: only their budget totals count
        try:
            log = UsageLog(uri)
            records = log.load(since)
            earlier = log.budget_totals(earlier_windows(self._policies, wall), since)
        except Exception:
            logger.exception(
                "cannot read the usage log at %s: budgets, rate limits and fairness are in "
                "memory only until it can be (retried on the next configure)",
                uri,
            )
            return
        acc = rebuild(
            records,
            self._policies,
            wall,
            output_weight=self.core.output_weight,
            since=since,
            earlier=earlier,
        )
        self.usage = UsageWriter(log, lambda now: keep_since(self._policies, now))
        self._restore(acc, wall, models)
        self.usage.start()
        limits = {p.name: p.budget_tokens for p in self._policies}
        logger.info(
            "accounting rebuilt from %d usage records: %s", len(records), summarize(acc, limits)
        )

    def _restore(self, acc: Accounting, wall: float, models: set[str]) -> None:
        """Apply a rebuild: budgets and rate buckets, VTC counters, admissions in flight."""
        for tenant in self.policy.tenants():
            self.policy.restore(
                tenant,
                wall,
                budget_spent=acc.budget_spent.get(tenant, 0),
                rate_events=acc.rate_events.get(tenant, ()),
            )
        for model, counters in acc.counters.items():
            if model in models:
                try:
                    self.core.restore_counters(model, counters)
                except ValueError as e:  # requests came first: their order stands
                    logger.warning("VTC counters of %s not restored: %s", model, e)
        due = time.monotonic() + ORPHAN_GRACE_S
        early, self._early_releases = self._early_releases, {}
        for rid, r in acc.open.items():
            if rid in self._admissions:
                continue
            admission = self.policy.adopt(r.tenant, r.model, r.prompt_tokens, r.admitted_at)
            if admission is None:
                continue
            self._admissions[rid] = admission
            if rid in early:  # its release came before the rebuild: settle it now
                self._settle(rid, *early[rid])
            else:
                self._orphans[rid] = due

    def _record(
        self, kind: Kind, rid: str, admission: Admission, prompt: int, completion: int
    ) -> None:
        """Buffer a usage record; written at once when its tenant is near a limit."""
        usage = self.usage
        if usage is None:
            return
        wall = time.time()
        record = UsageRecord(
            kind,
            rid,
            admission.tenant,
            admission.model,
            max(0, prompt),
            max(0, completion),
            admission.admitted_at,
            wall,
        )
        usage.add(record, urgent=self.policy.near_limit(admission.tenant, wall))

    def _sweep_orphans(self, now: float) -> None:
        """Give up the slots of calls of the previous process that no caller named within
        the grace period: their release was lost with that process. They are settled with
        their prompt estimate (their real counts went with it)."""
        if not self._orphans:
            return
        gone = [rid for rid, due in self._orphans.items() if due <= now]
        for rid in gone:
            del self._orphans[rid]
            admission = self._admissions.get(rid)
            self._settle(rid, admission.estimate_tokens if admission else 0, 0)
        if gone:
            logger.warning(
                "%d calls admitted before the restart were named by no caller within %gs: "
                "their concurrency slots are free again",
                len(gone),
                ORPHAN_GRACE_S,
            )

    def usage_stats(self) -> dict[str, Any]:
        """The usage log's writer: records buffered, written, dropped, failed writes; and
        the calls of a previous process still held (named by a caller, or not yet)."""
        u = self.usage
        return {
            "durable": u is not None,
            "pending": u.pending() if u else 0,
            "written": u.written if u else 0,
            "dropped": u.dropped if u else 0,
            "failures": u.failures if u else 0,
            "orphans": len(self._orphans),
            "adopted": len(self._adopted),
        }

    # -- leases ----------------------------------------------------------------------------

    def enter(self, caller_id: str, requests: list[AcquireRequest]) -> list[AiriError | None]:
        """The front door: check a caller's batch of requests against the tenant's limits
        that need no tokens (request shape, ACL, concurrency, budget, requests/minute)
        before the caller tokenizes their prompts, and charge them. Per request: None (it
        may go on to ``acquire`` with the same id, which charges its tokens) or the refusal.
        A request that entered and is refused before ``acquire`` (say, too long for the
        model) is handed back with ``release`` and has counted as a request.
        """
        self._check_started()
        now = time.monotonic()
        self.callers.heard(caller_id, now)
        self._sweep_orphans(now)
        wall = time.time()
        results: list[AiriError | None] = []
        for request in requests:
            rid = request.request_id
            try:
                if rid in self._admissions or self.callers.caller_of(rid) is not None:
                    raise InvalidRequest(f"request {rid} is already in the scheduler")
                self._check_shape(request)
                admission = self.policy.enter(request.tenant, request.model, wall)
            except AiriError as e:
                self._refused(request, e)
                results.append(e)
                continue
            self._admissions[rid] = admission
            self._record("open", rid, admission, 0, 0)
            self._entered[rid] = now
            self.callers.add(caller_id, rid, now)
            results.append(None)
        return results

    def _check_started(self) -> None:
        if self._views_to_come is None or self._views_to_come:
            raise SchedulerStarting(
                "the scheduler is starting (it was restarted); the call is asked again"
            )

    def _check_shape(self, request: AcquireRequest) -> None:
        """The request's size fields that need no tokens, against its tenant's limits."""
        self.policy.check_request_shape(
            request.tenant,
            max_tokens=request.requested_max_tokens,
            messages=request.messages,
            stop=request.stop,
            prompt_chars=request.prompt_chars,
        )

    def acquire(
        self, caller_id: str, requests: list[AcquireRequest]
    ) -> list[Lease | AiriError | None]:
        """Queue a caller's batch of requests and grant what fits now.

        Per request: a ``Lease`` if granted at once, an error (``Overloaded``: 429,
        ``ReplicaUnavailable``: 503) if it cannot be queued, or ``None`` if it waits: its
        lease (or a timeout error) then arrives on the caller's ``grants`` stream.
        """
        self._check_started()
        now = time.monotonic()
        results: dict[str, Lease | AiriError | None] = {}
        self._callers.setdefault(caller_id, _Grants())
        self.callers.heard(caller_id, now)
        self._sweep_orphans(now)
        wall = time.time()  # budgets reset on UTC boundaries
        for request in requests:
            rid = request.request_id
            self._arrivals[request.model].add(now, 1)
            if self._orphans.pop(rid, None) is not None or self._unadopt(rid):
                self._entered[rid] = now  # entered at the previous process: its slot is held
            entered = self._admissions.get(rid) if self._entered.pop(rid, None) else None
            try:
                if entered is None:  # else checked at the door
                    self._check_shape(request)
                if request.inputs:
                    self.policy.check_request_shape(
                        request.tenant, embedding_tokens=request.prompt_tokens
                    )
                admission = self.policy.admit(
                    request.tenant,
                    request.model,
                    request.prompt_tokens,
                    request.max_tokens,
                    wall,
                    entered=entered,
                )
            except AiriError as e:
                self._refused(request, e)
                results[rid] = e
                if entered is not None:
                    self._settle(rid, 0, 0)
                    self.callers.remove(rid)
                continue
            # The tenant's class caps the call's: a batch tenant cannot jump its own queue.
            priority = cap_priority(request.priority, admission.priority)
            if priority != request.priority:
                request = dataclasses.replace(request, priority=priority)
            try:
                self.core.enqueue(request, now)
            except AiriError as e:
                self._admissions[rid] = admission  # replaces an entered request's
                self._settle(rid, 0, 0)
                self.callers.remove(rid)
                results[rid] = e
                continue
            self._admissions[rid] = admission
            if entered is None or self.policy.policy(request.tenant).tpm is not None:
                # Its prompt estimate, for a tokens/minute bucket rebuilt while it runs; an
                # entered call's slot is recorded already.
                self._record("open", rid, admission, admission.estimate_tokens, 0)
            self.callers.add(caller_id, rid, now)
            results[rid] = None
            self._wait(request.request_id, caller_id, now)
        self._dispatch(results)
        return [results[r.request_id] for r in requests]

    def requeue(
        self,
        caller_id: str,
        request_id: str,
        exclude_version: bool = False,
        pin_version: bool = False,
    ) -> Lease | None:
        """The request failed on its replica: queue it again.

        The request goes back to the head of its tenant's queue, avoiding that replica,
        which stops taking work until the controller replaces it. With
        ``exclude_version`` (a canary version failed it) it avoids the whole version
        instead, and the replica keeps working. With ``pin_version`` (its replica died
        mid-stream) it goes on on the same version only. Either way the attempt counts as
        an error of its version. Returns a new lease if one is free now, else None (the lease
        arrives on the ``grants`` stream).

        Raises:
            ReplicaUnavailable: the request holds no lease (it was released already), or
                with ``pin_version`` no other replica of its version is up.
        """
        now = time.monotonic()
        self.callers.heard(caller_id, now)
        lease = self.core.lease(request_id)
        if lease is None or not self.core.requeue(
            request_id, exclude_version=exclude_version, pin_version=pin_version
        ):
            raise ReplicaUnavailable(f"request {request_id} holds no lease to requeue")
        self._versions[lease.model][lease.version].add(True, None)
        if not exclude_version:
            self.core.mark_unready(lease.replica_id)
        self._wait(request_id, caller_id, now)
        results: dict[str, Lease | AiriError | None] = {request_id: None}
        self._dispatch(results)
        result = results[request_id]
        assert not isinstance(result, AiriError)
        return result

    async def grants(self, caller_id: str) -> AsyncIterator[list[tuple[str, Lease | AiriError]]]:
        """Stream the caller's grants, a list per wake-up, until the caller says goodbye
        (``caller_gone``) or falls silent (see ``CallerBook``); then its queued requests
        are dropped and its leases returned. Ray does not end this stream when the caller
        dies, so the end of the stream is not relied on to notice it."""
        grants = self._callers.setdefault(caller_id, _Grants())
        if self._expirer is None or self._expirer.done():
            self._expirer = asyncio.create_task(self._expire_loop())
        if self.usage is not None:
            self.usage.start()  # configure may have run without an event loop
        try:
            async for batch in grants.batches():
                yield batch
        finally:
            if self._callers.get(caller_id) is grants:  # not taken back already
                self._take_back(caller_id, "closed its grant stream")

    def heartbeat(
        self,
        caller_id: str,
        held: list[str] | None = None,
        placed: dict[str, tuple[str, int]] | None = None,
    ) -> int:
        """The caller is alive (sent every few seconds, whatever it is doing), and still
        holds the leases ``held``: any other lease booked under it lost its release and
        is taken back (see ``CallerBook.unheld``). Returns how many were.

        ``placed`` gives the replica and KV-token cost of each held lease: a call that
        runs under a lease of the previous process (after a restart) then keeps its
        replica's slot and tokens in routing as well as its tenant's concurrency."""
        now = time.monotonic()
        self.callers.heard(caller_id, now)
        if held is None:
            return 0
        if self._orphans:  # calls of the previous process this caller still runs
            for rid in held:
                if self._orphans.pop(rid, None) is not None:
                    self._adopted[rid] = now
                    self.callers.add(caller_id, rid, now)
                    admission = self._admissions.get(rid)
                    where = (placed or {}).get(rid)
                    if admission is not None and where is not None:
                        self.core.adopt(rid, admission.model, where[0], int(where[1]))
            self._sweep_orphans(now)
        lost = self.callers.unheld(caller_id, held, self._granted_at, now)
        if lost:
            logger.warning(
                "caller %s no longer holds %d leases booked under it (%s): taken back",
                caller_id,
                len(lost),
                ", ".join(lost),
            )
            self.release([(rid, {"error": "release_lost"}, False) for rid in lost], caller_id)
        return len(lost)

    def _unadopt(self, request_id: str) -> bool:
        """Forget a call adopted from the previous process (it ended); False if it was not
        one. Its replica's slot and tokens are free again."""
        if self._adopted.pop(request_id, None) is None:
            return False
        self.core.drop_adopted(request_id)
        return True

    def _granted_at(self, request_id: str) -> float | None:
        """When the request's lease was granted, or it entered (a caller holds both)."""
        lease = self.core.lease(request_id)
        if lease is not None:
            return lease.granted_at
        return self._entered.get(request_id, self._adopted.get(request_id))

    def caller_gone(self, caller_id: str) -> int:
        """The caller is closing: take back what it still holds (a client's ``close``, an
        ingress replica's shutdown). Returns how many requests were taken back."""
        return self._take_back(caller_id, "closed")

    def _take_back(self, caller_id: str, why: str) -> int:
        """Drop the caller's queued requests, release its leases, close its grant stream."""
        grants = self._callers.pop(caller_id, None)
        if grants is not None:
            grants.close()
        requests = self.callers.drop(caller_id)
        leased = [rid for rid in requests if self.core.lease(rid) is not None]
        if requests:
            logger.warning(
                "caller %s %s holding %d leases and %d queued requests: taken back",
                caller_id,
                why,
                len(leased),
                len(requests) - len(leased),
            )
        for rid in requests:
            if rid not in leased:
                self._drop_waiting(rid)
        if leased:
            self.release([(rid, {"error": "caller_gone"}, False) for rid in leased])
        return len(requests)

    def release(
        self, items: list[tuple[str, dict[str, Any], bool]], caller_id: str | None = None
    ) -> None:
        """Take back leases ``(request_id, usage, replica_failed)`` and charge their usage.

        A request still waiting in a queue (its caller gave up) is just dropped.
        """
        now = time.monotonic()
        if caller_id is not None:
            self.callers.heard(caller_id, now)
        for request_id, usage_dict, replica_failed in items:
            usage = Usage(**usage_dict)
            self.callers.remove(request_id)
            if request_id in self._adopted or request_id in self._orphans:
                # Admitted by the previous process: charge what it used, free its slot.
                self._unadopt(request_id)
                self._orphans.pop(request_id, None)
                self._settle(request_id, usage.prompt_tokens, usage.completion_tokens)
                continue
            if (
                self._durable
                and self.usage is None
                and request_id not in self._admissions
                and len(self._early_releases) < MAX_EARLY_RELEASES
            ):  # restarted and not rebuilt yet: its admission may be in the usage log
                self._early_releases[request_id] = (usage.prompt_tokens, usage.completion_tokens)
            lease = self.core.release(request_id, usage.completion_tokens, now)
            if lease is None:
                self._drop_waiting(request_id)
                continue
            self._settle(request_id, usage.prompt_tokens, usage.completion_tokens)
            if usage.ttft_s is not None:
                self._ttfts[lease.model].add(now, usage.ttft_s)
            failed = usage.error is not None and usage.error not in _NOT_VERSION_ERRORS
            self._versions[lease.model][lease.version].add(failed, usage.ttft_s)
            if replica_failed:
                self.core.mark_unready(lease.replica_id)
            self.metrics.record_call(lease, usage)
        self._dispatch()

    def prefilled(self, request_ids: list[str]) -> None:
        """These calls' first tokens are out: their prompts no longer hold their replicas'
        prefill budgets, and what waited for room may be granted."""
        if self.core.prefilled(request_ids):
            self._dispatch()

    def _wait(self, request_id: str, caller_id: str, now: float) -> None:
        expires = now + self.queue_timeout_s
        self._waiting[request_id] = (caller_id, expires)
        heapq.heappush(self._expiry, (expires, request_id))

    def _settle(self, request_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Charge a finished (or abandoned) call's real tokens to its tenant's limits."""
        admission = self._admissions.pop(request_id, None)
        if admission is not None and self.policy.release(
            admission, prompt_tokens, completion_tokens, time.time()
        ):
            self._record("settle", request_id, admission, prompt_tokens, completion_tokens)

    def autoscale_signals(self) -> dict[str, dict[str, Any]]:
        """Per model: queued and running tokens, TTFT p99 and requests over the last
        ``SIGNAL_WINDOW_S`` seconds (what the controller's autoscaler decides on)."""
        now = time.monotonic()
        out = {}
        for model, st in self.core.stats(now).items():
            ttfts = self._ttfts[model].values(now)
            out[model] = {
                "queued_tokens": st.queued_tokens,
                "running_tokens": st.in_flight_tokens,
                "ttft_p99_s": percentile(ttfts, 99) if ttfts else None,
                "requests_in_window": round(self._arrivals[model].rate(now) * SIGNAL_WINDOW_S),
            }
        return out

    def set_traffic(self, splits: dict[str, tuple[dict[str, float], str | None]]) -> None:
        """Each model's traffic split ``(weight per version, stable version)``, all in one
        call, so models that switch together switch in the same instant. A model whose
        split changed starts its version stats afresh."""
        for model, (weights, stable) in splits.items():
            if self.core.traffic(model) == weights and self._stable.get(model) == stable:
                continue
            self.core.set_traffic(model, weights, stable)
            self._stable[model] = stable
            self._versions.pop(model, None)
            for version, weight in weights.items():
                self.metrics.traffic.labels(model, version).set(weight)
        self._dispatch()

    def version_stats(self, model: str) -> dict[str, dict[str, Any]]:
        """Per version of ``model``, since its split last changed: requests, errors and
        TTFT p99 (None without samples)."""
        return {
            v: {
                "requests": s.requests,
                "errors": s.errors,
                "ttft_p99_s": percentile(s.ttfts, 99) if s.ttfts else None,
            }
            for v, s in self._versions.get(model, {}).items()
        }

    def replica_in_flight(self, model: str) -> dict[str, int]:
        """Leases held per replica of ``model`` (a draining version waits for zero)."""
        return {r.replica_id: r.in_flight for r in self.core.replicas(model)}

    def record_rollout(self, model: str, action: str) -> None:
        """Count a rollout decision the controller acted on."""
        self.metrics.rollout_decisions.labels(model, action).inc()

    def record_scaling(self, model: str, direction: str, replicas: int) -> None:
        """Count an autoscaling decision the controller acted on."""
        self.metrics.autoscale_decisions.labels(model, direction).inc()
        self.metrics.desired_replicas.labels(model).set(replicas)

    def audit(self, events: list[AuditEvent]) -> None:
        """Count content-filter outcomes (blocks, redactions, flags) reported by callers."""
        for e in events:
            self.metrics.policy_filter_events.labels(e.model, e.tenant, e.rule, e.action).inc(
                e.count
            )

    def _refused(self, request: AcquireRequest, error: AiriError) -> None:
        """Log and count a policy refusal; never the key, never the prompt."""
        event = refusal_event(
            error, tenant=request.tenant, model=request.model, request_id=request.request_id
        )
        logger.info("policy refused %s", event)
        self.metrics.policy_refusals.labels(request.model, request.tenant, event.rule).inc()

    def _drop_waiting(self, request_id: str) -> str | None:
        """Take a request out of its queue; returns its caller."""
        self.callers.remove(request_id)
        if (
            self.core.cancel(request_id)
            or self._entered.pop(request_id, None) is not None
            or self._unadopt(request_id)
        ):
            self._settle(request_id, 0, 0)
        waiting = self._waiting.pop(request_id, None)
        return waiting[0] if waiting else None

    def _dispatch(self, results: dict[str, Lease | AiriError | None] | None = None) -> None:
        """Grant what fits; leases of requests in ``results`` go there, others to streams."""
        granted = True
        while granted:  # a lease nobody waits for any more frees a slot for the next one
            granted = False
            for lease in self.core.dispatch(time.monotonic()):
                rid = lease.request_id
                waiting = self._waiting.pop(rid, None)
                grants = self._callers.get(waiting[0]) if waiting else None
                if waiting is None or (grants is None and (results is None or rid not in results)):
                    self.core.release(rid)
                    self._settle(rid, 0, 0)
                    self.callers.remove(rid)
                    granted = True
                    continue
                if results is not None and rid in results:
                    results[rid] = lease
                else:
                    assert grants is not None
                    grants.push((rid, lease))

    async def _expire_loop(self) -> None:
        """Refuse requests that waited longer than the queue timeout, and take back what
        silent callers hold (checked each second)."""
        while self._callers or len(self.callers):
            await asyncio.sleep(1.0)
            now = time.monotonic()
            self._sweep_orphans(now)
            for caller in self.callers.expired(now):
                self._take_back(caller, f"was silent for over {self.callers.ttl_s:g}s")
            while self._expiry and self._expiry[0][0] <= now:
                expires, rid = heapq.heappop(self._expiry)
                waiting = self._waiting.get(rid)
                if waiting is None or waiting[1] != expires:
                    continue  # granted, cancelled or requeued since
                model = self.core.queued_model(rid) or "?"
                caller = self._drop_waiting(rid)
                ready = sum(1 for r in self.core.replicas(model) if r.ready)
                grants = self._callers.get(caller or "")
                if grants is not None:
                    error = ReplicaUnavailable(
                        f"no replica of model {model!r} became free within "
                        f"{self.queue_timeout_s:g}s ({ready} ready replicas); retry later"
                    )
                    grants.push((rid, error))

    def set_replicas(
        self, model: str, views: list[ReplicaView], stats: list[dict[str, Any]]
    ) -> None:
        """The controller's current view of a model's replicas and their engine stats."""
        self.core.set_replicas(model, views)
        if self._views_to_come:
            self._views_to_come.discard(model)
        engines = self.metrics.engines.replicas
        for rid in [rid for rid, s in engines.items() if s["model"] == model]:
            del engines[rid]
        for s in stats:
            engines[s["replica_id"]] = {**s, "model": model}
        ready = sum(1 for v in views if v.ready)
        self.metrics.replicas.labels(model, "ready").set(ready)
        self.metrics.replicas.labels(model, "starting").set(sum(1 for v in views if v.starting))
        self._dispatch()

    def observe_cache(self, replica_id: str, delta: CacheDelta) -> bool:
        """A replica's report of what its engine's prefix cache now holds (see
        ``core.scheduling.Scheduler.observe_cache``); False asks it for a full snapshot."""
        return self.core.observe_cache(replica_id, delta)

    def snapshot(self) -> dict[str, Any]:
        """Queue depth, leases and replica views per model, for ``airi status``."""
        stats = self.core.stats(time.monotonic())
        return {
            m: {
                "queue_depth": self.core.queue_depth(m),
                "in_flight": self.core.in_flight(m),
                "routes": stats[m].routes if m in stats else {},
                "engine_cache_blocks": stats[m].engine_cache_blocks if m in stats else 0,
                "tenants": (
                    {t: dataclasses.asdict(x) for t, x in stats[m].tenants.items()}
                    if m in stats
                    else {}
                ),
                "replicas": [dataclasses.asdict(r) for r in self.core.replicas(m)],
            }
            for m in sorted(self.core.models())
        }

    def outstanding(self) -> dict[str, Any]:
        """What is still held, all zero once every call has ended: per model its leases,
        in-flight count and queued requests, and this actor's own books (requests by caller,
        requests waiting for a grant, open policy admissions, requests let in at the front
        door and not yet queued). A count left above zero is
        a leak: the model serves that much less until a restart."""
        core = self.core
        now = time.monotonic()
        return {
            "models": {
                m: {
                    "in_flight": core.in_flight(m),
                    "queued": core.queue_depth(m),
                    "leases": [
                        {
                            "request_id": x.request_id,
                            "tenant": x.tenant,
                            "replica": x.replica_id,
                            "caller": self.callers.caller_of(x.request_id),
                            "age_s": round(now - x.granted_at, 1),
                        }
                        for x in core.leases(m)
                    ],
                }
                for m in sorted(core.models())
            },
            "callers": self.callers.held(),
            "waiting": len(self._waiting),
            "admissions": len(self._admissions),
            "entered": len(self._entered),
            # Leases awaiting their first token, and the prefill tokens replicas count.
            "prefilling": list(core.prefill_pending()),
        }

    def timeline_stats(self) -> dict[str, Any]:
        """Queue depth per tenant (all models) and prefix-cache hit rate per model, for the
        observer's samples."""
        depth: dict[str, int] = defaultdict(int)
        for model_stats in self.core.stats(time.monotonic()).values():
            for tenant, t in model_stats.tenants.items():
                depth[tenant] += t.queue_depth
        hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for s in self.metrics.engines.replicas.values():
            h = hits[s["model"]]
            h[0] += int(s.get("prefix_cache_hits", 0))
            h[1] += int(s.get("prefix_cache_queries", 0))
        return {
            "queue_depth": dict(depth),
            "cache_hit_rate": {m: h / q for m, (h, q) in hits.items() if q},
        }

    def metrics_text(self) -> bytes:
        return self.metrics.text()

    def ping(self) -> bool:
        return True
