"""Sites: where a component runs, what reaching another site costs, and the order that follows from it.

A deployment is a set of sites (a district, a clinic), each with its own Mosquitto bridged to a regional or
cloud hub (:func:`edgecoop.broker.bridge_config`). Cards and status cross the bridges, so every CMS mirror
sees every site's agents; each card says its ``site``. A component that knows its own site ranks agents by
the *network cost* of reaching them: its own site is free, the sites it lists in ``site_costs`` cost what it
says (a neighbouring district 1, the cloud 10), any other site costs :data:`DEFAULT_REMOTE_COST`.

Requests to another site's agent and their replies travel under ``<prefix>/sites/<site>/...``
(:meth:`edgecoop.rpc.Requester.route`); the rule and a diagram are in docs/scaling.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgecoop.cms.discovery import Match
from edgecoop.errors import ConfigError, TopicError
from edgecoop.topics import validate_id

__all__ = ["DEFAULT_REMOTE_COST", "SiteCosts", "parse_site_costs"]

#: network cost of a site that ``site_costs`` does not list
DEFAULT_REMOTE_COST = 5.0


@dataclass(frozen=True, slots=True)
class SiteCosts:
    """This component's site and the cost of reaching the others (``site=None``: one flat site, no ranking)."""

    site: str | None = None
    costs: Mapping[str, float] = field(default_factory=dict)
    default_remote: float = DEFAULT_REMOTE_COST

    def __post_init__(self) -> None:
        try:
            if self.site is not None:
                validate_id(self.site, "site")
            for name, cost in self.costs.items():
                validate_id(name, "site")
                if isinstance(cost, bool) or not isinstance(cost, int | float) or not 0 <= cost < float("inf"):
                    raise ConfigError(f"site cost of {name!r} must be a finite number >= 0, not {cost!r}")
        except TopicError as exc:
            raise ConfigError(str(exc)) from exc

    def cost(self, site: object) -> float:
        """Network cost of reaching an agent whose card says ``site`` (0 for our own site)."""
        if self.site is None or site == self.site or not isinstance(site, str):
            return 0.0
        return float(self.costs.get(site, self.default_remote))

    def is_remote(self, site: object) -> bool:
        return self.site is not None and isinstance(site, str) and site != self.site

    def near_first(self, ordered: Sequence[Match], *, band: float = 0.0) -> list[Match]:
        """Nearest site first among candidates of comparable relevance; otherwise keep ``ordered``'s order.

        Candidates are taken in relevance bands: the best remaining score and every candidate within ``band``
        (a fraction of that score) of it form one band, ordered by network cost (stable: the strategy's own
        order - load, round robin - decides among equals). ``band=0`` lets the network cost break exact ties
        only: right for place-bound data, where another site's sensor answers a different question. A band
        of 0.5 prefers a local computation agent unless a remote one matches the need twice as well.
        """
        if self.site is None or len(ordered) < 2:
            return list(ordered)
        rest = list(ordered)
        out: list[Match] = []
        while rest:
            best = max(m.score for m in rest)
            floor = best - band * abs(best) - 1e-9
            group = [m for m in rest if m.score >= floor]
            rest = [m for m in rest if m.score < floor]
            out += sorted(group, key=lambda m: self.cost(m.card.get("site")))
        return out

    def annotate(self, card: Mapping[str, Any]) -> dict[str, Any]:
        """What a trace or a discovery listing shows about where an agent is."""
        site = card.get("site")
        return {"site": site, "network_cost": self.cost(site)}


def parse_site_costs(items: Sequence[str] | Mapping[str, Any]) -> dict[str, float]:
    """``["district-2=1", "cloud=10"]`` or ``{"district-2": 1, "cloud": 10}`` -> ``{site: cost}``."""
    pairs = items.items() if isinstance(items, Mapping) else (str(i).partition("=")[::2] for i in items)
    out: dict[str, float] = {}
    for name, value in pairs:
        try:
            out[validate_id(str(name).strip(), "site")] = float(value)
        except (TopicError, ValueError) as exc:
            raise ConfigError(f"bad site cost {name!r}={value!r}: expected SITE=NUMBER ({exc})") from exc
    return out
