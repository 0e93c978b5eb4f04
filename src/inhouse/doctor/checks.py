"""The built-in checks: repository and model specs, artefacts and checksums, execution
providers and GPUs, ports, disk space, TLS files and the data directory."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

from inhouse.backends import LoadContext, get_backend
from inhouse.core.repository import ModelRepository
from inhouse.core.spec import ModelSpec
from inhouse.doctor.findings import DoctorOptions, Finding, Severity, register_check
from inhouse.errors import InhouseError

GiB = 1024**3
OK, INFO, WARN, ERR = Severity.OK, Severity.INFO, Severity.WARNING, Severity.ERROR


def check_repository(o: DoctorOptions) -> Iterator[Finding]:
    if o.repo is None:
        yield Finding("repository", INFO, "No --repo given: the built-in demo repository is served.",
                      "Pass --repo DIR (or set repo in inhouse.yaml) to check your own models.")
        return
    if not o.repo.is_dir():
        yield Finding("repository", ERR, f"Model repository {o.repo} does not exist or is not a folder.",
                      "Create it, or point --repo / INHOUSE_REPO at the folder holding your models.")
        return
    repo = ModelRepository(o.repo)
    names = repo.model_names()
    if not names:
        yield Finding("repository", WARN, f"{repo.root} holds no models.",
                      "Add MODEL/model.yaml and MODEL/1/<artefact> folders (see README, 'Serving your own models').")
        return
    yield Finding("repository", OK, f"{repo.root}: {len(names)} model(s): {', '.join(names)}.")
    for name in names:
        yield from _check_model(repo, name, o)


def _check_model(repo: ModelRepository, name: str, o: DoctorOptions) -> Iterator[Finding]:
    area = f"model {name}"
    try:
        spec = repo.read_spec(name)
        versions = repo.select_versions(spec)
    except InhouseError as err:
        yield Finding(area, ERR, f"[{err.code}] {err.message}", "Fix model.yaml as the message says.")
        return
    problems = 0
    if spec.backend == "onnxruntime":
        for f in _check_providers(spec, area):
            problems += f.severity >= ERR
            yield f
    else:
        try:
            get_backend(spec.backend)
        except InhouseError as err:
            problems += 1
            yield Finding(area, ERR, f"[{err.code}] {err.message}", f"pip install 'inhouse[{spec.backend}]'.")
    for f in _check_files(repo.root / name, spec, versions, area):
        problems += f.severity >= ERR
        yield f
    if o.load_models and not problems:
        yield from _try_load(repo, spec, versions, area)
    elif not problems:
        yield Finding(area, OK, f"Spec valid; version(s) {', '.join(map(str, versions))} present"
                      f"{' and checksums match' if spec.files.sha256 else ''}.")


def _check_providers(spec: ModelSpec, area: str) -> Iterator[Finding]:
    # lazy: onnxruntime loads its providers on import; only onnxruntime models need it
    from inhouse.backends.onnx import resolve_providers

    try:
        providers = resolve_providers(spec)
    except InhouseError as err:
        yield Finding(area, ERR, f"[{err.code}] {err.message}",
                      "Install the onnxruntime build for that provider (e.g. onnxruntime-gpu) or change "
                      "onnxruntime.providers in model.yaml.")
        return
    wants_gpu = (any(p.startswith(("CUDA", "Tensorrt")) for p, _ in providers)
                 or spec.instances.device.startswith("cuda"))
    if wants_gpu and not _gpus():
        yield Finding(area, ERR, "The model asks for a CUDA / TensorRT device, but no NVIDIA GPU is visible.",
                      "Check the driver (nvidia-smi), CUDA_VISIBLE_DEVICES, and the container's GPU access, "
                      "or use providers: [cpu].")


def _check_files(model_dir: Path, spec: ModelSpec, versions: list[int], area: str) -> Iterator[Finding]:
    artefact = spec.onnxruntime.file if spec.backend == "onnxruntime" else None
    for v in versions:
        if artefact is not None and not (model_dir / str(v) / artefact).is_file():
            yield Finding(area, ERR, f"Version {v} has no '{artefact}' ({model_dir / str(v) / artefact}).",
                          "Put the model file there, or set onnxruntime.file in model.yaml.")
    for rel, expected in sorted(spec.files.sha256.items()):
        path = model_dir / rel
        if not path.is_file():
            yield Finding(area, ERR, f"files.sha256 lists '{rel}', which does not exist.",
                          "Restore the file, or remove it from files.sha256.")
            continue
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != expected:
            yield Finding(area, ERR, f"[1004] Checksum mismatch for '{rel}': expected {expected[:12]}…, "
                          f"found {h.hexdigest()[:12]}….",
                          "The file is corrupted or was replaced: restore it, or update files.sha256 if the "
                          "change is intended.")


def _try_load(repo: ModelRepository, spec: ModelSpec, versions: list[int], area: str) -> Iterator[Finding]:
    backend = get_backend(spec.backend)
    for v in versions:
        ctx = LoadContext(model_dir=repo.root / spec.name, version_dir=repo.root / spec.name / str(v), spec=spec)
        try:
            model = backend.load(ctx)
        except InhouseError as err:
            yield Finding(area, ERR, f"Version {v} does not load: [{err.code}] {err.message}",
                          "See the error table in README for what the code means.")
            continue
        except Exception as err:
            yield Finding(area, ERR, f"Version {v} does not load: {type(err).__name__}: {err}",
                          "Check the artefact with its own tools (e.g. onnx.checker).")
            continue
        model.close()
        yield Finding(area, OK, f"Version {v} loads.")


def _gpus() -> list[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
                    for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return []


def check_accelerators(o: DoctorOptions) -> Iterator[Finding]:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    yield Finding("runtime", OK, f"onnxruntime {ort.__version__}; execution providers: {', '.join(providers)}.")
    gpus = _gpus()
    if gpus:
        yield Finding("gpu", OK, f"{len(gpus)} NVIDIA GPU(s): {', '.join(gpus)}.")
        if "CUDAExecutionProvider" not in providers:
            yield Finding("gpu", WARN, "A GPU is present but this onnxruntime build has no CUDA provider.",
                          "pip install onnxruntime-gpu (instead of onnxruntime) to run ONNX models on it.")
    else:
        yield Finding("gpu", INFO, "No NVIDIA GPU visible (or nvidia-ml-py not installed); models run on CPU.")


def check_ports(o: DoctorOptions) -> Iterator[Finding]:
    if not o.check_ports:
        return
    s = o.settings
    wanted = [("HTTP", s.host, s.http_port, "--http-port")]
    if s.grpc.enabled:
        wanted.append(("gRPC", s.host, s.grpc_port, "--grpc-port"))
    if s.metrics_port is not None:
        wanted.append(("metrics", s.metrics_host or s.host, s.metrics_port, "--metrics-port"))
    for what, host, port, flag in wanted:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as err:
                yield Finding("ports", ERR, f"Cannot listen for {what} on {host}:{port}: {err.strerror}.",
                              f"Stop the process using the port (e.g. `ss -ltnp 'sport = :{port}'`) or choose "
                              f"another with {flag}.")
                continue
        yield Finding("ports", OK, f"{what} port {host}:{port} is free.")


def check_disk(o: DoctorOptions) -> Iterator[Finding]:
    places = {"data directory": o.settings.data_dir}
    if o.repo is not None and o.repo.is_dir():
        places["repository"] = o.repo
    for what, path in places.items():
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < GiB // 4:
            yield Finding("disk", ERR, f"Only {free / GiB:.2f} GiB free for the {what} ({path}).",
                          "Free space: the key store, audit log and model caches need room to write.")
        elif free < 2 * GiB:
            yield Finding("disk", WARN, f"{free / GiB:.1f} GiB free for the {what} ({path}).",
                          "Free some space before adding models.")
        else:
            yield Finding("disk", OK, f"{free / GiB:.0f} GiB free for the {what} ({path}).")


def check_data_dir(o: DoctorOptions) -> Iterator[Finding]:
    d = o.settings.data_dir
    if d.exists() and not d.is_dir():
        yield Finding("data dir", ERR, f"{d} exists but is not a folder.", "Point --data-dir at a folder.")
    elif d.exists() and not os.access(d, os.W_OK):
        yield Finding("data dir", ERR, f"{d} is not writable by this user.",
                      "chown / chmod it, or use another --data-dir (INHOUSE_DATA_DIR).")
    elif not d.exists():
        yield Finding("data dir", INFO, f"{d} does not exist yet; inhouse creates it at first start.")
    else:
        yield Finding("data dir", OK, f"{d} is writable.")


def check_tls(o: DoctorOptions) -> Iterator[Finding]:
    s = o.settings
    if not s.tls_cert and not s.tls_key:
        if s.host not in ("127.0.0.1", "localhost", "::1"):
            yield Finding("tls", WARN, f"Listening on {s.host} without TLS: traffic (inputs, outputs, API keys) "
                          "is readable on the network.", "Set --tls-cert and --tls-key.")
        return
    if not s.tls_cert or not s.tls_key:
        yield Finding("tls", ERR, "Only one of tls_cert / tls_key is set.", "Set both --tls-cert and --tls-key.")
        return
    for label, path in (("certificate", s.tls_cert), ("key", s.tls_key), ("client CA", s.tls_client_ca)):
        if path is not None and not path.is_file():
            yield Finding("tls", ERR, f"TLS {label} {path} does not exist.", "Fix the path.")
            return
    yield from _check_cert_file(s.tls_cert, "certificate")
    if s.tls_client_ca:
        yield from _check_cert_file(s.tls_client_ca, "client CA")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key))
    except ssl.SSLError as err:
        yield Finding("tls", ERR, f"The key {s.tls_key} does not match the certificate {s.tls_cert} or cannot "
                      f"be read ({err.reason or err}).",
                      "Use the key the certificate was issued for (PEM, unencrypted).")
        return
    yield Finding("tls", OK, "Key matches the certificate.")


def _check_cert_file(path: Path, label: str) -> Iterator[Finding]:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as err:
        yield Finding("tls", ERR, f"TLS {label} {path} is not a PEM certificate ({err}).", "Use a PEM file.")
        return
    now = dt.datetime.now(dt.UTC)
    cert = certs[0]
    subject = cert.subject.rfc4514_string()
    if cert.not_valid_after_utc <= now:
        yield Finding("tls", ERR, f"TLS {label} ({subject}) expired on {cert.not_valid_after_utc:%Y-%m-%d}.",
                      "Renew it; clients refuse expired certificates.")
    elif cert.not_valid_before_utc > now:
        yield Finding("tls", ERR, f"TLS {label} ({subject}) is not valid before "
                      f"{cert.not_valid_before_utc:%Y-%m-%d}.", "Check the machine clock or reissue it.")
    elif cert.not_valid_after_utc - now < dt.timedelta(days=30):
        days = (cert.not_valid_after_utc - now).days
        yield Finding("tls", WARN, f"TLS {label} ({subject}) expires in {days} day(s).", "Renew it soon.")
    else:
        yield Finding("tls", OK, f"TLS {label} ({subject}) valid until {cert.not_valid_after_utc:%Y-%m-%d}.")


def check_exposure(o: DoctorOptions) -> Iterator[Finding]:
    s = o.settings
    if s.host not in ("127.0.0.1", "localhost", "::1") and not s.auth:
        sev = WARN if s.insecure else ERR
        yield Finding("access", sev, f"Listening on {s.host} without API keys: anyone who can reach the port can "
                      "call and load models.", "Enable --auth (and create keys), or bind to 127.0.0.1.")


register_check("config", check_exposure)
register_check("repository", check_repository)
register_check("runtime", check_accelerators)
register_check("ports", check_ports)
register_check("disk", check_disk)
register_check("data dir", check_data_dir)
register_check("tls", check_tls)
