"""Backends turn a model folder into something that predicts. Each one lives in its own
module and is imported only when a model asks for it, so optional engines stay optional."""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from inhouse.core.spec import ModelSpec, TensorSpec
from inhouse.errors import ArtefactIntegrityError, ModelFormatError, ModelSpecError

ArtefactDecryptor = Callable[[bytes, str, ModelSpec], bytes]


@dataclass
class LoadContext:
    """What a backend may use while loading: artefact access with integrity checks (and, when
    configured, in-memory decryption) and server-wide options."""

    model_dir: Path
    version_dir: Path
    spec: ModelSpec
    decryptor: ArtefactDecryptor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[float, str], None] | None = None  # (percent, what) while loading; shown as reason

    def hf_folder(self, fix: str) -> Path:
        """The Hugging Face folder the model loads from: ``source`` (relative to the version
        folder) or the version folder itself; 1005 with ``fix`` when it has no config.json."""
        src = self.spec.source
        path = self.version_dir if src is None else Path(src).expanduser()
        if not path.is_absolute():
            path = self.version_dir / path
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"Model '{self.spec.name}': {path} is not a Hugging Face model folder (no "
                                 f"config.json); {fix}")
        return path

    def read_artefact(self, relative: str) -> bytes:
        """Bytes of ``VERSION/relative``, checksum-verified and decrypted in memory if needed.
        Raises 1004 on a checksum mismatch or failed decryption, 1005 when it is missing."""
        path = self.version_dir / relative
        rel_to_model = f"{self.version_dir.name}/{relative}"
        if not path.resolve().is_relative_to(self.version_dir.resolve()):
            raise ModelSpecError(
                f"Model '{self.spec.name}': artefact '{relative}' lies outside its version folder; name a file "
                "inside it."
            )
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelSpecError(
                f"Model '{self.spec.name}' version {self.version_dir.name} has no '{relative}'; "
                f"put the artefact at {path}."
            ) from None
        except OSError as err:
            raise ModelSpecError(f"Cannot read {path}: {err.strerror}.") from None
        expected = self.spec.files.sha256.get(rel_to_model)
        if expected is not None:
            self._check_sha256(rel_to_model, expected, hashlib.sha256(data).hexdigest())
        if self.decryptor is not None:
            data = self.decryptor(data, rel_to_model, self.spec)
        return data

    def verify_file(self, relative: str) -> None:
        """The sha256 check of ``read_artefact`` for a file a runtime reads itself from disk (not
        through Python): streamed, so a large file is never held in memory. Raises 1004."""
        rel_to_model = f"{self.version_dir.name}/{relative}"
        expected = self.spec.files.sha256.get(rel_to_model)
        if expected is None:
            return
        with open(self.version_dir / relative, "rb") as f:
            self._check_sha256(rel_to_model, expected, hashlib.file_digest(f, "sha256").hexdigest())

    def verify_listed(self) -> None:
        """Check every file that ``files.sha256`` lists in this version folder, for a runtime that
        reads the whole folder itself (transformers' ``from_pretrained``): call it before any of the
        folder is read. Raises 1004 on a mismatch, 1005 for a listed file that is missing."""
        prefix = f"{self.version_dir.name}/"
        for rel_to_model in sorted(self.spec.files.sha256):
            if not rel_to_model.startswith(prefix):
                continue  # another version's file
            relative = rel_to_model.removeprefix(prefix)
            path = self.version_dir / relative
            if not path.resolve().is_relative_to(self.version_dir.resolve()) or not path.is_file():
                raise ModelSpecError(
                    f"Model '{self.spec.name}': files.sha256 lists '{rel_to_model}', which is not a file in "
                    f"{self.version_dir}; restore it, or remove it from files.sha256."
                )
            self.verify_file(relative)

    def _check_sha256(self, rel_to_model: str, expected: str, actual: str) -> None:
        if actual != expected:
            raise ArtefactIntegrityError(
                f"Checksum mismatch for '{rel_to_model}' of model '{self.spec.name}': "
                f"model.yaml expects sha256 {expected[:12]}…, the file has {actual[:12]}…. "
                "The file is corrupted or was replaced; restore it or update files.sha256."
            )


class LoadedModel(Protocol):
    """A model version held in memory, ready to predict. A model may also set a class
    attribute ``inline_safe = True`` when its ``predict`` never blocks on other Python threads:
    the scheduler then runs calls it measured as very cheap on the event loop, sparing the
    thread hand-off."""

    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        """Run one (possibly batched) call. Blocking; called off the event loop."""
        ...

    def close(self) -> None:
        """Release every resource; the object is not used afterwards."""
        ...


class Backend(Protocol):
    name: str

    def load(self, ctx: LoadContext) -> LoadedModel: ...


_BACKENDS: dict[str, str] = {
    "onnxruntime": "inhouse.backends.onnx:OnnxBackend",
    "transformers": "inhouse.backends.transformers:TransformersBackend",
    "llamacpp": "inhouse.backends.llamacpp:LlamaCppBackend",
    "upstream": "inhouse.backends.upstream:UpstreamBackend",
    "vllm": "inhouse.backends.vllm:VllmBackend",
}


def register_backend(name: str, target: str) -> None:
    """Register ``module:Class`` as the backend for ``backend: name`` in model.yaml."""
    _BACKENDS[name] = target


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    target = _BACKENDS.get(name)
    if target is None:
        raise ModelFormatError(
            f"Backend '{name}' is not supported; model.yaml 'backend' must be one of: "
            f"{', '.join(backend_names())}."
        )
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelFormatError(
            f"Backend '{name}' needs an optional dependency that is not installed ({err.name}); "
            f"install it with: pip install 'inhouse[{name}]'."
        ) from None
    backend: Backend = getattr(module, cls_name)()
    return backend
