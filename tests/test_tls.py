"""mqtts:// means TLS: the broker's certificate and host name are checked, client certificates work, and nothing
ever falls back to plain text. A throwaway CA is made with openssl for this module, and a Mosquitto with two TLS
listeners (one also requiring a client certificate) runs on loopback ports of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgecoop.agents import Agent
from edgecoop.agents.config import config_from_dict
from edgecoop.broker import MosquittoProcess
from edgecoop.broker.manager import free_port
from edgecoop.connection import BrokerSettings, Connection
from edgecoop.errors import ConfigError, ConnectError
from edgecoop.rpc import Requester
from edgecoop.topics import Topics

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)  # fmt: skip
    return d / f"{name}.crt", d / f"{name}.key"


def issue(d: Path, ca: tuple[Path, Path], name: str, san: str, usage: str) -> tuple[Path, Path]:
    """A certificate signed by ``ca`` with subjectAltName ``san``: (certificate, key)."""
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)  # fmt: skip
    return d / f"{name}.crt", d / f"{name}.key"


@dataclass
class TlsBroker:
    port: int  # TLS, any client with a trusted CA
    mtls_port: int  # TLS, and a client certificate signed by the CA is required
    ca: Path
    other_ca: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[TlsBroker]:
    # not under pytest's tmp dir: as root, Mosquitto drops to the mosquitto user, who cannot enter that (0700)
    d = Path(tempfile.mkdtemp(prefix="edgecoop-pki-"))
    try:
        yield from _tls_broker(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _tls_broker(d: Path) -> Iterator[TlsBroker]:
    ca = make_ca(d, "edgecoop-test-ca")
    other_ca = make_ca(d, "somebody-else-ca")
    server = issue(d, ca, "broker", "DNS:localhost", "serverAuth")  # names localhost only, not 127.0.0.1
    client = issue(d, ca, "air-park", "DNS:air-park", "clientAuth")
    port, mtls_port = free_port(), free_port()
    tls = f"cafile {ca[0]}\ncertfile {server[0]}\nkeyfile {server[1]}\ntls_version tlsv1.2\n"
    config = (
        "per_listener_settings false\nallow_anonymous true\npersistence false\nlog_dest none\n"
        f"listener {port} 127.0.0.1\nprotocol mqtt\n{tls}require_certificate false\n"
        f"listener {mtls_port} 127.0.0.1\nprotocol mqtt\n{tls}require_certificate true\n"
    )
    if os.geteuid() == 0:  # Mosquitto drops to the mosquitto user: it must read the key files
        for p in d.iterdir():
            p.chmod(0o644)
        d.chmod(0o755)
    with MosquittoProcess(port, config_text=config, workdir=d / "broker"):
        yield TlsBroker(port, mtls_port, ca[0], other_ca[0], *client)


def settings(url: str, **kw: object) -> BrokerSettings:
    return BrokerSettings.from_url(url, keepalive=5, **kw)


async def test_agent_and_requester_over_tls(tls_broker):
    topics = Topics(f"t{uuid.uuid4().hex[:8]}/v1")
    s = settings(f"mqtts://localhost:{tls_broker.port}", ca_file=str(tls_broker.ca))
    assert s.tls and s.url == f"mqtts://localhost:{tls_broker.port}"
    cfg = config_from_dict({"agent": {"id": "echo-tls"}, "capabilities": [{"kind": "echo"}]}, broker=s,
                           prefix=topics.prefix)  # fmt: skip
    cid = f"tc-{uuid.uuid4().hex[:8]}"
    conn = Connection(s, cid, subscriptions=[Requester.subscription(topics, cid)], clean_start=True)
    req = Requester(conn, topics)
    conn._handler = req.handle
    async with Agent(cfg), conn:
        reply = await req.request("echo-tls", "echo", {"text": "over TLS"}, timeout=10)
    assert reply.ok and reply.result["echo"]["text"] == "over TLS"


async def test_client_certificate(tls_broker):
    url = f"mqtts://localhost:{tls_broker.mtls_port}"
    with_cert = settings(url, ca_file=str(tls_broker.ca), cert_file=str(tls_broker.client_cert),
                         key_file=str(tls_broker.client_key))  # fmt: skip
    async with Connection(with_cert, "air-park", connect_timeout=5) as conn:
        assert conn.connected.is_set()
    with pytest.raises(ConnectError):
        async with Connection(settings(url, ca_file=str(tls_broker.ca)), "no-cert", connect_timeout=2):
            pass


@pytest.mark.parametrize("case", ["wrong host name", "unknown CA"])
async def test_an_unverified_broker_is_refused_at_once(tls_broker, case):
    if case == "wrong host name":  # the certificate names localhost, not 127.0.0.1
        s = settings(f"mqtts://127.0.0.1:{tls_broker.port}", ca_file=str(tls_broker.ca))
    else:
        s = settings(f"mqtts://localhost:{tls_broker.port}", ca_file=str(tls_broker.other_ca))
    start = time.monotonic()
    with pytest.raises(ConnectError, match=r"TLS to .* failed: .*CERTIFICATE_VERIFY_FAILED") as err:
        async with Connection(s, f"c-{uuid.uuid4().hex[:6]}", connect_timeout=10):
            pass
    assert time.monotonic() - start < 5  # not retried until the connect timeout: the same certificate fails again
    if case == "wrong host name":
        assert "mismatch" in str(err.value) and "must name '127.0.0.1'" in str(err.value)
    else:
        assert f"signed by {tls_broker.other_ca}?" in str(err.value)


async def test_mqtts_never_falls_back_to_plain_text(broker):
    """A plain listener behind an mqtts:// URL: no connection, rather than credentials in clear text."""
    s = BrokerSettings.from_url(f"mqtts://127.0.0.1:{broker.port}", username="air-park", password="s3cret")  # noqa: S106
    with pytest.raises(ConnectError):
        async with Connection(s, "air-park", connect_timeout=2):
            pass


async def test_plain_mqtt_to_a_tls_listener_does_not_connect(tls_broker):
    with pytest.raises(ConnectError):
        async with Connection(settings(f"mqtt://localhost:{tls_broker.port}"), "plain", connect_timeout=2):
            pass


def test_tls_settings_from_urls_and_files(tmp_path):
    s = BrokerSettings.from_url("mqtts://hub.local", ca_file="/etc/edgecoop/ca.crt")
    assert (s.port, s.tls, s.ca_file) == (8883, True, "/etc/edgecoop/ca.crt")
    assert BrokerSettings.from_url("mqtt://hub.local", ca_file="x").ca_file is None  # the scheme decides
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        BrokerSettings.from_url("mqtts://hub.local", ca_file=str(tmp_path / "missing.pem")).ssl_context()
    ctx = BrokerSettings.from_url("mqtts://hub.local").ssl_context()
    assert ctx is not None and ctx.check_hostname and ctx.verify_mode.name == "CERT_REQUIRED"


def test_cli_over_tls(tls_broker):
    """The CLI takes TLS files from the environment (what install.sh's edgecoop.env sets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECOOP_")}
    env |= {"EDGECOOP_BROKER": f"mqtts://localhost:{tls_broker.port}", "EDGECOOP_CA_FILE": str(tls_broker.ca)}
    out = subprocess.run([sys.executable, "-m", "edgecoop.cli", "cms", "query", "--prefix", "nobody/v1"],
                         capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert out.returncode == 1, out.stderr  # connected over TLS; nothing registered under that prefix
    assert f"broker mqtts://localhost:{tls_broker.port} (from env EDGECOOP_BROKER, CA {tls_broker.ca})" in out.stderr
