"""Per-role ranks of tracked runs: the mean rank of a transformer's Q, K, V, O, MLP-in and
MLP-out matrices at every tracking point, from the per-layer rows every run records.

    from rankbias.report.roles import role_ranks, final_role_ranks
    with Store("out/results.db", readonly=True) as store:
        frame = role_ranks(store.metrics(), tol=1e-3)   # run_id, step, epoch, role, value

A layer's role comes from its name (rankbias.analyze.matrices.role_of, the names
`rankbias analyze` reads: q_proj, k_proj, v_proj, o_proj, fc_in, fc_out, ...); the packed
in-projection of nn.MultiheadAttention is split as ":q", ":k", ":v". Only the roles of the
average rank's matrices are kept (the classifier, embeddings and plain linear layers are
not a role here), so a model without attention has no rows.
"""

from __future__ import annotations

import pandas as pd

from rankbias.analyze.matrices import role_of
from rankbias.metrics.tracker import rank_metric

ROLES = ("attention_q", "attention_k", "attention_v", "attention_o", "mlp_in", "mlp_out")
ROLE_LABELS = {"attention_q": "W_Q", "attention_k": "W_K", "attention_v": "W_V",
               "attention_o": "W_O", "mlp_in": "MLP in", "mlp_out": "MLP out"}


def layer_role(layer: str) -> str:
    """The role of one tracked matrix, from its name."""
    tensor, _, part = layer.partition(":")
    return f"attention_{part}" if part in ("q", "k", "v") else role_of(tensor)


def role_ranks(metrics: pd.DataFrame, tol: float) -> pd.DataFrame:
    """Per run, tracking point and role: the mean rank@tol of that role's matrices
    (columns run_id, step, epoch, role, value; roles in ROLES order)."""
    rows = metrics[(metrics["layer"] != "") & (metrics["metric"] == rank_metric(tol))]
    roles = rows["layer"].map({name: layer_role(name) for name in rows["layer"].unique()})
    rows = rows.assign(role=roles)[roles.isin(ROLES)]
    frame = rows.groupby(["run_id", "step", "epoch", "role"], as_index=False)["value"].mean()
    frame["role"] = pd.Categorical(frame["role"], categories=list(ROLES), ordered=True)
    return frame.sort_values(["run_id", "step", "role"]).reset_index(drop=True)


def final_role_ranks(metrics: pd.DataFrame, tol: float) -> pd.DataFrame:
    """run_id x role: the mean rank@tol of each role's matrices at a run's last tracking
    point (only the roles found)."""
    frame = role_ranks(metrics, tol)
    if frame.empty:
        return pd.DataFrame()
    last = frame[frame["step"] == frame.groupby("run_id")["step"].transform("max")]
    table = last.pivot_table(index="run_id", columns="role", values="value", observed=True)
    return table[[r for r in ROLES if r in table.columns]]
