"""An exact-match cache of deterministic answers (v2 infer; chat and completions at temperature 0
or with a seed). Transport-free: a protocol adapter says whose request it is (the tenant, a
digest of the API key presented) and whether the client allowed caching; the data plane and the
LLM service look answers up after the security pipeline admitted the request, so a cached answer
is still key-checked, rate-limited and audited — only the model call is skipped.

Entries are bytes, keyed by model, version, the version's file fingerprint, the tenant and a
digest of the canonical request, and live in memory (LRU, bounded by count and bytes) or in Redis.
A store that fails (Redis gone) turns into misses for a second at a time, with one log line per
outage and a counted error: requests are served uncached, never failed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from inhouse.core.datatypes import V2_TO_NUMPY, deserialize_bytes, raw_bytes
from inhouse.core.manager import ModelState
from inhouse.core.spec import ModelSpec
from inhouse.core.types import InferRequest, InferResponse, OutputTensor

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0  # a failed store is left alone this long before it is tried again
# request parameters that change only how an answer is written, not what the model computes
_RENDER_PARAMETERS = frozenset({"binary_data_output", "binary_data", "binary_data_size"})


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The server-wide settings (``cache:`` in inhouse.yaml)."""

    enabled: bool = False  # every model, unless its model.yaml says otherwise
    ttl_s: float = 300.0
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    redis_url: str | None = None
    share_across_keys: bool = False  # one tenant for every key (off: an answer never crosses keys)


class CacheRecorder(Protocol):
    """What the cache reports (observability implements it: Prometheus, v2 statistics)."""

    def cache_lookup(self, model: str, version: int, hit: bool, seconds: float) -> None: ...

    def cache_error(self, store: str) -> None: ...


class Store(Protocol):
    name: str

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def drop(self, prefix: str) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """LRU within ``max_entries`` and ``max_bytes``; an entry past its TTL reads as absent."""

    name = "memory"

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        item = self._entries.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return item[1]

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self._max_bytes:
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (self._clock() + ttl_s, value)
        self._bytes += len(value)
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._remove(next(iter(self._entries)))

    async def drop(self, prefix: str) -> None:
        for key in [k for k in self._entries if k.startswith(prefix)]:
            self._remove(key)

    def _remove(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self._bytes -= len(value)

    def __len__(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0


class RedisStore:
    """Entries under ``inhouse:rc:`` in a Redis server (redis-py's asyncio client), with Redis's
    own expiry; Redis's ``maxmemory`` policy bounds its size."""

    name = "redis"
    PREFIX = "inhouse:rc:"

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        import redis.asyncio as aioredis  # an optional dependency, imported only when configured

        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                               retry_on_timeout=False)

    async def get(self, key: str) -> bytes | None:
        value = await self._client.get(self.PREFIX + key)
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._client.set(self.PREFIX + key, value, px=max(1, int(ttl_s * 1000)))

    async def drop(self, prefix: str) -> None:
        # the prefix is hex digits, a version number and colons: no glob characters to escape
        batch: list[Any] = []
        async for key in self._client.scan_iter(match=self.PREFIX + prefix + "*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                await self._client.unlink(*batch)
                batch = []
        if batch:
            await self._client.unlink(*batch)

    async def close(self) -> None:
        await self._client.aclose()


class ResponseCache:
    """The cache the data plane and the LLM service share; ``store`` is memory unless
    ``policy.redis_url`` is set."""

    def __init__(self, policy: CachePolicy, store: Store | None = None,
                 recorder: CacheRecorder | None = None) -> None:
        self.policy = policy
        if store is None:
            store = RedisStore(policy.redis_url) if policy.redis_url else MemoryStore(policy.max_entries,
                                                                                       policy.max_bytes)
        self.store = store
        self.recorder = recorder
        self._down_until = 0.0  # the store failed: skipped until then
        self._outage = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # ---- which requests -------------------------------------------------------------------
    def ttl_for(self, spec: ModelSpec) -> float | None:
        """The TTL of this model's entries, or None when its answers are not cached: the model's
        ``response_cache`` decides where it is written, else the server-wide ``enabled``."""
        own = spec.response_cache
        enabled = own.enabled if own is not None and own.enabled is not None else self.policy.enabled
        if not enabled:
            return None
        return own.ttl_s if own is not None and own.ttl_s is not None else self.policy.ttl_s

    def key(self, model: str, version: int, fingerprint: str, tenant: str, canonical: bytes) -> str:
        scope = "" if self.policy.share_across_keys else tenant
        h = hashlib.blake2b(digest_size=20)
        for part in (fingerprint.encode(), b"\0", scope.encode(), b"\0", canonical):
            h.update(part)
        return f"{_prefix(model, version)}{h.hexdigest()}"

    # ---- lookups ----------------------------------------------------------------------------
    async def get(self, model: str, version: int, key: str) -> bytes | None:
        start = time.perf_counter()
        value = None
        if self._usable():
            try:
                value = await self.store.get(key)
            except Exception as exc:
                self._failed(exc)
            else:
                self._recovered()
        if self.recorder is not None:
            self.recorder.cache_lookup(model, version, value is not None, time.perf_counter() - start)
        return value

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if not self._usable():
            return
        try:
            await self.store.put(key, value, ttl_s)
        except Exception as exc:
            self._failed(exc)

    def _usable(self) -> bool:
        return not self._down_until or time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + RETRY_AFTER_S
        if self.recorder is not None:
            self.recorder.cache_error(self.store.name)
        if not self._outage:
            self._outage = True
            log.warning("response cache unavailable; serving uncached",
                        extra={"store": self.store.name, "reason": f"{type(exc).__name__}: {exc}"})

    def _recovered(self) -> None:
        if self._outage:
            self._outage = False
            log.info("response cache available again", extra={"store": self.store.name})
        self._down_until = 0.0

    # ---- invalidation -----------------------------------------------------------------------
    def __call__(self, name: str, version: int | None, state: ModelState) -> None:
        """A model-manager listener: a version leaving service takes its entries with it."""
        if self._stopping or version is None or state not in (ModelState.DRAINING, ModelState.UNLOADED,
                                                               ModelState.FAILED):
            return
        task = asyncio.get_running_loop().create_task(self.invalidate(name, version))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stopping(self) -> None:
        """The server is shutting down: the versions it closes keep their entries, which a
        shared Redis still serves to the other processes and to this server's next start."""
        self._stopping = True

    async def invalidate(self, model: str, version: int) -> None:
        try:
            await self.store.drop(_prefix(model, version))
        except Exception as exc:
            self._failed(exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.store.close()


def _prefix(model: str, version: int) -> str:
    return f"{hashlib.blake2b(model.encode(), digest_size=8).hexdigest()}:{version}:"


# ---- v2 infer: canonical requests and stored answers -----------------------------------------
def infer_canonical(request: InferRequest) -> bytes:
    """What decides a v2 answer: inputs (by name: datatype, shape, bytes), the outputs asked for
    (in order, which is the answer's order) and the parameters that are not about rendering."""
    h = hashlib.blake2b(digest_size=32)
    for t in sorted(request.inputs, key=lambda t: t.name):
        h.update(json.dumps([t.name, t.datatype, list(t.shape), t.data.dtype.str]).encode())
        h.update(raw_bytes(t.data))
    outputs = [o.name for o in request.outputs] if request.outputs else None
    params = {k: v for k, v in request.parameters.items() if k not in _RENDER_PARAMETERS}
    h.update(json.dumps([outputs, params], sort_keys=True, default=str).encode())
    return h.digest()


def encode_infer(response: InferResponse) -> bytes:
    header = []
    parts: list[bytes | memoryview] = []
    for out in response.outputs:
        raw = raw_bytes(out.data)
        header.append([out.name, out.datatype, list(out.shape), len(raw)])
        parts.append(raw)
    head = json.dumps(header).encode()
    return b"".join([struct.pack("<I", len(head)), head, *parts])


def decode_infer(value: bytes, request: InferRequest, version: int) -> InferResponse:
    (n,) = struct.unpack_from("<I", value, 0)
    header = json.loads(value[4:4 + n])
    pos = 4 + n
    outputs: list[OutputTensor] = []
    for name, datatype, shape, size in header:
        count = int(np.prod(shape)) if shape else 1
        if datatype == "BYTES":
            data = deserialize_bytes(name, value[pos:pos + size], count).reshape(shape)
        else:
            data = np.frombuffer(value, dtype=V2_TO_NUMPY[datatype], count=count, offset=pos).reshape(shape)
        outputs.append(OutputTensor(name=name, datatype=datatype, shape=list(shape), data=data))
        pos += size
    return InferResponse(model=request.model, version=version, outputs=outputs, id=request.id)
