"""The ``edgecoop`` command line. Every subcommand has help text (checked by tests/test_cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edgecoop import __version__
from edgecoop.connection import BrokerSettings
from edgecoop.errors import ConfigError, EdgecoopError
from edgecoop.settings import DEFAULT_BROKER, resolve_broker, resolve_metrics
from edgecoop.topics import DEFAULT_PREFIX, Topics

__all__ = ["main"]

#: how long one-shot commands (task, cms query) try to reach the broker before they say it is unreachable
CLI_CONNECT_TIMEOUT_S = 5.0


def _broker(args: argparse.Namespace) -> BrokerSettings:
    """--broker, else EDGECOOP_BROKER, else the default; credentials and TLS files from the environment."""
    return resolve_broker(flag=args.broker)


def _say_broker(broker: BrokerSettings) -> None:
    """One-shot commands name the broker they use (stderr: stdout stays the answer, e.g. JSON)."""
    print(f"edgecoop: broker {broker.describe()}", file=sys.stderr, flush=True)


def _add_broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker",
        default=None,
        help=f"broker URL mqtt://[user:pass@]host[:port] or mqtts://... for TLS (default: env EDGECOOP_BROKER, else "
        f"{DEFAULT_BROKER}; credentials from EDGECOOP_USERNAME/EDGECOOP_PASSWORD, TLS files from EDGECOOP_CA_FILE, "
        "EDGECOOP_CERT_FILE, EDGECOOP_KEY_FILE)",
    )
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic namespace prefix (default {DEFAULT_PREFIX})")


def _add_metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = a free port; default: env "
                   "EDGECOOP_METRICS_PORT, else not served)")  # fmt: skip
    p.add_argument(
        "--metrics-host",
        default=None,
        metavar="HOST",
        help="address of the metrics endpoint (default: env EDGECOOP_METRICS_HOST, else 127.0.0.1)",
    )


@contextlib.contextmanager
def _serve_metrics(args: argparse.Namespace, register: Callable[[Any], None]) -> Iterator[None]:
    """Serve /metrics on its own thread while the service runs, when --metrics-port (or the environment) asks."""
    address = resolve_metrics(args.metrics_port, args.metrics_host)
    if address is None:
        yield
        return
    from edgecoop.metrics import Metrics

    metrics = Metrics()
    register(metrics)
    host, port = address
    with contextlib.ExitStack() as stack:
        try:
            bound = stack.enter_context(metrics.serve(port, host))
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} (choose another "
                              "--metrics-port)") from exc  # fmt: skip
        print(f"metrics on http://{host}:{bound}/metrics", flush=True)
        yield


# -- broker --------------------------------------------------------------------------------------------
def cmd_broker(args: argparse.Namespace) -> int:
    from edgecoop.broker import (
        MosquittoProcess,
        bridge_config,
        development_config,
        production_acl,
        production_config,
    )

    if args.print_config:
        kind = args.print_config
        if kind == "development":
            print(development_config(args.port or 1883, websockets_port=args.websockets_port), end="")
        elif kind == "production":
            tls_port = 8883 if args.tls_port is None else args.tls_port or None
            print(production_config(port=args.port or 1883, websockets_port=args.websockets_port or 9001,
                                    tls_port=tls_port, a2a_port=args.a2a_listener), end="")  # fmt: skip
        elif kind == "acl":
            print(production_acl(prefix=args.prefix), end="")
        elif kind == "bridge":
            if not (args.remote and args.site):
                print("--print-config bridge needs --site and --remote HOST:PORT", file=sys.stderr)
                return 2
            host, _, port = args.remote.partition(":")
            print(
                bridge_config(
                    name=f"{args.site}-uplink",
                    site=args.site,
                    remote_host=host,
                    remote_port=int(port or 1883),
                    prefix=args.prefix,
                ),
                end="",
            )
        return 0
    broker = MosquittoProcess(args.port, websockets_port=args.websockets_port, persistence=args.persistence)
    broker.start()
    print(f"edgecoop broker (mosquitto pid {broker.pid}) listening on {broker.url}", flush=True)
    if args.websockets_port:
        print(f"websockets listener on ws://127.0.0.1:{args.websockets_port}", flush=True)
    try:
        _wait_for_signal()
    finally:
        broker.cleanup()
        print("broker stopped", flush=True)
    return 0


def _wait_for_signal() -> None:
    got = []

    def _stop(signum: int, frame: object) -> None:
        got.append(signum)

    old = signal.signal(signal.SIGTERM, _stop)
    try:
        while not got:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)


# -- agent ---------------------------------------------------------------------------------------------
def cmd_agent(args: argparse.Namespace) -> int:
    from edgecoop.agents import Agent, load_agent_config

    # --broker replaces the address only: the file's credentials and TLS files stay
    config = load_agent_config(args.config, broker_url=args.broker)

    async def run() -> None:
        async with Agent(config) as agent:
            if args.deregister:
                await agent.deregister()
                print(f"agent {agent.agent_id} deregistered")
                return
            print(f"agent {agent.agent_id} online at {config.broker.describe()}", flush=True)
            from edgecoop.systemd import notify_ready, watchdog_loop

            with _serve_metrics(args, agent.register_metrics):
                notify_ready()
                await asyncio.gather(agent.serve_forever(), watchdog_loop())

    return _run_async(run)


def _run_async(fn: Callable[[], Any]) -> int:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await fn()

    asyncio.run(main())
    return 0


# -- cms -----------------------------------------------------------------------------------------------
def cmd_cms_query(args: argparse.Namespace) -> int:
    from edgecoop.cms import DiscoveryQuery
    from edgecoop.cms.mirror import CmsMirror
    from edgecoop.cms.sites import SiteCosts, parse_site_costs

    costs = SiteCosts(args.from_site, parse_site_costs(args.site_costs or []))
    q = DiscoveryQuery(
        need=args.need or "", kind=args.kind, modality=args.modality, domain=args.domain, site=args.site,
        cooperation=args.cooperation, online_only=not args.all, limit=args.limit,
    )  # fmt: skip

    broker = _broker(args)
    _say_broker(broker)
    found = []

    async def run() -> None:
        async with CmsMirror(broker, topics=Topics(args.prefix), connect_timeout=CLI_CONNECT_TIMEOUT_S) as mirror:
            await mirror.sync()
            matches = await mirror.discover(q)
            snapshot = await mirror.snapshot()
        found.append(len(snapshot))
        if not snapshot:  # connected, but nothing registered here: a wrong broker or prefix, most likely
            return
        if args.json:
            print(json.dumps([{**m.to_dict(), "online": snapshot.get(m.agent_id, {}).get("online")}
                              | (costs.annotate(m.card) if args.from_site else {}) for m in matches]))  # fmt: skip
            return
        if not matches:
            print("no matching agents")
        for m in matches:
            caps = ", ".join(f"{c['name']}({c['kind']})" for c in m.card.get("capabilities", []))
            online = "online" if snapshot.get(m.agent_id, {}).get("online") else "offline"
            cost = f"cost {costs.cost(m.card.get('site')):<5g} " if args.from_site else ""
            print(f"{m.score:8.3f}  {m.agent_id:<24} {m.card.get('site', ''):<14} {cost}{online:<8} {caps}")
            if m.card.get("description"):
                print(f"          {m.card['description']}")

    _run_async(run)
    if found == [0]:
        print(f"edgecoop: no agents are registered on {broker.url} under prefix {args.prefix!r}", file=sys.stderr)
        return 1
    return 0


def cmd_cms_mirror(args: argparse.Namespace) -> int:
    from edgecoop.cms.mirror import CmsMirror

    broker = _broker(args)

    async def run() -> None:
        async with CmsMirror(broker, topics=Topics(args.prefix), db_path=args.db) as mirror:
            await mirror.sync()
            print(f"CMS mirror in sync at {args.db} ({await mirror.query(lambda s: s.count())} agents), broker "
                  f"{broker.describe()}", flush=True)  # fmt: skip
            from edgecoop.systemd import notify_ready, watchdog_loop

            with _serve_metrics(args, mirror.register_metrics):
                notify_ready()
                await watchdog_loop()

    return _run_async(run)


# -- dashboard -----------------------------------------------------------------------------------------
def cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        from edgecoop.dashboard import Dashboard
    except ImportError as exc:  # the ASGI server is an extra
        raise ConfigError(
            f"the dashboard needs the dashboard extra: pip install 'edgecoop[dashboard]' ({exc})"
        ) from exc

    broker = _broker(args)

    async def run() -> None:
        async with contextlib.AsyncExitStack() as stack:
            try:
                dash = await stack.enter_async_context(Dashboard(broker, Topics(args.prefix), args.host, args.port))
            except OSError as exc:  # the port is taken (or not ours to bind): a message, not a traceback
                raise ConfigError(f"the dashboard cannot listen on {args.host}:{args.port}: {exc.strerror or exc} "
                                  "(choose another --port or EDGECOOP_DASHBOARD_PORT)") from exc  # fmt: skip
            print(f"edgecoop dashboard on {dash.url} (broker {broker.describe()}, prefix {args.prefix})", flush=True)
            from edgecoop.systemd import notify_ready, watchdog_loop

            notify_ready()
            await asyncio.gather(dash.serve_forever(), watchdog_loop())

    return _run_async(run)


# -- a2a gateway ---------------------------------------------------------------------------------------
def cmd_a2a_gateway(args: argparse.Namespace) -> int:
    from edgecoop.interop import A2AGateway

    broker = _broker(args)

    async def run() -> None:
        orchestrator = None if args.no_orchestrator else args.orchestrator
        async with A2AGateway(broker, topics=Topics(args.prefix), org=args.org, site=args.site, url=args.url,
                              orchestrator=orchestrator) as gw:  # fmt: skip
            print(f"A2A gateway: {gw.statistics()['endpoints']} agents on $a2a/v1/discovery/{args.org}/..., "
                  f"broker {broker.url}", flush=True)  # fmt: skip
            from edgecoop.systemd import notify_ready, watchdog_loop

            notify_ready()
            await watchdog_loop()

    return _run_async(run)


BENCHMARKS = ["rpc", "cms", "scheduling", "slm", "understanding", "scale", "a2a", "overload", "tasks", "writer",
              "cascade", "openworld"]  # fmt: skip


def _models_eval(args: argparse.Namespace) -> int:
    from edgecoop.benchmarks.modeleval import main as evaluate

    return evaluate(args)


# -- bench ---------------------------------------------------------------------------------------------
def cmd_knowledge_topics(args: argparse.Namespace) -> int:
    """Print a suggested ``topics`` list for a knowledge capability's options, from its documents."""
    from pathlib import Path

    from edgecoop.agents.handlers.knowledge import document_topics

    files: list[Path] = []
    for name in args.paths:
        p = Path(name)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".md", ".markdown", ".txt"))
        elif p.is_file():
            files.append(p)
    if not files:
        print("no .md/.txt documents found", file=sys.stderr)
        return 2
    topics = document_topics([f.read_text(encoding="utf-8") for f in files], limit=args.limit)
    print("topics = [" + ", ".join(f'"{t}"' for t in topics) + "]")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"edgecoop.benchmarks.{args.which}")
    result: dict[str, Any] = module.main(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


# -- orchestrator and tasks ---------------------------------------------------------------------------
_ORCH_DEFAULTS: dict[str, Any] = {
    "id": "orchestrator", "strategy": "capability-aware", "classifier": "rule", "model": "smollm2-135m",
    "db": "tasks.db", "summarize": False, "site": None, "site_costs": {}, "privacy": None, "pool": None,
    "pool_log_expiry_s": 600.0,
}  # fmt: skip


def _orchestrator_settings(args: argparse.Namespace) -> tuple[dict[str, Any], BrokerSettings, str]:
    """Flags override the TOML file (``--config``), which overrides the defaults; the file is checked key by key."""
    import dataclasses

    from edgecoop.orchestrator.admission import AdmissionSettings
    from edgecoop.orchestrator.strategies import STRATEGIES
    from edgecoop.settings import (
        ORCHESTRATOR_TABLES,
        BrokerTable,
        OrchestratorTable,
        check_tables,
        from_table,
        read_toml,
    )

    table, broker_table, path = OrchestratorTable(), BrokerTable(), None
    admission = AdmissionSettings()  # [admission]: bulkheads, queues, client rates, the cloud budget
    if args.config:
        path = Path(args.config)
        data = read_toml(path, "orchestrator config")
        check_tables(data, ORCHESTRATOR_TABLES, str(path))
        table = from_table(OrchestratorTable, data.get("orchestrator", {}), f"{path}: [orchestrator]")
        broker_table = from_table(BrokerTable, data.get("broker", {}), f"{path}: [broker]")
        admission = from_table(AdmissionSettings, data.get("admission", {}), f"{path}: [admission]")
        if table.strategy not in STRATEGIES:
            raise ConfigError(f"{path}: [orchestrator] strategy: expected one of {', '.join(sorted(STRATEGIES))}, "
                              f"got {table.strategy!r}")  # fmt: skip
    conf = dataclasses.asdict(table)
    settings = {
        k: getattr(args, k) if getattr(args, k) is not None else conf.get(k, d) for k, d in _ORCH_DEFAULTS.items()
    }
    settings["admission"] = admission
    broker = resolve_broker(flag=args.broker, table=broker_table, source=path)
    prefix = args.prefix or broker_table.prefix
    return settings, broker, prefix


def cmd_orchestrator(args: argparse.Namespace) -> int:
    from edgecoop.cms.sites import parse_site_costs
    from edgecoop.orchestrator import Orchestrator, Parser

    conf, broker, prefix = _orchestrator_settings(args)
    # "rule": the fast parser over the live vocabulary; "slm": plus the grammar-constrained model when it is unsure
    model_parser: Parser | None = None
    if conf["classifier"] == "slm":
        from edgecoop.models import resolve_model
        from edgecoop.orchestrator.modelparser import ModelParser

        model_parser = ModelParser(str(resolve_model(conf["model"])))
    parser_name = "fast+model" if model_parser else "fast"

    async def run() -> None:
        async with Orchestrator(
            broker, topics=Topics(prefix), orchestrator_id=conf["id"], strategy=conf["strategy"],
            model_parser=model_parser, db_path=conf["db"], summarize=bool(conf["summarize"]),
            site=conf["site"], site_costs=parse_site_costs(conf["site_costs"]), admission=conf["admission"],
            privacy_policy=conf["privacy"], pool=conf["pool"], pool_log_expiry_s=float(conf["pool_log_expiry_s"]),
        ) as orch:  # fmt: skip
            pool = f", pool {conf['pool']}" if conf["pool"] else ""
            print(
                f"orchestrator {conf['id']} ({conf['strategy']}, {parser_name} parser{pool}) on {broker.describe()}",
                flush=True,
            )
            from edgecoop.orchestrator.metrics import register_orchestrator
            from edgecoop.systemd import notify_ready, watchdog_loop

            with _serve_metrics(args, lambda metrics: register_orchestrator(metrics, orch)):
                notify_ready()
                await watchdog_loop()

    return _run_async(run)


def cmd_task(args: argparse.Namespace) -> int:
    from edgecoop.taskclient import TaskClient

    result: dict[str, Any] = {}
    broker = _broker(args)
    _say_broker(broker)

    async def run() -> None:
        # with a user name, the client id and reply topic are the user name: the production broker forces that
        # client id (use_username_as_clientid) and its ACL lets a user read only <prefix>/reply/<user name>
        async with TaskClient(broker, topics=Topics(args.prefix), client_id=broker.username or None,
                              connect_timeout=CLI_CONNECT_TIMEOUT_S) as client:  # fmt: skip
            await client.wait_for_orchestrator()  # none online: say so now, not after --timeout
            result.update(
                await client.submit(args.question, timeout=args.timeout, strategy=args.strategy, privacy=args.privacy,
                                    summarize=args.summarize or None)
            )  # fmt: skip

    _run_async(run)
    if not result:
        return 1
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(format_result(result))
    return 0 if result.get("state") == "done" else 1


def format_result(r: dict[str, Any]) -> str:
    agents = " -> ".join(
        f"{t['agent']}({t['capability']},{t['tier']},{t['ms']:.0f}ms)" for t in r.get("trace", []) if t.get("ok")
    )
    c = r.get("classification") or {}
    lines = [
        f"answer : {r.get('answer')}",
        f"state  : {r.get('state')}  tier: {r.get('tier')}  latency: {r.get('latency_ms', 0):.0f} ms  cost: {r.get('cost', 0)}",
        f"intent : {c.get('intent')} ({', '.join(c.get('cooperation', []))}; {r.get('plan', {}).get('shape')}; privacy {c.get('privacy')})",
        f"route  : {agents or '-'}",
    ]
    if r.get("reason"):
        lines.append(f"reason : {r['reason']}")
    return "\n".join(lines)


# -- demo ----------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from edgecoop.scenarios.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecoop",
        description="edgecoop: collaborative generative AI at the edge over MQTT 5.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--version", action="version", version=f"edgecoop {__version__}", help="print the version")
    parser.add_argument("--log-format", choices=["text", "json"], default=None,
                        help="log records as text (default) or JSON lines, e.g. for journald (env EDGECOOP_LOG_FORMAT)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("broker", help="run a private Mosquitto, or print broker configs",
                       description="Run a private Mosquitto (MQTT 5, loopback, free port by default) until "
                       "Ctrl-C, or print a config with --print-config.")  # fmt: skip
    p.add_argument("--port", type=int, default=None, help="listener port (default: a free port)")
    p.add_argument("--websockets-port", type=int, default=None, help="also open a websockets listener")
    p.add_argument("--persistence", action="store_true", help="persist retained messages and sessions")
    p.add_argument("--tls-port", type=int, default=None,
                   help="with --print-config production: the TLS listener's port (default 8883; 0 = none)")  # fmt: skip
    p.add_argument("--a2a-listener", type=int, default=None, metavar="PORT",
                   help="with --print-config production: a loopback listener for edgecoop a2a-gateway")  # fmt: skip
    p.add_argument("--print-config", choices=["development", "production", "acl", "bridge"],
                   help="print a Mosquitto config (production: for /etc/mosquitto/conf.d) and exit")  # fmt: skip
    p.add_argument("--site", help="with --print-config bridge: this site's id")
    p.add_argument("--remote", help="with --print-config bridge: the regional broker HOST:PORT")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic namespace prefix")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("agent", help="run one agent from its TOML config",
                       description="Run an agent: publish its capability card and answer requests.")  # fmt: skip
    p.add_argument("config", help="path to the agent's TOML file")
    p.add_argument("--broker", default=None, help="override the broker URL of the config")
    p.add_argument("--deregister", action="store_true", help="clear the agent's retained card and status, then exit")
    _add_metrics_args(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("cms", help="query the Capability Metadata Store",
                       description="Query or run the CMS (a SQLite mirror of the retained capability cards).")  # fmt: skip
    cms_sub = p.add_subparsers(dest="cms_command", metavar="CMS_COMMAND", required=True)
    q = cms_sub.add_parser("query", help="discover agents by need and filters",
                           description="Rank agents against a natural-language need, with structured filters.")  # fmt: skip
    _add_broker_args(q)
    q.add_argument("--need", help='natural-language need, e.g. "count vehicles near the station"')
    q.add_argument("--kind", help="capability kind: echo, slm, vision, sensor, knowledge, cloud")
    q.add_argument("--cooperation", choices=["data", "computation", "knowledge"], help="cooperation type")
    q.add_argument("--modality", help="sensor modality, e.g. pm25, camera, heart_rate")
    q.add_argument("--domain", help="knowledge domain")
    q.add_argument("--site", help="only agents of this site")
    q.add_argument("--from-site", help="show each agent's network cost as seen from this site")
    q.add_argument("--site-cost", dest="site_costs", action="append", metavar="SITE=COST",
                   help="with --from-site: cost of reaching another site (repeatable; unlisted sites cost 5)")  # fmt: skip
    q.add_argument("--all", action="store_true", help="include offline agents")
    q.add_argument("--limit", type=int, default=10, help="at most this many results")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_cms_query)
    m = cms_sub.add_parser("mirror", help="keep a SQLite mirror of the CMS in sync (a service)",
                           description="Subscribe to all cards/status and keep a SQLite file in sync.")  # fmt: skip
    _add_broker_args(m)
    m.add_argument("--db", default="cms.db", help="SQLite file (default cms.db)")
    _add_metrics_args(m)
    m.set_defaults(func=cmd_cms_mirror)

    p = sub.add_parser("a2a-gateway", help="expose every agent and the orchestrator as A2A-over-MQTT agents",
                       description="Publish A2A v1.0 Agent Cards on $a2a/v1/discovery/<org>/<site>/<agent> and "
                       "answer A2A JSON-RPC requests on $a2a/v1/request/... (docs/interop.md).")  # fmt: skip
    _add_broker_args(p)
    p.add_argument("--org", default="edgecoop", help="A2A organisation id (default edgecoop)")
    p.add_argument("--site", default="default", help="unit of the orchestrator's A2A agent")
    p.add_argument("--orchestrator", default="city", help="A2A agent id of the orchestrator (default city)")
    p.add_argument("--no-orchestrator", action="store_true", help="do not expose the orchestrator")
    p.add_argument("--url", default=None, help="broker URL advertised in the cards (default: the --broker URL)")
    p.set_defaults(func=cmd_a2a_gateway)

    p = sub.add_parser("knowledge-topics", help="suggest a knowledge capability's topics from its documents",
                       description="Print heading and recurring words of the documents as a TOML 'topics' line to "
                       "review and paste into the capability's [capabilities.options]: the orchestrator routes "
                       "look-ups by declared topics, never by the documents themselves.")  # fmt: skip
    p.add_argument("paths", nargs="+", help="document files or folders")
    p.add_argument("--limit", type=int, default=160, help="at most this many topics (default 160)")
    p.set_defaults(func=cmd_knowledge_topics)

    p = sub.add_parser("bench", help="run a benchmark (always with a baseline in the same run)",
                       description="Benchmarks: rpc (vs raw paho), cms (ingest and discovery latency).")  # fmt: skip
    p.add_argument(
        "which",
        choices=BENCHMARKS,
        help="which benchmark",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smaller workload (smoke run)")
    p.add_argument("--agents", type=int, default=1000, help="scale: number of agents")
    p.add_argument("--split", choices=["dev", "test"], help="understanding: one split of the evaluation set only")
    p.add_argument("--eval", metavar="FILE", help="understanding: your own labelled questions (JSON lines in the "
                   "evaluation set's format, any split name but 'test') instead of the shipped set")  # fmt: skip
    p.add_argument("--orchestrators", type=int, default=0, metavar="N",
                   help="tasks: also pools of 1..N orchestrators, and the failover gap (docs/scaling.md)")  # fmt: skip
    p.set_defaults(func=cmd_bench)

    from edgecoop.orchestrator.strategies import STRATEGIES

    p = sub.add_parser("orchestrator", help="run the Task Orchestrator service",
                       description="Accept tasks on <prefix>/tasks/submit, plan them from the CMS, dispatch, answer. "
                       "Settings come from --config (TOML: [broker] and [orchestrator] tables), overridden by flags.")  # fmt: skip
    p.add_argument("--config", help="TOML file with [broker] (url, username, password_file) and [orchestrator] "
                   "(id, strategy, classifier, model, db, summarize), [admission] (limits, queues, client_rate, "
                   "cloud_budget, ...: docs/reliability.md)")  # fmt: skip
    p.add_argument("--broker", default=None, help="broker URL mqtt://[user:pass@]host:port (default from --config, "
                   "else EDGECOOP_BROKER or mqtt://127.0.0.1:1883)")  # fmt: skip
    p.add_argument("--prefix", default=None, help=f"topic namespace prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--id", default=None, help="orchestrator id, also its MQTT client id (default orchestrator)")
    p.add_argument(
        "--strategy", default=None, choices=sorted(STRATEGIES), help="default scheduling strategy (capability-aware)"
    )
    p.add_argument("--classifier", default=None, choices=["rule", "slm"], help="rule (default) or slm classifier")
    p.add_argument("--model", default=None, help="model for the slm classifier (default smollm2-135m)")
    p.add_argument("--db", default=None, help="SQLite file for task states and results (default tasks.db)")
    p.add_argument("--privacy", default=None, choices=["public", "site", "private"],
                   help="privacy floor of every task (a health hub: private); default: derived per task")  # fmt: skip
    p.add_argument("--summarize", action="store_true", default=None, help="add an SLM summary step to pipelines")
    p.add_argument("--site", default=None, help="this orchestrator's site: its agents first, others over the bridges")
    p.add_argument("--pool", default=None, metavar="NAME", help="join the orchestrator pool NAME: tasks shared "
                   "through $share/NAME/<prefix>/tasks/submit, taken over when a member dies (docs/scaling.md)")  # fmt: skip
    p.add_argument("--pool-log-expiry", dest="pool_log_expiry_s", type=float, default=None, metavar="S",
                   help="seconds the pool's task log keeps a task's claim and result on the broker (default 600)")  # fmt: skip
    p.add_argument("--site-cost", dest="site_costs", action="append", default=None, metavar="SITE=COST",
                   help="network cost of reaching another site (repeatable; unlisted sites cost 5, our own 0)")  # fmt: skip
    _add_metrics_args(p)
    p.set_defaults(func=cmd_orchestrator)

    p = sub.add_parser("task", help="submit a task to the orchestrator and print the answer",
                       description="Publish a task on <prefix>/tasks/submit and wait for the answer.")  # fmt: skip
    _add_broker_args(p)
    p.add_argument("question", help="the question, in natural language")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), help="scheduling strategy for this task")
    p.add_argument("--privacy", choices=["public", "site", "private"], help="mark the task private (never the cloud)")
    p.add_argument("--summarize", action="store_true", help="ask for an SLM summary step")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=cmd_task)

    p = sub.add_parser("demo", help="run a scenario demo on a private broker",
                       description="Start a private Mosquitto, the scenario's agents and run its tasks.")  # fmt: skip
    p.add_argument("scenario", nargs="?", default="urban", help="urban (default) or health")
    p.add_argument("--once", action="store_true", help="exit after the report instead of running until Ctrl-C")
    p.add_argument("--dashboard-port", type=int, default=8080, help="dashboard HTTP port (0 = a free port)")
    p.add_argument("--broker-port", type=int, default=18830,
                   help="port of the demo's private broker (default 18830; a free port if taken)")  # fmt: skip
    p.set_defaults(func=cmd_demo)

    from edgecoop.models import add_models_parser

    add_models_parser(sub, evaluate=_models_eval)
    p = sub.add_parser("dashboard", help="serve the live web dashboard",
                       description="Serve a live web page of agents, tasks and their cooperation graphs, the "
                       "edge/cloud split and sensor sparklines (no authentication: bind to a trusted network).")  # fmt: skip
    _add_broker_args(p)
    p.add_argument("--host", default=os.environ.get("EDGECOOP_DASHBOARD_HOST", "127.0.0.1"),
                   help="address to listen on (env EDGECOOP_DASHBOARD_HOST; default 127.0.0.1)")  # fmt: skip
    p.add_argument("--port", type=int, default=int(os.environ.get("EDGECOOP_DASHBOARD_PORT", "8080")),
                   help="HTTP port (env EDGECOOP_DASHBOARD_PORT; default 8080)")  # fmt: skip
    p.set_defaults(func=cmd_dashboard)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from edgecoop.logs import LOG_FORMATS, setup_logging

    log_format = args.log_format or os.environ.get("EDGECOOP_LOG_FORMAT") or "text"
    if log_format not in LOG_FORMATS:
        parser.error(f"EDGECOOP_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    setup_logging(logging.DEBUG if args.verbose else logging.WARNING, log_format)
    try:
        return int(args.func(args))
    except EdgecoopError as exc:
        print(f"edgecoop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
