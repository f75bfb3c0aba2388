"""API keys: issued from ``secrets``, stored only as salted hashes, checked in constant time.

A key reads ``sk-airi-<key id>-<secret>``: the key id (12 hex digits) is not secret and
finds the one record to check, so a lookup costs one hash whatever the number of keys; the
secret (32 random bytes, base64url) never leaves the caller. A ``KeyRecord`` holds the key
id, the tenant, a random per-key salt and ``HMAC-SHA256(salt, key)``.

Why one HMAC and not scrypt or PBKDF2: a slow KDF protects low-entropy passwords against
guessing once the hashes leak; these keys carry 256 random bits, so guessing is hopeless at
any speed, and one HMAC (about a microsecond) can run on every request without a cache.
The per-key salt still makes every digest unique, so leaked records give nothing to
precompute against.

Everything presented as a key (missing, too long, not ASCII, SQL-like, wrong, revoked)
ends in ``AuthenticationError`` with a message that never repeats what was presented.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from airi_ray.core.errors import AuthenticationError

KEY_PREFIX = "sk-airi-"
MAX_KEY_CHARS = 256
KEY_ID_HEX = 12
SECRET_BYTES = 32
SALT_BYTES = 16

_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{0,32}")
_BODY_RE = re.compile(r"([0-9a-f]{12})-([A-Za-z0-9_-]{16,200})")
_DUMMY_SALT = "00" * SALT_BYTES


def new_key(prefix: str = KEY_PREFIX) -> str:
    """A fresh random key ``<prefix><key id>-<secret>`` (48-bit id, 256-bit secret)."""
    _check_prefix(prefix)
    return f"{prefix}{secrets.token_hex(KEY_ID_HEX // 2)}-{secrets.token_urlsafe(SECRET_BYTES)}"


def new_salt() -> str:
    """A fresh random per-key salt, as hex."""
    return secrets.token_hex(SALT_BYTES)


def hash_key(key: str, salt: str) -> str:
    """``HMAC-SHA256(salt, key)`` as hex: what a ``KeyRecord`` stores instead of the key."""
    return hmac.new(salt.encode(), key.encode(), hashlib.sha256).hexdigest()


def parse_key_id(key: object, prefix: str = KEY_PREFIX) -> str:
    """The key id embedded in a presented key.

    Raises:
        AuthenticationError: missing, not a string, longer than ``MAX_KEY_CHARS`` or not of
            the form ``<prefix><12 hex>-<secret>``. The message never echoes the key.
    """
    if key is None or key == "":
        raise AuthenticationError(
            f"missing API key: send 'Authorization: Bearer {prefix}...' with a key issued by "
            "'airi keys create'"
        )
    if (
        not isinstance(key, str)
        or len(key) > MAX_KEY_CHARS
        or not key.startswith(prefix)
        or (m := _BODY_RE.fullmatch(key, len(prefix))) is None
    ):
        raise AuthenticationError(
            f"malformed API key: expected '{prefix}<12 hex digits>-<secret>', at most "
            f"{MAX_KEY_CHARS} characters, as printed by 'airi keys create'"
        )
    return m.group(1)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What is stored about one key: never the key itself."""

    key_id: str
    tenant: str
    salt: str
    digest: str
    created_at: float
    revoked_at: float | None = None

    @classmethod
    def create(
        cls, key: str, tenant: str, now: float, *, salt: str | None = None, prefix: str = KEY_PREFIX
    ) -> KeyRecord:
        """The record of ``key`` for ``tenant`` (a new random salt unless one is given).

        Raises:
            ValueError: the key is malformed or the tenant name is empty.
        """
        if not tenant:
            raise ValueError("a key needs a tenant")
        try:
            key_id = parse_key_id(key, prefix)
        except AuthenticationError as e:
            raise ValueError(e.message) from None
        salt = new_salt() if salt is None else salt
        return cls(key_id, tenant, salt, hash_key(key, salt), created_at=now)

    def revoked(self, now: float) -> bool:
        """Whether the key is revoked at ``now`` (a future ``revoked_at`` is a planned expiry)."""
        return self.revoked_at is not None and self.revoked_at <= now

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, for the key store of the shell."""
        return {
            "key_id": self.key_id,
            "tenant": self.tenant,
            "salt": self.salt,
            "digest": self.digest,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeyRecord:
        """The inverse of ``to_dict``."""
        revoked_at = data.get("revoked_at")
        return cls(
            key_id=str(data["key_id"]),
            tenant=str(data["tenant"]),
            salt=str(data["salt"]),
            digest=str(data["digest"]),
            created_at=float(data["created_at"]),
            revoked_at=None if revoked_at is None else float(revoked_at),
        )


class KeyRing:
    """The key records of every tenant, by key id; answers which tenant a key belongs to."""

    def __init__(self, records: Iterable[KeyRecord] = (), *, prefix: str = KEY_PREFIX) -> None:
        _check_prefix(prefix)
        self.prefix = prefix
        self._records: dict[str, KeyRecord] = {}
        for r in records:
            self.add(r)

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> tuple[KeyRecord, ...]:
        """Every record, by creation time (revoked ones included)."""
        return tuple(sorted(self._records.values(), key=lambda r: (r.created_at, r.key_id)))

    def add(self, record: KeyRecord) -> None:
        """Add a record. Raises ValueError if its key id is taken."""
        if record.key_id in self._records:
            raise ValueError(f"key id {record.key_id!r} already exists")
        self._records[record.key_id] = record

    def issue(self, tenant: str, now: float) -> tuple[str, KeyRecord]:
        """Create a key for ``tenant``: returns the key (show it once) and its stored record."""
        while True:
            key = new_key(self.prefix)
            record = KeyRecord.create(key, tenant, now, prefix=self.prefix)
            if record.key_id not in self._records:  # 48-bit ids: a clash is near impossible
                self._records[record.key_id] = record
                return key, record

    def revoke(self, key_id: str, now: float) -> KeyRecord:
        """Revoke a key by id from ``now`` on; returns the updated record.

        Raises:
            ValueError: no key has this id.
        """
        record = self._records.get(key_id)
        if record is None:
            raise ValueError(f"no key with id {key_id!r}; 'airi keys list' shows the ids")
        if not record.revoked(now):
            record = replace(record, revoked_at=now)
            self._records[key_id] = record
        return record

    def authenticate(self, key: object, now: float) -> KeyRecord:
        """The record of a presented key, if the key is valid and not revoked at ``now``.

        Raises:
            AuthenticationError: missing, malformed, unknown, wrong or revoked key.
        """
        key_id = parse_key_id(key, self.prefix)
        assert isinstance(key, str)  # parse_key_id checked it
        record = self._records.get(key_id)
        # Hash even for an unknown id, so a miss costs the same time as a wrong secret.
        digest = hash_key(key, _DUMMY_SALT if record is None else record.salt)
        if record is None or not hmac.compare_digest(digest, record.digest):
            raise AuthenticationError(
                "invalid API key: no such key; check it, or create one with 'airi keys create'"
            )
        if record.revoked(now):
            raise AuthenticationError(
                f"API key {key_id} was revoked; create a new one with 'airi keys create'",
                code="key_revoked",
            )
        return record

    def tenant_for(self, key: object, now: float) -> str:
        """The tenant a presented key names (see ``authenticate`` for the errors)."""
        return self.authenticate(key, now).tenant


def _check_prefix(prefix: str) -> None:
    if _PREFIX_RE.fullmatch(prefix) is None:
        raise ValueError(f"a key prefix is up to 32 of [A-Za-z0-9_-], not {prefix!r}")
