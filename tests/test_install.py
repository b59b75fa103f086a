"""systemd/install.sh to a working hub: install into a scratch root, run each unit's ExecStart as systemd would,
READY=1 from every service, and one task answered end to end through them.

What runs is what install.sh wrote: the unit files it installed (parsed, not the repository's), its
/etc/edgecoop files, its credentials and its Mosquitto files. ``install.sh --root DIR --no-system`` stages the files
under DIR with their final paths inside and touches nothing else (no apt, useradd, pip or systemctl), so the
emulation maps the final paths (/etc/edgecoop, /opt/edgecoop, /var/lib/edgecoop, ...) into DIR wherever systemd
itself would use them: ExecStart, EnvironmentFile, the Environment it passes, WorkingDirectory, StateDirectory and
CacheDirectory, ConditionPathExists. Files the services read themselves (the TOML configs) are not rewritten: they
must work as installed. The virtualenv is the checkout's (pip is skipped): /opt/edgecoop/.venv/bin/edgecoop is a
link to it.

As systemd does, each service gets a clean environment, NOTIFY_SOCKET (a datagram socket of its own, owned by this
test, with SO_PASSCRED: READY=1 must come from the main process, NotifyAccess=main), WATCHDOG_USEC, STATE_DIRECTORY
and CACHE_DIRECTORY, and stops with SIGTERM. User=: as root the services run as an unused uid/gid standing in for
`edgecoop` (the test must not create users), and install.sh is told to give that group /etc/edgecoop
(EDGECOOP_GROUP), so file permissions are checked for real; not as root, User= is skipped. Not emulated: the
sandbox (ProtectSystem=, PrivateTmp=, ...), which `systemd-analyze verify` checks only for syntax
(tests/test_systemd.py).

The broker is install.sh's production config (passwords, ACL, client id = user name) with its paths mapped the same
way and its listeners on free loopback ports: never the machine's Mosquitto on 1883.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgecoop.broker import MosquittoProcess, free_port
from tests.test_systemd import parse_unit

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "systemd" / "install.sh"
VENV_EDGECOOP = Path(sys.executable).with_name("edgecoop")
AGENT = "air-park"  # the README's deployment example: scenarios/urban/agents/air-park.toml, copied as it is
HUB = ["edgecoop-orchestrator.service", "edgecoop-cms.service", "edgecoop-dashboard.service"]
#: what systemd puts in every service's environment before Environment= and EnvironmentFile=
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the final paths install.sh and the units use, mapped into the scratch root
MAPPED = ("/etc/edgecoop", "/opt/edgecoop", "/var/lib/edgecoop", "/var/cache/edgecoop", "/etc/mosquitto",
          "/var/lib/mosquitto", "/var/log/mosquitto", "/etc/systemd/system")  # fmt: skip
# Debian's stock /etc/mosquitto/mosquitto.conf (bookworm), which install.sh adapts its drop-in to
DEBIAN_MOSQUITTO_CONF = """\
pid_file /run/mosquitto/mosquitto.pid
persistence true
persistence_location /var/lib/mosquitto/
log_dest file /var/log/mosquitto/mosquitto.log
include_dir /etc/mosquitto/conf.d
"""


def _unused_id(taken: set[int]) -> int:
    return next(i for i in range(61000, 65000) if i not in taken)


@dataclass
class Scratch:
    root: Path
    ports: dict[str, int]
    #: (uid, gid) standing in for User=edgecoop / Group=edgecoop when the test runs as root
    run_as: tuple[int, int] | None
    #: install.sh's environment (ports, the edgecoop command, the group)
    install_env: dict[str, str] = field(default_factory=dict)
    install_log: list[str] = field(default_factory=list)

    def map(self, text: str) -> str:
        """Final paths -> the scratch root (only at a path boundary: /etc/edgecoop.d stays)."""
        pattern = "|".join(re.escape(p) for p in MAPPED)
        return re.sub(rf"(?<![\w/.-])({pattern})(?=/|:|\s|$)", lambda m: f"{self.root}{m.group(1)}", text)

    def path(self, final: str) -> Path:
        return Path(self.map(final))

    def credentials(self, user: str) -> dict[str, str]:
        return read_environment_file(self.path(f"/etc/edgecoop/credentials/{user}.env"))


def read_environment_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= format: KEY=VALUE lines, # and ; comments, optional quotes."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()), f"{path}: bad line {raw!r}"
        value = value.strip()
        env[key.strip()] = shlex.split(value)[0] if value[:1] in "\"'" else value
    return env


def run_install(scratch: Scratch, *args: str, env: dict[str, str]) -> str:
    result = subprocess.run([str(INSTALL), "--root", str(scratch.root), "--no-system", *args], env=env,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"install.sh failed ({result.returncode}):\n{out}"
    return out


@pytest.fixture(scope="module")
def scratch() -> Iterator[Scratch]:
    # not pytest's tmp dir (0700): the broker and the services run as other users when this runs as root
    root = Path(tempfile.mkdtemp(prefix="edgecoop-root-", dir="/tmp"))
    root.chmod(0o755)
    run_as = None
    if os.geteuid() == 0:
        run_as = (_unused_id({p.pw_uid for p in pwd.getpwall()}), _unused_id({g.gr_gid for g in grp.getgrall()}))
        try:
            subprocess.run([sys.executable, "-c", "import edgecoop"], user=run_as[0], group=run_as[1],
                           extra_groups=[], capture_output=True, timeout=30, check=True)  # fmt: skip
        except (OSError, subprocess.CalledProcessError):  # e.g. a pyenv Python under /root (0700)
            run_as = None  # another user cannot run this checkout's Python: User= is skipped as when not root
    ports = {"mqtt": free_port(), "ws": free_port(), "tls": free_port(), "dashboard": free_port()}
    s = Scratch(root, ports, run_as)
    # what the Debian mosquitto package and the operator put there before install.sh runs
    s.path("/etc/mosquitto/conf.d").mkdir(parents=True)
    s.path("/etc/mosquitto/mosquitto.conf").write_text(DEBIAN_MOSQUITTO_CONF)
    s.path("/etc/edgecoop").mkdir(parents=True)
    shutil.copy(REPO / "scenarios" / "urban" / "agents" / f"{AGENT}.toml", s.path(f"/etc/edgecoop/{AGENT}.toml"))
    env = {
        **os.environ,
        "EDGECOOP_BIN": str(VENV_EDGECOOP),
        "EDGECOOP_MQTT_PORT": str(ports["mqtt"]),
        "EDGECOOP_WS_PORT": str(ports["ws"]),
        "EDGECOOP_TLS_PORT": str(ports["tls"]),
        "EDGECOOP_DASHBOARD_PORT": str(ports["dashboard"]),
        "PYTHON": sys.executable,
    }
    env.pop("EDGECOOP_BROKER", None)
    if run_as:
        env["EDGECOOP_GROUP"] = str(run_as[1])
    s.install_env = env
    s.install_log.append(run_install(s, env=env))
    s.install_log.append(run_install(s, env=env))  # idempotent: the second run must change nothing
    # pip is skipped: the checkout's virtualenv stands in for /opt/edgecoop/.venv
    venv_bin = s.path("/opt/edgecoop/.venv/bin")
    venv_bin.mkdir(parents=True)
    (venv_bin / "edgecoop").symlink_to(VENV_EDGECOOP)
    try:
        yield s
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- Mosquitto as Debian's mosquitto.service runs it -----------------------------------------------------------------
@pytest.fixture(scope="module")
def hub_broker(scratch: Scratch) -> Iterator[MosquittoProcess]:
    """`mosquitto -c /etc/mosquitto/mosquitto.conf` with install.sh's drop-in, paths mapped, listeners on loopback."""
    run = scratch.root / "run" / "mosquitto"
    (run / "conf.d").mkdir(parents=True)
    for d in ("/var/lib/mosquitto", "/var/log/mosquitto"):
        scratch.path(d).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # Mosquitto started as root drops to the mosquitto user
            shutil.chown(scratch.path(d), "mosquitto", "mosquitto")
    dropin = scratch.map(scratch.path("/etc/mosquitto/conf.d/edgecoop.conf").read_text())
    dropin, n = re.subn(r"^listener (\d+)$", r"listener \1 127.0.0.1", dropin, flags=re.M)
    assert n == 3, dropin  # MQTT, MQTT over TLS, websockets
    (run / "conf.d" / "edgecoop.conf").write_text(dropin)
    main = scratch.map(scratch.path("/etc/mosquitto/mosquitto.conf").read_text())
    main = main.replace(f"include_dir {scratch.root}/etc/mosquitto/conf.d", f"include_dir {run}/conf.d")
    main = main.replace("pid_file /run/mosquitto/mosquitto.pid\n", "")
    with MosquittoProcess(scratch.ports["mqtt"], config_text=main, workdir=run) as broker:
        broker.log_file = scratch.path("/var/log/mosquitto/mosquitto.log")
        yield broker


# -- systemd, emulated -----------------------------------------------------------------------------------------
_UCRED = struct.Struct("3i")


@dataclass
class Service:
    """One unit's ExecStart, started the way systemd starts a Type=notify service."""

    scratch: Scratch
    unit: str
    instance: str = ""
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    journal: Path | None = None
    ready: bool = False

    @property
    def name(self) -> str:
        return self.unit.replace("@.", f"@{self.instance}.")

    def spec(self, text: str) -> str:
        return text.replace("%i", self.instance).replace("%I", self.instance).replace("%n", self.name)

    def start(self) -> None:
        sections = parse_unit(self.scratch.path(f"/etc/systemd/system/{self.unit}"))
        unit, svc = sections["Unit"], sections["Service"]
        assert svc["Type"] == ["notify"] and svc.get("NotifyAccess") == ["main"], self.unit
        for cond in unit.get("ConditionPathExists", []):
            assert self.scratch.path(self.spec(cond)).exists(), f"{self.name}: condition failed: {cond}"
        uid, gid = self.scratch.run_as or (os.getuid(), os.getgid())
        env: dict[str, str] = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "INVOCATION_ID": os.urandom(16).hex()}
        if self.scratch.run_as:  # what User= adds (HOME is overridden by the unit's Environment=)
            env |= {"USER": "edgecoop", "LOGNAME": "edgecoop", "HOME": "/", "SHELL": "/usr/sbin/nologin"}
        # StateDirectory=/CacheDirectory=: created (and owned by User=) before the process starts
        for key, base, mode_key in (("StateDirectory", "/var/lib", "StateDirectoryMode"),
                                    ("CacheDirectory", "/var/cache", "CacheDirectoryMode")):  # fmt: skip
            names = [n for line in svc.get(key, []) for n in self.spec(line).split()]
            mode = int(svc.get(mode_key, ["0755"])[-1], 8)
            for name in names:
                d = self.scratch.path(f"{base}/{name}")
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(mode)
                if self.scratch.run_as:
                    os.chown(d, uid, gid)
            if names:
                env[key.upper().replace("DIRECTORY", "_DIRECTORY")] = ":".join(f"{base}/{n}" for n in names)
        for line in svc.get("Environment", []):
            for assignment in shlex.split(self.spec(line)):
                k, _, v = assignment.partition("=")
                env[k] = v
        for line in svc.get("EnvironmentFile", []):  # read by systemd (as root), so the service needs no access
            optional, path = line.startswith("-"), self.scratch.path(self.spec(line.removeprefix("-")))
            if path.exists():
                env |= read_environment_file(path)
            else:
                assert optional, f"{self.name}: EnvironmentFile {line} is missing"
        env = {k: self.scratch.map(v) for k, v in env.items()}
        [exec_start] = svc["ExecStart"]
        argv = [self.scratch.map(a) for a in shlex.split(self.spec(exec_start))]
        [workdir] = svc["WorkingDirectory"]
        cwd = self.scratch.path(self.spec(workdir.removeprefix("-")))
        assert cwd.is_dir(), f"{self.name}: WorkingDirectory {workdir} does not exist (systemd: 200/CHDIR)"
        # NOTIFY_SOCKET: a datagram socket of this test; SO_PASSCRED tells which process sent each message
        sockdir = Path(tempfile.mkdtemp(prefix="sdn", dir="/tmp"))  # AF_UNIX paths are limited to 108 bytes
        sockdir.chmod(0o755)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify.bind(str(sockdir / "notify"))
        (sockdir / "notify").chmod(0o666)
        env["NOTIFY_SOCKET"] = str(sockdir / "notify")
        env["WATCHDOG_USEC"] = str(int(svc["WatchdogSec"][-1]) * 1_000_000)
        self.journal = self.scratch.root / f"journal-{self.name}.log"
        with self.journal.open("wb") as journal:
            ids: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": []} if self.scratch.run_as else {}
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=journal,
                                         stderr=subprocess.STDOUT, process_group=0, **ids)  # fmt: skip
        env["WATCHDOG_PID"] = str(self.proc.pid)  # (systemd sets it before exec; nothing here reads it)

    def log(self) -> str:
        return self.journal.read_text(errors="replace") if self.journal and self.journal.exists() else ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until READY=1 arrives from the main process; fail at once if the process exits first."""
        assert self.proc is not None and self.notify is not None
        deadline = time.monotonic() + timeout
        while not self.ready:
            rc = self.proc.poll()
            assert rc is None, f"{self.name} exited with {rc} before READY=1:\n{self.log()}"
            assert time.monotonic() < deadline, f"{self.name}: no READY=1 within {timeout} s:\n{self.log()}"
            if not select.select([self.notify], [], [], 0.2)[0]:
                continue  # the process may still be starting: check it is alive, then wait again
            data, ancdata, _, _ = self.notify.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            pid = next(_UCRED.unpack(d[: _UCRED.size])[0] for level, kind, d in ancdata
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)  # fmt: skip
            if b"READY=1" in data.split(b"\n"):
                assert pid == self.proc.pid, f"{self.name}: READY=1 from pid {pid}, not the main process"
                self.ready = True

    def stop(self) -> int | None:
        """SIGTERM, as `systemctl stop` (KillMode=control-group: the whole process group)."""
        if self.notify is not None:
            path = self.notify.getsockname()
            self.notify.close()
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def hub(scratch: Scratch, hub_broker: MosquittoProcess) -> Iterator[dict[str, Service]]:
    services = {s.name: s for s in [*(Service(scratch, u) for u in HUB), Service(scratch, "edgecoop-agent@.service", AGENT)]}  # fmt: skip
    try:
        for s in services.values():
            s.start()
        for s in services.values():
            s.wait_ready()
        yield services
    finally:
        codes = {name: s.stop() for name, s in services.items()}
        bad = {n: c for n, c in codes.items() if c not in (0, None)}
        assert not bad, f"services did not stop cleanly on SIGTERM: {bad}\n" + "\n".join(
            f"--- {n}\n{services[n].log()[-2000:]}" for n in bad
        )


def documented_ask_command() -> str:
    """The README's (and docs/deployment.md's) way to ask the hub a question, without its ``sudo``."""
    pattern = re.compile(r"^sudo sh -c '(.+edgecoop task .+)'$", re.M)
    readme = pattern.findall((REPO / "README.md").read_text())
    deployment = pattern.findall((REPO / "docs" / "deployment.md").read_text())
    assert len(readme) == 1 and readme == deployment, (readme, deployment)
    return str(readme[0])


def until(predicate: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # polling state another process owns (a file, an HTTP endpoint); not a readiness sleep
    return value


# -- install.sh's files -----------------------------------------------------------------------------------------
def test_install_creates_everything_the_units_read(scratch):
    """Every path a unit names (ExecStart's files, EnvironmentFile, ConditionPathExists) exists after install.sh."""
    units = scratch.path("/etc/systemd/system")
    for unit in [*HUB, "edgecoop-agent@.service"]:
        assert (units / unit).read_text() == (REPO / "systemd" / unit).read_text()
        svc = parse_unit(units / unit)["Service"]
        for line in svc["EnvironmentFile"]:
            assert scratch.path(line.removeprefix("-").replace("%i", AGENT)).is_file(), (unit, line)
        for arg in shlex.split(svc["ExecStart"][0].replace("%i", AGENT)):
            if arg.startswith("/etc/"):
                assert scratch.path(arg).is_file(), (unit, arg)
    assert (units / "mosquitto.service.d" / "edgecoop.conf").is_file()
    creds = scratch.path("/etc/edgecoop/credentials")
    assert sorted(p.name for p in creds.iterdir()) == sorted(
        f"{u}.env" for u in ["orchestrator", "cms", "dashboard", "operator", "homeassistant", "a2a-gateway", AGENT]
    )
    for env_file in creds.iterdir():
        assert env_file.stat().st_mode & 0o777 == 0o640
        assert set(read_environment_file(env_file)) == {"EDGECOOP_USERNAME", "EDGECOOP_PASSWORD"}
    passwd = scratch.path("/etc/mosquitto/edgecoop.passwd").read_text()
    assert {line.split(":")[0] for line in passwd.splitlines()} == {p.stem for p in creds.iterdir()}
    assert scratch.path("/etc/edgecoop").stat().st_mode & 0o777 == 0o750
    if scratch.run_as:  # the service group owns /etc/edgecoop; Mosquitto's group its password file
        assert scratch.path("/etc/edgecoop/orchestrator.toml").stat().st_gid == scratch.run_as[1]
        assert scratch.path("/etc/mosquitto/edgecoop.passwd").stat().st_gid == grp.getgrnam("mosquitto").gr_gid
    # the drop-in is adapted to Debian's main config: its persistence_location stays the only one
    dropin = scratch.path("/etc/mosquitto/conf.d/edgecoop.conf").read_text()
    assert "\npersistence_location" not in dropin


def test_install_makes_a_ca_and_the_brokers_tls_certificate(scratch):
    """A CA of the hub (key root-only), the broker's certificate signed by it, the CA for clients in edgecoop.env."""
    certs, tls = scratch.path("/etc/mosquitto/certs"), scratch.path("/etc/edgecoop/tls")
    assert (certs / "edgecoop-server.key").stat().st_mode & 0o777 == 0o640  # read by the mosquitto group
    assert (tls / "ca.key").stat().st_mode & 0o777 == 0o600 and tls.stat().st_mode & 0o777 == 0o700
    assert scratch.path("/etc/edgecoop/ca.crt").read_bytes() == (tls / "ca.crt").read_bytes()
    verify = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile",
                             str(tls / "ca.crt"), str(certs / "edgecoop-server.crt")],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                           str(certs / "edgecoop-server.crt")], capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert {"DNS:localhost", "IP Address:127.0.0.1", f"DNS:{socket.gethostname()}"} <= set(
        re.split(r",\s*|\n\s*", text)
    )
    env = read_environment_file(scratch.path("/etc/edgecoop/edgecoop.env"))
    assert env["EDGECOOP_CA_FILE"] == "/etc/edgecoop/ca.crt"
    dropin = scratch.path("/etc/mosquitto/conf.d/edgecoop.conf").read_text()
    assert (
        f"listener {scratch.ports['tls']}\nprotocol mqtt\ncertfile /etc/mosquitto/certs/edgecoop-server.crt" in dropin
    )


def test_the_documented_openssl_commands_make_a_certificate_that_verifies(tmp_path):
    """docs/deployment.md's by-hand equivalent of `install.sh --make-certs`, run as written (paths mapped)."""
    docs = (REPO / "docs" / "deployment.md").read_text()
    block = re.search(r"amounts to these commands.*?```sh\n(.*?)```", docs, re.S)
    assert block, "docs/deployment.md: the openssl commands are gone"
    scratch = Scratch(tmp_path, {}, None)
    script = scratch.map(block.group(1))
    if os.geteuid() != 0:
        script = script.replace("chgrp mosquitto ", "true ")  # only root may give a file to another group
    scratch.path("/etc/mosquitto/certs").mkdir(parents=True)  # (the Debian package's directory)
    scratch.path("/etc/edgecoop").mkdir(parents=True)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60,
                         check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    verify = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile",
                             str(scratch.path("/etc/edgecoop/ca.crt")),
                             str(scratch.path("/etc/mosquitto/certs/edgecoop-server.crt"))],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert scratch.path("/etc/mosquitto/certs/edgecoop-server.key").stat().st_mode & 0o777 == 0o640


def test_install_is_idempotent(scratch):
    first, second = scratch.install_log
    assert "created MQTT user operator" in first and "created /etc/edgecoop/orchestrator.toml" in first
    assert "TLS: created /etc/mosquitto/certs/edgecoop-server.crt" in first
    assert "created" not in second, second


def test_orchestrator_config_is_valid_as_installed(scratch):
    from edgecoop.cli import _orchestrator_settings, build_parser

    path = scratch.path("/etc/edgecoop/orchestrator.toml")
    args = build_parser().parse_args(["orchestrator", "--config", str(path)])
    conf, _, prefix = _orchestrator_settings(args)
    assert (conf["id"], conf["strategy"], conf["db"], prefix) == ("orchestrator", "capability-aware", "tasks.db",
                                                                  "edgecoop/v1")  # fmt: skip


def test_root_is_required_without_no_system():
    ids: dict[str, Any] = {}
    if os.geteuid() == 0:  # show the refusal as an unprivileged user (bash and the script are world-readable)
        ids = {"user": _unused_id({p.pw_uid for p in pwd.getpwall()}), "group": 65534, "extra_groups": []}
    result = subprocess.run([str(INSTALL)], capture_output=True, text=True, timeout=30, check=False, cwd="/", **ids)
    assert result.returncode == 1 and "run as root" in result.stderr


# -- the hub, started as systemd starts it ------------------------------------------------------------------------
def test_every_service_reports_ready_and_a_task_is_served_end_to_end(scratch, hub_broker, hub):
    assert all(s.ready for s in hub.values())
    # the documented command, run as written (paths mapped): edgecoop.env and the operator's credentials
    command = documented_ask_command()
    question = re.search(r'edgecoop task "(.+)"', command).group(1)  # type: ignore[union-attr]
    result = subprocess.run(["sh", "-c", scratch.map(command)], env={"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"},
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "state  : done  tier: edge" in result.stdout, result.stdout
    assert f"route  : {AGENT}(air,edge," in result.stdout, result.stdout
    assert "µg/m³" in result.stdout
    assert f"edgecoop: broker mqtt://127.0.0.1:{scratch.ports['mqtt']} as operator (from env EDGECOOP_BROKER" in (
        result.stderr
    )
    # over TLS: the broker's listener with install.sh's certificate, checked against the CA edgecoop.env names
    env = {"PATH": SYSTEMD_PATH, **read_environment_file(scratch.path("/etc/edgecoop/edgecoop.env"))}
    env = {k: scratch.map(v) for k, v in (env | scratch.credentials("operator")).items()}
    tls_url = f"mqtts://localhost:{scratch.ports['tls']}"
    over_tls = subprocess.run([str(VENV_EDGECOOP), "task", "--json", "--broker", tls_url, question], env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert over_tls.returncode == 0, over_tls.stdout + over_tls.stderr
    assert json.loads(over_tls.stdout)["state"] == "done"
    assert f"edgecoop: broker {tls_url} as operator (from --broker, CA {scratch.path('/etc/edgecoop/ca.crt')})" in (
        over_tls.stderr
    )
    # the CMS service mirrors the card into its SQLite file (the ExecStart's --db, in the state directory)
    cms_db = scratch.path("/var/lib/edgecoop/cms.db")

    def cms_agents() -> list[str]:
        with sqlite3.connect(f"file:{cms_db}?mode=ro", uri=True) as db:
            return [r[0] for r in db.execute("SELECT agent_id FROM agents")]

    assert until(cms_agents, "the CMS mirror") == [AGENT]
    # the orchestrator keeps its tasks in tasks.db, relative to its WorkingDirectory (orchestrator.toml)
    assert scratch.path("/var/lib/edgecoop/tasks.db").is_file()
    # the dashboard service (port from edgecoop.env) shows the agent online and the task done at the edge
    url = f"http://127.0.0.1:{scratch.ports['dashboard']}/api/state"

    def dashboard_task() -> dict[str, Any] | None:
        with urllib.request.urlopen(url, timeout=5) as response:
            state = json.load(response)
        done = [t for t in state["tasks"] if t["question"] == question and t["state"] == "done"]
        online = [a["id"] for a in state["agents"] if a["online"]]
        return done[0] if done and online == [AGENT] else None

    assert until(dashboard_task, "the dashboard")["tier"] == "edge"


def test_services_write_only_their_state_directories(scratch, hub):
    """As the stand-in user, the services could not have written /etc/edgecoop (0750 root:<group>)."""
    if not scratch.run_as:
        pytest.skip("User= skipped: not root, or this checkout's Python is not reachable for another user")
    uid = scratch.run_as[0]
    owned = {p for p in scratch.path("/var/lib/edgecoop").rglob("*") if p.stat().st_uid == uid}
    assert scratch.path("/var/lib/edgecoop/cms.db") in owned and scratch.path("/var/lib/edgecoop/tasks.db") in owned
    assert not [p for p in scratch.path("/etc/edgecoop").rglob("*") if p.stat().st_uid == uid]


def test_passwords_certificates_and_edits_are_kept_across_installs(scratch):
    def etc() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for d in ("/etc/edgecoop", "/etc/mosquitto") for p in
                sorted(scratch.path(d).rglob("*")) if p.is_file()}  # fmt: skip

    before = etc()
    run_install(scratch, env=scratch.install_env)
    assert etc() == before
