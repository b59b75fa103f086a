"""Docs checked against the code and the committed benchmark results, so they cannot drift (sqlite-utils' habit).

* **Topics**: every topic the docs name parses under :class:`edgecoop.topics.Topics` (every filter matches a contract
  topic), the README's contract table agrees with ``topics.py`` on what is retained, and every topic kind is
  documented somewhere.
* **Strategies**: the README's strategy table lists exactly ``STRATEGIES``, with the CLI's default marked.
* **Handler kinds**: docs/handlers.md has one section per built-in kind, stating its card kind and cooperation;
  every TOML example names a registered kind and only options its handler reads.
* **CLI**: every ``edgecoop ...`` command line in the README and docs parses with :func:`edgecoop.cli.build_parser`
  (a command shown only up to an option or a required argument counts as a mention), and every subcommand and
  every benchmark is shown somewhere.
* **Broker limits**: every ``max_queued_messages N`` the docs state is the one of the stock broker configs.
* **Benchmark figures**: a figure written as ``<number><!-- figure: FILE KEY -->`` (FILE in benchmarks/results/,
  KEY a dotted path into its JSON, optionally ``x100`` for a fraction quoted as a percentage) must equal the file's
  value rounded to the decimals quoted, and the text just above its table (or its own paragraph) names the file.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgecoop.agents.handlers import base as handler_base
from edgecoop.broker.configs import development_config, production_config
from edgecoop.cli import _ORCH_DEFAULTS, build_parser
from edgecoop.orchestrator import Orchestrator
from edgecoop.orchestrator.strategies import STRATEGIES
from edgecoop.topics import Kind, Topics

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
RESULTS = ROOT / "benchmarks" / "results"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


_FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _fenced(text: str, lang: str | None = None) -> list[str]:
    """The bodies of the fenced code blocks (of one language, if given)."""
    out = []
    for m in _FENCE.finditer(text):
        head, _, body = m.group(0).partition("\n")
        if lang is None or head[3:].strip() == lang:
            out.append(body.rsplit("```", 1)[0])
    return out


def _prose(text: str) -> str:
    """The text outside fenced code blocks (line count kept)."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def _section(text: str, heading: str) -> str:
    """From the heading line to the next heading of the same or a higher level."""
    start = text.index(heading + "\n")
    level = len(heading) - len(heading.lstrip("#"))
    nxt = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE)
    m = nxt.search(text, start + len(heading) + 1)
    return text[start : m.start() if m else len(text)]


def _tables(text: str) -> Iterator[list[list[str]]]:
    """Markdown tables (outside code blocks) as rows of stripped cells, the separator row dropped."""
    rows: list[list[str]] = []
    for line in [*_prose(text).splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            yield rows
            rows = []


def _code_spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks (a span may wrap onto the next line)."""
    return [" ".join(m.group(1).split()) for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", _prose(text))]


# -- topics ------------------------------------------------------------------------------------------------
T = Topics()
_DOC_PREFIXES = ("edgecoop/v1/", "<p>/", "<prefix>/")


def _contract_topics() -> dict[str, Kind]:
    """One concrete topic per builder of :class:`Topics` (every public method whose result is a plain topic under
    the prefix), with its kind: what "the contract" is, for the docs' filters to match against."""
    out = {}
    for name, method in inspect.getmembers(T, inspect.ismethod):
        if name.startswith("_") or name == "parse":
            continue
        topic = method(*["x"] * (len(inspect.signature(method).parameters)))
        if isinstance(topic, str) and topic.startswith(T.prefix + "/") and not any(c in topic for c in "+#"):
            out[topic] = T.parse(topic).kind  # every builder's topic parses back
    return out


CONTRACT_TOPICS = _contract_topics()


def test_the_contract_has_a_builder_for_every_kind():
    assert set(CONTRACT_TOPICS.values()) == set(Kind)
    assert any(T.parse(t).site for t in CONTRACT_TOPICS)  # and the site-qualified (bridged) forms


def _concrete(doc_topic: str, fill: str = "x") -> str:
    """A documented topic with the default prefix and every ``<placeholder>`` (or one capital letter) filled in."""
    for p in _DOC_PREFIXES[1:]:
        if doc_topic.startswith(p):
            doc_topic = "edgecoop/v1/" + doc_topic[len(p) :]
    levels = [fill if re.fullmatch(r"<[^>]+>|[A-Z]", level) else level for level in doc_topic.split("/")]
    return "/".join(levels)


def _documented_topics() -> list[tuple[str, str]]:
    """(file, topic) for every inline code span that is a topic or filter under the prefix."""
    out = []
    for doc in DOCS:
        for span in _code_spans(_text(doc)):
            if span.startswith(_DOC_PREFIXES) and " " not in span.replace("<this site>", "x"):
                out.append((_rel(doc), span))
    return out


def test_every_documented_topic_is_part_of_the_contract():
    topics = _documented_topics()
    assert len(topics) > 40  # the docs do name topics; a parser change that finds none must not pass
    wrong = []
    for doc, span in topics:
        topic = _concrete(span)
        if topic.endswith("/") or any(c in topic for c in "+#%"):
            # a namespace ("inside edgecoop/v1/reply/"), a subscription or an ACL filter: it covers a contract topic
            pattern = _concrete(span, "+").replace("%u", "+").replace("%c", "+")
            pattern = pattern + "#" if pattern.endswith("/") else pattern
            ok = any(mqtt.topic_matches_sub(pattern, t) for t in CONTRACT_TOPICS)
        else:
            try:
                T.parse(topic)
                ok = True
            except Exception:
                ok = False
        if not ok:
            wrong.append(f"{doc}: `{span}`")
    assert not wrong, "documented topics outside the contract of edgecoop/topics.py:\n" + "\n".join(wrong)


def _readme_contract_rows() -> list[list[str]]:
    section = _section(_text(README), "## The topic and payload contract")
    table = next(_tables(section))
    assert table[0][:2] == ["Topic", "Retained"]
    return table[1:]


def _retained_in_code() -> dict[Kind, bool]:
    """What the contract in topics.py's docstring says is retained, by kind."""
    import edgecoop.topics

    out = {}
    for line in (edgecoop.topics.__doc__ or "").splitlines():
        m = re.match(r"\s+(<p>/\S+)\s+(.*)", line)
        if m and "<site>" not in m.group(1):
            kind = T.parse(_concrete(m.group(1))).kind
            out[kind] = "retained" in m.group(2) and "not retained" not in m.group(2)
    return out


def test_readme_contract_table_matches_topics_py():
    rows = _readme_contract_rows()
    in_code = _retained_in_code()
    assert set(in_code) == set(Kind)  # the docstring names every kind
    seen = set()
    for row in rows:
        topic = row[0].strip("`")
        kind = T.parse(_concrete(topic)).kind
        seen.add(kind)
        retained = row[1].startswith("yes")
        assert row[1].split()[0] in ("yes", "no"), row
        assert retained == in_code[kind], f"README says {topic} is {'' if retained else 'not '}retained"
    # Home Assistant mirrors are opt-in and documented in docs/deployment.md, with the same retained flags
    missing = set(Kind) - seen - {Kind.HA_STATE, Kind.HA_STATUS}
    assert not missing, f"topic kinds missing from the README's contract table: {sorted(missing)}"


def test_every_topic_kind_is_documented():
    documented = set()
    for _, span in _documented_topics():
        topic = _concrete(span)
        if not any(c in topic for c in "+#%") and not topic.endswith("/"):
            parsed = T.parse(topic)
            documented.add((parsed.kind, bool(parsed.site)))
    wanted = {(T.parse(t).kind, bool(T.parse(t).site)) for t in CONTRACT_TOPICS}
    assert wanted <= documented, f"topics built by topics.py but named in no doc: {sorted(wanted - documented)}"


# -- strategies --------------------------------------------------------------------------------------------
def _strategy_tables() -> list[tuple[str, list[list[str]]]]:
    out = []
    for doc in DOCS:
        for table in _tables(_text(doc)):
            if table[0] and table[0][0].lower() == "strategy":
                out.append((_rel(doc), table))
    return out


def test_strategy_tables_list_exactly_the_registered_strategies():
    tables = _strategy_tables()
    assert any(doc == "README.md" for doc, _ in tables)
    for doc, table in tables:
        names = [re.match(r"`([^`]+)`", row[0]).group(1) for row in table[1:]]  # type: ignore[union-attr]
        assert sorted(names) == sorted(STRATEGIES), f"{doc}: strategy table lists {names}, code has {list(STRATEGIES)}"


def test_readme_marks_the_default_strategy():
    table = next(t for d, t in _strategy_tables() if d == "README.md")
    defaults = [re.match(r"`([^`]+)`", row[0]).group(1) for row in table[1:] if "(default)" in row[0]]  # type: ignore[union-attr]
    args = build_parser().parse_args(["orchestrator"])
    assert args.strategy is None  # the command's default comes from its settings defaults, not argparse
    in_service = inspect.signature(Orchestrator).parameters["strategy"].default
    assert defaults == [_ORCH_DEFAULTS["strategy"]] == [in_service]


# -- handler kinds -----------------------------------------------------------------------------------------
HANDLERS_MD = ROOT / "docs" / "handlers.md"
_KIND_LINE = re.compile(
    r"^Kind `(?P<kind>[^`]+)`(?: \(its card says `(?P<card>[^`]+)`\))?, cooperation `(?P<coop>[^`]+)`", re.MULTILINE
)


def _registered_kinds() -> set[str]:
    """The kinds edgecoop ships (``register_handler`` adds kinds at run time: plug-ins, and tests' fakes)."""
    return set(handler_base._BUILTIN)


def test_handlers_md_documents_every_registered_kind():
    text = _text(HANDLERS_MD)
    headings = set(re.findall(r"^## `([^`]+)`", text, re.MULTILINE))
    stated = {m["kind"]: m for m in _KIND_LINE.finditer(text)}
    kinds = _registered_kinds()
    assert headings == kinds, f"docs/handlers.md sections {sorted(headings)} vs registered kinds {sorted(kinds)}"
    assert set(stated) == kinds
    for kind, m in stated.items():
        cls = handler_base.handler_class(kind)
        assert (m["card"] or kind) == cls.kind, f"{kind}: the card says {cls.kind!r}"
        assert m["coop"] == cls.cooperation, f"{kind}: cooperation is {cls.cooperation!r}"


def test_readme_names_every_handler_kind_an_agent_file_can_use():
    """The README's agent example lists the kinds in a comment (``kind = "sensor"  # echo | sensor | ...``)."""
    m = re.search(r'kind = "\w+"\s+# ([\w| -]+)', _text(README))
    assert m is not None
    listed = {k.strip() for k in m.group(1).split("|")}
    assert listed == _registered_kinds() - {"cloud-reference"}  # the benchmark stand-in is not for agent files


def _toml_capabilities() -> Iterator[tuple[str, dict[str, Any], set[str]]]:
    """(doc, capability table, kinds the doc's own code registers) for the TOML examples of the docs."""
    for doc in DOCS:
        text = _text(doc)
        own = set(re.findall(r'register_handler\("([^"]+)"', "\n".join(_fenced(text, "python"))))
        for body in _fenced(text, "toml"):
            try:
                data = tomllib.loads(body)
            except tomllib.TOMLDecodeError:
                continue  # a fragment with placeholders
            for cap in data.get("capabilities", []):
                if "kind" in cap:
                    yield _rel(doc), cap, own


def test_toml_examples_use_registered_kinds_and_options_their_handler_reads():
    import importlib

    caps = list(_toml_capabilities())
    assert {c["kind"] for _, c, _ in caps} >= {"vision", "sensor", "knowledge", "slm", "cloud", "camera", "rulebook"}
    for doc, cap, own in caps:
        kind = cap["kind"]
        if kind in own:  # a recipe's own kind (docs/extending.md): tests/test_extending.py runs it
            continue
        assert kind in _registered_kinds(), f"{doc}: unknown kind {kind!r}"
        source = inspect.getsource(importlib.import_module(handler_base.handler_class(kind).__module__))
        for key in cap.get("options", {}):
            assert f'"{key}"' in source, f"{doc}: option {key!r} of kind {kind!r} is not read by its handler"


# -- CLI ---------------------------------------------------------------------------------------------------
#: ``edgecoop`` as a command (at the start, after a space or a ``bin/``) followed by a subcommand or an option
_COMMAND = re.compile(r"(?:^|(?<=\s)|(?<=bin/))edgecoop((?:\s+(?=[a-z-])[^\s#]+)(?:\s+[^\s#]+)*)")


def _command_lines() -> Iterator[tuple[str, list[str]]]:
    """(doc, argv) for every ``edgecoop ...`` command in code spans and shell blocks: ``[--opt]`` is read as
    ``--opt``, and ``a|b`` gives one command per alternative."""
    for doc in DOCS:
        text = _text(doc)
        sources = _code_spans(text) + [
            line for body in _fenced(text, "sh") + _fenced(text, "") for line in body.splitlines()
        ]
        for src in sources:
            m = _COMMAND.search(src.split(" #")[0])
            if m is None or any(c in m.group(1) for c in ("<", ">", "...")):
                continue
            try:
                argv = [a for a in shlex.split(m.group(1).replace("[", " ").replace("]", " ")) if a]
            except ValueError:  # prose around a span, e.g. "edgecoop's"
                continue
            alt = next((i for i, a in enumerate(argv) if "|" in a and not a.startswith("-")), None)
            if alt is None:
                yield _rel(doc), argv
            else:
                for choice in argv[alt].split("|"):
                    yield _rel(doc), [*argv[:alt], choice, *argv[alt + 1 :]]


#: a command shown only up to a subcommand or an option name (``edgecoop task``, ``cms query --need``) is a mention
_INCOMPLETE = ("the following arguments are required", "expected one argument")


def _parses(argv: list[str]) -> str | None:
    """None if edgecoop.cli accepts ``argv`` (or it is an incomplete mention), else argparse's complaint."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            msg = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
            return None if exc.code == 0 or any(s in msg for s in _INCOMPLETE) else msg
    return None


def test_every_documented_command_line_parses():
    lines = list(_command_lines())
    assert sum(doc == "README.md" for doc, _ in lines) >= 8
    wrong = [f"{doc}: edgecoop {' '.join(argv)}: {msg}" for doc, argv in lines if (msg := _parses(argv))]
    assert not wrong, "documented commands that edgecoop.cli does not accept:\n" + "\n".join(wrong)


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(subs.choices)


def test_every_subcommand_is_documented():
    mentioned = {argv[0] for _, argv in _command_lines()}
    missing = _subcommands(build_parser()) - mentioned
    assert not missing, f"subcommands no doc shows: {sorted(missing)}"


def test_readme_bench_commands_cover_every_benchmark():
    parser = build_parser()
    bench = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    which = next(a for a in bench._actions if a.dest == "which")
    shown = {argv[1] for doc, argv in _command_lines() if argv[0] == "bench" and len(argv) > 1}
    assert set(which.choices or ()) <= shown, f"benchmarks no doc shows: {set(which.choices or ()) - shown}"


# -- broker limits -----------------------------------------------------------------------------------------
def test_documented_queue_limit_is_the_configs():
    configured = {int(n) for n in re.findall(r"^max_queued_messages (\d+)$", development_config(1883), re.M)}
    configured |= {int(n) for n in re.findall(r"^max_queued_messages (\d+)$", production_config(), re.M)}
    assert len(configured) == 1
    stock = configured.pop()
    found = []
    for doc in DOCS:
        for line in _text(doc).splitlines():
            for m in re.finditer(r"`max_queued_messages ([\d,]+)`", line):
                if "test" not in line:  # a test's own small broker config is not the stock one
                    found.append((_rel(doc), int(m.group(1).replace(",", ""))))
    assert found, "no doc states the stock queue limit"
    wrong = [(doc, n) for doc, n in found if n != stock]
    assert not wrong, f"the stock max_queued_messages is {stock}, the docs say {wrong}"


# -- benchmark figures -------------------------------------------------------------------------------------
_FIGURE = re.compile(
    r"(?P<num>[-+−]?\d[\d,]*(?:\.\d+)?)(?P<between>[^\d<|]{0,24}?)"
    r"<!-- figure: (?P<file>[\w.-]+\.json) (?P<key>\S+?)(?: x(?P<scale>\d+))? -->"
)


@dataclass(frozen=True)
class Figure:
    doc: str
    line: int
    quoted: str
    file: str
    key: str
    scale: int


def _without_code(text: str) -> str:
    """The text with fenced blocks and inline code blanked (line numbers kept): markers in code are examples."""
    return re.sub(r"(?<!`)`[^`]+`(?!`)", lambda m: re.sub(r"[^\n]", "_", m.group(0)), _prose(text))


def _figures(path: Path) -> list[Figure]:
    text = _without_code(_text(path))
    out = []
    for m in _FIGURE.finditer(text):
        out.append(
            Figure(_rel(path), text.count("\n", 0, m.start()) + 1, m["num"], m["file"], m["key"], int(m["scale"] or 1))
        )
    return out


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _matches(quoted: str, value: Any, scale: int) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    q = quoted.replace(",", "").replace("−", "-")
    decimals = len(q.partition(".")[2])
    return bool(abs(float(q) - value * scale) <= 0.5 * 10**-decimals + 1e-9)


ALL_FIGURES = [f for doc in DOCS for f in _figures(doc)]


def test_figures_are_quoted_at_all():
    """Every doc quoting benchmark results uses markers (a regex change that finds none must not pass)."""
    by_doc = {f.doc for f in ALL_FIGURES}
    assert {"README.md", "docs/benchmarks.md", "docs/scaling.md", "docs/models.md"} <= by_doc
    assert {f.file for f in ALL_FIGURES if f.doc == "README.md"} >= {"rpc.json", "cms.json", "scale.json", "slm.json",
                                                                     "scheduling.json"}  # fmt: skip


@pytest.mark.parametrize("fig", ALL_FIGURES, ids=lambda f: f"{f.doc}:{f.line}:{f.file}:{f.key}")
def test_quoted_figure_matches_its_result_file(fig: Figure):
    path = RESULTS / fig.file
    assert path.is_file(), f"{fig.doc}:{fig.line}: no result file benchmarks/results/{fig.file}"
    value = _lookup(json.loads(path.read_text()), fig.key)
    assert _matches(fig.quoted, value, fig.scale), (
        f"{fig.doc}:{fig.line}: quotes {fig.quoted} for {fig.file} {fig.key}"
        f"{f' x{fig.scale}' if fig.scale != 1 else ''}, the file says {value}"
    )


def _blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of the blank-line separated blocks outside code fences."""
    out: list[tuple[int, str]] = []
    start, lines = 0, list[str]()
    for i, line in enumerate([*_prose(text).splitlines(), ""], 1):
        if line.strip():
            if not lines:
                start = i
            lines.append(line)
        elif lines:
            out.append((start, "\n".join(lines)))
            lines = []
    return out


def _visible(text: str) -> str:
    return re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)


@pytest.mark.parametrize("doc", sorted({f.doc for f in ALL_FIGURES}))
def test_each_quoted_table_names_its_result_files(doc: str):
    """A table of quoted figures has its result files named in the text just above it; prose names them itself."""
    text = _text(ROOT / doc)
    blocks, markup = _blocks(text), _blocks(_without_code(text))
    assert [line for line, _ in blocks] == [line for line, _ in markup]
    missing = []
    for i, ((line, block), (_, marked)) in enumerate(zip(blocks, markup, strict=True)):
        files = {m["file"] for m in _FIGURE.finditer(marked)}
        if not files:
            continue
        caption = block if not block.startswith("|") else blocks[i - 1][1] + "\n" + block
        for f in sorted(files):
            if f"benchmarks/results/{f}" not in _visible(caption):
                missing.append(f"{doc}:{line}: figures from {f} without naming benchmarks/results/{f} above")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("doc", sorted({f.doc for f in ALL_FIGURES}))
def test_quoted_tables_have_no_unmarked_figures(doc: str):
    """In a table that quotes result files, every number outside the first column is a marked figure (targets,
    written with a comparison sign, are specifications, not figures)."""
    bad = []
    for table in _tables(_text(ROOT / doc)):
        if not any(_FIGURE.search(c) for row in table for c in row):
            continue
        for row in table[1:]:
            for cell in row[1:]:
                rest = _FIGURE.sub("", cell)
                rest = re.sub(r"[<>≤≥]=?\s*[\d.,]+", "", rest)  # targets
                rest = re.sub(r"`[^`]*`", "", rest)  # code (names, keys)
                if re.search(r"\d", rest):
                    bad.append(f"{doc}: {' | '.join(row)}")
                    break
    assert not bad, "numbers in quoted tables without a figure marker:\n" + "\n".join(bad)


def test_result_files_name_their_machine():
    files = sorted(RESULTS.glob("*.json"))
    assert files
    for path in files:
        machine = json.loads(path.read_text()).get("machine", {})
        for keys in (("system", "platform"), ("cores", "cpus"), ("python",)):
            assert any(machine.get(k) for k in keys), f"{_rel(path)}: its machine does not say {' or '.join(keys)}"
