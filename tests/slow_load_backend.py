"""A real (pure Python) backend whose load can be held, for load-timeout tests: ``y = x * 2`` on
FP32 ``[-1, 2]``; ``load`` waits until the model's ``LoadGate`` opens and the gate counts closes."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from inhouse.backends import LoadContext, register_backend
from inhouse.core.spec import TensorSpec


@dataclass
class LoadGate:
    open: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    closed: int = 0


LOAD_GATES: dict[str, LoadGate] = {}


class DoublingModel:
    platform = "python_slow_load"

    def __init__(self, gate: LoadGate) -> None:
        self.inputs = [TensorSpec(name="x", dtype="FP32", shape=[-1, 2])]
        self.outputs = [TensorSpec(name="y", dtype="FP32", shape=[-1, 2])]
        self._gate = gate

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}

    def close(self) -> None:
        self._gate.closed += 1


class SlowLoadBackend:
    name = "slow-load"

    def load(self, ctx: LoadContext) -> DoublingModel:
        gate = LOAD_GATES.setdefault(ctx.spec.name, LoadGate())
        gate.started.set()
        gate.open.wait(30)
        return DoublingModel(gate)


register_backend("slow-load", f"{__name__}:SlowLoadBackend")
