"""Mosquitto configurations, generated so they always match the topic contract in :mod:`edgecoop.topics`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgecoop.topics import DEFAULT_PREFIX, validate_id, validate_prefix

__all__ = ["bridge_config", "development_config", "production_acl", "production_config"]

# Explicit limits instead of Mosquitto's defaults; our payload cap is 256 KiB (edgecoop.wire.MAX_PAYLOAD).
# max_queued_messages also bounds the retained burst a late joiner receives (a card and a status per agent):
# keep it above twice the number of agents, or a CMS mirror silently misses cards (field notes: drops are silent).
_LIMITS = """\
max_packet_size 1048576
max_inflight_messages 20
max_queued_messages 50000
max_queued_bytes 134217728
max_keepalive 120
set_tcp_nodelay true
"""


def development_config(
    port: int,
    *,
    host: str = "127.0.0.1",
    data_dir: Path | None = None,
    websockets_port: int | None = None,
    persistence: bool = False,
    log_file: Path | None = None,
) -> str:
    """Loopback-only, anonymous broker for the demo and tests."""
    lines = [
        "# edgecoop development broker: loopback only, anonymous, MQTT 5 clients",
        "per_listener_settings false",
        "allow_anonymous true",
        f"listener {port} {host}",
        "protocol mqtt",
    ]
    if websockets_port:
        lines += [f"listener {websockets_port} {host}", "protocol websockets"]
    lines.append(_LIMITS.rstrip())
    lines.append("sys_interval 1")
    if persistence and data_dir is not None:
        lines += [
            "persistence true",
            f"persistence_location {data_dir}/",
            "autosave_interval 1",
            "autosave_on_changes true",
        ]
    else:
        lines.append("persistence false")
    if log_file is not None:
        lines += [f"log_dest file {log_file}", "log_type error", "log_type warning", "log_type notice"]
    else:
        lines.append("log_dest none")
    return "\n".join(lines) + "\n"


def production_config(
    *,
    port: int = 1883,
    websockets_port: int | None = 9001,
    tls_port: int | None = 8883,
    etc_dir: str = "/etc/mosquitto",
    data_dir: str = "/var/lib/mosquitto",
    a2a_port: int | None = None,
) -> str:
    """A Pi-ready broker: passwords, per-agent ACL, client id = username, durable persistence, a TLS listener.

    The TLS listener's certificate and key are ``{etc_dir}/certs/edgecoop-server.crt`` / ``.key`` (systemd/install.sh
    makes them, with a CA of its own, when they do not exist; docs/deployment.md shows the openssl commands).
    ``a2a_port``: also a loopback listener for ``edgecoop a2a-gateway``, the one listener without
    ``use_username_as_clientid`` (the gateway needs a client id per agent it fronts; docs/interop.md).
    """
    a2a = (
        f"""
# the A2A gateway (edgecoop a2a-gateway --broker mqtt://127.0.0.1:{a2a_port}): one connection per agent it fronts,
# each with the client id the A2A binding requires ({{org}}/{{unit}}/{{agent}}), so no use_username_as_clientid here.
# Loopback only: passwords and the ACL apply as everywhere, but a local client could pick another's client id.
listener {a2a_port} 127.0.0.1
protocol mqtt
"""
        if a2a_port
        else ""
    )
    ws = (
        f"\n# dashboards (browser MQTT over websockets); same passwords and ACL\nlistener {websockets_port}\n"
        "protocol websockets\nuse_username_as_clientid true\n"
        if websockets_port
        else ""
    )
    tls = (
        f"""
# MQTT over TLS (mqtts://host:{tls_port}) for agents on other machines: passwords never cross the network in clear.
# Clients check this certificate against the CA that signed it (install.sh: /etc/edgecoop/ca.crt) and its host name.
listener {tls_port}
protocol mqtt
certfile {etc_dir}/certs/edgecoop-server.crt
keyfile {etc_dir}/certs/edgecoop-server.key
use_username_as_clientid true
"""
        if tls_port
        else ""
    )
    return f"""\
# edgecoop production broker (drop into /etc/mosquitto/conf.d/edgecoop.conf)
per_listener_settings false
allow_anonymous false
password_file {etc_dir}/edgecoop.passwd
acl_file {etc_dir}/edgecoop.acl

listener {port}
protocol mqtt
# a client may only use its own username as client id: no client-id takeover of another agent
# (a listener option: placed before any listener, Mosquitto would open an extra default listener)
use_username_as_clientid true
{tls}{ws}{a2a}
# PUBACK is not "on disk": save on every change so a power cut loses nothing acknowledged
persistence true
# persistence_location is set by Debian's /etc/mosquitto/mosquitto.conf (a second one is fatal);
# for a standalone config uncomment:
# persistence_location {data_dir}/
autosave_interval 1
autosave_on_changes true

{_LIMITS}
# offline clients' sessions (agents use clean_start=False) are kept for a day at most
persistent_client_expiration 1d
# the orchestrator's overload alarm watches $SYS/broker/publish/messages/dropped: detection takes up to this
sys_interval 2
log_type error
log_type warning
log_type notice
connection_messages true
"""


def production_acl(*, prefix: str = DEFAULT_PREFIX, admins: Sequence[str] = ("orchestrator", "cms")) -> str:
    """ACL: each agent (username = agent id) writes only its own card, status, data and replies."""
    validate_prefix(prefix)
    for a in admins:
        validate_id(a, "admin user")
    p = prefix
    admin_blocks = "\n".join(
        f"""user {a}
topic readwrite {p}/#
topic read $SYS/#
"""
        for a in admins
    )
    return f"""\
# edgecoop ACL. %u is the MQTT username, which is also the agent id and the client id.
# Agents: write their own card/status/data, read requests addressed to them, answer on reply topics,
# ask other agents (request topics, pools) and read the CMS (cards and status of everyone).
pattern write {p}/agents/%u/card
pattern write {p}/agents/%u/status
pattern write {p}/agents/%u/data/#
pattern read {p}/agents/%u/req/#
# acknowledgements of its durable results (written by the orchestrator): without them the outbox never empties
pattern read {p}/agents/%u/ack
pattern readwrite {p}/reply/%u
pattern write {p}/reply/+
pattern write {p}/agents/+/req/#
pattern write {p}/pool/#
pattern read {p}/pool/#
pattern read {p}/agents/+/card
pattern read {p}/agents/+/status
pattern read {p}/agents/+/data/#
pattern write {p}/tasks/submit
pattern read {p}/tasks/events/#
# orchestrators' online status and overload alarms: `edgecoop task` waits for one online, dashboards show them
pattern read {p}/orchestrators/+/status
pattern read {p}/orchestrators/+/alarm
# across sites (bridged): requests to us from other sites, our replies to their requesters
pattern read {p}/sites/+/agents/%u/req/#
pattern readwrite {p}/sites/+/reply/%u
pattern write {p}/sites/+/reply/+
pattern write {p}/sites/+/agents/+/req/#
# A2A over MQTT ($a2a/v1/..., docs/interop.md; a `#` filter never matches `$` topics, so these are named).
# Anyone may discover and ask; an agent (user = agent id) may publish only its own A2A card, in any org and unit;
# an A2A client whose user name is its spec client id {{org}}/{{unit}}/{{agent}} publishes its own card and reads
# only its own reply topics: the unit in a Response Topic is then the requester's real unit, which the gateway's
# site check of private agents and tasks relies on.
pattern read $a2a/v1/discovery/#
pattern write $a2a/v1/discovery/+/+/%u
pattern write $a2a/v1/discovery/%u
pattern write $a2a/v1/request/#
pattern read $a2a/v1/reply/%u/#

{admin_blocks}
# the A2A gateway (edgecoop a2a-gateway): A2A cards, requests and replies of every agent it fronts; the CMS, its
# agents and the task contract (it opens one connection per fronted agent, client id {{org}}/{{unit}}/{{agent}}:
# it connects to the loopback listener without use_username_as_clientid, --print-config production --a2a-listener)
user a2a-gateway
topic readwrite $a2a/v1/#
topic readwrite {p}/#
"""


def bridge_config(
    *,
    name: str,
    site: str,
    remote_host: str,
    remote_port: int,
    prefix: str = DEFAULT_PREFIX,
    username: str | None = None,
    password: str | None = None,
    keepalive: int = 15,
    restart_timeout: tuple[int, int] = (1, 10),
) -> str:
    """Bridge one site's broker to the regional/cloud hub (append it to the site broker's config).

    What crosses (docs/scaling.md has the diagram):

    * cards and status, retained, both ways: every site's CMS sees every agent, with its ``site``;
    * ``<prefix>/sites/<site>/#`` *in*: requests to this site's agents and replies to its requesters;
    * ``<prefix>/sites/#`` *out*: this site's requests to other sites' agents and its replies to other
      sites' requesters (the hub forwards each only to the one site it names);
    * task events out, for a regional dashboard.

    Mosquitto bridges keep the MQTT 5 Response Topic as it is (upstream #1896), so a cross-site request
    carries a Response Topic that routes back by itself: ``<prefix>/sites/<requester's site>/reply/<client>``.
    Local requests and replies (``<prefix>/agents/.../req``, ``<prefix>/reply/...``) and sensor data never
    cross. A v5 bridge subscribes with No Local on both ends, so nothing comes back the way it went: no loops,
    no duplicates (tests/test_bridges.py counts them).
    """
    validate_id(name, "bridge name")
    validate_id(site, "site")
    validate_prefix(prefix)
    if not remote_host or any(c.isspace() for c in remote_host):
        raise ValueError(f"bad remote host {remote_host!r}")
    p = prefix
    creds = f"remote_username {username}\nremote_password {password}\n" if username else ""
    base, cap = restart_timeout
    return f"""\
# edgecoop bridge from site {site} to {remote_host}:{remote_port}
connection {name}
address {remote_host}:{remote_port}
bridge_protocol_version mqttv50
cleansession false
local_clientid bridge-{name}-local
remote_clientid bridge-{name}
try_private true
keepalive_interval {keepalive}
restart_timeout {base} {cap}
{creds}# discovery state (retained) in both directions
topic {p}/agents/+/card both 1
topic {p}/agents/+/status both 1
# cross-site request/response: what is addressed to this site comes in, what is addressed elsewhere goes out
topic {p}/sites/{site}/# in 1
topic {p}/sites/# out 1
topic {p}/tasks/events/# out 0
"""
