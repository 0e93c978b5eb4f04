"""PII detection and redaction: e-mail addresses, phone numbers (international and mainland
China mobiles), mainland China resident ID numbers (checksum verified), bank card numbers
(Luhn verified) and IP addresses.

Logs and the audit log get plain markers (``[EMAIL]``). Model inputs get numbered placeholders
(``[PHONE_1]``) remembered in a :class:`Vault`, so a model's answer can have the originals put
back for the caller (the model itself never sees them)."""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inhouse.core.spec import PiiSpec

DETECTORS = ("email", "cn_id", "phone", "bank_card", "ip")
_LABELS = {"email": "EMAIL", "cn_id": "CN_ID", "phone": "PHONE", "bank_card": "BANK_CARD", "ip": "IP"}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_CN_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[0-9Xx](?![0-9A-Za-z])")
_CN_MOBILE = re.compile(r"(?<![\d+])(?:(?:\+|00)?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)")
_INTL_PHONE = re.compile(r"(?<![\w+])(?:\+|00)[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d)")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
# Every detector needs an '@', a run of 7+ digits (spaces, dots, dashes, brackets allowed) or two
# colons: one cheap search rules out most strings (log lines, ids, paths) before the detectors run.
_MAYBE = re.compile(r"@|\d[\d\s().+-]{5,}\d|:[0-9A-Fa-f]*:")
# A placeholder, and what may be the start of one at the end of a streamed piece (held back
# until the next piece says): both from the labels, so they cannot drift apart.
_PLACEHOLDER = re.compile(rf"\[({'|'.join(_LABELS.values())})_(\d{{1,6}})\]")
_PARTIAL_PLACEHOLDER = re.compile(rf"\[[A-Z_]{{0,{max(map(len, _LABELS.values())) + 1}}}\d{{0,6}}$")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def valid_cn_id(number: str) -> bool:
    """A mainland China resident ID (GB 11643): 18 characters, a real birth date, and the
    ISO 7064 MOD 11-2 check character."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    try:
        born = _dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    if born.year < 1900 or born > _dt.date.today():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_valid(digits: str) -> bool:
    if not digits.isdigit() or not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _phone_ok(text: str) -> bool:
    return 7 <= len(_digits(text)) <= 15


_RULES: dict[str, list[tuple[re.Pattern[str], Callable[[str], bool] | None]]] = {
    "email": [(_EMAIL, None)],
    "cn_id": [(_CN_ID, valid_cn_id)],
    "phone": [(_CN_MOBILE, None), (_INTL_PHONE, _phone_ok)],
    "bank_card": [(_CARD, lambda s: luhn_valid(_digits(s)))],
    "ip": [(_IPV4, _valid_ip), (_IPV6, _valid_ip)],
}


@dataclass
class Vault:
    """Placeholders handed out while redacting one request, to restore them in its answer.
    ``limit``: keep at most this many (a long-lived stream's vault); the oldest are forgotten
    first, so a late answer naming one keeps the placeholder, never another value, and numbers
    are never handed out twice."""

    originals: dict[str, str] = field(default_factory=dict)  # placeholder → original
    limit: int | None = None
    _by_value: dict[tuple[str, str], str] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def placeholder(self, kind: str, value: str) -> str:
        key = (kind, value)
        found = self._by_value.get(key)
        if found is None:
            label = _LABELS[kind]
            n = self._counts.get(label, 0) + 1
            self._counts[label] = n
            found = f"[{label}_{n}]"
            self._by_value[key] = found
            self.originals[found] = value
            if self.limit is not None and len(self.originals) > self.limit:
                oldest = next(iter(self._by_value))  # both dicts are filled together, in order
                del self.originals[self._by_value.pop(oldest)]
        return found

    def restore(self, text: str) -> str:
        if not self.originals or "[" not in text:
            return text
        return _PLACEHOLDER.sub(lambda m: self.originals.get(m.group(0), m.group(0)), text)


class Redactor:
    def __init__(self, detectors: Iterable[str] = DETECTORS) -> None:
        chosen = list(detectors)
        unknown = sorted(set(chosen) - set(DETECTORS))
        if unknown:
            raise ValueError(f"Unknown PII detector(s) {unknown}; known: {', '.join(DETECTORS)}.")
        # Fixed order: more specific detectors claim their digits first.
        self._rules = [(kind, rx, check) for kind in DETECTORS if kind in chosen for rx, check in _RULES[kind]]

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, kind) spans, in text order."""
        taken: list[tuple[int, int, str]] = []
        for kind, rx, check in self._rules:
            for m in rx.finditer(text):
                s, e = m.span()
                if check is not None and not check(m.group(0)):
                    continue
                if any(s < te and ts < e for ts, te, _ in taken):
                    continue
                taken.append((s, e, kind))
        return sorted(taken)

    def redact(self, text: str, vault: Vault | None = None) -> str:
        """Replace every detected item: with ``[KIND]`` markers, or with numbered placeholders
        recorded in ``vault``."""
        if not text or not _MAYBE.search(text):
            return text
        spans = self.find(text)
        if not spans:
            return text
        out, pos = [], 0
        for s, e, kind in spans:
            out.append(text[pos:s])
            out.append(vault.placeholder(kind, text[s:e]) if vault is not None else f"[{_LABELS[kind]}]")
            pos = e
        out.append(text[pos:])
        return "".join(out)


DEFAULT_REDACTOR = Redactor()


def redact(text: str) -> str:
    """Irreversible redaction with every detector (for logs and the audit log)."""
    return DEFAULT_REDACTOR.redact(text)


class PiiLogFilter:
    """A logging filter that redacts PII from every record's message and string extras (installed
    on the server's log handler). Exception tracebacks are left as they are."""

    SAFE_KEYS = frozenset({"client", "url", "host", "request_id", "trace_id", "span_id", "traceparent", "route",
                           "method", "logger", "model", "version"})

    def filter(self, record: object) -> bool:
        msg = record.getMessage()  # type: ignore[attr-defined]
        red = redact(msg)
        if red is not msg:
            record.msg, record.args = red, None  # type: ignore[attr-defined]
        for k, v in list(vars(record).items()):
            if isinstance(v, str) and k not in self.SAFE_KEYS and k not in _LOG_RECORD_ATTRS:
                setattr(record, k, redact(v))
        return True


_LOG_RECORD_ATTRS = frozenset({"name", "msg", "levelname", "pathname", "filename", "module", "funcName",
                               "threadName", "processName", "exc_text", "stack_info", "taskName", "message",
                               "asctime"})


class PiiRules:
    """A model's ``pii:`` rules applied to one exchange: input texts get numbered placeholders
    recorded in ``vault``; answer texts get the originals back (``outputs: restore``) or have
    PII masked (``outputs: redact``). Every transport uses these, so they behave the same."""

    def __init__(self, spec: PiiSpec, vault: Vault | None = None) -> None:
        self.spec = spec
        self.vault = vault if vault is not None else Vault()
        self._redactor = _redactor(tuple(spec.detectors))

    @property
    def changes_outputs(self) -> bool:
        return self.spec.outputs == "redact" or (self.spec.outputs == "restore" and self.spec.inputs)

    def redact_input(self, text: str) -> str:
        return self._redactor.redact(text, self.vault) if self.spec.inputs else text

    def output(self, text: str) -> str:
        if self.spec.outputs == "redact":
            return self._redactor.redact(text)
        if self.spec.outputs == "restore" and self.spec.inputs:
            return self.vault.restore(text)
        return text


@lru_cache(maxsize=64)
def _redactor(detectors: tuple[str, ...]) -> Redactor:
    return Redactor(detectors)


class PieceTexts:
    """Answer text that arrives in pieces (streamed tokens) through ``fn``. A placeholder such
    as ``[PHONE_1]`` usually arrives split over several pieces, so a piece that ends in what may
    be the start of one is held back and joined to the next piece with the same ``key``."""

    def __init__(self, fn: Callable[[str], str]) -> None:
        self.fn = fn
        self.held: dict[Hashable, str] = {}

    def piece(self, key: Hashable, text: str, final: bool) -> str:
        text = self.held.pop(key, "") + text
        if not final:
            m = _PARTIAL_PLACEHOLDER.search(text)
            if m:
                self.held[key] = text[m.start():]
                text = text[:m.start()]
        return self.fn(text)

    def drop(self, key: Hashable) -> None:
        self.held.pop(key, None)
