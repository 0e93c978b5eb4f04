"""A real (pure Python) backend for scheduler tests: ``y = x * 2`` on FP32 ``[-1, 2]``, which
records every call it runs and can be held closed, so tests control when the model is busy."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from inhouse.backends import LoadContext, register_backend
from inhouse.core.spec import TensorSpec


@dataclass
class Gate:
    open: threading.Event = field(default_factory=threading.Event)
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    calls: list[np.ndarray] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.open.set()

    def hold(self) -> None:
        """Close the gate and forget the entries of calls made before: a test that then waits on
        ``entered`` sees a call that started after the hold, not a stale permit."""
        self.open.clear()
        while self.entered.acquire(blocking=False):
            pass

    def executed_ids(self) -> list[float]:
        """The first feature of every row the model ran (tests put a request id there)."""
        with self.lock:
            return [float(v) for call in self.calls for v in call[:, 0]]


GATES: dict[str, Gate] = {}


class GateModel:
    platform = "python_gate"

    def __init__(self, gate: Gate) -> None:
        self.inputs = [TensorSpec(name="x", dtype="FP32", shape=[-1, 2])]
        self.outputs = [TensorSpec(name="y", dtype="FP32", shape=[-1, 2])]
        self._gate = gate

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self._gate.entered.release()
        self._gate.open.wait(30)
        with self._gate.lock:
            self._gate.calls.append(np.array(x, copy=True))
        if np.isnan(x).any():
            raise RuntimeError("the gate model refuses NaN")
        return {"y": x * 2}

    def close(self) -> None:
        pass


class GateBackend:
    name = "gate"

    def load(self, ctx: LoadContext) -> GateModel:
        return GateModel(GATES.setdefault(ctx.spec.name, Gate()))


register_backend("gate", f"{__name__}:GateBackend")
