"""The model repository on disk: ``REPO/MODEL/model.yaml`` and ``REPO/MODEL/VERSION/…``."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from inhouse.core.spec import SPEC_FILENAMES, ModelSpec, find_spec_file, load_spec_file, read_spec_path
from inhouse.core.triton_pbtxt import spec_from_pbtxt
from inhouse.errors import InhouseError, InvalidRequestError, ModelNotFoundError, ModelSpecError

_VERSION_FOLDER = re.compile(r"^[vV]?(\d+)$")


@dataclass(frozen=True)
class LinkedModel:
    """A model served from a folder outside the repository's own layout (OpenClaw's
    ``LoadModel``): its spec file and the folder of each version."""

    folder: Path
    spec_file: Path | None
    versions: dict[int, Path]
    artefact: str | None = None  # a single model file in ``folder`` (MODEL_PATH=model.onnx)


def link_layout(name: str, folder: Path, spec_file: Path | None) -> LinkedModel:
    """How a folder maps onto versions: one with numbered subfolders (``1/``, ``2/``) is a model
    folder; any other is one version, numbered by its name (``v1`` or ``3``, else 1). Without a
    spec file, the folder's own ``model.yaml`` / ``model_spec.yaml`` is used, if any."""
    if not folder.is_dir():
        raise ModelSpecError(f"Model '{name}': model_path {folder} is not a folder; name the folder holding "
                             "the model (a version folder with model.onnx, or one with numbered versions).")
    numbered = {int(c.name): c for c in folder.iterdir() if c.is_dir() and c.name.isdigit() and int(c.name) > 0}
    if numbered:
        versions = numbered
    else:
        m = _VERSION_FOLDER.match(folder.name)
        versions = {int(m.group(1)) if m and int(m.group(1)) > 0 else 1: folder}
    if spec_file is not None and not spec_file.is_file():
        raise ModelSpecError(f"Model '{name}': config_path {spec_file} is not a file; name the model's "
                             "model_spec.yaml (or leave config_path empty to use the one in model_path).")
    return LinkedModel(folder, spec_file or find_spec_file(folder), versions)


def single_model(path: Path) -> tuple[str, LinkedModel]:
    """The one model a server started with ``MODEL_PATH`` / ``--model`` serves: a model folder (a
    spec file and numbered versions), a bare version folder holding model.onnx, or one ``.onnx``
    file. Its name is the spec's ``name``, else the file's stem or the folder's name (the parent's,
    for a version folder such as ``bert/1``)."""
    path = path.expanduser().resolve()
    if path.is_file():
        if path.suffix.lower() != ".onnx":
            raise ModelSpecError(f"{path} is a file but not an .onnx model; name an .onnx file or a model folder.")
        return path.stem, LinkedModel(path.parent, None, {1: path.parent}, artefact=path.name)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} does not exist; name a model folder or an .onnx file.")
    name = path.name
    if _VERSION_FOLDER.match(name) and not any(c.is_dir() and c.name.isdigit() for c in path.iterdir()):
        name = path.parent.name
    link = link_layout(name, path, None)
    return _spec_name(link.spec_file) or name, link


def _spec_name(spec_file: Path | None) -> str | None:
    """The ``name`` a spec file writes, if it can be read; a broken one fails later, at its load."""
    if spec_file is None:
        return None
    try:
        text = spec_file.read_text(encoding="utf-8")
        doc = spec_from_pbtxt(text, str(spec_file)) if spec_file.suffix == ".pbtxt" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, InhouseError):
        return None
    name = doc.get("name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) and name else None


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self._links: dict[str, LinkedModel] = {}

    def model_names(self) -> list[str]:
        names = set(self._links)
        if self.root.is_dir():
            names.update(p.name for p in self.root.iterdir()
                         if p.is_dir() and not p.name.startswith((".", "_")) and self._looks_like_model(p))
        return sorted(names)

    # ---- models linked from elsewhere (kept for the life of the process) -------------------
    def linked(self, name: str) -> LinkedModel | None:
        return self._links.get(name)

    def link(self, name: str, link: LinkedModel | None) -> LinkedModel | None:
        """Serve ``name`` from ``link`` (None: forget it); returns the link it replaces."""
        if link is not None and (self.root / name).is_dir() and (self.root / name).resolve() != link.folder:
            raise InvalidRequestError(
                f"A model named '{name}' is already in the repository ({self.root / name}); load that one "
                "by name, or choose another model_name for the model at " + str(link.folder) + "."
            )
        previous = self._links.pop(name, None)
        if link is not None:
            self._links[name] = link
        return previous

    def read_linked_spec(self, name: str, link: LinkedModel,
                         overrides: dict[str, Any] | None = None) -> ModelSpec:
        if link.artefact is not None:  # the file that was named, whatever it is called
            overrides = {"onnxruntime": {"file": link.artefact}, **(overrides or {})}
        return read_spec_path(link.spec_file, name, overrides, default_source=link.folder / SPEC_FILENAMES[1],
                              name_from="model_name")

    @staticmethod
    def _looks_like_model(path: Path) -> bool:
        return find_spec_file(path) is not None or any(
            c.is_dir() and c.name.isdigit() for c in path.iterdir()
        )

    def model_dir(self, name: str) -> Path:
        # Names come from clients: never let them escape the repository.
        if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
            raise ModelNotFoundError(f"Model '{name}' is not a valid model name.")
        link = self._links.get(name)
        if link is not None:
            return link.folder
        path = self.root / name
        if not path.is_dir():
            known = ", ".join(self.model_names()) or "none"
            raise ModelNotFoundError(
                f"Model '{name}' is not in the repository {self.root} (models there: {known})."
            )
        return path

    def model_dir_if_any(self, name: str) -> Path | None:
        """The repository's own folder for ``name``, resolved, or None."""
        path = self.root / name
        return path.resolve() if name and "/" not in name and path.is_dir() else None

    def read_spec(self, name: str, overrides: dict[str, Any] | None = None) -> ModelSpec:
        link = self._links.get(name)
        if link is not None:
            return self.read_linked_spec(name, link, overrides)
        return load_spec_file(self.model_dir(name), overrides)

    def version_dir(self, name: str, version: int) -> Path:
        link = self._links.get(name)
        if link is not None and version in link.versions:
            return link.versions[version]
        return self.model_dir(name) / str(version)

    def versions_on_disk(self, name: str) -> list[int]:
        path = self.model_dir(name)
        link = self._links.get(name)
        if link is not None:
            return sorted(v for v, d in link.versions.items() if d.is_dir())
        return sorted(int(c.name) for c in path.iterdir() if c.is_dir() and c.name.isdigit() and int(c.name) > 0)

    def select_versions(self, spec: ModelSpec) -> list[int]:
        """The versions the spec's version policy says should serve, newest first."""
        on_disk = self.versions_on_disk(spec.name)
        where = self.model_dir(spec.name)
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
        link = self._links.get(name)
        model_dir = link.folder if link is not None else self.root / name
        spec_files = [link.spec_file] if link is not None and link.spec_file is not None else (
            [] if link is not None else [model_dir / fn for fn in SPEC_FILENAMES])
        for p in spec_files:
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        vdir = self.version_dir(name, version) if link is not None else model_dir / str(version)
        if link is not None and link.artefact is not None:
            p = link.folder / link.artefact  # its folder may hold anything else
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        elif vdir.is_dir():
            for p in sorted(vdir.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p.relative_to(vdir)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()
