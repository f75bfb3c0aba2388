"""``KeyStore``: the spec's and the CLI's key records, saved to the KV store after every
change and read back by a restarted controller (the KV store faked)."""

from __future__ import annotations

import pytest

from airi_ray.core.errors import InvalidRequest
from airi_ray.runtime import cluster_kv
from airi_ray.runtime.keys import KeyStore

SPEC_KEY = "sk-airi-0123456789ab-abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
def kv(monkeypatch: pytest.MonkeyPatch) -> dict[bytes | str, bytes]:
    store: dict[bytes | str, bytes] = {}
    monkeypatch.setattr(cluster_kv, "get", store.get)
    monkeypatch.setattr(cluster_kv, "put", store.__setitem__)
    monkeypatch.setattr(cluster_kv, "delete", lambda key: store.pop(key, None))
    return store


def test_keys_are_saved_and_read_back(kv: dict[bytes | str, bytes]) -> None:
    assert KeyStore.load().listing() == []
    keys = KeyStore()
    keys.set_spec_keys([(SPEC_KEY, "t")], 1.0)
    secret, record = keys.issue("t", 2.0)
    assert secret.startswith("sk-airi-") and secret not in kv[cluster_kv.KEYS_KEY].decode()
    again = KeyStore.load()
    assert [(k["key_id"], k["source"]) for k in again.listing()] == [
        ("0123456789ab", "spec"),
        (record.key_id, "cli"),
    ]
    assert again.cli_keys.tenant_for(secret, 3.0) == "t"
    assert len(again.records()) == 2 and "digest" in again.records()[0]
    cluster_kv.delete_keys()
    assert KeyStore.load().listing() == []


def test_only_cli_keys_are_revoked(kv: dict[bytes | str, bytes]) -> None:
    keys = KeyStore()
    keys.set_spec_keys([(SPEC_KEY, "t")], 1.0)
    _, record = keys.issue("t", 2.0)
    with pytest.raises(InvalidRequest, match="comes from the app spec"):
        keys.revoke("0123456789ab", 3.0)
    with pytest.raises(InvalidRequest, match="no key with id 'nope'"):
        keys.revoke("nope", 3.0)
    info = keys.revoke(record.key_id, 3.0)
    assert (info["source"], info["revoked_at"]) == ("cli", 3.0)
    assert KeyStore.load().listing()[1]["revoked_at"] == 3.0
