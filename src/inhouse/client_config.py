"""Defaults for the client commands (``infer``, ``chat``, ``models``): a YAML file, by default
``~/.config/inhouse/client.yaml`` (``--client-config`` or ``INHOUSE_CLIENT_CONFIG`` choose
another). Flags given on the command line win over it.

    url: https://gpu-box:8000
    api_key: ih_...
    timeout: 60
    ca_cert: /etc/inhouse/ca.pem
    model: qwen-chat
    system_prompt: You are a concise assistant.
    max_tokens: 512
    temperature: 0.7
    top_p: 0.9
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inhouse.client import ClientError, InhouseClient


def default_client_config_path() -> Path:
    return Path(platformdirs.user_config_dir("inhouse", appauthor=False)) / "client.yaml"


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    timeout: float = Field(default=60.0, gt=0)
    retries: int = Field(default=3, ge=0, le=10)
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    tls_verify: bool = True
    # chat defaults
    model: str | None = None
    system_prompt: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)

    def client(self) -> InhouseClient:
        return InhouseClient(self.url, api_key=self.api_key, timeout=self.timeout, retries=self.retries,
                             verify=self.tls_verify, ca_cert=self.ca_cert, client_cert=self.client_cert,
                             client_key=self.client_key)


def load_client_config(path: Path | None, explicit: bool = False, **flags: Any) -> ClientConfig:
    """The file at ``path`` (a missing default file is fine; a missing file the user named is
    an error), overridden by the flags that are not None."""
    data: dict[str, Any] = {}
    path = path or default_client_config_path()
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ClientError(f"Cannot read the client config {path}: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ClientError(f"The client config {path} must be a mapping of keys to values.")
        data = loaded or {}
    elif explicit:
        raise ClientError(f"The client config {path} does not exist.")
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return ClientConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: "
            f"{'unknown key, valid keys: ' + ', '.join(ClientConfig.model_fields) if e['type'] == 'extra_forbidden' else e['msg']}"  # noqa: E501
            for e in err.errors())
        raise ClientError(f"Invalid client settings ({path} or flags): {problems}.") from None
