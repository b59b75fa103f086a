"""Typed settings files: one frozen dataclass per TOML table, checked key by key before anything runs.

A settings file is read with :func:`read_toml` and each table turned into its model with :func:`from_table`, which
refuses unknown keys (suggesting the closest known one), wrong types and missing required keys with a
:class:`~edgecoop.errors.ConfigError` that names the file, the table, the key and what was expected::

    /etc/edgecoop/air-park.toml: [broker] keepalive: expected an integer, got 'ten' (a string)
    /etc/edgecoop/air-park.toml: unknown table [brokr] (did you mean [broker]?); known: [agent], [broker], ...

Supported field types: ``str``, ``int``, ``float`` (an integer is accepted), ``bool``, ``X | None``, ``Literal[...]``,
``tuple[X, ...]``, ``dict[str, X]`` (``dict[str, Any]`` for free-form option tables), nested dataclasses (a table)
and tuples of them (an array of tables). The broker of every command is resolved here too, with where it came
from (:func:`resolve_broker`), so that the command line, the files and the environment mean the same everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from edgecoop.connection import BrokerSettings
from edgecoop.errors import ConfigError
from edgecoop.topics import DEFAULT_PREFIX, validate_prefix

__all__ = [
    "DEFAULT_BROKER",
    "ORCHESTRATOR_TABLES",
    "BrokerTable",
    "OrchestratorTable",
    "check_tables",
    "from_table",
    "read_toml",
    "resolve_broker",
    "resolve_metrics",
]

T = TypeVar("T")

#: the broker used when neither a flag, a file nor EDGECOOP_BROKER names one
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def read_toml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Parse a TOML file; unreadable or invalid files are a :class:`ConfigError` naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} file {p} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file {p}: {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc


def _describe(value: object) -> str:
    kinds = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", dict: "a table",
             list: "an array"}  # fmt: skip
    shown = repr(value) if not isinstance(value, dict | list) else ""
    kind = kinds.get(type(value), type(value).__name__)
    return f"{shown} ({kind})" if shown else kind


def _unknown(key: str, known: list[str], what: str = "key", fmt: str = "{!r}") -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {fmt.format(close[0])}?)" if close else ""
    listing = ", ".join(fmt.format(k) for k in known) or "none"
    return f"unknown {what} {fmt.format(key)}{hint}; known: {listing}"


def check_tables(data: Mapping[str, Any], known: Mapping[str, str], where: str) -> None:
    """Refuse top-level tables not in ``known`` (name -> "table" or "array of tables") and wrong shapes."""
    for name, value in data.items():
        if name not in known:
            raise ConfigError(f"{where}: {_unknown(name, list(known), 'table', '[{}]')}")
        if known[name] == "table" and not isinstance(value, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, got {_describe(value)}")
        if known[name] == "array of tables" and not (
            isinstance(value, list) and all(isinstance(v, dict) for v in value)
        ):
            raise ConfigError(f"{where}: {name} must be an array of tables ([[{name}]]), got {_describe(value)}")


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_expected(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return f"an array of {_expected(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or (dataclasses.is_dataclass(tp)):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{where}: expected {_expected(tp)}, got {_describe(value)}")
    if tp is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message (a table's unknown key, say)
            return _convert(value, options[0], where)
        for option in options:
            try:
                return _convert(value, option, where)
            except ConfigError:
                continue
        raise wrong
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise wrong
    if origin is tuple:
        if not isinstance(value, list):
            raise wrong
        item = typing.get_args(tp)[0]
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        item = typing.get_args(tp)[1]
        return {k: _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise wrong
        return from_table(tp, value, where)
    raise TypeError(f"settings field type {tp!r} is not supported")  # a bug in a model, not in a file


def from_table(cls: type[T], table: Mapping[str, Any], where: str) -> T:
    """Build the dataclass ``cls`` from a TOML table, refusing unknown keys, wrong types and missing keys.

    ``where`` names the table in messages, e.g. ``"/etc/edgecoop/air-park.toml: [broker]"``; a field's
    ``metadata["key"]`` renames it in the file (``id`` for ``agent_id``).
    """
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls) if f.init}
    for key in table:
        if key not in fields:
            raise ConfigError(f"{where}: {_unknown(key, list(fields))}")
    values: dict[str, Any] = {}
    for key, f in fields.items():
        if key in table:
            values[f.name] = _convert(table[key], hints[f.name], f"{where} {key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing key {key!r} ({_expected(hints[f.name])})")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


# -- the broker: [broker] tables, flags and the environment ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class BrokerTable:
    """A ``[broker]`` table (agent and orchestrator files)."""

    #: mqtt://host[:port] or mqtts://host[:port] (TLS); default EDGECOOP_BROKER, else mqtt://127.0.0.1:1883
    url: str | None = None
    username: str | None = None
    password: str | None = None
    #: a file holding the password (relative to the config file); default EDGECOOP_PASSWORD
    password_file: str | None = None
    keepalive: int = 10
    session_expiry_s: int = 3600
    prefix: str = DEFAULT_PREFIX
    #: mqtts: the CA certificate(s) that signed the broker's certificate (default: the system's CAs)
    ca_file: str | None = None
    #: mqtts: a client certificate and its key, for brokers that require one
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.keepalive <= 65535:
            raise ConfigError(f"keepalive must be 1..65535 seconds, not {self.keepalive}")
        if self.session_expiry_s < 0:
            raise ConfigError(f"session_expiry_s must be >= 0, not {self.session_expiry_s}")
        if self.password is not None and self.password_file is not None:
            raise ConfigError("give password or password_file, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file and key_file go together")
        validate_prefix(self.prefix)


def _path(value: str | None, base: Path | None) -> str | None:
    if not value:
        return None
    p = Path(value).expanduser()
    return str(base / p if base is not None and not p.is_absolute() else p)


def resolve_broker(
    *,
    flag: str | None = None,
    table: BrokerTable | None = None,
    source: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> BrokerSettings:
    """The broker a command uses, and where each part came from (``BrokerSettings.origin``).

    The URL: ``--broker`` flag, else the file's ``[broker] url``, else ``EDGECOOP_BROKER``, else the default.
    Credentials: the URL's ``user:pass@``, else the file's ``username`` / ``password`` / ``password_file``, else
    ``EDGECOOP_USERNAME`` / ``EDGECOOP_PASSWORD`` (what install.sh's credential files set). A flag replaces only the
    address: the file's credentials and TLS files stay. TLS files: the file, else ``EDGECOOP_CA_FILE``,
    ``EDGECOOP_CERT_FILE``, ``EDGECOOP_KEY_FILE``.
    """
    env = os.environ if env is None else env
    t = table or BrokerTable()
    here = f"{source}: [broker]" if source else "[broker]"
    if flag:
        url, origin = flag, "--broker"
    elif t.url:
        url, origin = t.url, f"{here} url"
    elif env.get("EDGECOOP_BROKER"):
        url, origin = env["EDGECOOP_BROKER"], "env EDGECOOP_BROKER"
    else:
        url, origin = DEFAULT_BROKER, "default: no --broker, no [broker] url, no EDGECOOP_BROKER"
    base = source.parent if source else None
    password = t.password
    if t.password_file:
        pf = Path(_path(t.password_file, base) or "")
        try:
            password = pf.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{here} password_file: cannot read {pf}: {exc.strerror or exc}") from exc
    try:
        return BrokerSettings.from_url(
            url,
            username=t.username or env.get("EDGECOOP_USERNAME") or None,
            password=password or env.get("EDGECOOP_PASSWORD") or None,
            keepalive=t.keepalive,
            session_expiry_s=t.session_expiry_s,
            ca_file=_path(t.ca_file, base) or env.get("EDGECOOP_CA_FILE") or None,
            cert_file=_path(t.cert_file, base) or env.get("EDGECOOP_CERT_FILE") or None,
            key_file=_path(t.key_file, base) or env.get("EDGECOOP_KEY_FILE") or None,
            origin=origin,
        )
    except ConfigError as exc:
        raise ConfigError(f"broker URL from {origin}: {exc}") from exc


# -- the metrics exporter of headless services ---------------------------------------------------------------
def resolve_metrics(
    port: int | None, host: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[str, int] | None:
    """Where ``/metrics`` is served: ``--metrics-port`` (else EDGECOOP_METRICS_PORT; unset = not served) on
    ``--metrics-host`` (else EDGECOOP_METRICS_HOST, else loopback: the numbers name agents and clients)."""
    env = os.environ if env is None else env
    if port is None:
        raw = env.get("EDGECOOP_METRICS_PORT", "").strip()
        if not raw:
            return None
        try:
            port = int(raw)
        except ValueError as exc:
            raise ConfigError(f"EDGECOOP_METRICS_PORT: expected a port number, got {raw!r}") from exc
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics port {port}: expected 0..65535 (0 = any free port)")
    return (host or env.get("EDGECOOP_METRICS_HOST") or "127.0.0.1"), port


# -- the orchestrator's file (``edgecoop orchestrator --config``) ------------------------------------------------
@dataclass(frozen=True, slots=True)
class OrchestratorTable:
    """The ``[orchestrator]`` table; each key is also a command-line flag, which wins over the file."""

    id: str = "orchestrator"
    #: a scheduling strategy name (checked against the orchestrator's list by the CLI)
    strategy: str = "capability-aware"
    classifier: Literal["rule", "slm"] = "rule"
    model: str = "smollm2-135m"
    #: SQLite file for task states and results (relative to the working directory)
    db: str = "tasks.db"
    summarize: bool = False
    site: str | None = None
    #: network cost of reaching other sites, ``{ district-2 = 1, cloud = 10 }``
    site_costs: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the privacy floor of every task this orchestrator runs (a health hub: "private"); unset = derived per task
    privacy: Literal["public", "site", "private"] | None = None
    #: join a pool of orchestrators of this name: a shared subscription to the submit topic and a task log on the
    #: broker, so each task runs on one member and survives the member's death (docs/scaling.md)
    pool: str | None = None
    #: how long the pool's task log keeps a task's claim and result on the broker (re-sends are answered from it)
    pool_log_expiry_s: float = 600.0


#: the tables an orchestrator file may have
ORCHESTRATOR_TABLES = {"orchestrator": "table", "broker": "table", "admission": "table"}
