"""What a claim's rule returns (a `Verdict`), and every rule kind's parameters, declared
once with their defaults so that an experiment file that misspells one is an error, not a
silent default.

    kind = rule_kind("monotone")             # its parameters: kind.params
    p = parameters({"kind": "monotone", "param": "batch_size"})   # defaults filled in
    parameters({"kind": "monotone", "param": "batch_size", "gap_sigm": 3})
    # RankbiasError: rule kind 'monotone' has no parameter 'gap_sigm' (did you mean ...)
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from rankbias.utils import RankbiasError

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
REQUIRED = object()  # a parameter without a default: the experiment file must give it
COMMON = {"kind": REQUIRED, "where": None}  # every rule: its kind; the runs it looks at


@dataclass
class Verdict:
    verdict: str  # pass | fail | inconclusive
    reason: str
    evidence: dict = field(default_factory=dict)


def combine(verdicts: list[str]) -> str:
    """Every part must pass: one fail fails, else one inconclusive (or none) is inconclusive."""
    if FAIL in verdicts:
        return FAIL
    return INCONCLUSIVE if INCONCLUSIVE in verdicts or not verdicts else PASS


def finish(verdicts: list[str], reasons: list[str], evidence: dict) -> Verdict:
    if not verdicts:
        return Verdict(INCONCLUSIVE, "; ".join(reasons) or "no finished run", evidence)
    return Verdict(combine(verdicts), "; ".join(reasons), evidence)


def rounded(value: float, digits: int = 4) -> float | None:
    """Rounded for evidence; None for NaN/inf (claims.json is strict JSON)."""
    return round(float(value), digits) if math.isfinite(float(value)) else None


@dataclass(frozen=True)
class RuleKind:
    name: str
    params: dict[str, Any]  # name -> default (REQUIRED: no default)


KINDS: dict[str, RuleKind] = {}
# The rule functions decided from runs and metrics: (parameters, runs, metrics) -> Verdict.
RULES: dict[str, Callable[[dict, pd.DataFrame, pd.DataFrame], Verdict]] = {}
# The decay-budget gate's parameters (claims/gate.py), declared by every rank rule: the
# threshold D must reach, log(2/eps) unless the experiment states another and why.
GATE = {"min_budget": None, "min_budget_reason": None}


def declare(name: str, **params: Any) -> RuleKind:
    """Declare a rule kind and its parameters (besides `kind` and `where`)."""
    KINDS[name] = RuleKind(name, {**COMMON, **params})
    return KINDS[name]


def declares(**params: Any):
    """Register a rule function under its name, with its parameters and their defaults."""
    def register(fn):
        declare(fn.__name__, **params)
        RULES[fn.__name__] = fn
        return fn
    return register


def rule_kind(name: Any) -> RuleKind:
    if name not in KINDS:
        raise RankbiasError(f"unknown rule kind {name!r}; choose from {', '.join(KINDS)}")
    return KINDS[name]


def parameters(rule: dict) -> dict[str, Any]:
    """The rule's parameters with its kind's defaults filled in; an unknown parameter or a
    missing required one is a RankbiasError that names it."""
    if not isinstance(rule, dict):
        raise RankbiasError(f"a rule must be a mapping with a kind, not {rule!r}")
    kind = rule_kind(rule.get("kind"))
    for key in rule:
        if key not in kind.params:
            close = difflib.get_close_matches(key, kind.params, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RankbiasError(f"rule kind {kind.name!r} has no parameter {key!r}{hint}; it "
                                f"takes: {', '.join(k for k in kind.params if k != 'kind')}")
    missing = [k for k, v in kind.params.items() if v is REQUIRED and k not in rule]
    if missing:
        raise RankbiasError(f"rule kind {kind.name!r} needs {', '.join(missing)}")
    if rule.get("min_budget") is not None and not rule.get("min_budget_reason"):
        raise RankbiasError(f"rule kind {kind.name!r}: a min_budget other than log(2/eps) "
                            "needs its reason (min_budget_reason)")
    return {**kind.params, **rule}


def check_rule(rule: dict) -> None:
    """Raise RankbiasError unless `rule` (or each part of `all: [...]`, of its
    `controls: [...]` and of its `reports: [...]`) is well formed."""
    if isinstance(rule, dict) and "all" in rule:
        parts = rule["all"], rule.get("controls", []), rule.get("reports", [])
        if not set(rule) <= {"all", "controls", "reports"} or not all(
                isinstance(p, list) for p in parts) or not rule["all"]:
            raise RankbiasError("a rule with `all` takes a non-empty list of rules, and "
                                "optionally `controls` and `reports`, lists of rules "
                                "reported beside them")
        for part in [*parts[0], *parts[1], *parts[2]]:
            check_rule(part)
        return
    parameters(rule)


def keyword_defaults(function) -> dict[str, Any]:
    """The keyword-only parameters of `function` and their defaults: a check defined below
    the claims (rankbias/theory/checks.py) declares its rule parameters in its signature."""
    import inspect

    return {name: REQUIRED if p.default is p.empty else p.default
            for name, p in inspect.signature(function).parameters.items()
            if p.kind is p.KEYWORD_ONLY}
