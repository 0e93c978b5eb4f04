"""``inhouse install-service``: a hardened systemd unit running ``inhouse serve`` as a
dedicated system user. SIGTERM makes inhouse stop accepting, finish in-flight requests (up to
``drain_timeout_s``) and close its logs; systemd waits ``TimeoutStopSec`` for that."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from inhouse.errors import InhouseError


class ServiceError(InhouseError):
    """The service could not be installed; the message says what to do."""

    code, http_status, grpc_status = 9000, 500, "INTERNAL"


@dataclass
class ServiceOptions:
    name: str = "inhouse"
    user: str = "inhouse"
    config: Path = Path("/etc/inhouse/inhouse.yaml")
    repo: Path = Path("/var/lib/inhouse/models")
    data_dir: Path = Path("/var/lib/inhouse")
    host: str = "0.0.0.0"
    auth: bool = True  # a service on the LAN requires API keys unless told otherwise
    insecure: bool = False
    http_port: int = 8000
    grpc_port: int = 50051
    drain_timeout_s: float = 30.0
    gpu: bool = False
    executable: list[str] = field(default_factory=lambda: [sys.executable, "-m", "inhouse"])
    extra_args: list[str] = field(default_factory=list)


def serve_command(o: ServiceOptions) -> list[str]:
    """The ``inhouse serve`` command line the unit runs (flags are checked against the CLI in tests)."""
    cmd = [*o.executable, "serve", "--config", str(o.config), "--repo", str(o.repo), "--data-dir", str(o.data_dir),
           "--host", o.host, "--http-port", str(o.http_port), "--grpc-port", str(o.grpc_port)]
    if o.auth:
        cmd.append("--auth")
    if o.insecure:
        cmd.append("--insecure")
    return cmd + o.extra_args


def render_unit(o: ServiceOptions) -> str:
    cmd = " ".join(shlex.quote(a) for a in serve_command(o))
    # The executable may live in a virtual environment under /home: keep that readable.
    home_policy = "read-only" if o.executable[0].startswith(("/home/", "/root/")) else "true"
    privileged_port = min(o.http_port, o.grpc_port) < 1024
    lines = [
        "[Unit]",
        "Description=inhouse inference server",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={o.user}",
        f"Group={o.user}",
        f"Environment=INHOUSE_DRAIN_TIMEOUT_S={o.drain_timeout_s:g}",
        "Environment=INHOUSE_LOG_FORMAT=json",
        f"ExecStart={cmd}",
        # SIGTERM: stop accepting, finish in-flight requests, close logs; then systemd escalates.
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={int(o.drain_timeout_s) + 15}",
        "Restart=always",
        "RestartSec=2",
        "LimitNOFILE=65536",
        f"WorkingDirectory={o.data_dir}",
        f"ReadWritePaths={o.data_dir}",
        "UMask=0027",
        # hardening
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        f"ProtectHome={home_policy}",
        "PrivateTmp=true",
        f"PrivateDevices={'false' if o.gpu else 'true'}",
        "ProtectKernelTunables=true",
        "ProtectKernelModules=true",
        "ProtectKernelLogs=true",
        "ProtectControlGroups=true",
        "ProtectClock=true",
        "ProtectHostname=true",
        "RestrictSUIDSGID=true",
        "RestrictRealtime=true",
        "RestrictNamespaces=true",
        "LockPersonality=true",
        "SystemCallArchitectures=native",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        f"CapabilityBoundingSet={'CAP_NET_BIND_SERVICE' if privileged_port else ''}",
    ]
    if privileged_port:
        lines.append("AmbientCapabilities=CAP_NET_BIND_SERVICE")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def default_config(o: ServiceOptions) -> str:
    return (
        "# inhouse settings for the systemd service (every key is also an INHOUSE_* variable and a\n"
        "# 'serve' flag; the flags in the unit's ExecStart win: change those with 'systemctl edit').\n"
        "# log_level: info\n"
        "# tls_cert: /etc/inhouse/tls.crt\n"
        "# tls_key: /etc/inhouse/tls.key\n"
        "# model_key_file: /etc/inhouse/model.key\n"
        "{}\n"
    )


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceError(f"'{' '.join(cmd)}' failed: {proc.stderr.strip() or proc.stdout.strip()}")


def install(o: ServiceOptions, unit_dir: Path = Path("/etc/systemd/system"), *, start: bool = True,
            create_user: bool = True) -> list[str]:
    """Write the unit (and a config file if there is none), create the user, enable and start.
    Returns what was done, for the terminal."""
    import os

    done: list[str] = []
    system = unit_dir == Path("/etc/systemd/system")
    if system and os.geteuid() != 0:
        raise ServiceError("Installing a system service needs root: run 'sudo inhouse install-service', or "
                           "--print to see the unit first.")
    if create_user and system:
        import pwd

        try:
            pwd.getpwnam(o.user)
        except KeyError:
            if shutil.which("useradd") is None:
                raise ServiceError(f"Cannot create user '{o.user}': useradd is missing. Create it by hand, "
                                   "then re-run with --no-create-user.") from None
            _run(["useradd", "--system", "--home-dir", str(o.data_dir), "--no-create-home",
                  "--shell", "/usr/sbin/nologin", "--user-group", o.user])
            done.append(f"created system user {o.user}")
    for path in (o.data_dir, o.repo):
        path.mkdir(parents=True, exist_ok=True)
        if system:
            shutil.chown(path, o.user, o.user)
    if not o.config.exists():
        o.config.parent.mkdir(parents=True, exist_ok=True)
        o.config.write_text(default_config(o), encoding="utf-8")
        done.append(f"wrote {o.config}")
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / f"{o.name}.service"
    unit.write_text(render_unit(o), encoding="utf-8")
    done.append(f"wrote {unit}")
    if system and start:
        _run(["systemctl", "daemon-reload"])
        _run(["systemctl", "enable", "--now", f"{o.name}.service"])
        done.append(f"enabled and started {o.name}.service (journalctl -u {o.name} -f to follow it)")
    return done
