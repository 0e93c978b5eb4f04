"""``inhouse doctor``: checks a deployment before (or instead of) starting it, and says how to
fix each problem. Each check is a function returning findings; other parts of inhouse add their
own with ``register_check``."""

from __future__ import annotations

from collections.abc import Iterable

from inhouse.doctor import checks, security_checks  # noqa: F401 - registers the built-in checks, in this order
from inhouse.doctor.findings import CHECKS, Check, DoctorOptions, Finding, Severity, register_check

__all__ = ["Check", "DoctorOptions", "Finding", "Severity", "register_check", "run_checks", "worst"]


def run_checks(options: DoctorOptions) -> list[Finding]:
    findings: list[Finding] = []
    for name, check in list(CHECKS):
        try:
            findings.extend(check(options))
        except Exception as err:  # a broken check is a finding, not a crash
            findings.append(Finding(name, Severity.ERROR, f"The check itself failed: {type(err).__name__}: {err}",
                                    "Report this as a bug in inhouse."))
    return findings


def worst(findings: Iterable[Finding]) -> Severity:
    return max((f.severity for f in findings), default=Severity.OK)
