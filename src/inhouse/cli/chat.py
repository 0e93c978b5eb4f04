"""``inhouse chat``: a streaming terminal chat against an OpenAI-compatible server
(``/v1/chat/completions``), keeping the conversation history."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from inhouse.cli.client_options import (
    ApiKey,
    CaCert,
    ClientCert,
    ClientKey,
    ConfigFile,
    Retries,
    Timeout,
    TlsVerify,
    Url,
    fail,
    resolve,
)
from inhouse.client import ClientError, InhouseClient

HELP = "Commands: /reset (forget the conversation), /system TEXT (new system prompt), /exit."


class Conversation:
    """The history and sampling settings of one chat; ``ask`` streams one answer."""

    def __init__(self, model: str, system: str | None, sampling: dict[str, Any]) -> None:
        self.model = model
        self.system = system
        self.sampling = {k: v for k, v in sampling.items() if v is not None}
        self.messages: list[dict[str, str]] = []

    def reset(self, system: str | None = None) -> None:
        self.messages = []
        if system is not None:
            self.system = system or None

    def request(self) -> dict[str, Any]:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        return {"model": self.model, "messages": msgs, **self.sampling}

    def ask(self, client: InhouseClient, text: str, stream: bool, write: Any) -> str:
        self.messages.append({"role": "user", "content": text})
        parts: list[str] = []
        try:
            if stream:
                for chunk in client.chat_stream(self.request()):
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            parts.append(piece)
                            write(piece)
            else:
                resp = client.chat(self.request())
                piece = ((resp.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
                parts.append(piece)
                write(piece)
        except ClientError:
            self.messages.pop()  # the question was not answered: do not keep it
            raise
        answer = "".join(parts)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(
    model: Annotated[str | None, typer.Option(help="Model name (default: from the client config, or the "
                                              "server's first model).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    message: Annotated[list[str] | None, typer.Option(
        "--message", "-m", help="Send these messages in turn and exit (no interactive prompt).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Longest answer in tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (0 = greedy).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling probability mass.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed, for repeatable answers.")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print the answer as it is made.")] = True,
    url: Url = None, api_key: ApiKey = None, timeout: Timeout = None, retries: Retries = None,
    ca_cert: CaCert = None, client_cert: ClientCert = None, client_key: ClientKey = None,
    tls_verify: TlsVerify = None, client_config: ConfigFile = None,
) -> None:
    """Chat with a model in the terminal (streaming, with history)."""
    cfg = resolve(client_config, url=url, api_key=api_key, timeout=timeout, retries=retries, ca_cert=ca_cert,
                  client_cert=client_cert, client_key=client_key, tls_verify=tls_verify, model=model,
                  system_prompt=system, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    try:
        client = cfg.client()
    except ClientError as err:
        raise fail(err) from None
    with client:
        name = cfg.model
        if name is None:
            try:
                listed = client.request("GET", "/v1/models") or {}
                name = next((m["id"] for m in listed.get("data", [])), None)
            except ClientError as err:
                raise fail(err) from None
            if name is None:
                raise fail(ClientError(f"The server at {cfg.url} lists no chat models; pass --model."))
        conv = Conversation(name, cfg.system_prompt, {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                                                     "top_p": cfg.top_p, "seed": seed})
        if message:
            for text in message:
                try:
                    conv.ask(client, text, stream, _write)
                except ClientError as err:
                    raise fail(err) from None
                _write("\n")
            return
        interactive = sys.stdin.isatty()
        if interactive:
            typer.echo(f"Chatting with {name} at {cfg.url}. {HELP}", err=True)
        while True:
            try:
                text = input("you> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                _write("\n" if interactive else "")
                return
            text = text.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                conv.reset()
                typer.echo("(conversation cleared)", err=True)
                continue
            if text.startswith("/system"):
                conv.reset(text.removeprefix("/system").strip())
                typer.echo("(new system prompt; conversation cleared)", err=True)
                continue
            if text.startswith("/"):
                typer.echo(HELP, err=True)
                continue
            if interactive:
                _write(f"{name}> ")
            try:
                conv.ask(client, text, stream, _write)
            except ClientError as err:
                typer.echo(f"\nerror: {err}", err=True)
                continue
            except KeyboardInterrupt:
                typer.echo("\n(interrupted)", err=True)
                continue
            _write("\n")
