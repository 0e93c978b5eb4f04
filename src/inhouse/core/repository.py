"""The model repository on disk: ``REPO/MODEL/model.yaml`` and ``REPO/MODEL/VERSION/…``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from inhouse.core.spec import SPEC_FILENAMES, ModelSpec, find_spec_file, load_spec_file
from inhouse.errors import ModelNotFoundError, ModelSpecError


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith((".", "_")) and self._looks_like_model(p)
        )

    @staticmethod
    def _looks_like_model(path: Path) -> bool:
        return find_spec_file(path) is not None or any(
            c.is_dir() and c.name.isdigit() for c in path.iterdir()
        )

    def model_dir(self, name: str) -> Path:
        # Names come from clients: never let them escape the repository.
        if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
            raise ModelNotFoundError(f"Model '{name}' is not a valid model name.")
        path = self.root / name
        if not path.is_dir():
            known = ", ".join(self.model_names()) or "none"
            raise ModelNotFoundError(
                f"Model '{name}' is not in the repository {self.root} (models there: {known})."
            )
        return path

    def read_spec(self, name: str, overrides: dict[str, Any] | None = None) -> ModelSpec:
        return load_spec_file(self.model_dir(name), overrides)

    def versions_on_disk(self, name: str) -> list[int]:
        path = self.model_dir(name)
        return sorted(int(c.name) for c in path.iterdir() if c.is_dir() and c.name.isdigit() and int(c.name) > 0)

    def select_versions(self, spec: ModelSpec) -> list[int]:
        """The versions the spec's version policy says should serve, newest first."""
        on_disk = self.versions_on_disk(spec.name)
        where = self.root / spec.name
        if not on_disk:
            raise ModelSpecError(
                f"Model '{spec.name}' has no versions: {where} needs a numbered folder such as "
                f"{where / '1'} holding the model artefact."
            )
        policy = spec.versions
        if policy.policy == "all":
            chosen = on_disk
        elif policy.policy == "latest":
            chosen = on_disk[-policy.keep:]
        else:
            missing = sorted(set(policy.versions) - set(on_disk))
            if missing:
                raise ModelSpecError(
                    f"Model '{spec.name}': versions.versions lists {missing}, which are not in "
                    f"{where} (on disk: {on_disk})."
                )
            chosen = sorted(policy.versions)
        return sorted(chosen, reverse=True)

    def model_fingerprint(self, name: str) -> str:
        try:
            versions = self.versions_on_disk(name)
        except ModelNotFoundError:
            return ""
        return "|".join([self.fingerprint(name, v) for v in versions] or [self.fingerprint(name, 0)])

    def fingerprint(self, name: str, version: int) -> str:
        """Changes when the version's files or the model's spec change (size + mtime)."""
        h = hashlib.sha1(usedforsecurity=False)
        model_dir = self.root / name
        for fn in SPEC_FILENAMES:
            p = model_dir / fn
            if p.is_file():
                st = p.stat()
                h.update(f"{fn}:{st.st_size}:{st.st_mtime_ns}".encode())
        vdir = model_dir / str(version)
        if vdir.is_dir():
            for p in sorted(vdir.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p.relative_to(vdir)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()
