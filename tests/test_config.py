"""Configuration that says what is wrong: typed settings files, the broker's origin, and every CLI error path.

Each error names the file, the table and key, and what was expected; the CLI prints it on one line (exit code 2,
no traceback). An unreachable broker, or a broker without an orchestrator, is reported within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgecoop.agents.config import config_from_dict, load_agent_config
from edgecoop.connection import BrokerSettings
from edgecoop.errors import ConfigError
from edgecoop.settings import BrokerTable, resolve_broker

AGENT = '[agent]\nid = "air-park"\n'
CAP = '[[capabilities]]\nkind = "echo"\n'


def _cli(*argv: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECOOP_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "edgecoop.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=full_env)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the agent file: unknown tables and keys, wrong types -----------------------------------------------------
BAD_AGENT_FILES = {
    "misspelt table": (AGENT + '[brokr]\nurl = "mqtt://10.0.0.5"\n' + CAP, "unknown table [brokr] (did you mean [broker]?)"),
    "unknown key": (AGENT + 'descripton = "x"\n' + CAP, "[agent]: unknown key 'descripton' (did you mean 'description'?)"),
    "unknown capability key": (AGENT + CAP + "max_concurency = 4\n",
                               "[[capabilities]] #1: unknown key 'max_concurency' (did you mean 'max_concurrency'?)"),
    "wrong type": (AGENT + '[broker]\nkeepalive = "ten"\n' + CAP, "[broker] keepalive: expected an integer, got 'ten'"),
    "nested unknown key": (AGENT + 'location = { nam = "City Park" }\n' + CAP,
                           "[agent] location: unknown key 'nam' (did you mean 'name'?)"),
    "wrong nested type": (AGENT + 'location = { name = "City Park", lat = "north" }\n' + CAP,
                          "[agent] location lat: expected a number, got 'north'"),
    "choice": (AGENT + 'privacy = "secret"\n' + CAP, "[agent] privacy: expected one of 'public', 'site', 'private'"),
    "list": (AGENT + 'domains = "air"\n' + CAP, "[agent] domains: expected an array of strings, got 'air'"),
    "missing id": ('[agent]\nsite = "x"\n' + CAP, "[agent]: missing key 'id'"),
    "missing kind": (AGENT + '[[capabilities]]\nname = "x"\n', "[[capabilities]] #1: missing key 'kind'"),
    "table as value": ('agent = "air-park"\n', "[agent] must be a table"),
    "no agent table": (CAP, "missing table [agent]"),
    "bad id": ('[agent]\nid = "a/b"\n', "forbidden characters"),
    "bad scheme": (AGENT + '[broker]\nurl = "http://broker.local"\n' + CAP,
                   "[broker] url: 'http://broker.local': the scheme must be mqtt:// (plain) or mqtts:// (TLS)"),
    "bad port": (AGENT + '[broker]\nurl = "mqtt://broker.local:http"\n' + CAP, "the port must be a number"),
    "missing password file": (AGENT + '[broker]\npassword_file = "air-park.secret"\n' + CAP,
                              "[broker] password_file: cannot read"),
    "cert without key": (AGENT + '[broker]\nurl = "mqtts://b"\ncert_file = "c.pem"\n' + CAP,
                         "cert_file and key_file go together"),
    "sensor option type": (AGENT + '[[capabilities]]\nkind = "sensor"\n[capabilities.options]\n'
                           'sensors = [{ name = "pm25", rate_hz = "fast" }]\n',
                           "[[capabilities]] 'sensor' (kind sensor): sensor 'pm25': rate_hz must be a number, not 'fast'"),
    "unknown kind": (AGENT + '[[capabilities]]\nkind = "teleport"\n', "unknown capability kind 'teleport'"),
    "invalid toml": (AGENT + "site = \n", "invalid TOML"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_AGENT_FILES))
def test_agent_file_errors_name_file_key_and_expectation(case, tmp_path):
    text, expected = BAD_AGENT_FILES[case]
    f = tmp_path / "air-park.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        from edgecoop.agents import Agent

        Agent(load_agent_config(f))  # the handlers check their options tables
    assert str(f) in str(err.value) and expected in str(err.value), str(err.value)


def test_every_shipped_agent_file_is_valid():
    root = Path(__file__).parent.parent
    files = [*root.glob("scenarios/*/agents/*.toml"), *root.glob("agents/**/*.toml")]
    assert len(files) > 10
    for f in files:
        assert load_agent_config(f).source == f


def test_dict_configs_are_checked_the_same_way():
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        config_from_dict({"agent": {"id": "a", "colour": "blue"}})


def test_missing_agent_file_is_one_line():
    out = _cli("agent", "/nonexistent/air-park.toml")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "edgecoop: error: agent config file /nonexistent/air-park.toml does not exist\n" in out.stderr


@pytest.mark.parametrize("case", ["misspelt table", "wrong type", "sensor option type", "bad scheme"])
def test_cli_agent_config_errors_exit_2_without_traceback(case, tmp_path):
    f = tmp_path / "air-park.toml"
    f.write_text(BAD_AGENT_FILES[case][0])
    out = _cli("agent", str(f))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and str(f) in out.stderr and BAD_AGENT_FILES[case][1] in out.stderr


# -- where the broker comes from ------------------------------------------------------------------------------
def test_broker_precedence_and_origin(tmp_path):
    env = {"EDGECOOP_BROKER": "mqtt://env-host:1884", "EDGECOOP_USERNAME": "env-user", "EDGECOOP_PASSWORD": "env-pw"}
    b = resolve_broker(env={})
    assert (b.url, b.username) == ("mqtt://127.0.0.1:1883", None) and b.origin.startswith("default")
    b = resolve_broker(env=env)
    assert (b.url, b.username, b.password, b.origin) == (
        "mqtt://env-host:1884",
        "env-user",
        "env-pw",
        "env EDGECOOP_BROKER",
    )
    src = tmp_path / "a.toml"
    (tmp_path / "a.secret").write_text("file-pw\n")
    table = BrokerTable(url="mqtts://hub.local", username="air-park", password_file="a.secret")  # noqa: S106
    b = resolve_broker(table=table, source=src, env=env)
    assert (b.url, b.tls, b.username, b.password) == ("mqtts://hub.local:8883", True, "air-park", "file-pw")
    assert b.origin == f"{src}: [broker] url" and "hub.local" in b.describe() and "air-park" in b.describe()
    # --broker replaces the address only: the file's credentials stay
    b = resolve_broker(flag="mqtt://10.0.0.9:1999", table=table, source=src, env=env)
    assert (b.url, b.username, b.password, b.origin) == ("mqtt://10.0.0.9:1999", "air-park", "file-pw", "--broker")
    b = resolve_broker(flag="mqtt://u:p%40ss@h", table=table, source=src, env=env)
    assert (b.username, b.password) == ("u", "p@ss")


def test_agent_broker_flag_keeps_the_files_credentials(tmp_path):
    f = tmp_path / "air-park.toml"
    f.write_text(AGENT + '[broker]\nurl = "mqtt://hub:1883"\nusername = "air-park"\npassword = "s3cret"\n' + CAP)
    cfg = load_agent_config(f, broker_url="mqtt://127.0.0.1:1999")
    assert (cfg.broker.url, cfg.broker.username, cfg.broker.password) == ("mqtt://127.0.0.1:1999", "air-park", "s3cret")


@pytest.mark.parametrize("url", ["http://h", "mqtt://h:99999", "mqtt://h/path", "mqtt://", "ws://h:9001"])
def test_bad_broker_urls_are_config_errors(url):
    with pytest.raises(ConfigError):
        BrokerSettings.from_url(url)


async def test_agent_prints_its_broker_and_where_it_came_from(tmp_path, settings, topics):
    f = tmp_path / "echo-cli.toml"
    f.write_text(f'[agent]\nid = "echo-cli"\n[broker]\nurl = "mqtt://127.0.0.1:1"\nprefix = "{topics.prefix}"\n'
                 f'username = "echo-cli"\n' + CAP)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECOOP_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgecoop.cli", "agent", str(f), "--broker", settings.url, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    finally:
        proc.terminate()
        await proc.wait()
    assert line.strip() == f"agent echo-cli online at {settings.url} as echo-cli (from --broker)"


# -- the orchestrator file ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[orchestrator]\ncolour = "blue"\n', "[orchestrator]: unknown key 'colour'"),
        ('[orchestrator]\nstrategy = "fastest"\n', "[orchestrator] strategy: expected one of"),
        ('[orchestrator]\nsummarize = "yes"\n', "[orchestrator] summarize: expected true or false, got 'yes'"),
        ('[orchestrator]\nclassifier = "llm"\n', "[orchestrator] classifier: expected one of 'rule', 'slm'"),
        ('[orchestrator]\nsite_costs = { cloud = "far" }\n', "[orchestrator] site_costs.cloud: expected a number"),
        ('[orchestrater]\nid = "o"\n', "unknown table [orchestrater] (did you mean [orchestrator]?)"),
        ("[broker]\nkeepalive = 0\n", "[broker]: keepalive must be 1..65535 seconds, not 0"),
    ],
)
def test_orchestrator_config_errors(text, expected, tmp_path):
    f = tmp_path / "orchestrator.toml"
    f.write_text(text)
    out = _cli("orchestrator", "--config", str(f))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(f) in out.stderr and expected in out.stderr, out.stderr


# -- one-shot commands and an unreachable or empty broker -----------------------------------------------------
@pytest.mark.parametrize("argv", [["task", "How full is bus 42?"], ["cms", "query", "--need", "bus"]])
def test_unreachable_broker_is_reported_within_seconds(argv):
    url = f"mqtt://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    out = _cli(*argv, env={"EDGECOOP_BROKER": url})
    assert time.monotonic() - start < 9  # 5 s connect budget plus the interpreter
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"broker {url} (from env EDGECOOP_BROKER)" in out.stderr
    assert f"could not connect to {url}" in out.stderr


def test_task_without_an_orchestrator_says_so(settings, topics):
    start = time.monotonic()
    out = _cli("task", "--broker", settings.url, "--prefix", topics.prefix, "How full is bus 42?")
    assert time.monotonic() - start < 9
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"no orchestrator is online on {settings.url} under prefix {topics.prefix!r}" in out.stderr


def test_cms_query_on_an_empty_broker_exits_1(settings, topics):
    out = _cli("cms", "query", "--broker", settings.url, "--prefix", topics.prefix, "--need", "bus")
    assert out.returncode == 1
    assert f"no agents are registered on {settings.url} under prefix {topics.prefix!r}" in out.stderr


def test_tls_files_for_an_unreadable_ca_are_a_config_error(tmp_path):
    out = _cli("cms", "query", "--broker", "mqtts://localhost:8883",
               env={"EDGECOOP_CA_FILE": str(tmp_path / "missing-ca.pem")})  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr and "missing-ca.pem" in out.stderr


async def test_dashboard_on_a_busy_port_is_a_message(settings, topics):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = await asyncio.to_thread(
            _cli, "dashboard", "--broker", settings.url, "--prefix", topics.prefix, "--port", str(port)
        )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"the dashboard cannot listen on 127.0.0.1:{port}" in out.stderr


def test_version():
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("edgecoop 0.")


def test_the_readme_agent_example_is_a_valid_file(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Configuration", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    f = tmp_path / "air-park.toml"
    f.write_text(block)
    cfg = load_agent_config(f)
    assert cfg.agent_id == "air-park" and cfg.broker.tls and cfg.broker.ca_file == "/etc/edgecoop/ca.crt"


# -- loud when it matters -------------------------------------------------------------------------------------
class _Seen(logging.Handler):
    """Sets an event when a WARNING containing ``text`` is logged (the test waits on it, not on a sleep)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text, self.loop, self.event = text, asyncio.get_running_loop(), asyncio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.messages.append(message)
            self.loop.call_soon_threadsafe(self.event.set)


async def test_connection_loss_and_reconnect_are_warnings(private_broker):
    from edgecoop.connection import Connection

    log = logging.getLogger("edgecoop.connection")
    lost, back = _Seen("lost"), _Seen("reconnected")
    log.addHandler(lost)
    log.addHandler(back)
    try:
        async with Connection(BrokerSettings(port=private_broker.port, keepalive=5), "loud", clean_start=True):
            await asyncio.to_thread(private_broker.stop)
            await asyncio.wait_for(lost.event.wait(), 15)
            await asyncio.to_thread(private_broker.start)
            await asyncio.wait_for(back.event.wait(), 30)
    finally:
        log.removeHandler(lost)
        log.removeHandler(back)
    assert f"loud: connection to {private_broker.url} lost" in lost.messages[0]
    assert back.messages[0].startswith(f"loud: reconnected to {private_broker.url} after ")
