"""Selection rules: one file per rule behind `base.Strategy`, and the registry that config
validation, the reduce and the report all read. A new rule is one file plus one line below
(or a `register(...)` call from the code that defines it)."""

from __future__ import annotations

from scoring.errors import BadConfig
from scoring.strategies.auto import Auto
from scoring.strategies.balanced import Balanced
from scoring.strategies.base import ClusterRule, GlobalRule, QuotaInput, Strategy
from scoring.strategies.dbp import DBP
from scoring.strategies.easy import Easy
from scoring.strategies.hard import Hard
from scoring.strategies.random import Random

REGISTRY: dict[str, Strategy] = {}


def register(rule: Strategy) -> Strategy:
    """Add a rule (an instance of a GlobalRule or ClusterRule subclass) under its name."""
    if not isinstance(rule, (GlobalRule, ClusterRule)) or not rule.name:
        raise TypeError(f"{rule!r} is not a named GlobalRule or ClusterRule")
    REGISTRY[rule.name] = rule
    return rule


for _rule in (Auto(), Hard(), Easy(), Random(), Balanced(), DBP()):
    register(_rule)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Strategy:
    try:
        return REGISTRY[name]
    except KeyError:
        raise BadConfig(
            f"config key 'strategy': must be one of {', '.join(REGISTRY)} (got {name!r})"
        ) from None


__all__ = ["ClusterRule", "GlobalRule", "QuotaInput", "Strategy", "get", "names", "register"]
