"""HPACK for the gRPC front (``front.py``): hpack's own coder with the two costs that matter
per call taken out. Answers are encoded without touching the dynamic table
(:class:`StatelessEncoder`); a request block seen before against the same dynamic table is not
decoded again (:class:`CachingDecoder`)."""

from __future__ import annotations

from typing import Any

import hpack
from hpack.hpack import encode_integer
from hpack.table import HeaderTable


def _static_index() -> tuple[dict[tuple[bytes, bytes], int], dict[bytes, int]]:
    full: dict[tuple[bytes, bytes], int] = {}
    names: dict[bytes, int] = {}
    for i, (name, value) in enumerate(HeaderTable.STATIC_TABLE, 1):
        full.setdefault((name, value), i)
        names.setdefault(name, i)
    return full, names


_STATIC_FULL, _STATIC_NAMES = _static_index()


class StatelessEncoder(hpack.Encoder):
    """An HPACK encoder that never adds to the dynamic table: each header is a static-table index or
    a literal without indexing, without Huffman coding. Answers' headers vary per call (trace
    ids, request ids) and indexing them evicts the constant ones; encoding them plainly costs a
    tenth of hpack's encoder in Python and a few bytes more on the wire."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple[bytes, bytes], bytes] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        block = []
        if self.header_table.resized:  # the peer's SETTINGS_HEADER_TABLE_SIZE: acknowledged as required
            block.append(self._encode_table_size_change())
            self.header_table.resized = False
        cache = self._cache
        for name, value in headers:
            key = (name, value)
            hit = cache.get(key)
            if hit is not None:
                block.append(hit)
                continue
            full = _STATIC_FULL.get(key)
            if full is not None:  # the static table has 61 entries: one byte
                encoded = bytes((0x80 | full,))
                cache[key] = encoded
                block.append(encoded)
                continue
            index = _STATIC_NAMES.get(name, 0)
            # literal without indexing: the name by its static index, or spelled out
            head = bytes(encode_integer(index, 4)) if index else b"\x00" + bytes(encode_integer(len(name), 7)) + name
            encoded = head + bytes(encode_integer(len(value), 7)) + value
            if len(cache) < 64 and len(value) < 32 and name in _CACHED_NAMES:
                cache[key] = encoded
            block.append(encoded)
        return b"".join(block)


class _CountedTable(HeaderTable):
    """hpack's dynamic table, counting its changes (:class:`CachingDecoder`'s key)."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return int(self._maxsize)

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]  # the base class's setter


class CachingDecoder(hpack.Decoder):
    """hpack's decoder, remembering the headers of blocks that left the dynamic table as it was:
    decoding the same bytes again against the same table gives the same headers. A gRPC client
    sends the same block for every call of a method (after the first, all of it indexed), and
    decoding it in Python costs more than the rest of the request's framing."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table: _CountedTable = _CountedTable()
        self._seen: dict[bytes, tuple[int, list[Any]]] = {}

    def decode(self, data: bytes, raw: bool = False) -> Any:
        table = self.header_table
        generation = table.generation
        hit = self._seen.get(data)
        if hit is not None and hit[0] == generation and raw:
            return list(hit[1])
        headers = super().decode(data, raw)
        if raw and table.generation == generation and len(data) <= 1024:
            if len(self._seen) >= 64:
                self._seen.clear()
            self._seen[data] = (generation, list(headers))
        return headers


_CACHED_NAMES = frozenset((b"content-type", b"grpc-accept-encoding", b"grpc-status", b"grpc-encoding"))
