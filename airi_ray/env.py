"""Every environment variable airi_ray reads, in one place.

Other modules import the values from here instead of calling ``os.environ`` themselves,
so the full list of knobs is visible at a glance.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of airi's cache (built demo models, local state). ``AIRI_CACHE_DIR`` overrides."""
    return Path(os.environ.get("AIRI_CACHE_DIR", "~/.cache/airi")).expanduser()


def api_key() -> str | None:
    """Default API key of the Python client and the CLI (``AIRI_API_KEY``)."""
    return os.environ.get("AIRI_API_KEY") or None


def storage_uri() -> str:
    """Default LanceDB URI of durable state (``AIRI_STORAGE_URI``; else under the cache)."""
    return os.environ.get("AIRI_STORAGE_URI") or str(cache_dir() / "state")
