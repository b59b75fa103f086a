"""Packaging: every module has one name, and the wheel and the sdist install and import on their own."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSET_DIRS = ("agents", "broker", "cms", "scenarios", "benchmarks")


def test_top_level_component_folders_hold_no_python_and_nothing_is_a_symlink():
    for d in ASSET_DIRS:
        assert (REPO / d).is_dir(), d
        assert not list((REPO / d).rglob("*.py")), f"{d}/ holds Python: it belongs under edgecoop/"
    links = [p for p in (REPO / "edgecoop").rglob("*") if p.is_symlink()]
    assert links == []


def _modules(names: list[str]) -> list[str]:
    mods = []
    for n in names:
        if n.startswith("edgecoop/") and n.endswith(".py"):
            mod = n[: -len(".py")].replace("/", ".")
            mods.append(mod.removesuffix(".__init__"))
    return sorted(mods)


def _venv(path: Path) -> Path:
    """A fresh venv; the dependencies come from the test's own environment through a path entry (no .pth files of
    that environment run, so its editable edgecoop is not visible)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


_CHECK = r"""
import importlib, json, sys
mods = json.loads(sys.argv[1])
import edgecoop
for m in mods:
    importlib.import_module(m)
from edgecoop.scenarios.data import data_root
from edgecoop.scenarios.loader import scenario_dir
root = data_root()
assert (root / "tasks.jsonl").is_file(), root
assert sorted(p.name for p in (scenario_dir("urban") / "agents").glob("*.toml")), root
assert (scenario_dir("health") / "knowledge").is_dir()
print(edgecoop.__file__)
"""


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # the wheel is built from the sdist, so a file the sdist lacks fails here
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    return out


@pytest.mark.timeout(400)
def test_wheel_installs_into_a_fresh_venv_and_every_module_imports(dists: Path, tmp_path: Path):
    wheel = next(dists.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    mods = _modules(names)
    assert "edgecoop.agents.runtime" in mods and "edgecoop.cms.store" in mods
    assert any(n.startswith("edgecoop/scenario_data/urban/agents/") for n in names)
    py = _venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(_purelib(py)), str(wheel)], check=True, timeout=120)  # fmt: skip
    _check(py, mods, tmp_path)


@pytest.mark.timeout(400)
def test_sdist_installs_into_a_fresh_venv_and_every_module_imports(dists: Path, tmp_path: Path):
    sdist = next(dists.glob("*.tar.gz"))
    with tarfile.open(sdist) as t:
        names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
    mods = _modules(names)
    assert "edgecoop.orchestrator.engine" in mods
    assert any(n.startswith("scenarios/urban/agents/") for n in names)
    py = _venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(_purelib(py)), str(sdist)], check=True, timeout=300)  # fmt: skip
    _check(py, mods, tmp_path)


def _purelib(py: Path) -> Path:
    out = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    return Path(out)


def _check(py: Path, mods: list[str], cwd: Path) -> None:
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run([py, "-c", _CHECK, json.dumps(mods)], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(_purelib(py)) in r.stdout, r.stdout  # the installed copy, not the checkout
