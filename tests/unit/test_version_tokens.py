"""A call to a version with other weights is tokenized with that version's tokenizer.

During a rollout from one base model to another (another tokenizer, another chat template),
the stable version's token ids would read as another text to the candidate. The call path
makes them again once the lease names the version. No Ray: the tokenizers are fakes that
number characters differently, set in the path's tokenizer cache.
"""

from __future__ import annotations

import asyncio

from airi_ray.runtime.calls import CallPath, ModelInfo


class Fake:
    """A tokenizer giving each character its code plus ``offset``."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) + self.offset for c in text]}


def path_with(tokenizers: dict[str, Fake]) -> CallPath:
    path = CallPath.__new__(CallPath)  # no actors: only the tokenizer cache is used
    path._tokenizers = dict(tokenizers)
    path._tokenizer_lock = asyncio.Lock()
    return path


INFO = ModelInfo(
    "chat",
    "1",
    "generate",
    "org/base",
    1024,
    1,
    Fake(0),
    sources={"1": "org/base", "2": "org/base", "3": "org/other"},
)


def encode(tokenizer: Fake) -> list[int]:
    return tokenizer("hi")["input_ids"]


def test_versions_on_the_stable_weights_get_the_stable_ids() -> None:
    path = path_with({"org/base": Fake(0), "org/other": Fake(1000)})
    ids = encode(Fake(0))
    for version in ("1", "2", "unknown"):
        assert asyncio.run(path._ids_for(INFO, version, ids, encode)) is ids


def test_a_version_on_other_weights_gets_its_own_tokens() -> None:
    path = path_with({"org/base": Fake(0), "org/other": Fake(1000)})
    ids = encode(Fake(0))
    assert asyncio.run(path._ids_for(INFO, "3", ids, encode)) == [1104, 1105]
    # without a way to make them again (ids were all the caller had), they go as they are
    assert asyncio.run(path._ids_for(INFO, "3", ids, None)) is ids
