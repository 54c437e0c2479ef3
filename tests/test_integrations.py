"""The Lightning and Hugging Face callbacks, with the real libraries, on tiny local models.

Each logged rank is checked against numpy's float64 SVD of the model's own weights at that
moment (an independent oracle), and the store they write against the logged values.
Skipped with the reason where `lightning` or `transformers` is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankbias.report.explorer_data import explorer_data
from rankbias.runs.store import Store

TOL = 1e-3


def oracle(weight: torch.Tensor) -> dict[str, float]:
    """The paper's rank and the stable rank of a matrix, from numpy's SVD in float64."""
    sigma = np.linalg.svd(weight.detach().double().numpy(), compute_uv=False)
    normed = sigma / np.sqrt(np.sum(sigma**2))
    return {"rank": int(np.sum(normed > TOL)), "stable_rank": float(np.sum(sigma**2) / sigma[0]**2)}


def change(after: torch.Tensor, before: torch.Tensor) -> float:
    after, before = after.detach().double().numpy(), before.detach().double().numpy()
    return float(np.linalg.norm(after - before) / np.linalg.norm(before))


def teacher_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x @ torch.randn(8, 3, generator=g)).argmax(dim=1)


# --- PyTorch Lightning --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lightning():
    return pytest.importorskip("lightning.pytorch", reason='lightning is not installed '
                               '(pip install -e ".[lightning]")')


def test_lightning_callback_logs_ranks(lightning, tmp_path):
    from lightning.pytorch.loggers.logger import Logger

    from rankbias.integrations.lightning import RankCallback

    class Tiny(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                     nn.Linear(32, 3))
            with torch.no_grad():  # a hidden matrix of known rank 5 at the start
                self.net[2].weight.copy_(torch.randn(32, 5) @ torch.randn(5, 32) / 10)

        def training_step(self, batch, index):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, weight_decay=5e-3)

    class Memory(Logger):  # the Lightning logger interface, kept in memory
        name, version = "memory", 0
        logged: list = []

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    class Snapshot(lightning.Callback):  # the weights after epoch 2, for the weight change
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 1:
                self.weights = {n: p.detach().clone() for n, p in module.named_parameters()}

    model, logger, snapshot = Tiny(), Memory(), Snapshot()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*teacher_data()),
                                         batch_size=8)
    store = tmp_path / "results.db"
    trainer = lightning.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1,
        callbacks=[RankCallback(every_n_epochs=2, store=store, config={"dataset": "teacher"}),
                   snapshot])
    trainer.fit(model, loader)

    points = [(step, m) for step, m in logger.logged if "rankbias/avg_rank" in m]
    assert [step for step, _ in points] == [0, 16, 24]  # init, epoch 2, the end (8 steps/epoch)
    hidden, layers = ["net.0.weight", "net.2.weight"], ["net.0.weight", "net.2.weight",
                                                         "net.4.weight"]
    end = dict(model.named_parameters())
    for (_, logged), weights in ((points[0], start), (points[-1], end)):
        expected = {name: oracle(weights[name]) for name in layers}
        for name in layers:
            assert logged[f"rankbias/{name}/rank@0.001"] == expected[name]["rank"]
            assert logged[f"rankbias/{name}/stable_rank"] == pytest.approx(
                expected[name]["stable_rank"], rel=1e-9)
        assert logged["rankbias/avg_rank"] == np.mean([expected[n]["rank"] for n in hidden])
    assert points[0][1]["rankbias/net.2.weight/rank@0.001"] == 5  # known by construction
    assert not any("weight_change" in k for k in points[0][1])  # nothing to compare at init
    for name in layers:
        assert points[-1][1][f"rankbias/{name}/weight_change"] == pytest.approx(
            change(end[name], snapshot.weights[name]), rel=1e-9)

    with Store(store) as db:
        runs, metrics = db.runs(), db.metrics()
        data = explorer_data(db)
    run = runs.iloc[0]
    assert len(runs) == 1 and run["status"] == "done" and run["model"] == "Tiny"
    assert (run["batch_size"], run["lr"], run["weight_decay"], run["dataset"]) == \
        (8, 0.2, 5e-3, "teacher")
    averages = metrics[(metrics["metric"] == "avg_rank") & (metrics["layer"] == "")]
    assert averages["step"].tolist() == [0, 16, 24]
    assert averages["value"].tolist() == [m["rankbias/avg_rank"] for _, m in points]
    assert run["final_avg_rank"] == points[-1][1]["rankbias/avg_rank"]
    assert data["curves"][0]["e"] == [0, 2, 3] and data["runs"]["spectra"][0]


# --- Hugging Face transformers ------------------------------------------------------------------
@pytest.fixture()
def transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing from any hub: the model is built here
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    module = pytest.importorskip("transformers", reason='transformers is not installed '
                                 '(pip install -e ".[huggingface]")')
    pytest.importorskip("accelerate", reason='the Trainer needs accelerate '
                        '(pip install -e ".[huggingface]")')
    return module


def tiny_bert(transformers):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": i % 3}
            for i in range(32)]
    return model, data


def trainer_of(transformers, tmp_path, model, data, callbacks=None):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), num_train_epochs=2, per_device_train_batch_size=4,
        learning_rate=0.05, weight_decay=0.01, optim="sgd", lr_scheduler_type="constant",
        logging_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def test_huggingface_callback_logs_through_the_trainer(transformers, tmp_path):
    from rankbias.integrations.huggingface import RankCallback
    from rankbias.metrics.layers import weight_matrices

    class Reporter(transformers.TrainerCallback):  # stands for TensorBoard, W&B, ...
        logs: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    model, data = tiny_bert(transformers)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    reporter = Reporter()
    trainer = trainer_of(transformers, tmp_path, model, data, callbacks=[reporter])
    RankCallback(every_n_epochs=1, store=tmp_path / "results.db").attach(trainer)
    trainer.train()

    points = [h for h in trainer.state.log_history if "rankbias/avg_rank" in h]
    assert [p["step"] for p in points] == [0, 8, 16]  # init and two epochs of 8 steps
    assert [r for r in reporter.logs if "rankbias/avg_rank" in r] == \
        [{k: v for k, v in p.items() if k != "step"} for p in points]
    end = dict(model.named_parameters())
    hidden = list(weight_matrices(model))
    assert "bert.encoder.layer.0.attention.self.query.weight" in hidden
    for point, weights in ((points[0], start), (points[-1], end)):
        ranks = {}
        for key, value in point.items():
            if key.endswith("/rank@0.001"):
                name = key[len("rankbias/"):-len("/rank@0.001")]
                ranks[name] = oracle(weights[name])["rank"]
                assert value == ranks[name], name
                assert point[f"rankbias/{name}/stable_rank"] == pytest.approx(
                    oracle(weights[name])["stable_rank"], rel=1e-9)
        assert set(hidden) < set(ranks)  # every hidden matrix, and the classifier too
        assert point["rankbias/avg_rank"] == pytest.approx(np.mean([ranks[n] for n in hidden]))
    name = hidden[0]
    assert points[-1][f"rankbias/{name}/weight_change"] > 0
    with Store(tmp_path / "results.db") as db:
        run = db.runs().iloc[0]
    assert run["status"] == "done" and run["model"] == "bert"
    assert (run["batch_size"], run["lr"], run["weight_decay"], run["seed"]) == (4, 0.05, 0.01, 0)
    assert run["final_avg_rank"] == points[-1]["rankbias/avg_rank"]


def test_huggingface_callback_without_attach(transformers, tmp_path):
    from rankbias.integrations.huggingface import RankCallback

    model, data = tiny_bert(transformers)
    callback = RankCallback(every_n_epochs=2, per_layer=False)
    trainer = trainer_of(transformers, tmp_path, model, data, callbacks=[callback])
    trainer.train()
    points = [h for h in trainer.state.log_history if "rankbias/avg_rank" in h]
    assert [p["step"] for p in points] == [0, 16]
    assert all(not any(k.count("/") > 1 for k in p) for p in points)  # no per-layer values
    assert callback.recorder.tracker.latest() == points[-1]["rankbias/avg_rank"]
