"""``inhouse doctor``: checks a deployment before (or instead of) starting it, and says how to
fix each problem. Each check is a function returning findings; other parts of inhouse add their
own with ``register_check``."""

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
_CHECKS: list[tuple[str, Check]] = []


def register_check(name: str, check: Check) -> None:
    """Add a check (e.g. the key store and audit chain from the security module)."""
    _CHECKS.append((name, check))


def run_checks(options: DoctorOptions) -> list[Finding]:
    from inhouse.doctor import checks, security_checks  # noqa: F401 - registers the built-in checks

    findings: list[Finding] = []
    for name, check in list(_CHECKS):
        try:
            findings.extend(check(options))
        except Exception as err:  # a broken check is a finding, not a crash
            findings.append(Finding(name, Severity.ERROR, f"The check itself failed: {type(err).__name__}: {err}",
                                    "Report this as a bug in inhouse."))
    return findings


def worst(findings: Iterable[Finding]) -> Severity:
    return max((f.severity for f in findings), default=Severity.OK)
