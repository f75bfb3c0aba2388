"""What an engine's prefix cache holds, in the router's block hashes, from its KV events.

vLLM publishes an event whenever its cache stores a full block (``BlockStored``: the
blocks' own hashes, their parent's, and their token ids), evicts blocks
(``BlockRemoved``: their hashes) or is emptied (``AllBlocksCleared``). Its hashes are its
own (seeded, and per ``block_size`` tokens, 128 on the CPU backend); the router keys
prompts by ``routing.block_hashes`` of 16-token blocks. ``CacheMirror`` translates: it
keeps, per engine block, the router hashes of the tokens in it, chained from the parent
block's, so a stored block becomes the exact router hashes a prompt with those tokens
has, and a removed one takes those hashes away.

The mirror collects what changed since the scheduler was last told (``take``): the net
change per hash, so a block stored and evicted between two reports is not reported at
all, and a clear drops what came before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from airi_ray.core.routing import BLOCK_TOKENS, ROOT_HASH, block_hashes

# An engine's block hash: an int, or bytes for vLLM's sha256 hashing.
EngineHash = int | bytes


@dataclass(frozen=True, slots=True)
class CacheDelta:
    """What changed in one replica's cache since the last report, in router hashes.

    Applied in this order: if ``cleared``, forget everything; then drop ``removed``; then
    add ``stored``. (No hash is in both: the mirror keeps each hash's last change.)
    """

    stored: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    cleared: bool = False

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed or self.cleared)


class CacheMirror:
    """One engine's prefix cache in router block hashes, kept from its KV events.

    Args:
        block_tokens: tokens per router block (``routing.BLOCK_TOKENS``). An engine block
            must be a whole number of them.
    """

    def __init__(self, block_tokens: int = BLOCK_TOKENS) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be positive, got {block_tokens}")
        self.block_tokens = block_tokens
        # Engine block hash -> the router hashes of its tokens, in order.
        self._blocks: dict[EngineHash, tuple[int, ...]] = {}
        # Router hash -> whether it is held now, for the hashes changed since ``take``.
        self._changed: dict[int, bool] = {}
        self._cleared = False
        self.unknown_parents = 0  # stored blocks dropped: their parent was never seen

    def __len__(self) -> int:
        """Engine blocks held."""
        return len(self._blocks)

    def stored(
        self,
        block_hashes_: Sequence[EngineHash],
        parent: EngineHash | None,
        token_ids: Sequence[int],
        block_size: int,
    ) -> None:
        """The engine stored full blocks ``block_hashes_``, the first a child of ``parent``
        (None: of the root), holding ``token_ids`` (``block_size`` per block).

        A block whose parent the mirror does not hold is dropped, with its children in the
        event: without its prefix its router hashes cannot be known (the mirror started
        after the parent was stored, or missed its event). ``unknown_parents`` counts them.

        Raises:
            ValueError: ``block_size`` is not a multiple of ``block_tokens``, or the token
                ids do not fill the blocks.
        """
        if block_size % self.block_tokens:
            raise ValueError(
                f"engine blocks of {block_size} tokens are not a whole number of "
                f"{self.block_tokens}-token router blocks"
            )
        if len(token_ids) != block_size * len(block_hashes_):
            raise ValueError(
                f"{len(block_hashes_)} blocks of {block_size} tokens, got {len(token_ids)} ids"
            )
        if parent is None:
            chain = ROOT_HASH
        else:
            held = self._blocks.get(parent)
            if held is None:
                self.unknown_parents += len(block_hashes_)
                return
            chain = held[-1]
        changed = self._changed
        for i, h in enumerate(block_hashes_):
            ours = block_hashes(
                token_ids[i * block_size : (i + 1) * block_size], self.block_tokens, chain
            )
            self._blocks[h] = ours
            for x in ours:
                changed[x] = True
            chain = ours[-1]

    def removed(self, block_hashes_: Iterable[EngineHash]) -> None:
        """The engine evicted these blocks (unknown ones are ignored)."""
        changed = self._changed
        for h in block_hashes_:
            ours = self._blocks.pop(h, None)
            if ours is not None:
                for x in ours:
                    changed[x] = False

    def cleared(self) -> None:
        """The engine emptied its cache."""
        self._blocks.clear()
        self._changed.clear()
        self._cleared = True

    def take(self) -> CacheDelta:
        """What changed since the last ``take`` (an empty delta if nothing did)."""
        changed = self._changed
        delta = CacheDelta(
            tuple(h for h, held in changed.items() if held),
            tuple(h for h, held in changed.items() if not held),
            self._cleared,
        )
        changed.clear()
        self._cleared = False
        return delta

    def snapshot(self) -> CacheDelta:
        """Everything held, as a delta that replaces what the receiver knew; the changes
        since the last ``take`` are included, so they are taken too."""
        self._changed.clear()
        self._cleared = False
        return CacheDelta(tuple(x for ours in self._blocks.values() for x in ours), (), True)
