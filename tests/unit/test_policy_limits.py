"""Token buckets, budgets and the policy engine (ACL, shape, RPM/TPM, budget, concurrency)."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airi_ray.core.errors import AiriError, InvalidRequest, Overloaded
from airi_ray.core.policy import (
    Budget,
    BudgetExceeded,
    ContentBlocked,
    PermissionDenied,
    PolicyEngine,
    RateLimited,
    RequestLimitExceeded,
    TenantPolicy,
    TokenBucket,
    allows,
    refusal_event,
)

DAY = 86_400.0
T0 = 1_700_000_000.0  # an epoch time, so budget windows align to UTC days


# --- TokenBucket --------------------------------------------------------------------------


def test_bucket_starts_full_and_refills() -> None:
    b = TokenBucket(rate_per_s=1.0, burst=3)
    assert [b.try_take(1, now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.try_take(1, now=0.0) == pytest.approx(1.0)
    assert b.try_take(1, now=0.5) == pytest.approx(0.5)  # refused: nothing taken
    assert b.try_take(1, now=1.0) == 0.0
    assert b.try_take(2, now=10.0) == 0.0  # refilled to the burst, not beyond
    assert b.try_take(2, now=10.0) == pytest.approx(1.0)


def test_bucket_request_larger_than_burst_waits_for_a_full_bucket() -> None:
    b = TokenBucket(rate_per_s=10.0, burst=100)
    assert b.try_take(250, now=0.0) == 0.0  # full bucket: allowed, 150 of debt
    assert b.level == -150
    assert b.try_take(1, now=0.0) == pytest.approx(15.1)
    assert b.try_take(250, now=25.0) == 0.0  # full again after 25 s


def test_bucket_charge_corrects_and_debt_delays() -> None:
    b = TokenBucket(rate_per_s=1.0, burst=10)
    b.charge(10, now=0.0)
    b.charge(-4, now=0.0)  # refund
    assert b.level == 4
    b.charge(9, now=0.0)  # real usage above the estimate: debt
    assert b.wait_s(1, now=0.0) == pytest.approx(6.0)
    b.charge(-100, now=0.0)
    assert b.level == 10  # never above the burst


def test_bucket_ignores_a_clock_going_back() -> None:
    b = TokenBucket(rate_per_s=1.0, burst=2)
    b.try_take(2, now=100.0)
    assert b.wait_s(1, now=50.0) == pytest.approx(1.0)
    assert b.wait_s(1, now=101.0) == 0.0


def test_bucket_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


# --- Budget -------------------------------------------------------------------------------


def test_budget_window_aligned_and_resets() -> None:
    b = Budget(limit=100, period_s=DAY)
    start = (T0 // DAY) * DAY
    b.charge(60, now=start + 10)
    assert b.remaining(start + 20) == 40 and not b.exhausted(start + 20)
    b.charge(50, now=start + 30)
    assert b.exhausted(start + 40) and b.remaining(start + 40) == 0
    assert b.resets_at(start + 40) == start + DAY
    assert not b.exhausted(start + DAY)  # the next UTC day
    assert b.remaining(start + DAY + 1) == 100
    assert not b.exhausted(start + 5)  # the clock going back keeps the current window


# --- engine: ACL, shape -------------------------------------------------------------------


def engine(**kw: object) -> PolicyEngine:
    return PolicyEngine([TenantPolicy("acme", **kw), TenantPolicy("other")])  # type: ignore[arg-type]


def test_acl_globs() -> None:
    e = engine(models=("tiny-*", "qwen-0.5b"), graphs=("support-*",))
    e.check_model("acme", "tiny-chat")
    e.check_model("acme", "qwen-0.5b")
    e.check_graph("acme", "support-bot")
    with pytest.raises(PermissionDenied) as err:
        e.admit("acme", "big-70b", 10, None, now=T0)
    assert err.value.status == 403 and err.value.type == "permission_error"
    assert "'big-70b'" in err.value.message and "tiny-*, qwen-0.5b" in err.value.message
    with pytest.raises(PermissionDenied, match="graph 'etl'") as gerr:
        e.check_graph("acme", "etl")
    assert gerr.value.code == "graph_not_allowed" and gerr.value.rule == "graph_acl"
    with pytest.raises(PermissionDenied):
        e.check_model("acme", "qwen-0.5b-instruct")  # whole-name match
    e.check_model("other", "anything")  # empty list: all allowed
    assert e.in_flight("acme") == 0  # a refusal charges nothing


def test_allows_decides_as_the_acl_checks_do() -> None:
    assert allows([], "anything") and allows(["tiny-*"], "tiny-chat")
    assert not allows(["tiny-*", "qwen-0.5b"], "qwen-0.5b-instruct")  # whole-name match
    assert allows(["org/*"], "org/model-7b")


def test_embedding_tokens_are_checked_only_for_embeddings() -> None:
    e = engine(max_embedding_tokens=100)
    e.check_request_shape("acme", embedding_tokens=100)
    e.check_request_shape("acme", prompt_chars=10)  # a generation: no embedding limit
    with pytest.raises(RequestLimitExceeded, match="embedding_tokens 101 is over the limit"):
        e.check_request_shape("acme", embedding_tokens=101)


def test_unknown_tenant_is_403() -> None:
    with pytest.raises(PermissionDenied, match="no policy") as err:
        engine().admit("ghost", "m", 1, None, now=T0)
    assert err.value.code == "tenant_not_configured"


@pytest.mark.parametrize(
    ("field", "kwargs", "limit"),
    [
        ("max_tokens", {"max_tokens": 10**9}, "32768"),
        ("n", {"n": 1000}, "8"),
        ("messages", {"messages": 100_000}, "512"),
        ("stop", {"stop": 500}, "16"),
        ("prompt_chars", {"prompt_chars": 10**8}, "1000000"),
        ("embedding_tokens", {"embedding_tokens": 10**6}, "300000"),
    ],
)
def test_request_shape_limits_are_400_naming_the_limit(
    field: str, kwargs: dict[str, int], limit: str
) -> None:
    with pytest.raises(RequestLimitExceeded) as err:
        engine().check_request_shape("acme", **kwargs)
    assert err.value.status == 400 and isinstance(err.value, InvalidRequest)
    assert field in err.value.message and limit in err.value.message
    assert err.value.rule == field


def test_request_shape_custom_limits_and_bad_values() -> None:
    e = engine(max_tokens=100, max_stop=2, max_n=None)
    e.check_request_shape("acme", max_tokens=100, n=50, messages=3, stop=2, prompt_chars=10)
    with pytest.raises(RequestLimitExceeded, match="max_tokens 101"):
        e.check_request_shape("acme", max_tokens=101)
    with pytest.raises(RequestLimitExceeded, match="max_tokens must be at least 1"):
        e.check_request_shape("acme", max_tokens=0)
    with pytest.raises(RequestLimitExceeded, match="n must be at least 1"):
        e.check_request_shape("acme", n=-1)


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="weight"):
        TenantPolicy("x", weight=0)
    with pytest.raises(ValueError, match="rpm"):
        TenantPolicy("x", rpm=0)
    with pytest.raises(ValueError, match="priority"):
        TenantPolicy("x", priority="urgent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two policies"):
        PolicyEngine([TenantPolicy("x"), TenantPolicy("x")])


# --- engine: rate limits ------------------------------------------------------------------


def test_rpm_limit_retry_after_and_refill() -> None:
    e = engine(rpm=60)
    for _ in range(60):
        a = e.admit("acme", "m", 10, None, now=T0)
        e.release(a, 10, 5, now=T0)
    with pytest.raises(RateLimited) as err:
        e.admit("acme", "m", 10, None, now=T0)
    assert isinstance(err.value, Overloaded) and err.value.status == 429
    assert err.value.retry_after_s == pytest.approx(1.0)
    assert err.value.rule == "rpm"
    assert "tenant 'acme' is over its 60 requests/minute limit; retry after 1.0s" in (
        err.value.message
    )
    with pytest.raises(RateLimited) as err2:
        e.admit("acme", "m", 10, None, now=T0 + 0.4)
    assert err2.value.retry_after_s == pytest.approx(0.6)
    e.admit("acme", "m", 10, None, now=T0 + 1.0)  # refilled one
    e.admit("other", "m", 10, None, now=T0)  # other tenants unaffected


def test_tpm_estimate_at_admission_and_correction_at_release() -> None:
    e = engine(tpm=1000)
    a = e.admit("acme", "m", 600, None, now=T0)  # 600 charged, 400 left
    with pytest.raises(RateLimited) as err:
        e.admit("acme", "m", 500, None, now=T0)
    assert err.value.rule == "tpm" and "1000 tokens/minute" in err.value.message
    assert err.value.retry_after_s == pytest.approx(100 / (1000 / 60))
    e.release(a, prompt_tokens=600, completion_tokens=0, now=T0)  # estimate was right
    b = e.admit("acme", "m", 400, None, now=T0)  # bucket now empty
    e.release(b, prompt_tokens=100, completion_tokens=0, now=T0)  # refund 300
    c = e.admit("acme", "m", 300, None, now=T0)
    # Real usage far above the estimate: debt that delays the next request.
    e.release(c, prompt_tokens=300, completion_tokens=700, now=T0)
    with pytest.raises(RateLimited) as err3:
        e.admit("acme", "m", 1, None, now=T0)
    assert err3.value.retry_after_s == pytest.approx((700 + 1) / (1000 / 60))


def test_rpm_and_tpm_charge_nothing_when_either_refuses() -> None:
    e = engine(rpm=10, tpm=100)
    e.admit("acme", "m", 50, None, now=T0)
    with pytest.raises(RateLimited, match="tokens/minute"):
        e.admit("acme", "m", 80, None, now=T0)
    assert e.in_flight("acme") == 1
    for _ in range(9):  # the refused request did not take a request token
        e.admit("acme", "m", 0, None, now=T0)
    with pytest.raises(RateLimited, match="requests/minute"):
        e.admit("acme", "m", 0, None, now=T0)


def test_larger_than_burst_prompt_admitted_on_full_bucket() -> None:
    e = engine(tpm=100)
    a = e.admit("acme", "m", 500, None, now=T0)
    e.release(a, 500, 0, now=T0)
    with pytest.raises(RateLimited) as err:
        e.admit("acme", "m", 1, None, now=T0)
    assert err.value.retry_after_s == pytest.approx(401 / (100 / 60))


def test_concurrency_cap_and_release() -> None:
    e = engine(max_concurrent=2)
    a = e.admit("acme", "m", 1, None, now=T0)
    e.admit("acme", "m", 1, None, now=T0)
    with pytest.raises(RateLimited, match="2 requests in flight") as err:
        e.admit("acme", "m", 1, None, now=T0)
    assert err.value.rule == "concurrency" and err.value.retry_after_s is not None
    assert e.release(a, 1, 1, now=T0) is True
    assert e.release(a, 1, 1, now=T0) is False  # idempotent
    e.admit("acme", "m", 1, None, now=T0)
    assert e.in_flight("acme") == 2


def test_enter_charges_rpm_and_a_slot_before_the_tokens_are_known() -> None:
    e = engine(rpm=3, max_concurrent=2)
    a = e.enter("acme", "m", now=T0)
    assert e.in_flight("acme") == 1 and a.estimate_tokens == 0
    e.release(a, 0, 0, now=T0)  # refused for its length: it still counted as a request
    b = e.enter("acme", "m", now=T0)
    e.enter("acme", "m", now=T0)
    with pytest.raises(RateLimited) as err:  # two in flight: the slot is taken at enter
        e.enter("acme", "m", now=T0)
    assert err.value.rule == "concurrency"
    e.release(b, 0, 0, now=T0)
    with pytest.raises(RateLimited) as err2:  # three requests this minute
        e.enter("acme", "m", now=T0)
    assert err2.value.rule == "rpm"


def test_admit_after_enter_charges_only_the_tokens() -> None:
    e = engine(rpm=1, tpm=100, max_concurrent=1)
    entered = e.enter("acme", "m", now=T0)
    a = e.admit("acme", "m", 60, 8, now=T0, entered=entered)
    assert a.seq == entered.seq and a.estimate_tokens == 60 and a.max_tokens == 8
    assert e.in_flight("acme") == 1  # the same slot, not a second one
    e.release(a, 60, 10, now=T0)  # 70 used: the estimate of 60 is corrected
    assert e.in_flight("acme") == 0
    with pytest.raises(RateLimited, match="requests/minute"):
        e.enter("acme", "m", now=T0)


def test_admit_after_enter_refused_for_tokens_leaves_the_entry_open() -> None:
    e = engine(tpm=100)
    e.release(e.admit("acme", "m", 90, None, now=T0), 90, 0, now=T0)
    entered = e.enter("acme", "m", now=T0)
    with pytest.raises(RateLimited, match="tokens/minute"):
        e.admit("acme", "m", 50, None, now=T0, entered=entered)
    assert e.in_flight("acme") == 1
    assert e.release(entered, 0, 0, now=T0) is True
    e.release(e.admit("acme", "m", 0, None, now=T0), 0, 200, now=T0)  # into debt
    with pytest.raises(RateLimited, match="tokens/minute"):  # debt refuses at the door
        e.enter("acme", "m", now=T0)


def test_enter_checks_the_acl_and_a_stale_entry_is_admitted_afresh() -> None:
    e = PolicyEngine([TenantPolicy("acme", models=("tiny-*",), max_concurrent=1)])
    with pytest.raises(PermissionDenied):
        e.enter("acme", "big", now=T0)
    entered = e.enter("acme", "tiny-a", now=T0)
    e.release(entered, 0, 0, now=T0)  # e.g. its caller was taken back meanwhile
    a = e.admit("acme", "tiny-a", 5, None, now=T0, entered=entered)
    assert a.seq != entered.seq and e.in_flight("acme") == 1


def test_budget_refusal_names_budget_and_reset() -> None:
    e = engine(budget_tokens=1000)
    a = e.admit("acme", "m", 100, None, now=T0)
    e.release(a, 400, 700, now=T0)  # 1100 spent: over
    with pytest.raises(BudgetExceeded) as err:
        e.admit("acme", "m", 1, None, now=T0 + 60)
    msg = err.value.message
    assert err.value.status == 429 and err.value.code == "budget_exceeded"
    assert "budget of 1000 tokens per day" in msg and "1100 used" in msg
    reset = (T0 // DAY + 1) * DAY
    assert "resets at 2023-11-15T00:00:00Z" in msg
    assert err.value.retry_after_s == pytest.approx(reset - (T0 + 60))
    e.admit("acme", "m", 1, None, now=reset)  # new day, new budget
    usage = e.usage("acme", now=reset)
    assert usage.budget_spent == 0 and usage.budget_limit == 1000 and usage.in_flight == 1


def test_budget_hourly_period_in_message() -> None:
    e = engine(budget_tokens=10, budget_period_s=3600.0)
    e.release(e.admit("acme", "m", 1, None, now=T0), 5, 5, now=T0)
    with pytest.raises(BudgetExceeded, match="tokens per hour"):
        e.admit("acme", "m", 1, None, now=T0)


def test_admission_carries_class_from_policy() -> None:
    e = engine(priority="batch", weight=3.0)
    a = e.admit("acme", "tiny", 5, 64, now=T0)
    assert (a.tenant, a.model, a.priority, a.weight, a.max_tokens) == (
        "acme",
        "tiny",
        "batch",
        3.0,
        64,
    )
    with pytest.raises(InvalidRequest):
        e.admit("acme", "tiny", -1, None, now=T0)


def test_set_policies_keeps_counters_and_drops_tenants() -> None:
    e = PolicyEngine([TenantPolicy("a", rpm=1, budget_tokens=100), TenantPolicy("b")])
    a = e.admit("a", "m", 1, None, now=T0)
    e.release(a, 60, 0, now=T0)
    e.set_policies([TenantPolicy("a", rpm=1, budget_tokens=50)])
    with pytest.raises(RateLimited):  # the rpm bucket carried over
        e.admit("a", "m", 1, None, now=T0)
    with pytest.raises(BudgetExceeded):  # 60 spent under the new limit of 50
        e.admit("a", "m", 1, None, now=T0 + 61)
    with pytest.raises(PermissionDenied):
        e.admit("b", "m", 1, None, now=T0)
    assert e.tenants() == ("a",)


def test_state_is_bounded_by_configured_tenants() -> None:
    e = engine(rpm=1000)
    for i in range(1000):
        with pytest.raises(PermissionDenied):
            e.admit(f"t{i}", "m", 1, None, now=T0)
    assert len(e._tenants) == 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "release"]),
            st.integers(0, 5000),
            st.integers(0, 5000),
            st.floats(0, 120),
        ),
        max_size=60,
    )
)
def test_engine_only_raises_policy_errors(ops: list[tuple[str, int, int, float]]) -> None:
    e = engine(rpm=30, tpm=5000, budget_tokens=20_000, max_concurrent=3)
    now = T0
    open_: list[object] = []
    for op, p, c, dt in ops:
        now += dt
        if op == "admit":
            try:
                open_.append(e.admit("acme", "m", p, None, now=now))
            except (RateLimited, BudgetExceeded) as err:
                assert err.retry_after_s is not None and err.retry_after_s >= 0
        elif open_:
            e.release(open_.pop(0), p, c, now=now)  # type: ignore[arg-type]
        assert e.in_flight("acme") == len(open_) <= 3


# --- errors pickle, audit -----------------------------------------------------------------


@pytest.mark.parametrize(
    "err",
    [
        PermissionDenied("no", code="graph_not_allowed", rule="graph_acl"),
        ContentBlocked("blocked", rule="email", status=403),
        ContentBlocked("blocked", rule="blocklist"),
        RateLimited("slow down", retry_after_s=2.5, rule="tpm"),
        BudgetExceeded("spent", retry_after_s=3600.0),
        RequestLimitExceeded("too big", rule="max_tokens"),
    ],
)
def test_policy_errors_pickle_round_trip(err: AiriError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert (back.message, back.code, back.status, back.type) == (
        err.message,
        err.code,
        err.status,
        err.type,
    )
    assert back.rule == err.rule  # type: ignore[attr-defined]
    assert getattr(back, "retry_after_s", None) == getattr(err, "retry_after_s", None)
    assert back.to_body() == err.to_body()


def test_content_blocked_status_and_type() -> None:
    assert ContentBlocked("x").status == 400
    forbidden = ContentBlocked("x", status=403)
    assert forbidden.status == 403 and forbidden.type == "permission_error"
    assert forbidden.code == "content_filtered"
    with pytest.raises(ValueError):
        ContentBlocked("x", status=500)
    assert ContentBlocked.status == 400  # the instance did not change the class


def test_refusal_event_names_rule_never_text() -> None:
    err = RateLimited("tenant 'a' is over ...", retry_after_s=1.0, rule="rpm")
    ev = refusal_event(err, tenant="a", model="m", request_id="r1")
    assert (ev.tenant, ev.model, ev.rule, ev.action, ev.request_id) == (
        "a",
        "m",
        "rpm",
        "refuse",
        "r1",
    )
    blocked = refusal_event(
        ContentBlocked("x", rule="card"), tenant="a", model="m", request_id="r2"
    )
    assert (blocked.rule, blocked.action) == ("card", "block")
