"""Deployment artefacts, checked structurally: the container images, the compose file, the
Helm chart (rendered, then validated against the Kubernetes schemas), the KServe runtime and
the systemd unit. Every inhouse flag and INHOUSE_* variable they use must exist."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from conftest import RunningServer
from helm_render import Chart, TemplateError, set_values
from inhouse.cli import app
from inhouse.settings import ServerSettings, load_settings
from inhouse.tools.systemd import ServiceOptions, install, render_unit, serve_command

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "inhouse"
runner = CliRunner()


def _serve_flags() -> set[str]:
    group: Any = typer.main.get_command(app)
    cmd = group.commands["serve"]
    flags: set[str] = set()
    for p in cmd.params:
        if p.param_type_name == "option":
            flags.update(p.opts)
            flags.update(p.secondary_opts)
    return flags


SERVE_FLAGS = _serve_flags()


def assert_serve_args(args: list[str]) -> None:
    """Every --flag in an ``inhouse serve`` argument list is a real option of the command."""
    for a in args:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            assert flag in SERVE_FLAGS, f"{flag} is not an option of 'inhouse serve'"


def assert_env(names: list[str]) -> None:
    """Every INHOUSE_* variable names a ServerSettings field (INHOUSE_CONFIG chooses the file)."""
    fields = set(ServerSettings.model_fields)
    for name in names:
        if not name.startswith("INHOUSE_") or name == "INHOUSE_CONFIG":
            continue
        key = name.removeprefix("INHOUSE_").lower().split("__")[0]
        assert key in fields, f"{name} is not an inhouse setting"


# ---- container images ----

def _dockerfile(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _env_names(rest: str) -> list[str]:
    return [tok.split("=", 1)[0] for tok in shlex.split(rest) if "=" in tok]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(name: str) -> None:
    ins = _dockerfile(DEPLOY / "docker" / name)
    words = [w for w, _ in ins]
    assert words.count("FROM") >= 2 and any(w == "COPY" and r.startswith("--from=build") for w, r in ins)
    users = [r for w, r in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")  # nothing runs as root after
    (health,) = [r for w, r in ins if w == "HEALTHCHECK"]
    assert "/v2/health/" in health
    code = json.loads(health.split("CMD", 1)[1].strip())[2]
    compile(code, "HEALTHCHECK", "exec")
    (volume,) = [r for w, r in ins if w == "VOLUME"]
    assert "/models" in json.loads(volume)
    assert "8000" in next(r for w, r in ins if w == "EXPOSE") and "50051" in next(r for w, r in ins if w == "EXPOSE")
    entry = json.loads(next(r for w, r in ins if w == "ENTRYPOINT"))
    assert entry == ["inhouse", "serve"]
    assert_serve_args(json.loads(next(r for w, r in ins if w == "CMD")))
    env = [n for w, r in ins if w == "ENV" for n in _env_names(r)]
    assert {"INHOUSE_HOST", "INHOUSE_REPO", "INHOUSE_DATA_DIR"} <= set(env)
    assert_env(env)
    assert "SIGTERM" in next(r for w, r in ins if w == "STOPSIGNAL")
    for w, r in ins:  # files the build copies exist in the repository
        if w == "COPY" and not r.startswith("--from"):
            for src in r.split()[:-1]:
                assert (ROOT / src).exists(), src


def test_image_env_is_valid_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ins = _dockerfile(DEPLOY / "docker" / "Dockerfile")
    for w, r in ins:
        if w == "ENV":
            for tok in shlex.split(r):
                k, _, v = tok.partition("=")
                if k.startswith("INHOUSE_"):
                    monkeypatch.setenv(k, v)
    s = load_settings(None)
    assert s.host == "0.0.0.0" and str(s.repo) == "/models" and s.log_format == "json"


def test_healthcheck_command_passes_against_a_running_server(server: RunningServer) -> None:
    ins = _dockerfile(DEPLOY / "docker" / "Dockerfile")
    cmd = json.loads(next(r for w, r in ins if w == "HEALTHCHECK").split("CMD", 1)[1].strip())
    port = server.url.rsplit(":", 1)[1]
    ok = subprocess.run([sys.executable, *cmd[1:]], env={"INHOUSE_HTTP_PORT": port}, timeout=30, check=False)
    assert ok.returncode == 0
    bad = subprocess.run([sys.executable, *cmd[1:]], env={"INHOUSE_HTTP_PORT": "1"}, timeout=30,
                         capture_output=True, check=False)
    assert bad.returncode != 0


def test_compose_file() -> None:
    doc = yaml.safe_load((DEPLOY / "compose" / "inhouse.yml").read_text())
    for name, svc in doc["services"].items():
        build = svc["build"]
        assert (DEPLOY / "compose" / build["context"] / build["dockerfile"]).is_file(), name
        assert any(v.endswith(":/models:ro") for v in svc["volumes"])
        assert_env(list(svc["environment"]))
        drain = float(svc["environment"]["INHOUSE_DRAIN_TIMEOUT_S"])
        assert float(svc["stop_grace_period"].rstrip("s")) > drain
        assert svc["ulimits"]["nofile"]["soft"] >= 65536
    assert set(doc["volumes"]) >= {"inhouse-data"}


# ---- Helm chart ----

def _validate_k8s(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, "1.30.0", strict=True)


def _by_kind(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for docs in rendered.values() for d in docs}


def _container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any] = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return c


def test_chart_defaults(tmp_path: Path) -> None:
    objs = _by_kind(Chart(CHART).render(set_values(["models.pvc=models"])))
    assert set(objs) == {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"}
    for doc in objs.values():
        _validate_k8s(doc)
    c = _container(objs)
    assert c["args"][0] == "serve"
    assert_serve_args(c["args"])
    assert "--insecure" in c["args"]  # auth is off by default: a cluster-internal Service
    assert_env([e["name"] for e in c["env"]])
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    ports = {p["name"]: p["port"] for p in objs["Service"]["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 50051}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "models"
    # the ConfigMap's inhouse.yaml is a valid settings file
    cfg = tmp_path / "inhouse.yaml"
    cfg.write_text(objs["ConfigMap"]["data"]["inhouse.yaml"])
    s = load_settings(cfg)
    assert s.drain_timeout_s < pod["terminationGracePeriodSeconds"]
    pdb = objs["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"] == objs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_chart_everything_on(tmp_path: Path) -> None:
    values = set_values([
        "models.create=true", "data.pvc=inhouse-data", "autoscaling.enabled=true", "autoscaling.cpuUtilization=80",
        "tls.enabled=true", "tls.cert=CERT", "tls.key=KEY", "tls.clientCA=CA", "modelKey=secret-key",
        "auth.enabled=true", "config.open_readiness=false", "auth.probeKeySecret=inhouse-probe", "gpu.count=1",
        "serviceMonitor.enabled=true",
        "serviceMonitor.keySecret=inhouse-prometheus",
        "config.log_level=debug", "config.max_request_bytes=1048576",
    ])
    values["extraEnv"] = [{"name": "INHOUSE_POLL", "value": "true"}]
    rendered = Chart(CHART).render(values)
    objs = _by_kind(rendered)
    assert {"HorizontalPodAutoscaler", "Secret", "PersistentVolumeClaim", "ServiceMonitor"} <= set(objs)
    for kind, doc in objs.items():
        if kind != "ServiceMonitor":  # a CRD: not in the core schemas
            _validate_k8s(doc)
    c = _container(objs)
    assert_serve_args(c["args"])
    assert {"--auth", "--tls-cert=/etc/inhouse/tls/tls.crt", "--tls-client-ca=/etc/inhouse/secret/client-ca.crt",
            "--model-key-file=/etc/inhouse/secret/model.key"} <= set(c["args"])
    assert_env([e["name"] for e in c["env"]])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    probe = c["readinessProbe"]["exec"]["command"]
    compile(probe[2], "readiness", "exec")
    assert "https://127.0.0.1:8000/v2/health/ready" in probe[2]
    scrape = objs["ServiceMonitor"]["spec"]["endpoints"][0]
    assert scrape["authorization"] == {"type": "Bearer",
                                       "credentials": {"name": "inhouse-prometheus", "key": "api-key"}}
    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "inhouse_queue_depth"
    assert "replicas" not in objs["Deployment"]["spec"]  # the HPA owns the replica count
    assert set(objs["Secret"]["stringData"]) == {"model.key", "tls.crt", "tls.key", "client-ca.crt"}
    cfg = tmp_path / "inhouse.yaml"
    cfg.write_text(objs["ConfigMap"]["data"]["inhouse.yaml"])
    assert load_settings(cfg).log_level == "debug"


def test_hpa_metric_is_exported(server: RunningServer) -> None:
    """The HPA scales on a metric the server really exports."""
    hpa = _by_kind(Chart(CHART).render(set_values(["models.pvc=m", "autoscaling.enabled=true"])))
    name = hpa["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    with server.client() as c:
        text = c.get("/metrics").text
    assert re.search(rf"^{name}\{{", text, re.M), f"{name} is not in /metrics"


def test_chart_refuses_incomplete_values() -> None:
    with pytest.raises(TemplateError, match=r"models\.pvc"):
        Chart(CHART).render({})
    with pytest.raises(TemplateError, match="probeKeySecret"):
        Chart(CHART).render(set_values(["models.pvc=m", "auth.enabled=true", "config.open_readiness=false"]))


def test_chart_with_auth_probes_open_readiness_without_a_key() -> None:
    c = _container(_by_kind(Chart(CHART).render(set_values(["models.pvc=m", "auth.enabled=true"]))))
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "PROBE_API_KEY" not in [e["name"] for e in c.get("env", [])]


def test_chart_config_keys_are_settings() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["config"]) <= set(ServerSettings.model_fields)


# ---- KServe ----

def test_kserve_serving_runtime() -> None:
    rt = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    assert rt["apiVersion"] == "serving.kserve.io/v1alpha1" and rt["kind"] == "ServingRuntime"
    spec = rt["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"
    assert_serve_args(c["args"])
    args = dict(a.split("=", 1) for a in c["args"] if "=" in a)
    assert args["--http-port"] == "8080" and args["--grpc-port"] == "9000" and args["--repo"] == "/mnt/models"
    assert_env([e["name"] for e in c["env"]])
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    isvc = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == rt["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}


# ---- systemd ----

def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
        elif "=" in line:
            k, _, v = line.partition("=")
            sections[current].setdefault(k, []).append(v)
    return sections


def test_systemd_unit_is_hardened_and_valid(tmp_path: Path) -> None:
    opts = ServiceOptions(repo=tmp_path / "models", data_dir=tmp_path / "data", config=tmp_path / "inhouse.yaml")
    text = render_unit(opts)
    svc = _unit(text)["Service"]
    for key, value in {"Restart": "always", "LimitNOFILE": "65536", "NoNewPrivileges": "true",
                       "ProtectSystem": "strict", "KillSignal": "SIGTERM", "User": "inhouse"}.items():
        assert svc[key] == [value], key
    assert int(svc["TimeoutStopSec"][0]) > opts.drain_timeout_s
    cmd = shlex.split(svc["ExecStart"][0])
    assert cmd[:4] == [sys.executable, "-m", "inhouse", "serve"]
    assert_serve_args(cmd[4:])
    assert "--auth" in cmd
    assert_env([v.split("=", 1)[0] for v in svc.get("Environment", [])])
    if shutil.which("systemd-analyze"):
        unit = tmp_path / "inhouse.service"
        unit.write_text(text.replace("User=inhouse", "User=root").replace("Group=inhouse", "Group=root"))
        res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr
    # the command line the unit runs is accepted by 'inhouse serve' (parsed up to start-up)
    assert serve_command(opts)[3] == "serve"


def test_install_service_into_a_folder(tmp_path: Path) -> None:
    opts = ServiceOptions(repo=tmp_path / "models", data_dir=tmp_path / "data", config=tmp_path / "etc" / "i.yaml")
    done = install(opts, tmp_path / "units", start=False)
    assert (tmp_path / "units" / "inhouse.service").is_file() and (tmp_path / "models").is_dir()
    assert load_settings(opts.config).host == "127.0.0.1"  # the written config file is valid
    assert any("wrote" in d for d in done)
    res = runner.invoke(app, ["install-service", "--print", "--no-auth", "--insecure", "--gpu", "--http-port", "80"])
    assert res.exit_code == 0
    svc = _unit(res.output)["Service"]
    assert "--insecure" in svc["ExecStart"][0] and "--auth" not in svc["ExecStart"][0]
    assert svc["PrivateDevices"] == ["false"] and svc["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
