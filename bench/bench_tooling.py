"""Benchmarks for the model tooling, as ratios against references measured in the
same run on the same machine:

1. ``inhouse quantize``: latency of the INT8 and FP16 versions of a small Transformer encoder
   exported with ``inhouse convert``, relative to the FP32 export (and their accuracy change).
2. ``inhouse infer``'s client (v2 binary tensors): latency of one inference call relative to
   tritonclient's HTTP client against the same running server.

Run: python bench/bench_tooling.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


class Encoder(torch.nn.Module):
    """A small Transformer encoder: token ids [batch, seq] → 2 logits."""

    def __init__(self, layers: int, d: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(1000, d)
        block = torch.nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)).mean(dim=1))


def _encoder(tmp: Path, layers: int, d: int) -> Path:
    torch.manual_seed(0)
    src = tmp / "encoder.pt"
    torch.save(Encoder(layers, d).eval(), str(src))  # a whole pickled module: the torch.export path
    return src


def bench_quantize(quick: bool) -> None:
    from inhouse.tools.convert import ConvertOptions, convert
    from inhouse.tools.quantize import quantize

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        src = _encoder(tmp, layers=2 if quick else 4, d=256)
        out = tmp / "models" / "encoder"
        t0 = time.perf_counter()
        res = convert(src, ConvertOptions(out=out, example_inputs=["ids=1x64:int64"], int_high=1000,
                                          tolerance=1e-3))
        print(f"convert: {time.perf_counter() - t0:.1f} s, max abs diff vs PyTorch "
              f"{res.comparison.max_abs_diff if res.comparison else float('nan'):.2e}")
        ids = np.random.default_rng(0).integers(0, 1000, (8, 128))
        np.savez(tmp / "samples.npz", ids=ids)
        for mode in ("int8", "fp16"):
            r = quantize(out, mode, version=1, check=tmp / "samples.npz")
            c = r.comparison
            assert c is not None and r.latency_before_s and r.latency_after_s
            print(f"quantize {mode}: FP32 {r.latency_before_s * 1e3:.2f} ms -> {r.latency_after_s * 1e3:.2f} ms "
                  f"per [8,128] batch = {r.latency_before_s / r.latency_after_s:.2f}x speed; "
                  f"size {r.size_after / r.size_before:.0%}; max abs diff {c.max_abs_diff:.3g}, "
                  f"top-1 agreement {c.min_agreement:.0%}")


def _median_call(fn: object, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_client(quick: bool) -> None:
    import tritonclient.http as httpclient

    from conftest import run_server
    from inhouse.client import InhouseClient
    from models import identity_model, write_model

    with tempfile.TemporaryDirectory() as t:
        repo = Path(t) / "models"
        write_model(repo, "echo", identity_model(1))
        n = 30 if quick else 100
        with run_server(repo) as srv:
            host = srv.url.removeprefix("http://")
            triton = httpclient.InferenceServerClient(host)
            ours = InhouseClient(srv.url)
            for rows in (1, 4096):
                x = np.random.default_rng(0).standard_normal((rows, 256)).astype(np.float32)

                def call_triton(x: np.ndarray = x) -> None:
                    inp = httpclient.InferInput("x", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x, binary_data=True)
                    triton.infer("echo", [inp], outputs=[httpclient.InferRequestedOutput("y", binary_data=True)])

                def call_ours(x: np.ndarray = x) -> None:
                    ours.infer("echo", {"x": x})

                call_triton()
                call_ours()
                ref = _median_call(call_triton, n)
                got = _median_call(call_ours, n)
                print(f"infer client, [{rows},256] FP32: tritonclient {ref * 1e3:.2f} ms, inhouse {got * 1e3:.2f} ms "
                      f"-> {got / ref:.2f}x tritonclient's latency")
            ours.close()
            triton.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    bench_quantize(args.quick)
    bench_client(args.quick)


if __name__ == "__main__":
    main()
