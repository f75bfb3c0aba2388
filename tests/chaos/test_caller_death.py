"""A caller process killed while it streams: the scheduler takes back its leases, and the
model serves at full capacity again.

Ray never closes the grant stream of a dead caller, so before callers were timed out by
their silence such a lease stayed held for good (each one a slot less for the model).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import ray

from airi_ray.runtime import names
from tests.conftest import KEY, wait_for

CHILD = textwrap.dedent(
    """
    import sys, threading, time
    import airi_ray as airi

    client = airi.connect(sys.argv[1], api_key=sys.argv[2])
    # One long stream, and a second long call beside it.
    stream = client.chat("tiny-chat", "talk", max_tokens=900, ignore_eos=True, stream=True)
    next(stream)
    threading.Thread(target=lambda: client.chat("tiny-chat", "x", max_tokens=900,
                     ignore_eos=True, priority="batch"), daemon=True).start()
    print("streaming", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_caller_gives_back_its_leases(airi_app) -> None:
    scheduler = names.get_actor(names.SCHEDULER_NAME)

    def outstanding() -> dict:
        return ray.get(scheduler.outstanding.remote())

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, ray.get_runtime_context().gcs_address, KEY],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "streaming"
        mark = f":{child.pid}:"  # caller ids name their process

        def childs() -> int:
            return sum(n for c, n in outstanding()["callers"].items() if mark in c)

        def childs_leases() -> int:
            leases = outstanding()["models"]["tiny-chat"]["leases"]
            return sum(mark in (x["caller"] or "") for x in leases)

        wait_for(lambda: childs() >= 2, timeout=30, what="the child's 2 calls")
        assert childs_leases() >= 1
        child.send_signal(signal.SIGKILL)  # no release, no goodbye
        child.wait(timeout=30)
        wait_for(
            lambda: childs() == 0 and childs_leases() == 0,
            timeout=30,
            what="the dead caller's lease to be taken back",
        )
    finally:
        child.kill()
        child.wait(timeout=30)


def test_a_live_callers_lost_release_is_taken_back(airi_app) -> None:
    """A caller that lives on but whose release never took effect: its heartbeats stop
    naming the lease, and the scheduler takes it back (never within the grace a grant
    needs to reach its caller)."""
    from airi_ray.core.scheduling import AcquireRequest

    scheduler = names.get_actor(names.SCHEDULER_NAME)
    caller = "test:lost-release"
    [lease] = ray.get(
        scheduler.acquire.remote(
            caller, [AcquireRequest("req-lost", "tiny-chat", "tenant-a", 8, 4)]
        )
    )
    assert lease is not None and lease.request_id == "req-lost"

    def booked() -> bool:
        leases = ray.get(scheduler.outstanding.remote())["models"]["tiny-chat"]["leases"]
        return any(x["request_id"] == "req-lost" for x in leases)

    try:
        # Named in a heartbeat, it is held; not named just after its grant, it may still
        # be on its way to the caller: neither is taken.
        assert ray.get(scheduler.heartbeat.remote(caller, ["req-lost"])) == 0
        assert ray.get(scheduler.heartbeat.remote(caller, [])) == 0 and booked()
        # The release is lost: the caller's reports stop naming the lease.
        wait_for(
            lambda: ray.get(scheduler.heartbeat.remote(caller, [])) == 1,
            timeout=30,
            what="the lease nobody holds to be taken back",
        )
        assert not booked()
    finally:
        ray.get(scheduler.release.remote([("req-lost", {}, False)], caller))
