"""The HTTP floor: a bare ASGI app on uvicorn (httptools, uvloop) — the server inhouse embeds —
that reads the body and answers a fixed JSON document. Nothing served over the same stack can
be faster; bench/run.py measures it in the same run as a reference.

    python bench/floor_app.py PORT
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

BODY = b'{"model_name":"floor","outputs":[]}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
                loop="uvloop", http="httptools")
