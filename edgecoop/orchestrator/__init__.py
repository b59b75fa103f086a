"""Classifier Engine, scheduling strategies and the Task Orchestrator."""

from edgecoop.orchestrator.classifier import Classification, RuleClassifier, SlmClassifier
from edgecoop.orchestrator.engine import Engine, TaskOutcome, TaskSpec
from edgecoop.orchestrator.intents import Intent
from edgecoop.orchestrator.service import Orchestrator
from edgecoop.orchestrator.strategies import STRATEGIES, get_strategy

__all__ = [
    "STRATEGIES",
    "Classification",
    "Engine",
    "Intent",
    "Orchestrator",
    "RuleClassifier",
    "SlmClassifier",
    "TaskOutcome",
    "TaskSpec",
    "get_strategy",
]
