"""Capability Metadata Store: a SQLite mirror of the retained card/status topics plus discovery.

This package knows nothing of MQTT; :mod:`edgecoop.cms.mirror` feeds it from the broker.
"""

from edgecoop.cms.discovery import DiscoveryQuery, EmbeddingRanker, Match, Ranker
from edgecoop.cms.store import CmsStore, IngestResult

__all__ = ["CmsStore", "DiscoveryQuery", "EmbeddingRanker", "IngestResult", "Match", "Ranker"]
