"""systemd deployment: the units verify, carry the required settings and start what the CLI accepts; sd_notify works;
the broker files install.sh generates run under a real Mosquitto with the production ACL and passwords."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecoop.broker import find_mosquitto, free_port
from edgecoop.cli import build_parser
from edgecoop.connection import BrokerSettings, Connection
from edgecoop.dashboard import Dashboard
from edgecoop.errors import ConnectError
from edgecoop.systemd import notify, notify_ready, watchdog_loop
from edgecoop.topics import Topics
from tests.conftest import agent_config
from tests.test_hass import Watcher

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"
SERVICES = [
    "edgecoop-agent@.service",
    "edgecoop-orchestrator.service",
    "edgecoop-cms.service",
    "edgecoop-dashboard.service",
]
UNITS = [*SERVICES, "edgecoop.target"]
EDGECOOP_BIN = "/opt/edgecoop/.venv/bin/edgecoop"
VENV_EDGECOOP = Path(sys.executable).with_name("edgecoop")


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is required (apt-get install systemd; scripts/setup does this)", pytrace=False)
    return exe


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: repeated keys accumulate, so configparser will not do."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit_copies(tmp_path_factory) -> Path:
    """The units with ExecStart pointing at an executable that exists (verify insists on it)."""
    out: Path = tmp_path_factory.mktemp("units")
    fake = out / "edgecoop"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    for name in UNITS:
        (out / name).write_text((UNIT_DIR / name).read_text().replace(EDGECOOP_BIN, str(fake)))
    return out


def verify(path: Path) -> str:
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}".strip()


# -- units ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["edgecoop-agent@cam-01.service", *UNITS[1:]])
def test_unit_passes_systemd_analyze_verify(unit_copies, unit):
    assert verify(unit_copies / unit) == "rc=0"


def test_verify_does_catch_mistakes(unit_copies, tmp_path):
    bad = tmp_path / "edgecoop-cms.service"
    bad.write_text((unit_copies / "edgecoop-cms.service").read_text().replace("WatchdogSec=30", "WatchdogSecs=30"))
    assert "Unknown key" in verify(bad)


def test_mosquitto_dropin_verifies_as_a_dropin(tmp_path):
    (tmp_path / "mosquitto.service").write_text(
        "[Unit]\nDescription=stand-in for Debian's unit\n[Service]\nType=notify\nExecStart=/bin/true\n"
    )
    (tmp_path / "mosquitto.service.d").mkdir()
    shutil.copy(UNIT_DIR / "mosquitto-edgecoop.conf", tmp_path / "mosquitto.service.d" / "edgecoop.conf")
    assert verify(tmp_path / "mosquitto.service") == "rc=0"
    text = (UNIT_DIR / "mosquitto-edgecoop.conf").read_text()
    assert "edgecoop broker --print-config production" in text and "--print-config acl" in text
    assert parse_unit(UNIT_DIR / "mosquitto-edgecoop.conf")["Service"]["LimitNOFILE"] == ["65536"]


@pytest.mark.parametrize("name", SERVICES)
def test_service_settings(name):
    unit = parse_unit(UNIT_DIR / name)
    s, u = unit["Service"], unit["Unit"]
    required = {
        "Type": "notify",
        "User": "edgecoop",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "2",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }
    assert {k: s.get(k, [None])[-1] for k in required} == required
    assert "edgecoop" in s["StateDirectory"][0].split()
    assert set(u["After"][0].split()) >= {"network-online.target", "mosquitto.service"}
    assert unit["Install"]["WantedBy"] == ["edgecoop.target"]
    assert u["PartOf"] == ["edgecoop.target"]


EXPECTED_EXEC = {
    "edgecoop-agent@.service": f"{EDGECOOP_BIN} agent /etc/edgecoop/%i.toml",
    "edgecoop-orchestrator.service": f"{EDGECOOP_BIN} orchestrator --config /etc/edgecoop/orchestrator.toml",
    "edgecoop-cms.service": f"{EDGECOOP_BIN} cms mirror --db /var/lib/edgecoop/cms.db",
    "edgecoop-dashboard.service": f"{EDGECOOP_BIN} dashboard",
}


@pytest.mark.parametrize("name", SERVICES)
def test_exec_start_is_a_valid_command_line(name, capsys):
    [exec_start] = parse_unit(UNIT_DIR / name)["Service"]["ExecStart"]
    assert exec_start == EXPECTED_EXEC[name]
    argv = shlex.split(exec_start.replace("%i", "cam-01"))
    args = build_parser().parse_args(argv[1:])
    assert callable(args.func)


def test_target_pulls_in_the_services():
    target = parse_unit(UNIT_DIR / "edgecoop.target")
    assert set(target["Unit"]["Wants"][0].split()) == {
        "edgecoop-orchestrator.service",
        "edgecoop-cms.service",
        "edgecoop-dashboard.service",
    }
    assert target["Install"]["WantedBy"] == ["multi-user.target"]


def test_agent_unit_keeps_device_access():
    """Cameras and the Jetson GPU are devices: no PrivateDevices, and nothing that implies a device allow-list."""
    service = parse_unit(UNIT_DIR / "edgecoop-agent@.service")["Service"]
    assert not {"PrivateDevices", "DeviceAllow", "ProtectClock", "DevicePolicy"} & set(service)


# -- sd_notify ----------------------------------------------------------------------------------------------------
@pytest.fixture
def notify_socket(monkeypatch) -> Iterator[socket.socket]:
    directory = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # AF_UNIX paths are limited to 108 bytes
    path = os.path.join(directory, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock
    shutil.rmtree(directory)


def test_notify_ready_sends_ready_to_the_notify_socket(notify_socket):
    assert notify_ready() is True
    assert notify_socket.recv(4096) == b"READY=1"


def test_notify_supports_abstract_sockets(monkeypatch):
    name = f"edgecoop-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STATUS=serving") is True
        assert sock.recv(4096) == b"STATUS=serving"


def test_notify_without_systemd_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify_ready() is False


async def test_watchdog_pings_at_half_the_interval(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: pings every 0.05 s
    notify_socket.setblocking(False)
    task = asyncio.create_task(watchdog_loop())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pings = []
    while True:
        try:
            pings.append(notify_socket.recv(4096))
        except BlockingIOError:
            break
    assert 3 <= len(pings) <= 9 and set(pings) == {b"WATCHDOG=1"}


def test_dashboard_command_tells_systemd_it_is_ready(broker, notify_socket):
    env = {**os.environ, "NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"], "WATCHDOG_USEC": "2000000"}
    proc = subprocess.Popen(
        [str(VENV_EDGECOOP), "dashboard", "--broker", broker.url, "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        messages = {notify_socket.recv(4096), notify_socket.recv(4096)}
        assert messages == {b"READY=1", b"WATCHDOG=1"}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert re.search(r"edgecoop dashboard on http://127\.0\.0\.1:\d+ ", out), out


# -- install.sh's broker files under a real Mosquitto ---------------------------------------------------------------
@pytest.fixture
def production_broker() -> Iterator[tuple[int, dict[str, str]]]:
    """Mosquitto started the Debian way (stock main conf + conf.d) with what install.sh generates, on free ports."""
    # not pytest's tmp_path: its root is 0700, and a root-started Mosquitto reads these files as user mosquitto
    root = Path(tempfile.mkdtemp(prefix="edgecoop-prod-", dir="/tmp"))
    etc, data = root / "etc" / "mosquitto", root / "data"
    (etc / "conf.d").mkdir(parents=True)
    data.mkdir()
    main = etc / "mosquitto.conf"
    # Debian's stock /etc/mosquitto/mosquitto.conf, minus its log and pid files
    main.write_text(f"persistence true\npersistence_location {data}/\nlog_dest stderr\ninclude_dir {etc / 'conf.d'}\n")
    port, ws_port = free_port(), free_port()
    env = {
        **os.environ,
        "EDGECOOP_BIN": str(VENV_EDGECOOP),
        "EDGECOOP_MQTT_PORT": str(port),
        "EDGECOOP_WS_PORT": str(ws_port),
        "EDGECOOP_MOSQUITTO_CONF": str(main),
    }
    script = UNIT_DIR / "install.sh"
    # the TLS listener's certificate, made as install.sh makes it (under root/etc/mosquitto/certs)
    subprocess.run([script, "--make-certs", "--root", str(root), "--no-system"], env=env, capture_output=True,
                   check=True)  # fmt: skip
    conf = subprocess.run([script, "--print-broker-config"], env=env, capture_output=True, text=True, check=True).stdout
    acl = subprocess.run([script, "--print-acl"], env=env, capture_output=True, text=True, check=True).stdout
    (etc / "conf.d" / "edgecoop.conf").write_text(conf.replace("/etc/mosquitto", str(etc)))
    (etc / "edgecoop.acl").write_text(acl)
    passwords = {u: f"pw-{u}" for u in ["cam-01", "dashboard", "homeassistant"]}
    (etc / "edgecoop.passwd").touch()  # as install.sh does: mosquitto_passwd -b needs an existing file
    for user, password in passwords.items():
        subprocess.run(["mosquitto_passwd", "-b", str(etc / "edgecoop.passwd"), user, password], check=True)
    root.chmod(0o755)
    if os.geteuid() == 0:  # a root-started Mosquitto drops to the mosquitto user
        for path in [root, *root.rglob("*")]:
            shutil.chown(path, "mosquitto")
    proc = subprocess.Popen([find_mosquitto(), "-c", str(main)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Mosquitto refused install.sh's config:\n{proc.stderr.read() if proc.stderr else ''}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "Mosquitto never listened"
            time.sleep(0.05)
        yield port, passwords
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.05)


async def test_install_broker_files_run_with_passwords_and_acl(production_broker):
    from edgecoop.agents import Agent

    port, passwords = production_broker
    topics = Topics()  # the production ACL is written for the default prefix
    creds = {u: BrokerSettings(port=port, username=u, password=p, keepalive=5) for u, p in passwords.items()}
    with pytest.raises(ConnectError):
        async with Connection(
            BrokerSettings(port=port, username="dashboard", password=passwords["cam-01"]), "x", connect_timeout=1
        ):
            pass
    config = agent_config("cam-01", creds["cam-01"], topics, home_assistant=True)
    async with Dashboard(creds["dashboard"], topics, port=0) as dashboard, Agent(config) as agent:
        # the dashboard user may read cards and status (pattern read ACL lines)
        await until(lambda: getattr(dashboard.state.agents.get("cam-01"), "online", False))
        # Home Assistant sees the agent's discovery config: `pattern write homeassistant/device/edgecoop_v1_%u/config`
        node_config = "homeassistant/device/edgecoop_v1_cam-01/config"
        async with Watcher(creds["homeassistant"], ["homeassistant/#", f"{topics.prefix}/agents/+/ha/#"]) as ha:
            await ha.wait(lambda seen: {node_config, topics.ha_status("cam-01")} <= set(seen))
        assert agent.statistics()["connects"] == 1
