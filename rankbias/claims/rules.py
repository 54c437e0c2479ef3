"""The verdict rules of `rankbias reproduce`: each claim (docs/theory.md, "The claims") is
decided by a rule stated in advance in its experiment file, applied to the finished runs.

A rule is a mapping with a `kind` and its parameters, e.g.

    rule: {kind: monotone, param: batch_size, direction: increasing,
           where: "weight_decay > 0", gap_sigma: 3, min_step_se: 2}

Every rule returns a `Verdict`: pass | fail | inconclusive, with the numbers behind it.
How the rules stay honest:
- Runs are grouped by data set and architecture (`group_by`, default both): a "seed
  spread" is never the spread between models or data sets, and every group must pass.
- Margins are stated in units of the seed spread, so a verdict flips only if the data
  move by several seed spreads; each verdict reports its margin.
- The decay-budget gate (claims/gate.py): a rank rule concludes only from settings whose
  weight decay had the time to act; the settings and their budgets are in the evidence
  (`validity`), and a design that could not show the effect is inconclusive, never a fail.
- A grid value with too few finished runs makes the claim inconclusive, naming the value
  and what happened to its runs; diverged, stopped and collapsed runs are counted in the
  evidence, never silently dropped.

The rules live by family: claims/trends.py (4, 5, 6, 11), claims/dynamics.py (7, 10),
claims/accuracy.py (8), claims/generalization.py (9) and claims/compress_claim.py (12).
"""

from __future__ import annotations

import pandas as pd

from rankbias.claims import accuracy, dynamics, trends  # noqa: F401 (their rules register)
from rankbias.claims.gate import validity_table, with_validity
from rankbias.claims.runsets import select_runs
from rankbias.claims.verdict import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    RULES,
    Verdict,
    combine,
    declares,
    parameters,
    rounded,
)
from rankbias.utils import RankbiasError


# --- claim 1: gradient ranks --------------------------------------------------------------------
@declares(min_checks=10)
def gradient_rank(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Lemma 3.1: every recorded mini-batch gradient has rank <= B*m. Only checks with
    B*m below the matrix's smaller side can fail (a rank can never exceed that side):
    those are counted and must number at least `min_checks`; the capped ones are
    reported apart, as a check of the bookkeeping only."""
    ranks = metrics[metrics.metric == "grad_rank"]
    bounds = metrics[metrics.metric == "grad_rank_bound"]
    sizes = metrics[metrics.metric == "grad_rank_cap"]
    if ranks.empty:
        return Verdict(INCONCLUSIVE, "no gradient ranks recorded", {})
    joined = ranks.merge(bounds, on=["run_id", "step", "layer"], suffixes=("", "_bound"))
    joined = joined.merge(sizes, on=["run_id", "step", "layer"], suffixes=("", "_cap"))
    informative = joined[joined.value_bound < joined.value_cap]
    capped = joined[joined.value_bound >= joined.value_cap]
    violations = informative[informative.value > informative.value_bound]
    at_bound = int((informative.value == informative.value_bound).sum())
    evidence = {"informative_checks": int(len(informative)),
                "informative_violations": int(len(violations)),
                "informative_at_the_bound": at_bound,
                "capped_checks": int(len(capped)),
                "capped_violations": int((capped.value > capped.value_cap).sum()),
                "largest_rank_over_bound": rounded(
                    (informative.value / informative.value_bound).max(), 3)
                if len(informative) else None}
    reason = (f"{len(informative)} gradients with B*m below the matrix size: "
              f"{len(violations)} above B*m, {at_bound} exactly at it; {len(capped)} capped "
              "checks (B*m >= size, true by construction) reported apart")
    if len(informative) < rule["min_checks"]:
        return Verdict(INCONCLUSIVE, reason, evidence)
    return Verdict(PASS if violations.empty else FAIL, reason, evidence)


def evaluate(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame,
             eps: float | None = None) -> Verdict:
    """Apply one rule (its parameters checked, defaults filled in); several rules (`all:
    [...]`) must all pass; `controls: [...]` beside them are applied and reported (their
    verdicts and reasons, "control: ..."), never combined into the verdict: they show what
    the design gives where the answer is known (plain SGD at the same decay budget);
    `reports: [...]` likewise add what the verdict does not judge (the trend per matrix
    role, the timeline of the rank against the accuracy), as "report: ...".
    Rules with the decay-budget gate see each run's validity and report it (`validity`)
    at the rank's tolerance (`eps`: the runs' first by default)."""
    if "all" in rule:
        parts = [evaluate(r, runs, metrics, eps) for r in rule["all"]]
        controls = [evaluate(r, runs, metrics, eps) for r in rule.get("controls", [])]
        reports = [evaluate(r, runs, metrics, eps) for r in rule.get("reports", [])]
        evidence = {f"rule{i + 1}": p.evidence for i, p in enumerate(parts)}
        evidence.update({f"control{i + 1}": {"verdict": c.verdict, **c.evidence}
                         for i, c in enumerate(controls)})
        evidence.update({f"report{i + 1}": {"kind": r["kind"], **p.evidence}
                         for i, (r, p) in enumerate(zip(rule.get("reports", []), reports))})
        settings = {repr(s): s for p in parts + controls
                    for s in p.evidence.get("validity", [])}
        if settings:
            evidence["validity"] = list(settings.values())
        reason = " | ".join([p.reason for p in parts]
                            + [f"control ({c.verdict}): {c.reason}" for c in controls]
                            + [f"report: {r.reason}" for r in reports])
        return Verdict(combine([p.verdict for p in parts]), reason, evidence)
    params = parameters(rule)
    if params["kind"] not in RULES:
        raise RankbiasError(f"rule kind {params['kind']!r} is decided by its experiment's "
                            "check, not from runs")
    gated = "min_budget" in params
    if gated:
        runs = with_validity(runs, params, eps)
    verdict = RULES[params["kind"]](params, runs, metrics)
    if gated:
        verdict.evidence["validity"] = validity_table(select_runs(runs, params["where"]))
    return verdict
