"""``inhouse convert`` and ``inhouse quantize``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from inhouse.errors import InhouseError

console = Console(stderr=True)


@contextmanager
def progress() -> Iterator[Callable[[str], None]]:
    """A spinner with elapsed time on a terminal (plain lines otherwise); ``step(text)`` moves
    it to the next stage."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("starting", total=None)

        def step(text: str) -> None:
            bar.update(task, description=text)
            if not console.is_terminal:
                typer.echo(f"... {text}", err=True)

        yield step


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n:.1f} GB"


def _fail(err: InhouseError) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


def convert(
    src: Annotated[Path, typer.Argument(help="model.pt / .pt2 (PyTorch), .pkl / .joblib (scikit-learn, XGBoost, "
                                        "LightGBM), a Hugging Face folder, a SavedModel folder or .onnx.")],
    out: Annotated[Path, typer.Option(help="Model folder to write (REPO/NAME); a new version is added.")],
    example_input: Annotated[list[str] | None, typer.Option(
        help="PyTorch: [NAME=]DIMxDIM[:DTYPE] per input, e.g. shape=1x128:int64.")] = None,
    features: Annotated[int | None, typer.Option(help="Tabular models: number of input features.")] = None,
    opset: Annotated[int | None, typer.Option(
        help="ONNX opset (default: 18, or less if this onnxruntime runs less).")] = None,
    exporter: Annotated[str, typer.Option(help="PyTorch / Hugging Face exporter: auto | dynamo | legacy.")] = "auto",
    output_names: Annotated[str | None, typer.Option(help="PyTorch: comma-separated output names.")] = None,
    samples: Annotated[Path | None, typer.Option(help="Check on these inputs (.npz keyed by input name) "
                                                 "instead of random ones.")] = None,
    fixed_sequence: Annotated[bool, typer.Option(help="PyTorch: keep dimension 1 of integer inputs static.")] = False,
    int_high: Annotated[int, typer.Option(help="Random integer sample inputs lie in [0, INT_HIGH).")] = 10,
    tolerance: Annotated[float, typer.Option(help="Largest accepted output difference.")] = 1e-3,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare with the original.")] = True,
    task: Annotated[str, typer.Option(
        help="Hugging Face: auto (from the folder's architecture), feature-extraction, text-classification, "
             "token-classification, fill-mask or text-generation.")] = "auto",
    signature: Annotated[str, typer.Option(help="TensorFlow: the SavedModel signature to export.")
                         ] = "serving_default",
    to: Annotated[str, typer.Option(help="onnx, or gguf: a Hugging Face LLM for backend: llamacpp (built with "
                                    "scripts/build_llama_server.sh's llama.cpp).")] = "onnx",
    quant: Annotated[str, typer.Option(help="GGUF: f16, q8_0 or q4_k_m.")] = "f16",
    tokenizer_pre: Annotated[str | None, typer.Option(
        help="GGUF: the pre-tokenizer (gpt-2, llama-bpe, qwen2, …) of a tokenizer llama.cpp does not "
             "recognise.")] = None,
) -> None:
    """Convert a trained model to ONNX (or an LLM to GGUF), write a model.yaml, and check it."""
    if to == "gguf":
        _convert_gguf(src, out, quant, tokenizer_pre)
        return
    if to != "onnx":
        typer.echo("error: --to must be onnx or gguf.", err=True)
        raise typer.Exit(2)
    # lazy: the converters import onnx (and the framework of the source); other commands start without it
    from inhouse.tools.convert import ConvertOptions
    from inhouse.tools.convert import convert as run_convert

    if exporter not in ("auto", "dynamo", "legacy"):
        typer.echo("error: --exporter must be auto, dynamo or legacy.", err=True)
        raise typer.Exit(2)
    opts = ConvertOptions(
        out=out, example_inputs=example_input or [], features=features, opset=opset, exporter=exporter,
        output_names=[n.strip() for n in output_names.split(",")] if output_names else None, samples=samples,
        sequence_axis=not fixed_sequence, int_high=int_high, tolerance=tolerance, verify=verify, task=task,
        signature=signature,
    )
    try:
        with progress() as step:
            result = run_convert(src, opts, step)
    except InhouseError as err:
        raise _fail(err) from None
    typer.echo(f"wrote {result.artefact} (version {result.version}, {result.framework}, opset {result.opset})")
    typer.echo(f"      {result.model_dir / 'model.yaml'}")
    for kind, tensors in (("input ", result.inputs), ("output", result.outputs)):
        for t in tensors:
            typer.echo(f"  {kind} {t['name']}: {t['dtype']} {t['shape']}")
    if result.comparison is not None:
        typer.echo(f"verified against {result.framework}: max abs diff {result.comparison.max_abs_diff:.3g}")
        for line in result.comparison.lines():
            typer.echo(f"  {line}")
    for note in result.notes:
        typer.echo(f"note: {note}")


def _convert_gguf(src: Path, out: Path, quant: str, tokenizer_pre: str | None) -> None:
    from inhouse.tools.convert_gguf import convert_to_gguf

    try:
        with progress() as step:
            r = convert_to_gguf(src, out, quant, tokenizer_pre=tokenizer_pre, step=step)
    except InhouseError as err:
        raise _fail(err) from None
    typer.echo(f"wrote {r.artefact} (version {r.version}, GGUF {r.quant.upper()}, {_size(r.size)})")
    typer.echo(f"      {r.model_dir / 'model.yaml'} (backend: llamacpp)")


def quantize(
    model_dir: Annotated[Path, typer.Argument(help="A model folder (REPO/NAME) holding an ONNX model.")],
    int8: Annotated[bool, typer.Option("--int8", help="Dynamic INT8 quantization (default).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 weights, FP32 inputs and outputs.")] = False,
    version: Annotated[int | None, typer.Option(help="Source version (default: the newest).")] = None,
    check: Annotated[Path | None, typer.Option(help="Samples (.npz keyed by input name) to measure the "
                                               "accuracy and speed change on.")] = None,
    per_channel: Annotated[bool, typer.Option(help="INT8: per-channel weight scales.")] = False,
    tolerance: Annotated[float | None, typer.Option(help="With --check: refuse to write when outputs differ "
                                                    "by more.")] = None,
) -> None:
    """Write an INT8 or FP16 version of a model as its next version."""
    # lazy: quantization imports onnx and onnxruntime's tools; other commands start without them
    from inhouse.tools.quantize import quantize as run_quantize

    if int8 and fp16:
        typer.echo("error: choose one of --int8 and --fp16.", err=True)
        raise typer.Exit(2)
    mode: Literal["int8", "fp16"] = "fp16" if fp16 else "int8"
    try:
        with progress() as step:
            r = run_quantize(model_dir, mode, version=version, check=check, per_channel=per_channel,
                             tolerance=tolerance, step=step)
    except InhouseError as err:
        raise _fail(err) from None
    if r.note is not None:
        typer.echo(f"note: {r.note}")
        return
    typer.echo(f"wrote {r.artefact} (version {r.version}, {mode.upper()} of version {r.source_version})")
    typer.echo(f"size: {_size(r.size_before)} -> {_size(r.size_after)} "
               f"({r.size_after / max(r.size_before, 1):.0%})")
    if r.comparison is not None:
        typer.echo("accuracy change on the samples:")
        for line in r.comparison.lines():
            typer.echo(f"  {line}")
    if r.speedup is not None and r.latency_before_s is not None and r.latency_after_s is not None:
        typer.echo(f"speed on this machine: {r.latency_before_s * 1e3:.2f} ms -> {r.latency_after_s * 1e3:.2f} ms "
                   f"per call ({r.speedup:.2f}x)")
