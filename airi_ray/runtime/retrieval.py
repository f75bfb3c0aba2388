"""Collections and retrieval inside the runtime: LanceDB tables embedded by AIRI's own models.

``Retriever`` lives in a caller's process (the Python client, the graph executor), bound to
its event loop and its ``CallPath``. Embedding goes through the call path, so ingestion and
queries are scheduled, limited and charged to the tenant like any model call. LanceDB work
runs in threads: the tables sit under the app's storage URI, which every process of the
cluster reaches (a local folder on one machine, object storage on a cluster).

A query is embedded by whichever version of the embedding model the traffic split picks
and reads only that version's table: a version takes traffic only once its tables are
complete (``runtime.reembed``), so no query mixes vectors of two versions. Ingestion
embeds with the collection's active version only (pinned), into its table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from airi_ray.core.chunking import Chunker
from airi_ray.core.errors import InvalidRequest
from airi_ray.core.requests import CallOptions
from airi_ray.data.collections import (
    Collection,
    CollectionStore,
    Document,
    EmbedderState,
    collections_uri,
)
from airi_ray.obs.tracing import tracing
from airi_ray.runtime.calls import CallPath

# Chunks a little under MiniLM-class embedders' 256-token limit, with some overlap.
CHUNK_TOKENS = 200
CHUNK_OVERLAP = 32
MAX_QUERY_CHARS = 8_000


class Retriever:
    """Collections under ``uri``, embedded through ``path`` (bound to the running loop);
    ``progress`` shows a progress bar on stderr while a long ingest embeds."""

    def __init__(self, path: CallPath, uri: str, progress: bool = False) -> None:
        self._path = path
        self._store = CollectionStore(collections_uri(uri), progress=progress)
        self._loop = asyncio.get_running_loop()

    async def create(self, name: str, model: str, tenant: str) -> dict[str, Any]:
        """Create a collection embedded by ``model`` (its serving version).

        Raises:
            InvalidRequest: a bad name, the collection exists, or ``model`` does not embed.
        """
        # The serving version as of now: model infos are cached a few seconds, and a
        # collection made for the version a rollout just replaced would get no table of the
        # new one (its re-embedding job ran before the collection existed).
        await self._path.list_models(refresh=True)
        info = await self._path.model(model, "embed")
        pinned = CallOptions(version=info.version)
        vectors, _ = await self._path.embed(model, ["dimension probe"], tenant, pinned)
        collection = await asyncio.to_thread(
            self._store.create, name, model=model, version=info.version, dim=len(vectors[0])
        )
        return {"name": name, "model": model, "version": info.version, "dim": len(vectors[0])} | {
            "embedders": [asdict(e) for e in collection.embedders()]
        }

    async def names(self) -> list[str]:
        return await asyncio.to_thread(self._store.names)

    async def ingest(
        self,
        name: str,
        tenant: str,
        documents: Sequence[Document | Mapping[str, Any]] | None = None,
        folder: str | None = None,
    ) -> dict[str, int]:
        """Chunk, embed and upsert the tenant's documents (or every ``.md``/``.txt`` file
        under ``folder``); a document replaces its earlier chunks.

        Raises:
            CollectionNotFound: no such collection.
            InvalidRequest: neither or both of ``documents`` and ``folder``, or a bad document.
        """
        if (documents is None) == (folder is None):
            raise InvalidRequest("give either documents or folder")
        collection, active = await self._open(name)
        model = active.model
        info = await self._path.model(model, "embed")
        tokenizer = info.tokenizer
        chunker = Chunker(
            lambda text: tokenizer.encode(text, add_special_tokens=False),
            tokenizer.decode,
            max_tokens=CHUNK_TOKENS,
            overlap_tokens=CHUNK_OVERLAP,
        )
        options = CallOptions(priority="batch", version=active.version)
        embed = self._embed_from_thread(model, tenant, options, where="document")
        if folder is not None:
            result = await asyncio.to_thread(
                collection.ingest_folder, Path(folder), tenant=tenant, embed=embed, chunker=chunker
            )
        else:
            assert documents is not None
            result = await asyncio.to_thread(
                collection.upsert, list(documents), tenant=tenant, embed=embed, chunker=chunker
            )
        return {"documents": result.documents, "chunks": result.chunks}

    async def delete(self, name: str, tenant: str, doc_ids: list[str]) -> None:
        collection, _ = await self._open(name)
        await asyncio.to_thread(collection.delete, doc_ids, tenant=tenant)

    async def retrieve(
        self,
        name: str,
        query: str,
        tenant: str,
        k: int = 5,
        filter: Mapping[str, Any] | None = None,
        mmr_lambda: float | None = None,
        options: CallOptions | None = None,
        charge: Callable[[str, int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """The ``k`` chunks of the tenant's documents closest to ``query``, best first, each
        ``{"id", "doc_id", "text", "metadata", "score"}`` (``id`` is the citation id).

        ``charge(model, tokens)`` is told what embedding the query cost (a graph run counts
        it against its budget).

        Raises:
            CollectionNotFound: no such collection.
            EmbedderNotReady: the serving embedder version's table is not complete.
            InvalidRequest: a bad query, ``k``, filter or ``mmr_lambda``.
        """
        if not isinstance(query, str) or not 0 < len(query) <= MAX_QUERY_CHARS:
            raise InvalidRequest(f"query must be a string of 1 to {MAX_QUERY_CHARS} characters")
        attrs = {"airi.collection": name, "airi.tenant": tenant, "airi.k": k}
        with tracing.span(f"retrieval {name}", "retrieval", attrs) as span:
            collection, active = await self._open(name)
            model = active.model
            options = options or CallOptions()
            vectors, usage = await self._path.embed(model, [query], tenant, options)
            if charge is not None:
                charge(model, usage.prompt_tokens)
            version = usage.extra["version"]  # the table of the version that embedded it
            hits = await asyncio.to_thread(
                collection.search,
                vectors[0],
                k,
                tenant=tenant,
                embedder=(model, version),
                filter=filter,
                mmr_lambda=mmr_lambda,
            )
            best = max((h.score for h in hits), default=None)
            if span is not None:
                span.set_attributes({"airi.hits": len(hits), "airi.best_score": best or 0.0})
            if best is not None:
                self._path.signal("relevance", model, version, best)
        return [asdict(h) for h in hits]

    async def _open(self, name: str) -> tuple[Collection, EmbedderState]:
        collection = await asyncio.to_thread(self._store.open, name)
        return collection, await asyncio.to_thread(collection.active)

    def _embed_from_thread(
        self, model: str, tenant: str, options: CallOptions, where: str = "prompt"
    ) -> Any:
        return embed_from_thread(self._path, self._loop, model, tenant, options, where)


def embed_from_thread(
    path: CallPath,
    loop: asyncio.AbstractEventLoop,
    model: str,
    tenant: str,
    options: CallOptions,
    where: str = "prompt",
) -> Callable[[list[str]], list[list[float]]]:
    """A blocking ``embed(texts)`` for LanceDB work in a thread: each batch is an embedding
    call on ``loop``, through ``path`` and the scheduler."""

    def embed(texts: list[str]) -> list[list[float]]:
        call = path.embed(model, texts, tenant, options, where)
        vectors, _ = asyncio.run_coroutine_threadsafe(call, loop).result()
        return vectors

    return embed
