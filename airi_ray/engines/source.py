"""Where a model's weights come from: a local directory, a package, or a Hugging Face id."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from airi_ray.core.errors import InvalidRequest

PACKAGE_PREFIX = "package:"


def resolve_model_source(source: str) -> str:
    """Turn a spec's ``model`` field into what vLLM and transformers load.

    ``package:MODULE/SUBDIR`` names a directory inside an installed Python package (weights
    shipped on a package index); a value that looks like a path (``/``, ``.``, ``~`` or a
    ``$VAR``) must exist; anything else is passed through as a Hugging Face id.

    Raises:
        InvalidRequest: a package or a local path that is not there.
    """
    if source.startswith(PACKAGE_PREFIX):
        module, _, sub = source[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(module) if module else None
        if spec is None or not spec.submodule_search_locations:
            raise InvalidRequest(
                f"model source {source!r}: Python package {module!r} is not installed"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / sub
        if not path.is_dir():
            raise InvalidRequest(f"model source {source!r}: {path} is not a directory")
        return str(path)
    if source.startswith(("/", ".", "~", "$")):
        path = Path(os.path.expandvars(source)).expanduser()
        if not path.is_dir():
            raise InvalidRequest(
                f"model directory {path} does not exist (from {source!r}); for the demo model "
                "run `python -m airi_ray.models.tiny` (make setup does it)"
            )
        return str(path.resolve())
    return source
