"""Where model artefacts may come from: only configured folders (the repository and
``model_dirs``), never a URL, never a path that escapes them (``..``, symlinks)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from inhouse.errors import ForbiddenError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_model_source(source: object, base: Path, allowed: Sequence[Path], what: str = "source") -> Path:
    """The resolved path a model's ``source`` (or another setting, named by ``what``) names, if it
    lies inside an allowed folder; else 4003. Relative paths are resolved against ``base``."""
    if not isinstance(source, str) or not source.strip():
        raise ForbiddenError(f"'{what}' must be a folder path.")
    if _URL.match(source) or source.startswith("//"):
        raise ForbiddenError(f"'{what}' may not be a URL ({source!r}); inhouse never downloads models.")
    path = Path(source).expanduser()
    resolved = (path if path.is_absolute() else base / path).resolve()
    roots = [Path(a).expanduser().resolve() for a in allowed]
    if not any(resolved.is_relative_to(r) for r in roots):
        raise ForbiddenError(f"'{what}' {source!r} is outside the folders models may be loaded from "
                             f"({', '.join(str(r) for r in roots)}); add its folder to model_dirs.")
    return resolved
