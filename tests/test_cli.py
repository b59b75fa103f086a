"""The command line: help everywhere, configs, and real commands against the test broker."""

import argparse
import asyncio
import json
import subprocess
import sys

import pytest

from edgecoop.cli import _orchestrator_settings, build_parser, main


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_subcommand_has_help_and_description():
    parser = build_parser()
    subs = dict(_subparsers(parser))
    assert {"broker", "agent", "cms", "cms query", "cms mirror", "bench", "demo", "orchestrator", "task", "models",
            "dashboard"} <= set(subs)  # fmt: skip
    for name, sub in subs.items():
        assert sub.description, f"`edgecoop {name}` has no description"
        for action in sub._actions:
            if action.dest != "help" and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"`edgecoop {name}`: option {action.dest} has no help"


@pytest.mark.parametrize("kind", ["development", "production", "acl"])
def test_print_config(kind, capsys):
    assert main(["broker", "--print-config", kind]) == 0
    out = capsys.readouterr().out
    if kind == "production":
        assert "use_username_as_clientid true" in out and "allow_anonymous false" in out
        assert out.index("listener 1883") < out.index("use_username_as_clientid")
        assert "autosave_on_changes true" in out and "set_tcp_nodelay true" in out
    if kind == "acl":
        assert "pattern write edgecoop/v1/agents/%u/card" in out


def test_bridge_config_needs_site_and_remote(capsys):
    assert main(["broker", "--print-config", "bridge"]) == 2
    assert main(["broker", "--print-config", "bridge", "--site", "north", "--remote", "hub.local:1883"]) == 0
    out = capsys.readouterr().out
    assert "address hub.local:1883" in out and "bridge_protocol_version mqttv50" in out


def test_orchestrator_settings_flags_override_the_file(tmp_path):
    conf = tmp_path / "orchestrator.toml"
    (tmp_path / "secret").write_text("s3cret\n")
    conf.write_text('[broker]\nurl = "mqtt://10.0.0.5:1884"\nusername = "orchestrator"\npassword_file = "secret"\n'
                    '[orchestrator]\nstrategy = "cascade"\ndb = "/var/lib/edgecoop/tasks.db"\n')  # fmt: skip
    args = build_parser().parse_args(["orchestrator", "--config", str(conf), "--strategy", "edge-only"])
    settings, broker, prefix = _orchestrator_settings(args)
    assert settings["strategy"] == "edge-only" and settings["db"] == "/var/lib/edgecoop/tasks.db"
    assert (broker.host, broker.port, broker.username, broker.password) == ("10.0.0.5", 1884, "orchestrator", "s3cret")
    assert prefix == "edgecoop/v1"
    conf.write_text('[orchestrator]\nstrategy = "fastest-possible"\ncolour = "blue"\n')
    with pytest.raises(Exception, match="colour"):
        _orchestrator_settings(build_parser().parse_args(["orchestrator", "--config", str(conf)]))


async def test_cms_query_command_against_a_running_agent(make_agent, settings, topics):
    async with make_agent("cam-cli", description="Traffic camera counting vehicles at the central station"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgecoop.cli", "cms", "query", "--broker", settings.url, "--prefix", topics.prefix,
            "--need", "count vehicles near the station", "--json", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    rows = json.loads(out)
    assert rows[0]["agent_id"] == "cam-cli" and rows[0]["online"] is True


def test_bad_agent_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\nid = "a/b"\n')
    out = subprocess.run([sys.executable, "-m", "edgecoop.cli", "agent", str(bad)], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 2 and "forbidden characters" in out.stderr and "Traceback" not in out.stderr


def test_knowledge_topics_suggests_a_toml_line_of_the_documents_words(tmp_path, capsys):
    import tomllib

    from edgecoop.cli import main

    (tmp_path / "a.md").write_text("# Allotment rules\n\nSheds need a permit. A shed permit costs 20.\n")
    (tmp_path / "b.txt").write_text("Compost heaps must stay 2 m from a fence; compost is collected on Mondays.\n")
    assert main(["knowledge-topics", str(tmp_path)]) == 0
    topics = tomllib.loads(capsys.readouterr().out)["topics"]
    assert topics[:2] == ["allotment", "rules"]  # heading words first
    assert {"permit", "compost"} <= set(topics) and "sheds" not in topics  # then words that recur; a single word not
    assert main(["knowledge-topics", str(tmp_path / "missing")]) == 2
