"""The API keys the controller keeps: the app spec's and those made by `airi keys`.

Keys live only as salted hashes (``core.policy.KeyRecord``): the spec's ``api_keys`` are
replaced on each deploy, the CLI's are kept until revoked. Both are saved in Ray's
internal KV store (``cluster_kv``) after every change, so a restarted controller has them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from airi_ray.core.errors import InvalidRequest
from airi_ray.core.policy import KeyRecord, KeyRing
from airi_ray.runtime import cluster_kv


def _info(record: KeyRecord, source: str) -> dict[str, Any]:
    return {
        "key_id": record.key_id,
        "tenant": record.tenant,
        "source": source,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
    }


class KeyStore:
    """The spec's keys and the CLI's, saved after every change."""

    def __init__(self, spec_keys: Iterable[KeyRecord] = (), cli_keys: KeyRing | None = None):
        self.spec_keys = list(spec_keys)
        self.cli_keys = cli_keys if cli_keys is not None else KeyRing()

    @classmethod
    def load(cls) -> KeyStore:
        """The keys saved last (none if nothing was saved)."""
        data = cluster_kv.saved_keys()
        if data is None:
            return cls()
        return cls(
            [KeyRecord.from_dict(r) for r in data["spec"]],
            KeyRing(KeyRecord.from_dict(r) for r in data["cli"]),
        )

    def save(self) -> None:
        cluster_kv.save_keys(
            {
                "spec": [r.to_dict() for r in self.spec_keys],
                "cli": [r.to_dict() for r in self.cli_keys.records()],
            }
        )

    def set_spec_keys(self, keys: Iterable[tuple[str, str]], now: float) -> None:
        """Replace the spec's keys with ``keys`` (key, tenant), and save."""
        self.spec_keys = [KeyRecord.create(key, tenant, now) for key, tenant in keys]
        self.save()

    def issue(self, tenant: str, now: float) -> tuple[str, KeyRecord]:
        """A new key for ``tenant`` (returned once, kept only as a hash), saved."""
        key, record = self.cli_keys.issue(tenant, now)
        self.save()
        return key, record

    def revoke(self, key_id: str, now: float) -> dict[str, Any]:
        """Revoke a key ``issue`` made, and save; its info after.

        Raises:
            InvalidRequest: no such key (keys listed in the spec go away by redeploying
                the spec without them).
        """
        if any(r.key_id == key_id for r in self.spec_keys):
            raise InvalidRequest(
                f"key {key_id} comes from the app spec; remove it there and deploy again"
            )
        try:
            record = self.cli_keys.revoke(key_id, now)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        self.save()
        return _info(record, "cli")

    def listing(self) -> list[dict[str, Any]]:
        """Every key's id, tenant, origin and dates; never a secret or a hash."""
        return [_info(r, "spec") for r in self.spec_keys] + [
            _info(r, "cli") for r in self.cli_keys.records()
        ]

    def records(self) -> list[dict[str, Any]]:
        """Every key record (salted hashes), for callers to verify keys against."""
        return [r.to_dict() for r in [*self.spec_keys, *self.cli_keys.records()]]
