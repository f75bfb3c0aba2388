"""The replica's reader of vLLM's KV cache events, fed over a real ZMQ socket with vLLM's
own event types and wire format (no engine, no Ray): what it mirrors and what it leaves out."""

from __future__ import annotations

import os
import time

import msgspec
import pytest
import zmq

from airi_ray.core.kv_events import CacheDelta
from airi_ray.core.routing import block_hashes
from airi_ray.runtime.cache_events import CacheReporter, new_endpoint

kv_events = pytest.importorskip("vllm.distributed.kv_events")

PROMPT = list(range(1000, 1128))


class Publisher:
    """vLLM's ZMQ publisher's framing: topic, an 8-byte sequence number, the batch."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.sock.bind(endpoint)
        self.seq = 0
        self.encode = msgspec.msgpack.Encoder().encode

    def send(self, *events: object) -> None:
        self.send_payload(self.encode(kv_events.KVEventBatch(ts=time.time(), events=list(events))))

    def send_payload(self, payload: bytes) -> None:
        """The next batch's frame around ``payload``, whatever it holds."""
        self.seq += 1
        self.sock.send_multipart((b"", self.seq.to_bytes(8, "big"), payload))


def stored(hashes: list[int], parent: int | None, tokens: list[int], **extra: object) -> object:
    fields = {"block_size": 32, "lora_id": None, "medium": "GPU", "lora_name": None}
    return kv_events.BlockStored(
        block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, **(fields | extra)
    )


@pytest.fixture
def wired():
    endpoint = new_endpoint()
    pub = Publisher(endpoint)
    reporter = CacheReporter("replica-under-test", endpoint)
    yield pub, reporter
    pub.sock.close(linger=0)
    reporter.stop()


def settle(pub: Publisher, reporter: CacheReporter, *events: object) -> None:
    """Send ``events`` (resending a marker until the reader, which may still be joining,
    has read it), then wait until the reader has read them all."""
    deadline = time.monotonic() + 10
    while reporter.events == 0:  # a SUB socket misses what is sent before it has joined
        assert time.monotonic() < deadline, "the reader never received an event"
        pub.send(kv_events.AllBlocksCleared())
        time.sleep(0.05)
    want = reporter.events + len(events)
    pub.send(*events)
    while reporter.events < want:
        assert time.monotonic() < deadline, "the reader did not read the batch"
        time.sleep(0.01)


def test_plain_blocks_are_mirrored_and_others_are_left_out(wired) -> None:
    pub, reporter = wired
    settle(
        pub,
        reporter,
        stored([1, 2], None, PROMPT[:64]),
        # An image's placeholder tokens, a CPU offload copy, a hybrid model's other group:
        stored([3], 2, PROMPT[64:96], extra_keys=[("mm-hash", 0)]),
        stored([4], None, PROMPT[:32], medium="CPU"),
        stored([5], None, PROMPT[:32], group_idx=1),
        # A child of a block left out is left out too: its prefix is not known.
        stored([6], 3, PROMPT[96:128]),
    )
    assert reporter.mirror.snapshot().stored == block_hashes(PROMPT[:64])
    assert reporter.stats()["kv_unknown_parents"] == 1


def test_evictions_count_only_in_the_engines_own_group(wired) -> None:
    pub, reporter = wired
    settle(
        pub,
        reporter,
        stored([1, 2], None, PROMPT[:64]),
        kv_events.BlockRemoved(block_hashes=[2], medium="GPU", group_idx=1),
        kv_events.BlockRemoved(block_hashes=[1], medium="CPU"),
    )
    assert reporter.mirror.snapshot().stored == block_hashes(PROMPT[:64])
    settle(pub, reporter, kv_events.BlockRemoved(block_hashes=[2], medium="GPU"))
    assert reporter.mirror.snapshot().stored == block_hashes(PROMPT[:32])


def test_a_gap_in_the_sequence_starts_the_mirror_over(wired) -> None:
    pub, reporter = wired
    settle(pub, reporter, stored([1], None, PROMPT[:32]))
    pub.seq += 1  # one batch lost
    settle(pub, reporter, stored([7], None, PROMPT[32:64]))
    assert reporter.stats()["kv_event_gaps"] == 1
    assert reporter.mirror.snapshot().stored == block_hashes(PROMPT[32:64])


def test_a_reader_that_dies_empties_the_view_it_can_no_longer_follow(wired) -> None:
    pub, reporter = wired
    settle(pub, reporter, stored([1, 2], None, PROMPT[:64]))
    reporter.mirror.take()  # reported
    pub.send_payload(b"not a batch")
    deadline = time.monotonic() + 10
    while not reporter.failed:
        assert time.monotonic() < deadline, "the reader did not stop on a batch it cannot read"
        time.sleep(0.01)
    # The next report tells the scheduler to forget this replica's blocks.
    assert reporter.mirror.take() == CacheDelta((), (), True)
    assert reporter.stats()["kv_events_failed"] == 1


def test_stop_removes_the_socket_file() -> None:
    endpoint = new_endpoint()
    pub = Publisher(endpoint)
    reporter = CacheReporter("replica-under-test", endpoint)
    path = endpoint.removeprefix("ipc://")
    pub.sock.close(linger=0)
    reporter.stop()
    assert not os.path.exists(path)
