"""The non-Python assets in the top-level folders are kept equal to what the code generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecoop.broker.configs import development_config, production_acl, production_config
from edgecoop.cms.store import CmsStore

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("development.conf", lambda: development_config(1883)),
        ("production.conf", lambda: production_config(port=1883, websockets_port=9001)),
        ("acl.conf", production_acl),
    ],
)
def test_broker_folder_holds_the_generated_configs(name, text):
    assert (REPO / "broker" / name).read_text() == text(), f"regenerate: edgecoop broker --print-config {name[:-5]}"


def test_cms_schema_file_is_the_stores_schema():
    store = CmsStore()
    try:
        rows = store.db.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
            "AND name NOT LIKE '_sqlite_migrations%' ORDER BY type DESC, name"
        ).fetchall()
    finally:
        store.close()
    assert (REPO / "cms" / "schema.sql").read_text() == ";\n".join(r[0] for r in rows) + ";\n"


def test_example_agents_load():
    from edgecoop.agents.config import load_agent_config

    files = sorted((REPO / "agents" / "examples").glob("*.toml"))
    assert len(files) >= 3
    for f in files:
        assert load_agent_config(f).agent_id == f.stem
