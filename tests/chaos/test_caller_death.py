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

from airi_ray.runtime import actors
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
    scheduler = actors.get_actor(actors.SCHEDULER_NAME)

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
        wait_for(lambda: outstanding()["callers"] >= 2, timeout=30, what="the child's 2 calls")
        child.send_signal(signal.SIGKILL)  # no release, no goodbye
        child.wait(timeout=30)
        wait_for(
            lambda: (
                outstanding()["callers"] == 0
                and outstanding()["models"]["tiny-chat"]["in_flight"] == 0
            ),
            timeout=30,
            what="the dead caller's lease to be taken back",
        )
    finally:
        child.kill()
        child.wait(timeout=30)
