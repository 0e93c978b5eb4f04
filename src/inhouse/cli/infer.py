"""``inhouse infer``: call a model over KServe v2 with numpy files in and out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
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
from inhouse.client import ClientError
from inhouse.core.datatypes import V2_TO_NUMPY


class InputError(ClientError):
    pass


def parse_input(text: str, names: list[str]) -> tuple[str, np.ndarray]:
    """``NAME=@file.npy``, ``NAME=[[1, 2]]`` (JSON), or without ``NAME=`` for a one-input model."""
    name, sep, value = text.partition("=")
    if not sep or name.startswith(("@", "[")) or name.lstrip("-").replace(".", "").isdigit():
        if len(names) != 1:
            raise InputError(f"--input '{text}' has no name, but the model has inputs {names}; "
                             "write NAME=@file.npy.")
        name, value = names[0], text
    if name not in names:
        raise InputError(f"The model has no input '{name}' (inputs: {', '.join(names)}).")
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            return name, np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"Cannot read {path} as a .npy array: {err}") from None
    try:
        return name, np.asarray(json.loads(value))
    except ValueError:
        raise InputError(f"--input {name}=... must be @FILE.npy or a JSON array, not '{value[:60]}'.") from None


def _cast(name: str, arr: np.ndarray, datatype: str | None) -> np.ndarray:
    if datatype is None or datatype == "BYTES":
        return arr.astype(np.object_) if datatype == "BYTES" and arr.dtype.kind == "U" else arr
    want = V2_TO_NUMPY.get(datatype)
    if want is None or arr.dtype == want:
        return arr
    if arr.dtype.kind in "fc" and want.kind in "iub":
        raise InputError(f"Input '{name}' holds floats but the model wants {datatype}.")
    return arr.astype(want)


def render_table(outputs: dict[str, np.ndarray]) -> str:
    lines = []
    with np.printoptions(precision=5, suppress=True, threshold=60, edgeitems=3, linewidth=110):
        for name, arr in outputs.items():
            shown = arr
            if arr.dtype == np.object_:
                shown = np.vectorize(lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else v,
                                     otypes=[object])(arr) if arr.size else arr
            lines.append(f"{name}  {arr.dtype}  shape {list(arr.shape)}")
            lines.append("  " + str(shown).replace("\n", "\n  "))
    return "\n".join(lines)


def _json_value(arr: np.ndarray) -> Any:
    if arr.dtype == np.object_:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in arr.reshape(-1).tolist()]
    return arr.reshape(-1).tolist()


def infer(
    model: Annotated[str, typer.Argument(help="Model name.")],
    input: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="NAME=@file.npy, NAME='[[1,2]]' (JSON), or @file.npy for a one-input model.")] = None,
    inputs: Annotated[Path | None, typer.Option(help="An .npz with one array per input name.")] = None,
    output: Annotated[list[str] | None, typer.Option("--output", "-o", help="Only these outputs.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Write each output to DIR/NAME.npy.")] = None,
    format: Annotated[str, typer.Option("--format", help="table | json.")] = "table",
    model_version: Annotated[str | None, typer.Option("--model-version", help="Model version.")] = None,
    url: Url = None, api_key: ApiKey = None, timeout: Timeout = None, retries: Retries = None,
    ca_cert: CaCert = None, client_cert: ClientCert = None, client_key: ClientKey = None,
    tls_verify: TlsVerify = None, client_config: ConfigFile = None,
) -> None:
    """Run one inference request (KServe v2) and print or save the outputs."""
    if format not in ("table", "json"):
        typer.echo("error: --format must be table or json.", err=True)
        raise typer.Exit(2)
    if not input and inputs is None:
        typer.echo("error: give the model's inputs with --input NAME=@file.npy or --inputs file.npz.", err=True)
        raise typer.Exit(2)
    cfg = resolve(client_config, url=url, api_key=api_key, timeout=timeout, retries=retries, ca_cert=ca_cert,
                  client_cert=client_cert, client_key=client_key, tls_verify=tls_verify)
    try:
        with cfg.client() as c:
            meta = c.metadata(model, model_version)
            types = {i["name"]: i.get("datatype") for i in meta.get("inputs", [])}
            names = list(types)
            arrays: dict[str, np.ndarray] = {}
            if inputs is not None:
                try:
                    with np.load(inputs, allow_pickle=False) as npz:
                        arrays.update({k: npz[k] for k in npz.files})
                except (OSError, ValueError) as err:
                    raise InputError(f"Cannot read {inputs} as an .npz file: {err}") from None
                unknown = sorted(set(arrays) - set(names))
                if unknown:
                    raise InputError(f"{inputs} has arrays {unknown} that are not inputs of {model} ({names}).")
            for text in input or []:
                name, arr = parse_input(text, names)
                arrays[name] = arr
            arrays = {k: _cast(k, v, types.get(k)) for k, v in arrays.items()}
            result, header = c.infer(model, arrays, version=model_version, outputs=output or None)
    except ClientError as err:
        raise fail(err) from None
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, arr in result.items():
            safe = name.replace("/", "_")
            np.save(output_dir / f"{safe}.npy", arr, allow_pickle=arr.dtype == np.object_)
    if format == "json":
        typer.echo(json.dumps({
            "model_name": header.get("model_name", model), "model_version": header.get("model_version"),
            "outputs": [{"name": n, "datatype": next((o["datatype"] for o in header.get("outputs", [])
                                                      if o["name"] == n), None),
                         "shape": list(a.shape), "data": _json_value(a)} for n, a in result.items()],
        }))
    else:
        typer.echo(f"{header.get('model_name', model)} (version {header.get('model_version', '?')})")
        typer.echo(render_table(result))
