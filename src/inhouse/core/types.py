"""The internal request and response types every protocol adapter translates to and from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model: str
    inputs: list[InputTensor]
    version: int | None = None
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    priority: int | None = None
    timeout_s: float | None = None
    # whose request, for the response cache (a digest of the API key presented, "" without one);
    # None: not to be cached (the client sent Cache-Control: no-cache, or its adapter does not cache)
    cache_tenant: str | None = None


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    model: str
    version: int
    outputs: list[OutputTensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
