"""A thin synchronous client for inhouse's REST API (used by the CLI). Any v2 client works
too; this one adds retries with back-off on 429/503 and clear connection errors."""

from __future__ import annotations

import time
from typing import Any

import httpx


class ClientError(Exception):
    """A request that failed; the message is meant for a terminal."""


class InhouseClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, verify: bool | str = True) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=verify)
        self._retries = retries

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> InhouseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, json: Any = None) -> Any:
        delay = 0.5
        for attempt in range(self._retries + 1):
            try:
                resp = self._http.request(method, path, json=json)
            except httpx.ConnectError:
                raise ClientError(f"Cannot reach the inhouse server at {self.url}; is it running?") from None
            except httpx.TimeoutException:
                raise ClientError(f"The server at {self.url} did not answer in time.") from None
            if resp.status_code in (429, 503) and attempt < self._retries:
                retry_after = resp.headers.get("retry-after")
                time.sleep(float(retry_after) if retry_after and retry_after.isdigit() else delay)
                delay *= 2
                continue
            if resp.status_code >= 400:
                try:
                    body = resp.json()
                    msg = body.get("error") if isinstance(body, dict) else None
                    if isinstance(msg, dict):
                        msg = msg.get("message")
                except ValueError:
                    msg = None
                raise ClientError(f"HTTP {resp.status_code}: {msg or resp.text[:300]}")
            return resp.json() if resp.content else None
        raise ClientError("unreachable")  # pragma: no cover

    def repository_index(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("POST", "/v2/repository/index", json={})
        return result

    def load(self, name: str, config: dict[str, Any] | None = None) -> Any:
        import json as _json

        body = {"parameters": {"config": _json.dumps(config)}} if config else {}
        return self.request("POST", f"/v2/repository/models/{name}/load", json=body)

    def unload(self, name: str) -> Any:
        return self.request("POST", f"/v2/repository/models/{name}/unload", json={})
