"""Where the scenarios' data lives: agent cards, rulebooks, knowledge documents and task sets.

The data is not Python: in a source checkout it is the top-level ``scenarios/`` folder, and a wheel carries the same
files as ``edgecoop/scenario_data/`` (mapped by pyproject's ``package-dir``). Code asks here, never builds the path.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["data_root"]

_PACKAGE = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The folder holding ``urban/``, ``health/`` and the task sets (installed copy first, then the checkout)."""
    installed = _PACKAGE / "scenario_data"
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / "scenarios"
