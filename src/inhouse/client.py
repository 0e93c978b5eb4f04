"""A thin synchronous client for inhouse's REST API (used by the CLI). Any v2 or OpenAI client
works too; this one adds retries with back-off on 429/503, clear connection errors, TLS options
(custom CA, client certificates), v2 inference with numpy arrays over the binary tensor
extension, and streaming chat completions."""

from __future__ import annotations

import json as _json
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from inhouse.core.datatypes import V2_TO_NUMPY

RETRY_STATUSES = (429, 503)


class ClientError(Exception):
    """A request that failed; the message is meant for a terminal."""


def ssl_context(ca_cert: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None,
                verify: bool = True) -> ssl.SSLContext | bool:
    """What httpx's ``verify`` takes: a context trusting ``ca_cert`` (else the system store) and
    presenting ``client_cert``/``client_key`` for mutual TLS; ``False`` skips verification."""
    if not verify and client_cert is None:
        return False
    try:
        ctx = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if client_cert is not None:
            ctx.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
    except (OSError, ssl.SSLError) as err:
        raise ClientError(f"Cannot use the TLS files ({ca_cert or ''} {client_cert or ''}): {err}.") from None
    return ctx


class InhouseClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, verify: bool | str | ssl.SSLContext = True,
                 ca_cert: Path | None = None, client_cert: Path | None = None,
                 client_key: Path | None = None) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ClientError(f"Server URL '{url}' must start with http:// or https://.")
        if isinstance(verify, str):
            ca_cert, verify = Path(verify), True
        tls: bool | ssl.SSLContext = verify
        if ca_cert is not None or client_cert is not None or verify is False:
            tls = ssl_context(ca_cert, client_cert, client_key, verify=bool(verify))
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=tls)
        self._retries = retries

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> InhouseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ----

    def _send(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """One request with retries on 429/503 (honouring Retry-After) and exponential back-off."""
        delay = 0.5
        for attempt in range(self._retries + 1):
            try:
                req = self._http.build_request(method, path, **kwargs)
                resp = self._http.send(req, stream=stream)
            except httpx.ConnectError as err:
                if "CERTIFICATE_VERIFY_FAILED" in str(err) or "SSL" in str(err):
                    raise ClientError(f"TLS handshake with {self.url} failed: {err}. Pass --ca-cert for a "
                                      "private CA, or --client-cert/--client-key for mutual TLS.") from None
                raise ClientError(f"Cannot reach the inhouse server at {self.url}; is it running?") from None
            except httpx.TimeoutException:
                raise ClientError(f"The server at {self.url} did not answer in time.") from None
            except httpx.TransportError as err:
                raise ClientError(f"Connection to {self.url} failed: {err}.") from None
            if resp.status_code in RETRY_STATUSES and attempt < self._retries:
                retry_after = resp.headers.get("retry-after")
                resp.close()
                time.sleep(min(float(retry_after), 30.0) if retry_after and retry_after.isdigit() else delay)
                delay *= 2
                continue
            if resp.status_code >= 400:
                if stream:
                    resp.read()
                raise ClientError(_error_text(resp))
            return resp
        raise ClientError("unreachable")  # pragma: no cover

    def request(self, method: str, path: str, json: Any = None) -> Any:
        resp = self._send(method, path, json=json)
        try:
            return resp.json() if resp.content else None
        except ValueError:
            raise ClientError(f"The server at {self.url} sent a response that is not JSON.") from None

    # ---- models ----

    def repository_index(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("POST", "/v2/repository/index", json={})
        return result

    def load(self, name: str, config: dict[str, Any] | None = None) -> Any:
        body = {"parameters": {"config": _json.dumps(config)}} if config else {}
        return self.request("POST", f"/v2/repository/models/{name}/load", json=body)

    def unload(self, name: str) -> Any:
        return self.request("POST", f"/v2/repository/models/{name}/unload", json={})

    def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        result: dict[str, Any] = self.request("GET", path)
        return result

    # ---- inference ----

    def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
              outputs: list[str] | None = None, parameters: dict[str, Any] | None = None,
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Run a v2 inference; tensors travel as raw bytes (binary tensor data extension).
        Returns (outputs by name, the response's JSON header)."""
        body, header_len = encode_infer_request(inputs, outputs, parameters)
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        # Raw tensors hardly compress; gzip would cost more time than it saves on a LAN.
        resp = self._send("POST", path, content=body, headers={
            "inference-header-content-length": str(header_len), "content-type": "application/octet-stream",
            "accept-encoding": "identity"})
        return decode_infer_response(resp.content, resp.headers.get("inference-header-content-length"))

    # ---- chat (OpenAI wire format) ----

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST /v1/chat/completions with ``stream: true``; yields each server-sent chunk."""
        resp = self._send("POST", "/v1/chat/completions", json={**body, "stream": True}, stream=True)
        try:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = _json.loads(data)
                except ValueError:
                    raise ClientError(f"The server sent an event that is not JSON: {data[:200]}") from None
                if isinstance(chunk, dict) and "error" in chunk:
                    err = chunk["error"]
                    raise ClientError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
                yield chunk
        except httpx.TimeoutException:
            raise ClientError(f"The server at {self.url} stopped sending in the middle of the answer.") from None
        except httpx.TransportError as err:
            raise ClientError(f"The stream from {self.url} broke off: {err}.") from None
        finally:
            resp.close()

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/v1/chat/completions", json={**body, "stream": False})
        return result


def _error_text(resp: httpx.Response) -> str:
    msg: Any = None
    try:
        body = resp.json()
        msg = body.get("error") if isinstance(body, dict) else None
        if isinstance(msg, dict):
            msg = msg.get("message")
    except ValueError:
        pass
    text = f"HTTP {resp.status_code}: {msg or resp.text[:300] or resp.reason_phrase}"
    if resp.status_code == 401:
        text += " (pass --api-key or set api_key in the client config)"
    return text


def _v2_datatype(arr: np.ndarray) -> str:
    if arr.dtype.kind in "OUS":
        return "BYTES"
    for name, dt in V2_TO_NUMPY.items():
        if dt == arr.dtype:
            return name
    raise ClientError(f"Arrays of dtype {arr.dtype} cannot be sent; use a numeric, bool or string array.")


def _raw(arr: np.ndarray) -> bytes:
    if arr.dtype.kind not in "OUS":
        return np.ascontiguousarray(arr).tobytes()
    parts = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def encode_infer_request(inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
                         parameters: dict[str, Any] | None = None) -> tuple[bytes, int]:
    header: dict[str, Any] = {"inputs": [], "parameters": {"binary_data_output": True, **(parameters or {})}}
    blobs = []
    for name, value in inputs.items():
        arr = np.asarray(value)
        raw = _raw(arr)
        header["inputs"].append({"name": name, "shape": list(arr.shape), "datatype": _v2_datatype(arr),
                                 "parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    if outputs:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    head = _json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


def _from_raw(raw: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        items, i = [], 0
        while i < len(raw):
            (n,) = struct.unpack_from("<I", raw, i)
            items.append(raw[i + 4:i + 4 + n])
            i += 4 + n
        return np.array(items, dtype=np.object_).reshape(shape)
    return np.frombuffer(raw, dtype=V2_TO_NUMPY[datatype]).reshape(shape)


def decode_infer_response(body: bytes, header_length: str | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    n = int(header_length) if header_length else len(body)
    doc = _json.loads(body[:n])
    offset = n
    result: dict[str, np.ndarray] = {}
    for out in doc.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            result[out["name"]] = _from_raw(body[offset:offset + size], out["datatype"], out["shape"])
            offset += size
        elif out["datatype"] == "BYTES":
            result[out["name"]] = np.array(out.get("data", []), dtype=np.object_).reshape(out["shape"])
        else:
            result[out["name"]] = np.asarray(out.get("data", []), dtype=V2_TO_NUMPY[out["datatype"]]).reshape(
                out["shape"])
    return result, doc
