"""The live web dashboard: agents, tasks and their cooperation graphs, the edge/cloud split and sensor sparklines.

Run it with ``edgecoop dashboard --broker mqtt://host:1883 --port 8080`` (see docs/dashboard.md).
"""

from edgecoop.dashboard.server import Dashboard
from edgecoop.dashboard.state import DashboardState, parse_task_event

__all__ = ["Dashboard", "DashboardState", "parse_task_event"]
