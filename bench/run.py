"""inhouse benchmarks: the server against raw in-process onnxruntime, measured in one run.

    python bench/run.py                       # both scenarios, REST, spinning off
    python bench/run.py --scenario mlp --duration 5
    python bench/run.py --scenario encoder --spinning off,on --concurrency 1,8,32
    python bench/run.py --transport rest,grpc # once bench/grpc_transport.py exists

Scenarios
* ``encoder`` (compute-bound): the BERT-like encoder at sequence 128. Reference: raw
  onnxruntime throughput at its best batch size (the better of one session with its default
  threads, and two single-threaded sessions called at once) and its batch-1 latency. Server:
  ``enc`` batching off (the foundation baseline), ``enc-batch`` batching on, and ``enc-2x1``
  batching on with two instances of one thread each, at each concurrency.
* ``mlp`` (overhead-bound): the 32-feature MLP. Reference: one direct in-process call.
  Server: batching on and off at concurrency 64 and 1. Floors measured in the same run: a bare
  uvicorn app (REST, ``floor_app.py``) and a bare grpc.aio server (gRPC, ``floor_grpc.py``).

The server runs as a subprocess (``inhouse serve``); the load generator (``loadgen.py``) is
another process. Results print as a table and go to ``bench/results/<time>.json``."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from models import encoder_inputs, encoder_model, mlp_inputs, mlp_model, write, write_mlp  # noqa: E402

V2_TYPES = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}


# ---- reference: raw onnxruntime in this process ---------------------------------------------
def session(model: bytes, spinning: bool, threads: int = 0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def time_calls(sess: ort.InferenceSession, feed: dict[str, np.ndarray], seconds: float,
               min_calls: int = 3) -> tuple[list[float], float]:
    """Wall time of each call, and the CPU seconds (all threads) per call."""
    sess.run(None, feed)
    times: list[float] = []
    cpu0 = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_calls:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return times, (time.process_time() - cpu0) / len(times)


def raw_encoder(spinning: bool, seconds: float, batches: list[int]) -> dict[str, Any]:
    sess = session(encoder_model(), spinning)
    per_batch = {}
    for b in batches:
        t, cpu = time_calls(sess, encoder_inputs(b), seconds)
        per_batch[b] = {"seq_per_s": round(b / statistics.median(t), 2), "p50_ms": round(statistics.median(t) * 1e3, 3),
                        "cpu_ms_per_seq": round(cpu / b * 1e3, 2)}
    best = max(per_batch, key=lambda b: per_batch[b]["seq_per_s"])
    return {"per_batch": per_batch, "best_batch": best, "best_seq_per_s": per_batch[best]["seq_per_s"],
            "batch1_p50_ms": per_batch[1]["p50_ms"],
            "min_cpu_ms_per_seq": min(v["cpu_ms_per_seq"] for v in per_batch.values())}


def _call_for(sess: ort.InferenceSession, feed: dict[str, np.ndarray], end: float, calls: list[int],
              i: int) -> None:
    while time.perf_counter() < end:
        sess.run(None, feed)
        calls[i] += 1


def pair_rate(sessions: list[ort.InferenceSession], feed: dict[str, np.ndarray], seconds: float) -> float:
    """Rows per second of the sessions called from one thread each, all at once."""
    calls = [0] * len(sessions)
    start = time.perf_counter()
    threads = [threading.Thread(target=_call_for, args=(sess, feed, start + seconds, calls, i))
               for i, sess in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(calls) * len(next(iter(feed.values()))) / (time.perf_counter() - start)


def raw_encoder_pair(spinning: bool, seconds: float, batches: list[int]) -> dict[str, Any]:
    """Two single-threaded sessions called from two threads at once: the raw form of a server model
    with ``instances: {count: 2}`` and ``intra_op_threads: 1`` (no barrier between two cores)."""
    model = encoder_model()
    sessions = [session(model, spinning, threads=1) for _ in range(2)]
    per_batch = {}
    for b in batches:
        feed = encoder_inputs(b)
        for sess in sessions:
            sess.run(None, feed)
        per_batch[b] = {"seq_per_s": round(pair_rate(sessions, feed, seconds), 2)}
    best = max(per_batch, key=lambda b: per_batch[b]["seq_per_s"])
    return {"per_batch": per_batch, "best_batch": best, "best_seq_per_s": per_batch[best]["seq_per_s"]}


def raw_reference(model: bytes, spinning: bool, single_batch: int, pair_batch: int,
                  seconds: float) -> Callable[[], float]:
    """A function measuring raw onnxruntime's rate now: the better of one session (default threads)
    at ``single_batch`` and two single-threaded sessions at once at ``pair_batch``."""
    single = session(model, spinning)
    pair_sessions = [session(model, spinning, threads=1) for _ in range(2)]

    def rate() -> float:
        times, _ = time_calls(single, encoder_inputs(single_batch), seconds)
        return max(single_batch / statistics.median(times),
                   pair_rate(pair_sessions, encoder_inputs(pair_batch), seconds))

    return rate


def raw_mlp(seconds: float) -> dict[str, Any]:
    sess = session(mlp_model(), spinning=False, threads=1)
    t1, cpu1 = time_calls(sess, mlp_inputs(1), seconds)
    t64, _ = time_calls(sess, mlp_inputs(64), seconds)
    return {"call_p50_us": round(statistics.median(t1) * 1e6, 2), "call_cpu_us": round(cpu1 * 1e6, 2),
            "batch1_rps": round(1 / statistics.median(t1)), "batch64_rows_per_s": round(64 / statistics.median(t64))}


# ---- the server and the load generator ------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Settings given to every server this run starts, on top of the defaults (``--server-setting``);
# empty unless asked for, and printed with the results, so a table always says what it measured.
SERVER_SETTINGS: dict[str, str] = {}


def setting_env(settings: dict[str, str]) -> dict[str, str]:
    """``{"access_log": "false"}`` -> ``{"INHOUSE_ACCESS_LOG": "false"}`` (nested keys with ``.``)."""
    return {"INHOUSE_" + k.upper().replace(".", "__"): v for k, v in settings.items()}


@contextmanager
def serve(repo: Path, extra_env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """``inhouse serve`` as a user starts it: default settings (logging and the access log
    included, written to a file as a service manager would keep them), plus only what
    ``--server-setting`` asked for and ``extra_env``."""
    http, grpc = free_port(), free_port()
    env = {**os.environ, **setting_env(SERVER_SETTINGS), **(extra_env or {})}
    cmd = [sys.executable, "-c", "from inhouse.cli import main; main()", "serve", "--repo", str(repo),
           "--http-port", str(http), "--grpc-port", str(grpc), "--data-dir", str(repo.parent / "data")]
    with running(cmd, env, repo.parent / f"server-{http}.log", http, grpc, "the server", 300) as ends:
        yield ends


@contextmanager
def running(cmd: list[str], env: dict[str, str], log_path: Path, http: int, grpc: int, who: str,
            ready_s: float) -> Iterator[dict[str, str]]:
    """A server process started with ``cmd``, its output in ``log_path``, once it answers ready on
    ``http``: its endpoints; stopped (terminate, then kill after 30 s) when the block ends."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    try:
        end = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"{who} exited during start-up:\n{tail}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"{who} did not become ready")
            time.sleep(0.2)
        yield {"rest": url, "grpc": f"127.0.0.1:{grpc}", "grpc-h2load": f"127.0.0.1:{grpc}", "pid": str(proc.pid)}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

@contextmanager
def serve_triton(args: argparse.Namespace, work: Path, name: str, model: bytes, max_batch: int,
                 delay_ms: float, threads: int = 1) -> Iterator[dict[str, str]]:
    """Triton (its C++ front ends, the python backend running onnxruntime with ``threads``
    threads, its dynamic batcher at ``max_batch`` / ``delay_ms``) serving ``model`` as ``name``:
    the peer harness's ``triton-pyb``, from what ``peers.sh setup`` installed under ``--triton``."""
    venvs, harness = args.triton, args.peer_harness
    dist = venvs / "triton-dist"
    libs = venvs / "venv-pytriton" / "lib" / "python3.11" / "site-packages" / "nvidia_pytriton.libs"
    if not (dist / "bin" / "tritonserver").is_file() or not (harness / "servers" / "triton_pyb_model.py").is_file():
        raise RuntimeError(f"no Triton under {venvs} or no harness in {harness}: run peers.sh setup")
    repo = work / "triton-repo"
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text('backend: "python"\ninstance_group [ { kind: KIND_CPU count: 1 } ]\n')
    (repo / name / "1" / "model.py").write_bytes((harness / "servers" / "triton_pyb_model.py").read_bytes())
    (work / f"{name}.onnx").write_bytes(model)
    http, grpc = free_port(), free_port()
    import sysconfig

    env = {**os.environ, "MODEL_PATH": str(work / f"{name}.onnx"), "MODEL_NAME": name, "ORT_THREADS": str(threads),
           "MAX_BATCH": str(max_batch), "MAX_WAIT_MS": str(delay_ms), "BENCH_SERVERS": str(harness / "servers"),
           "PATH": f"{venvs / 'venv-pytriton' / 'bin'}:{os.environ.get('PATH', '')}",
           "LD_LIBRARY_PATH": f"{sysconfig.get_config_var('LIBDIR')}:{libs}"}
    cmd = [str(dist / "bin" / "tritonserver"), f"--model-repository={repo}", "--model-control-mode=explicit",
           f"--load-model={name}", f"--backend-directory={dist / 'backends'}", f"--cache-directory={dist / 'caches'}",
           "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
           "--allow-metrics=false", "--log-verbose=0"]
    with running(cmd, env, work / "triton.log", http, grpc, "Triton", 120) as ends:
        yield ends

def payload_file(feed: dict[str, np.ndarray], folder: Path, name: str) -> Path:
    """The request as a v2 JSON header plus binary tensor data (as perf_analyzer sends it)."""
    inputs, blob = [], b""
    for k, v in feed.items():
        raw = np.ascontiguousarray(v).tobytes()
        inputs.append({"name": k, "datatype": V2_TYPES[v.dtype], "shape": list(v.shape),
                       "parameters": {"binary_data_size": len(raw)}})
        blob += raw
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"header": {"inputs": inputs, "parameters": {"binary_data_output": True}},
                                "binary_hex": blob.hex(), "feed": {k: v.tolist() for k, v in feed.items()}}))
    return path


def load(urls: dict[str, str], model: str, payload: Path, transport: str, concurrency: int, duration: float,
         warmup: float) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "loadgen.py"), "--url", urls[transport], "--model", model,
           "--payload", str(payload), "--transport", transport, "-c", str(concurrency), "-d", str(duration),
           "--warmup", str(warmup), "--server-pid", urls["pid"]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-500:]}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(args: argparse.Namespace, urls: dict[str, str], payload: Path,
            points: list[tuple[str, str, int]],
            reference: Callable[[], float] | None = None) -> list[dict[str, Any]]:
    """Every (transport, model, concurrency) point, ``--rounds`` times interleaved (so drifting
    load on a shared machine hits every point alike); per point the median of the rounds.
    ``reference`` (raw onnxruntime's rate, measured again just before each point) gives every
    point its own reference: ``ratio_to_reference`` is the median of those per-point ratios."""
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {pt: [] for pt in points}
    for rnd in range(args.rounds):
        for transport, model_name, c in points:
            ref = reference() if reference is not None else None
            r = load(urls, model_name, payload, transport, c, args.duration, args.warmup)
            if ref is not None and r.get("rps"):
                r["ratio_to_reference"] = r["rps"] / ref
            runs[(transport, model_name, c)].append(r)
            if args.rounds > 1:
                print(f"  round {rnd + 1}: {transport} {model_name} c={c} rps={r.get('rps')} p50={r.get('p50_ms')}",
                      flush=True)
    rows = []
    for (transport, model_name, c), results in runs.items():
        ok = [r for r in results if "rps" in r and r["requests"]]
        if not ok:
            rows.append({**results[-1], "transport": transport, "model": model_name, "concurrency": c,
                         "batching": model_name.endswith(("batch", "2x1"))})
            continue
        row = dict(ok[0])
        for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "server_cpu_us_per_req", "loadgen_cpu_us_per_req"):
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                row[key] = round(statistics.median(values), 3)
        ratios = [r["ratio_to_reference"] for r in ok if "ratio_to_reference" in r]
        if ratios:
            row["ratio_to_reference"] = round(statistics.median(ratios), 3)
            row["ratio_to_reference_per_round"] = [round(x, 3) for x in ratios]
        row.update(model=model_name, batching=model_name.endswith(("batch", "2x1")), rounds=len(ok),
                   errors=sum(r["errors"] for r in ok), requests=sum(r["requests"] for r in ok))
        rows.append(row)
    return rows


# ---- scenarios -------------------------------------------------------------------------------
def encoder_scenario(args: argparse.Namespace, work: Path, transports: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spin in args.spinning:
        raw = raw_encoder(spin, args.raw_seconds, [1, 4, 8, 16, 32])
        print(f"\nencoder, spinning {'on' if spin else 'off'}: raw onnxruntime {raw['per_batch']}, best batch "
              f"{raw['best_batch']}", flush=True)
        pair = raw_encoder_pair(spin, args.raw_seconds, [1, 4, 8, 16])
        print(f"  raw, two 1-thread sessions at once: {pair['per_batch']}, best batch {pair['best_batch']}",
              flush=True)
        # every server point is held against the best raw way found to run the model here
        best_raw = max(raw["best_seq_per_s"], pair["best_seq_per_s"])
        repo = work / f"enc-{spin}" / "models"
        repo.mkdir(parents=True)
        model = encoder_model()
        ort_cfg = {"spinning": spin}
        write(repo, "enc", model, {"onnxruntime": ort_cfg, "warmup": {"samples": 2}})
        max_batch = args.encoder_max_batch or raw["best_batch"]
        write(repo, "enc-batch", model, {
            "onnxruntime": ort_cfg, "warmup": {"samples": 2},
            "batching": {"max_batch_size": max_batch, "max_queue_delay_ms": 1,
                         "max_queue_size": 2048, "priority_levels": 2}})
        write(repo, "enc-2x1", model, {
            "onnxruntime": {**ort_cfg, "intra_op_threads": 1}, "instances": {"count": 2}, "warmup": {"samples": 2},
            "batching": {"max_batch_size": args.encoder_max_batch or pair["best_batch"], "max_queue_delay_ms": 1,
                         "max_queue_size": 2048, "priority_levels": 2}})
        payload = payload_file(encoder_inputs(1), work, f"enc-{spin}")
        points = [(t, m, c) for t in transports for m in ("enc", "enc-batch", "enc-2x1") for c in args.concurrency]
        # raw onnxruntime again just before every point (both ways, at their best batch sizes): on a
        # shared machine the rate drifts by more than the few per cent being measured
        reference = raw_reference(model, spin, raw["best_batch"], pair["best_batch"],
                                  max(1.0, args.raw_seconds * 2 / 3))
        with serve(repo) as urls:
            rows = measure(args, urls, payload, points, reference)
        for r in rows:
            if "rps" in r:
                r["ratio_to_raw_best"] = round(r["rps"] / best_raw, 3)  # against the reference taken at the start
                r["p50_minus_raw_batch1_ms"] = round(r["p50_ms"] - raw["batch1_p50_ms"], 3)
                if r.get("server_cpu_us_per_req"):
                    # CPU per request against raw onnxruntime's best CPU per sequence: steadier than
                    # requests/s on a shared machine
                    r["cpu_efficiency_vs_raw"] = round(raw["min_cpu_ms_per_seq"] * 1e3 / r["server_cpu_us_per_req"], 3)
            print(_row(r), flush=True)
        summary: dict[str, Any] = {}
        if args.triton is not None:
            # Triton with the same model on every core, its dynamic batcher at the same max batch and
            # delay, under the same load in the same run: the issue's yardstick for the encoder
            cores = len(os.sched_getaffinity(0))
            with serve_triton(args, work / f"enc-{spin}", "enc-batch", model, max_batch, 1, threads=cores) as urls:
                peer = measure(args, urls, payload, [(t, "enc-batch", c) for t in transports
                                                     for c in args.concurrency], reference)
            for r in peer:
                r["model"] = "triton-pyb"
                print(_row(r), flush=True)
            rows += peer
            summary.update(vs_triton(rows, transports, args.concurrency, {"enc": "enc_", "enc-batch": "enc-batch_"}))
            print(f"encoder summary: {summary}", flush=True)
        out["spinning_on" if spin else "spinning_off"] = {
            "raw": raw, "raw_two_sessions": pair, "best_raw_seq_per_s": best_raw, "max_batch_size": max_batch,
            "server": rows, "summary": summary}
    return out


def mlp_scenario(args: argparse.Namespace, work: Path, transports: list[str]) -> dict[str, Any]:
    raw = raw_mlp(args.raw_seconds)
    print(f"\nmlp: raw onnxruntime {raw}", flush=True)
    repo = work / "mlp" / "models"
    repo.mkdir(parents=True)
    model = write_mlp(repo)
    payload = payload_file(mlp_inputs(1), work, "mlp")
    points = [(t, m, c) for t in transports for m in ("mlp-batch", "mlp") for c in (64, 1)]
    with serve(repo) as urls:
        rows = measure(args, urls, payload, points)
    for r in rows:
        if "p50_ms" in r:
            r["added_p50_us"] = round(r["p50_ms"] * 1000 - raw["call_p50_us"], 1)
            r["added_p99_us"] = round(r["p99_ms"] * 1000 - raw["call_p50_us"], 1)
        print(_row(r), flush=True)
    if args.asgi_reference and "rest" in transports:
        # the same REST points with the HTTP fast path off (uvicorn's ASGI request cycle), same run
        with serve(repo, {"INHOUSE_HTTP_FAST_PATH": "false"}) as urls:
            asgi = measure(args, urls, payload, [("rest", "mlp-batch", 64), ("rest", "mlp-batch", 1)])
        for r in asgi:
            r["model"] = "mlp-batch (ASGI path)"
            print(_row(r), flush=True)
        rows += asgi
    if args.triton is not None:
        # Triton with the same model, batching and load, in the same run: the issue's yardstick
        with serve_triton(args, work / "mlp", "mlp-batch", model, 64, 1) as urls:
            peer = measure(args, urls, payload, [(t, "mlp-batch", c) for t in transports for c in (64, 1)])
        for r in peer:
            r["model"] = "triton-pyb"
            print(_row(r), flush=True)
        rows += peer
    floor = http_floor(args, payload) if "rest" in transports else {}
    if floor:
        print(f"  http floor (bare uvicorn app, c=64 / c=1): {floor}", flush=True)
    # the gRPC floor, sent by each gRPC load generator of the run (grpcio, h2load)
    g_floors = {t: grpc_floor(args, payload, t) for t in transports if t.startswith("grpc")}
    for t, f in g_floors.items():
        if f:
            print(f"  {t} floor (bare grpc.aio server, c=64 / c=1): {f}", flush=True)
    summary = {}
    for transport in transports:
        on = next((r for r in rows if r.get("transport") == transport and r["model"] == "mlp-batch"
                   and r["concurrency"] == 64), {})
        off = next((r for r in rows if r.get("transport") == transport and r["model"] == "mlp"
                    and r["concurrency"] == 64), {})
        if on.get("rps") and off.get("rps"):
            summary[f"{transport}_batching_speedup_c64"] = round(on["rps"] / off["rps"], 2)
    on_rest = next((r for r in rows if r.get("transport") == "rest" and r["model"] == "mlp-batch"
                    and r["concurrency"] == 64), {})
    asgi_rest = next((r for r in rows if r["model"] == "mlp-batch (ASGI path)" and r["concurrency"] == 64), {})
    if asgi_rest.get("rps") and on_rest.get("rps"):
        summary["rest_fast_path_vs_asgi_c64_rps"] = round(on_rest["rps"] / asgi_rest["rps"], 2)
        if asgi_rest.get("server_cpu_us_per_req") and on_rest.get("server_cpu_us_per_req"):
            summary["rest_fast_path_vs_asgi_c64_cpu"] = round(
                on_rest["server_cpu_us_per_req"] / asgi_rest["server_cpu_us_per_req"], 2)
    if floor.get("c64", {}).get("rps") and on_rest.get("rps"):
        summary["rest_batching_c64_vs_http_floor"] = round(on_rest["rps"] / floor["c64"]["rps"], 3)
    for t, g_floor in g_floors.items():
        on_grpc = next((r for r in rows if r.get("transport") == t and r["batching"] and r["concurrency"] == 64), {})
        if g_floor.get("c64", {}).get("server_cpu_us_per_req") and on_grpc.get("server_cpu_us_per_req"):
            summary[f"{t}_batching_c64_cpu_per_req_vs_grpc_floor"] = round(
                on_grpc["server_cpu_us_per_req"] / g_floor["c64"]["server_cpu_us_per_req"], 2)
    summary.update(vs_triton(rows, transports, [64, 1], {"mlp-batch": ""}))
    print(f"mlp summary: {summary}", flush=True)
    return {"raw": raw, "server": rows, "http_floor": floor, "grpc_floor": g_floors.get("grpc", {}),
            "grpc_floors": g_floors, "summary": summary}


def vs_triton(rows: list[dict[str, Any]], transports: list[str], levels: list[int],
              models: dict[str, str]) -> dict[str, Any]:
    """inhouse ÷ Triton (the ``triton-pyb`` rows) in req/s, and both p50s, per transport and
    concurrency, for each of ``models`` (model name → the infix of its summary keys)."""
    def row(transport: str, model: str, c: int) -> dict[str, Any]:
        return next((r for r in rows if r.get("transport") == transport and r["model"] == model
                     and r["concurrency"] == c), {})

    out: dict[str, Any] = {}
    for t in transports:
        for c in levels:
            theirs = row(t, "triton-pyb", c)
            for name, infix in models.items():
                ours = row(t, name, c)
                if ours.get("rps") and theirs.get("rps"):
                    out[f"{t}_{infix}c{c}_rps_vs_triton"] = round(ours["rps"] / theirs["rps"], 2)
                    out[f"{t}_{infix}c{c}_p50_ms_inhouse_triton"] = (ours["p50_ms"], theirs["p50_ms"])
    return out


def http_floor(args: argparse.Namespace, payload: Path) -> dict[str, Any]:
    """The same load against a bare uvicorn app: the ceiling of any server on this HTTP stack."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "floor_app.py"), str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > end:
                    return {}
                time.sleep(0.1)
        urls = {"rest": url, "pid": str(proc.pid)}
        rows = measure(args, urls, payload, [("rest", "floor", 64), ("rest", "floor", 1)])
        return _floor_summary(rows)
    finally:
        proc.terminate()
        proc.wait(10)


def _floor_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keep = ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req")
    return {f"c{r['concurrency']}": {k: r.get(k) for k in keep} for r in rows}


def grpc_floor(args: argparse.Namespace, payload: Path, transport: str = "grpc") -> dict[str, Any]:
    """The same gRPC load (``transport``: grpc or grpc-h2load) against a bare grpc.aio server
    (``floor_grpc.py``) that answers every ModelInfer with a fixed response: the ceiling of any
    Python server on this gRPC stack."""
    import grpc

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "floor_grpc.py"), str(port)])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                grpc.channel_ready_future(ch).result(timeout=30)
            except grpc.FutureTimeoutError:
                return {}
        urls = {transport: f"127.0.0.1:{port}", "pid": str(proc.pid)}
        rows = measure(args, urls, payload, [(transport, "floor", 64), (transport, "floor", 1)])
        return _floor_summary(rows)
    finally:
        proc.terminate()
        proc.wait(10)


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"  {r.get('model')}: ERROR {r['error']}"
    extra = {k: r[k] for k in ("ratio_to_reference", "ratio_to_raw_best", "cpu_efficiency_vs_raw",
                               "p50_minus_raw_batch1_ms", "added_p50_us", "added_p99_us")
             if k in r}
    return (f"  {r['transport']:5} {r['model']:10} c={r['concurrency']:<3} rps={r['rps']:<9} p50={r['p50_ms']}ms "
            f"p99={r['p99_ms']}ms errors={r['errors']} server_cpu/req={r.get('server_cpu_us_per_req')}us "
            f"loadgen_cpu/req={r.get('loadgen_cpu_us_per_req')}us {extra}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="all", choices=["all", "encoder", "mlp"])
    p.add_argument("--transport", default="rest", help="comma-separated: rest, grpc")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="seconds per raw onnxruntime point")
    p.add_argument("--concurrency", default="1,8,32", help="encoder concurrency levels")
    p.add_argument("--encoder-max-batch", type=int, default=0,
                   help="batching.max_batch_size of the batched encoder; 0 = raw onnxruntime's best batch size")
    p.add_argument("--spinning", default="off", help="encoder: off, on or off,on")
    p.add_argument("--rounds", type=int, default=1, help="repeat every point, interleaved; report medians")
    p.add_argument("--asgi-reference", action="store_true",
                   help="mlp: also measure REST with the HTTP fast path off (http_fast_path: false)")
    p.add_argument("--server-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a server setting other than its default (as INHOUSE_KEY=VALUE), e.g. access_log=false; "
                        "repeatable, reported with the results; the default is none: the server as shipped")
    p.add_argument("--triton", type=Path, default=None, metavar="PEERBENCH_DIR",
                   help="mlp, encoder: also measure Triton (python backend, onnxruntime) with the same model, "
                        "batching and load, from what the peer harness's `peers.sh setup` installed there "
                        "(e.g. /tmp/peerbench)")
    p.add_argument("--peer-harness", type=Path, default=HERE.parent.parent / "shared" / "peerbench",
                   help="the peer harness's folder (its servers/triton_pyb_model.py)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    for item in args.server_setting:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--server-setting wants KEY=VALUE, got {item!r}")
        SERVER_SETTINGS[key.strip()] = value.strip()
    print(f"server settings: {SERVER_SETTINGS or 'defaults (as shipped)'}", flush=True)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.spinning = [s.strip() == "on" for s in args.spinning.split(",")]
    transports = [t.strip() for t in args.transport.split(",")]
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                                           "onnxruntime": ort.__version__}, "args": vars(args) | {"out": None},
                               "server_settings": SERVER_SETTINGS or "defaults"}
    with tempfile.TemporaryDirectory(prefix="inhouse-bench-") as tmp:
        work = Path(tmp)
        if args.scenario in ("all", "mlp"):
            results["mlp"] = mlp_scenario(args, work, transports)
        if args.scenario in ("all", "encoder"):
            results["encoder"] = encoder_scenario(args, work, transports)
    out = args.out or HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
