"""Refusal pacing: a tenant's refused requests are answered no faster than a set rate.

A refused request still costs the front door what reading, parsing and checking it cost:
about 6 ms of CPU across the ingress, HAProxy and the scheduler for a 0.9 MB prompt that
is too long. A client that sends nothing but such requests in a closed loop sends the next
as soon as the last is answered, so however cheap a refusal is made, the flood grows until
the CPU is full, and the engines and every other tenant's requests get what is left.
Answering a tenant's refusals beyond a burst at a bounded rate makes its flood wait on the
clock instead: its connections are held open, which costs no CPU. An accepted request is
never paced, and one tenant's pace never delays another's answers.

``RefusalPacer`` keeps a ``TokenBucket`` per key (the tenant, or one key for requests that
name none). Each refusal takes one token; a refusal that finds the bucket empty is answered
when a token would be there again, at most ``max_delay_s`` later (the debt is capped there,
so a long flood does not push later answers ever further out).
"""

from __future__ import annotations

from collections import OrderedDict

from airi_ray.core.policy.limits import TokenBucket

MAX_DELAY_S = 2.0
MAX_KEYS = 10_000  # tenants are configured; this bounds memory should keys be many


class RefusalPacer:
    """Delays for refusals: ``rate_per_s`` per key beyond a ``burst``.

    Raises:
        ValueError: a setting is not positive.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_delay_s: float = MAX_DELAY_S,
        max_keys: int = MAX_KEYS,
    ) -> None:
        if not (rate_per_s > 0 and burst >= 1 and max_delay_s > 0 and max_keys >= 1):
            raise ValueError(
                "a refusal pacer needs rate_per_s > 0, burst >= 1, max_delay_s > 0 and "
                f"max_keys >= 1; got {rate_per_s}, {burst}, {max_delay_s}, {max_keys}"
            )
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_delay_s = max_delay_s
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def delay(self, key: str, now: float) -> float:
        """Charge one refusal to ``key``; the seconds its answer should wait (0: answer now)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate_per_s, self.burst)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)  # the least recently refused
        else:
            self._buckets.move_to_end(key)
        bucket.charge(1, now)
        floor = -self.max_delay_s * self.rate_per_s
        if bucket.level < floor:
            bucket.level = floor  # the debt is capped: the answer waits max_delay_s at most
        return -bucket.level / self.rate_per_s if bucket.level < 0 else 0.0
