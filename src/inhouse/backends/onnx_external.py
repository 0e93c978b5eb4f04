"""ONNX external data: models over 2 GB keep their weights beside the graph (``model.onnx`` plus
``weights.bin`` or one file per tensor). We load the graph from bytes (checksummed, maybe decrypted),
so ONNX Runtime must be told where those files are:

- plaintext files: ORT reads them itself from the graph's folder (no copy through Python, large
  weights are memory-mapped); any sha256 listed for them in model.yaml is verified first;
- encrypted files (``inhouse encrypt`` encrypts every file of a version): they are decrypted in
  memory and handed to ORT as in-memory files; no plaintext ever reaches the disk.

A location that is absolute or leaves the graph's folder is refused before ORT sees it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import onnx
import onnxruntime as ort
from onnx.external_data_helper import uses_external_data

from inhouse.backends import LoadContext
from inhouse.errors import ModelFormatError, ModelSpecError
from inhouse.security.crypto import MAGIC, is_encrypted

_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
# TensorProto.data_location (field 14, varint) = EXTERNAL (1): tag byte 0x70, value 0x01. A graph whose
# bytes lack this pair has no external tensors, so most models skip parsing the graph a second time.
_EXTERNAL_MARK = b"\x70\x01"


@dataclass
class ExternalData:
    """What a session needs for a graph's external data; keeps in-memory buffers alive until the
    session is built (ORT copies them), then ``release()`` drops them."""

    folder: Path | None = None
    names: list[str] = field(default_factory=list)
    buffers: list[bytes] = field(default_factory=list)

    def apply(self, so: ort.SessionOptions) -> None:
        if self.folder is not None:
            so.add_session_config_entry(_FOLDER_KEY, str(self.folder))
        if self.names:
            so.add_external_initializers_from_files_in_memory(self.names, self.buffers,
                                                              [len(b) for b in self.buffers])

    def release(self) -> None:
        self.names.clear()
        self.buffers.clear()


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def external_locations(data: bytes) -> list[str]:
    """The distinct external-data file names a serialized graph refers to (in first-seen order)."""
    if _EXTERNAL_MARK not in data:
        return []
    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # ORT reports an unreadable graph with its own, better message
        return []
    seen: dict[str, None] = {}
    for t in _tensors(model.graph):
        if uses_external_data(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            seen.setdefault(loc, None)
    return list(seen)


def _checked_relative(ctx: LoadContext, graph_file: str, location: str) -> str:
    """``location`` as a path relative to the version folder, refusing anything outside it."""
    name = ctx.spec.name
    loc = PurePosixPath(location.replace("\\", "/"))
    if not location or loc.is_absolute() or ".." in loc.parts:
        raise ModelFormatError(
            f"Model '{name}': the ONNX graph refers to external data at '{location}'; only files inside "
            "the graph's own folder are allowed. Re-save the model with onnx.save_model(..., "
            "save_as_external_data=True, location='weights.bin').")
    rel = PurePosixPath(graph_file).parent / loc
    if not (ctx.version_dir / rel).is_file():
        raise ModelSpecError(
            f"Model '{name}' version {ctx.version_dir.name}: the ONNX graph keeps weights in '{location}', "
            f"which is missing; put it beside {graph_file} in {ctx.version_dir}.")
    return rel.as_posix()


def _is_encrypted_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return is_encrypted(f.read(len(MAGIC)))


def prepare(ctx: LoadContext, graph_file: str, graph: bytes) -> ExternalData:
    """Check and stage the external data of ``graph`` (the bytes of VERSION/graph_file)."""
    locations = external_locations(graph)
    if not locations:
        return ExternalData()
    rels = [_checked_relative(ctx, graph_file, loc) for loc in locations]
    encrypted = ctx.spec.encryption is not None or any(_is_encrypted_file(ctx.version_dir / r) for r in rels)
    if encrypted:
        # read_artefact verifies the checksum, then decrypts in memory (1004 on a wrong key or a flipped byte)
        return ExternalData(names=list(locations), buffers=[ctx.read_artefact(r) for r in rels])
    for r in rels:
        ctx.verify_file(r)
    return ExternalData(folder=(ctx.version_dir / graph_file).parent.resolve())
