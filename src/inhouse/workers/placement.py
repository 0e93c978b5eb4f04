"""Which worker loads a model (``placement`` in model.yaml): ``each`` — every worker its own copy
(cheap tensor models, where more front ends are the point), or ``one`` — the owner loads it and
every other worker holds a stand-in that routes to it (LLMs, whose engine children and caches
must not be duplicated, and large models)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Literal

from inhouse.core.repository import ModelRepository, single_model
from inhouse.core.spec import ModelSpec
from inhouse.errors import InhouseError
from inhouse.settings import ServerSettings
from inhouse.workers.standin import StandInBackend
from inhouse.workers.wire import owner_path

Placement = Literal["each", "one"]
GENERATIVE = ("chat", "generate")
SERVER_ENGINES = ("llamacpp", "vllm")  # engines that are server children of their own


def owner_of(name: str, count: int) -> int:
    """The worker that holds ``name`` when it is placed on one: the same in every process (the
    supervisor sends a change there first), and spread over the workers."""
    return zlib.crc32(name.encode()) % count


def files_size(model_dir: Path, spec: ModelSpec) -> int:
    """Bytes on disk of the model's largest version folder, plus its Hugging Face ``source``."""
    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0

    versions = [size(p) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    total = max(versions, default=0)
    if spec.source and Path(spec.source).expanduser().is_absolute():
        total += size(Path(spec.source).expanduser())
    return total


def placement_of(spec: ModelSpec, model_dir: Path, one_above_mb: float) -> Placement:
    """model.yaml's ``placement``, else the default from the model."""
    if spec.placement is not None:
        return spec.placement
    if spec.backend == "upstream":
        return "each"  # a remote already: each worker keeps its own connections
    if spec.backend in SERVER_ENGINES or (spec.backend == "transformers" and spec.task in GENERATIVE):
        return "one"
    return "one" if files_size(model_dir, spec) > one_above_mb * 2**20 else "each"


class WorkerPlacement:
    """The manager's placement in worker ``index`` of ``count``: a model placed on one worker that
    is not this one loads as a stand-in for the owner's."""

    def __init__(self, repository: ModelRepository, folder: Path, index: int, count: int,
                 one_above_mb: float) -> None:
        self._repository = repository
        self._folder = folder
        self.index = index
        self.count = count
        self._one_above_mb = one_above_mb

    def owner(self, spec: ModelSpec) -> int | None:
        """The worker holding the model, or None when each worker loads its own."""
        if self.count < 2:
            return None
        if placement_of(spec, self._repository.model_dir(spec.name), self._one_above_mb) == "each":
            return None
        return owner_of(spec.name, self.count)

    def copies(self, spec: ModelSpec) -> int:
        return self.count if self.owner(spec) is None else 1

    def backend_for(self, spec: ModelSpec) -> StandInBackend | None:
        owner = self.owner(spec)
        if owner is None or owner == self.index:
            return None
        return StandInBackend(owner_path(self._folder, owner), owner)

    def close(self) -> None:
        return None


def start_count(settings: ServerSettings) -> int:
    """How many worker processes to start. ``workers: auto`` is one per core, except when every
    model the server loads at start is held by one worker (a repository of LLMs): that worker
    does each request's model work, and more front ends would only add a hop per token."""
    count = settings.worker_count()
    if settings.workers != "auto" or count < 2:
        return count
    placements = _start_placements(settings)
    return 1 if placements and all(p == "one" for p in placements) else count


def _start_placements(settings: ServerSettings) -> list[Placement]:
    """The placement of each model loaded at start, from the models the server will find (its
    repository, with ``MODEL_PATH``'s model linked in, as ``InhouseServer`` builds it) and
    ``--load``; empty when there are none, or for the built-in demo repository (small ONNX
    models: a copy per worker)."""
    if settings.repo is None and settings.model_path is None:
        return []
    repository = ModelRepository(settings.repo if settings.repo is not None else settings.data_dir / "no-repository")
    if settings.model_path is not None:
        try:
            repository.link(*single_model(settings.model_path))
        except InhouseError:
            return []  # the server itself says why, at start
    wanted = settings.load_names()
    names = [n for n in repository.model_names() if wanted == "all" or (wanted != "none" and n in wanted)]
    out: list[Placement] = []
    for name in names:
        try:
            spec = repository.read_spec(name)
            out.append(placement_of(spec, repository.model_dir(name), settings.placement_one_above_mb))
        except InhouseError:
            continue  # a model that will fail to load counts for neither
    return out
