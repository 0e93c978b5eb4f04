"""Security at server start-up: the secure-default exposure rule, the model keyring and the
audit-retention task."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable

from inhouse.security.crypto import KEY_ENV, Keyring, ModelKeyError, parse_key, read_key_file
from inhouse.security.gate import SecurityGate
from inhouse.settings import ServerSettings

log = logging.getLogger("inhouse.security")


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(settings: ServerSettings) -> str | None:
    """Why the server must not start as configured (a non-loopback address with no auth), or None.
    ``--insecure`` overrides it, loudly."""
    if settings.auth or is_loopback(settings.host):
        return None
    if settings.insecure:
        log.warning("SECURITY WARNING: serving on %s WITHOUT authentication (--insecure). Anyone who can reach "
                    "this address can run and load models. Use --auth with API keys for anything but a "
                    "trusted, isolated network.", settings.host)
        return None
    return (f"Refusing to listen on {settings.host} without authentication: anyone on the network could use it. "
            "Start with --auth (create keys with 'inhouse keys create'), listen on 127.0.0.1, or pass --insecure "
            "if the network is trusted.")


def model_keyring(settings: ServerSettings) -> Keyring:
    """The model keys: --model-key-file and/or INHOUSE_MODEL_KEY. Raises ModelKeyError."""
    keys = []
    if settings.model_key_file is not None:
        keys.append(read_key_file(settings.model_key_file))
    env = os.environ.get(KEY_ENV)
    if env:
        keys.append(parse_key(env, f"${KEY_ENV}"))
    return Keyring(keys)


async def start_security(gate: SecurityGate, days: float | None) -> Callable[[], Awaitable[None]]:
    """Starts the audit writer process; checkpoints the audit log's WAL every second and prunes
    it to ``days`` of retention (at start, then hourly), off the request path. Returns the
    stopper; the stores are closed by the server once every request has drained."""
    task: asyncio.Task[None] | None = None
    await gate.start()
    if gate.audit is not None:
        audit = gate.audit

        async def maintain_forever() -> None:
            next_prune = 0.0
            while True:
                try:
                    await asyncio.to_thread(audit.checkpoint)
                    if days and time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + 3600
                        n = await asyncio.to_thread(audit.prune, time.time() - days * 86400)
                        if n:
                            log.info("audit log pruned", extra={"entries": n, "retention_days": days})
                except Exception:
                    log.exception("audit log maintenance failed")
                await asyncio.sleep(1.0)

        task = asyncio.create_task(maintain_forever())

    async def stop() -> None:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return stop


__all__ = ["ModelKeyError", "exposure_problem", "is_loopback", "model_keyring", "start_security"]
