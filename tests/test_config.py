"""Run configs: one normal form, so one run has one id whatever its spelling."""

import json

import pytest

from rankbias.models import model_options
from rankbias.training.config import NOT_IDENTITY, RunConfig
from rankbias.utils import RankbiasError


@pytest.mark.parametrize("spelling_a, spelling_b", [
    (dict(momentum=0), dict(momentum=0.0)),
    (dict(schedule="multistep", gamma=1), dict(schedule="multistep", gamma=1.0)),
    (dict(lr=1), dict(lr=1.0)),
    (dict(batch_size=8.0), dict(batch_size=8)),
    (dict(model_args={}), dict(model_args=model_options("mlp"))),
    (dict(model="resnet18", model_args={"width": 1}),
     dict(model="resnet18", model_args={"width": 1.0})),
    (dict(schedule="constant", milestones=[10, 20], gamma=0.5), dict(schedule="constant")),
    (dict(schedule="multistep"), dict(schedule="multistep", milestones=[60, 100, 200])),
    (dict(weight_decay=0.0, wd_scope="weights"), dict(weight_decay=0.0)),
    (dict(gradient_rank_steps=7), dict()),
    (dict(tolerances=[1e-3, 1e-3]), dict(tolerances=[0.001])),
    (dict(dataset="FMNIST"), dict(dataset="fashion-mnist")),
    (dict(dataset_args={"subset": 300, "normalize": True}), dict(dataset_args={"subset": 300})),
    (dict(dataset_args={"root": "/data/a"}), dict(dataset_args={"root": "/elsewhere"})),
    (dict(device="cpu", checkpoint_every=5), dict()),
    (dict(optimizer="sgd"), dict()),
])
def test_spellings_of_one_run_share_an_id(spelling_a, spelling_b):
    a, b = RunConfig(**spelling_a), RunConfig(**spelling_b)
    assert a.run_id() == b.run_id()
    assert RunConfig.from_dict(json.loads(json.dumps(a.to_dict()))).run_id() == a.run_id()


@pytest.mark.parametrize("changes", [
    dict(momentum=0.9), dict(model_args={"width": 50}), dict(schedule="multistep"),
    dict(dataset_args={"subset": 300}), dict(optimizer="adamw"), dict(tolerances=[0.05]),
    dict(schedule="multistep", milestones=[5]), dict(seed=1), dict(track_every=2),
])
def test_what_changes_the_numbers_changes_the_id(changes):
    assert RunConfig(**changes).run_id() != RunConfig().run_id()


def test_the_id_is_the_same_before_and_after_validation_and_mutation():
    cfg = RunConfig(momentum=0, model_args={})
    before = cfg.run_id()
    assert cfg.validated().run_id() == before
    cfg.momentum = 0  # a later assignment is normalized too
    assert cfg.run_id() == before and cfg.to_dict()["momentum"] == 0.0


def test_the_normal_form_is_typed_and_complete():
    d = RunConfig(momentum=0, gamma=1, schedule="multistep", model="vit").to_dict()
    assert isinstance(d["momentum"], float) and isinstance(d["gamma"], float)
    assert d["milestones"] == [60, 100, 200]
    assert d["model_args"] == model_options("vit")  # every option spelled out
    assert set(NOT_IDENTITY) <= set(d) and not set(NOT_IDENTITY) & set(RunConfig().identity())


@pytest.mark.parametrize("changes, key", [
    (dict(batch_size=8.5), "batch_size"), (dict(momentum=True), "momentum"),
    (dict(optimizer="rmsprop"), "optimizer"), (dict(dataset_args={"seed": 3}), "seed"),
    (dict(model_args={"widht": 3}), "widht"),
])
def test_bad_values_are_still_rejected(changes, key):
    with pytest.raises(RankbiasError, match=key):
        RunConfig.from_dict(changes)
