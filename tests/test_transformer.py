"""The transformer and its task (issue 25): modular-addition against hand computations, the
model's matrices by role, attention under vmap, the attention products the tracker records
against a numpy oracle, a tiny run above chance, and its checkpoint analyzed by role."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rankbias.analyze.matrices import role_of
from rankbias.cli.main import main
from rankbias.data import describe, list_datasets, load_dataset
from rankbias.metrics.layers import attention_layers, weight_matrices
from rankbias.metrics.tracker import RankTracker
from rankbias.models import create_model, example_input
from rankbias.training.config import RunConfig
from rankbias.training.stack import ModelStack
from rankbias.training.train import train_run
from rankbias.utils import RankbiasError

TINY = dict(depth=2, width=16, heads=4, mlp_ratio=2.0)


# --- the data set -------------------------------------------------------------------------
@pytest.mark.parametrize("operation, op", [("add", lambda a, b: a + b),
                                           ("subtract", lambda a, b: a - b),
                                           ("multiply", lambda a, b: a * b)])
def test_modular_pairs_labels_and_split(operation, op):
    ds = load_dataset("modular-addition", p=7, train_fraction=0.4, operation=operation)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.int64 and ds.tokens
    assert ds.input_shape == (3,) and ds.num_classes == 7 and ds.mean is None
    assert (len(ds.y_train), len(ds.y_test)) == (round(0.4 * 49), 49 - round(0.4 * 49))
    pairs = set()
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        for (a, b, eq), label in zip(x.tolist(), y.tolist()):
            assert eq == 7 and 0 <= a < 7 and 0 <= b < 7
            assert label == op(a, b) % 7  # Python's % is the mathematician's mod
            pairs.add((a, b))
    assert pairs == {(a, b) for a in range(7) for b in range(7)}  # a partition of every pair
    assert describe("modular-addition", dict(p=7, train_fraction=0.4)) == (20, (3,), 7)


def test_modular_split_is_a_function_of_its_data_seed():
    a, b = load_dataset("modular-addition", p=11), load_dataset("modular-addition", p=11)
    c = load_dataset("modular-addition", p=11, data_seed=1)
    d = load_dataset("modular-addition", p=11, seed=5)  # a run's seed never changes the data
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_train, d.x_train)
    assert not torch.equal(a.x_train, c.x_train) and len(a.x_train) == len(c.x_train)
    assert describe("modular-addition") == (round(0.3 * 97 ** 2), (3,), 97)
    assert "modular-addition" in list_datasets()
    sub = load_dataset("modular-addition", p=11, subset=10)
    assert len(sub.x_train) == 10 and sub.x_train.dtype == torch.int64


@pytest.mark.parametrize("options, match", [
    (dict(p=1), "p must be an integer >= 2"), (dict(train_fraction=1.0), r"in \(0, 1\)"),
    (dict(operation="divide"), "unknown operation 'divide'"),
    (dict(pad_to=8), "token sequences: pad_to"),
])
def test_modular_bad_options(options, match):
    with pytest.raises(RankbiasError, match=match):
        load_dataset("modular-addition", **options)


# --- the model's matrices -------------------------------------------------------------------
def test_the_average_rank_takes_q_k_v_o_and_the_mlp_of_every_block():
    model = create_model("transformer", (3,), 7, **TINY)
    hidden = weight_matrices(model)
    roles = ["attention_q", "attention_k", "attention_v", "attention_o", "mlp_in", "mlp_out"]
    assert [role_of(name) for name in hidden] == roles * 2
    assert [name.split(".")[1] for name in hidden] == ["0"] * 6 + ["1"] * 6
    assert hidden["blocks.1.mlp.fc_in.weight"].shape == (32, 16)
    every = weight_matrices(model, include_classifier=True)
    assert set(every) - set(hidden) == {"head.weight"}  # embeddings are never matrices here
    layout = attention_layers(model)["blocks.1.attn"]
    assert (layout.n_heads, layout.n_kv_heads, layout.head_dim) == (4, 4, 4)
    assert layout.names["o"] == "blocks.1.attn.o_proj.weight"
    vit = create_model("vit", (1, 8, 8), 10, dim=16, heads=2, depth=1)
    assert attention_layers(vit)["blocks.0.attn"].names["q"] == "blocks.0.attn.in_proj_weight:q"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_under_vmap_equals_each_member(dtype):
    configs = [RunConfig(model="transformer", dataset="modular-addition", lr=0.1, seed=s)
               for s in range(3)]
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(create_model("transformer", (3,), 7, **TINY).to(dtype))
    stack = ModelStack(models, configs, torch.device("cpu"))
    x = torch.randint(0, 8, (3, 5, 3))
    stacked = stack._forward(stack.params, stack.buffers, x)
    for j, model in enumerate(models):
        torch.testing.assert_close(stacked[j], model(x[j]),
                                   rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    assert example_input(models[0], (3,), batch=2).dtype == torch.int64


# --- the products the tracker records ----------------------------------------------------------
def numpy_product_ranks(w: dict[str, np.ndarray], heads: int, tol: float) -> dict[str, list]:
    """Per head: rank_tol of W_Q^h^T W_K^h and W_O^h W_V^h, each divided by its Frobenius
    norm, from numpy's float64 SVD of the dense d x d products."""
    hd = w["q"].shape[0] // heads
    out = {"qk": [], "ov": []}
    for h in range(heads):
        rows = slice(h * hd, (h + 1) * hd)
        for kind, product in (("qk", w["q"][rows].T @ w["k"][rows]),
                              ("ov", w["o"][:, rows] @ w["v"][rows])):
            sigma = np.linalg.svd(product / np.linalg.norm(product), compute_uv=False)
            out[kind].append(int((sigma > tol).sum()))
    return out


def test_tracked_products_equal_a_numpy_oracle():
    torch.manual_seed(0)
    model = create_model("transformer", (3,), 7, **TINY)
    with torch.no_grad():  # give head 1 of block 0 a rank-2 query and head 3 a rank-1 value
        model.blocks[0].attn.q_proj.weight[4:6] = 0.0
        model.blocks[0].attn.v_proj.weight[12:16] = torch.outer(torch.randn(4), torch.randn(16))
    tracker = RankTracker(model, tolerances=[1e-3, 0.1])
    point = tracker.track(step=0)
    rows = {(layer, metric): value for _, _, layer, metric, value in tracker.rows}
    expected_means = {}
    for block in range(2):
        attn = model.blocks[block].attn
        w = {p: getattr(attn, f"{p}_proj").weight.detach().double().numpy() for p in "qkvo"}
        for tol in (1e-3, 0.1):
            ranks = numpy_product_ranks(w, 4, tol)
            for kind, values in ranks.items():
                for h, rank in enumerate(values):
                    key = (f"blocks.{block}.attn.head{h}.{kind}", f"product_rank@{tol:g}")
                    assert rows[key] == rank, key
                expected_means.setdefault((kind, tol), []).extend(values)
    assert rows[("blocks.0.attn.head1.qk", "product_rank@0.001")] == 2
    assert rows[("blocks.0.attn.head3.ov", "product_rank@0.001")] == 1
    for (kind, tol), values in expected_means.items():
        assert point[f"avg_{kind}_rank@{tol:g}"] == pytest.approx(np.mean(values))
    assert point["avg_qk_rank"] == point["avg_qk_rank@0.001"]
    # never in the average rank: that is the mean over the 12 hidden matrices alone
    hidden = [rows[(name, "rank@0.001")] for name in weight_matrices(model)]
    assert point["avg_rank"] == pytest.approx(np.mean(hidden))
    assert not attention_layers(create_model("mlp", (4,), 3))  # no attention, no products
    assert "avg_qk_rank" not in RankTracker(model, attention_products=False).track(0)


# --- training, checkpoints, analysis ---------------------------------------------------------
def test_a_tiny_run_beats_chance_and_its_checkpoint_analyzes_by_role(tmp_path, capsys):
    cfg = RunConfig(model="transformer", model_args=dict(depth=1, width=32, heads=4),
                    dataset="modular-addition", dataset_args=dict(p=11, train_fraction=0.5),
                    optimizer="adamw", lr=3e-3, weight_decay=0.5, wd_scope="weights",
                    batch_size=16, epochs=60, track_every=20, device="cpu")
    result = train_run(cfg, checkpoint_path=tmp_path / "run.pt")
    assert result.status == "done"
    assert result.summary["train_acc"] > 0.9 and result.summary["test_acc"] > 3 / 11
    assert result.summary["init_avg_qk_rank"] == 8.0  # head_dim: full rank at init
    assert {"final_avg_qk_rank", "final_avg_ov_rank"} <= set(result.summary)
    assert main(["analyze", str(tmp_path / "run.pt"), "--attention-products",
                 "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted({row["role"] for row in report["layers"]}) == [
        "attention_k", "attention_o", "attention_q", "attention_v", "mlp_in", "mlp_out"]
    assert len(report["layers"]) == 6 and len(report["attention_products"]) == 8
    final = {(layer, m): v for step, _, layer, m, v in result.rows if step == result.steps}
    for row in report["layers"] + report["attention_products"]:  # the tracker's last point
        metric = "product_rank@0.001" if "kind" in row else "rank@0.001"
        assert row["ranks"]["0.001"] == final[(row["name"], metric)], row["name"]


def tiny_run(**changes) -> RunConfig:
    return RunConfig(**{**dict(
        model="transformer", model_args=dict(depth=1, width=16, heads=2),
        dataset="modular-addition", dataset_args=dict(p=11, train_fraction=0.5),
        optimizer="sgd", lr=0.05, weight_decay=0.05, wd_scope="weights", batch_size=8,
        epochs=4, device="cpu"), **changes})


def test_a_transformer_resumes_bit_identical(tmp_path):
    cfg = tiny_run(checkpoint_every=1, optimizer="adamw", lr=3e-3, weight_decay=1.0)

    class Interrupt(Exception):
        pass

    def stop_at_epoch_3(epoch, point):
        if epoch == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_run(cfg, checkpoint_path=tmp_path / "a.pt", on_track=stop_at_epoch_3)
    resumed = train_run(cfg, checkpoint_path=tmp_path / "a.pt", resume=True)
    uninterrupted = train_run(cfg)
    strip = [r for r in resumed.rows if r[3] != "wall_s"]
    assert strip == [r for r in uninterrupted.rows if r[3] != "wall_s"] and len(strip) > 0


def test_a_transformer_grid_sweeps_stacked_into_the_same_runs(tmp_path):
    from rankbias.runs.store import Store
    from rankbias.runs.sweep import run_sweep

    configs = [tiny_run(lr=lr, weight_decay=wd, seed=seed)
               for lr, wd, seed in [(0.05, 0.05, 0), (0.1, 0.02, 1), (0.02, 0.0, 2)]]
    for mode in ("auto", "off"):
        summary = run_sweep(configs, tmp_path / f"{mode}.db", workers=1, ensemble=mode,
                            progress=False)
        assert summary.executed == 3 and summary.failed == 0
    frames = [Store(tmp_path / f"{mode}.db").runs().set_index("run_id").sort_index()
              for mode in ("auto", "off")]
    assert list(frames[0].index) == list(frames[1].index) == sorted(c.run_id() for c in configs)
    for column in ("final_avg_rank", "final_avg_qk_rank", "final_avg_ov_rank"):
        assert np.abs(frames[0][column] - frames[1][column]).max() <= 1.0  # at a threshold
    np.testing.assert_allclose(frames[0].train_acc, frames[1].train_acc, atol=2 / 60)


@pytest.mark.parametrize("flags, message", [
    (["--model", "transformer", "--dataset", "synthetic"], "takes token ids, but synthetic"),
    (["--model", "mlp", "--dataset", "modular-addition"], "use --model transformer"),
    (["--model", "transformer", "--dataset", "digits"], "token sequences of shape"),
])
def test_token_models_and_token_data_only_meet_each_other(tmp_path, capsys, flags, message):
    assert main(["train", *flags, "--epochs", "1", "--store", str(tmp_path / "s.db")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
