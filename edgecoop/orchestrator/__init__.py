"""Classifier Engine (task specifications over the live vocabulary), scheduling strategies, Task Orchestrator."""

from edgecoop.orchestrator.engine import Engine, Submission, TaskOutcome
from edgecoop.orchestrator.parser import FastParser, Parser
from edgecoop.orchestrator.service import Orchestrator
from edgecoop.orchestrator.spec import Operation, Target, TaskSpec
from edgecoop.orchestrator.strategies import STRATEGIES, get_strategy

__all__ = [
    "STRATEGIES",
    "Engine",
    "FastParser",
    "Operation",
    "Orchestrator",
    "Parser",
    "Submission",
    "Target",
    "TaskOutcome",
    "TaskSpec",
    "get_strategy",
]
