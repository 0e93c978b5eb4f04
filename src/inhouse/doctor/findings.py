"""What a doctor check reports, and the list of checks: below the checks that register
themselves and the runner that calls them."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from inhouse.settings import ServerSettings


class Severity(enum.IntEnum):
    OK = 0
    INFO = 1
    WARNING = 2
    ERROR = 3


@dataclass(frozen=True)
class Finding:
    area: str  # "config", "model iris", "port", "tls", ...
    severity: Severity
    message: str
    fix: str = ""


@dataclass(frozen=True)
class DoctorOptions:
    settings: ServerSettings
    repo: Path | None
    load_models: bool = False  # actually load every model (slow; catches opset / graph problems)
    check_ports: bool = True


Check = Callable[[DoctorOptions], Iterable[Finding]]
CHECKS: list[tuple[str, Check]] = []


def register_check(name: str, check: Check) -> None:
    """Add a check (e.g. the key store and audit chain from the security module)."""
    CHECKS.append((name, check))
