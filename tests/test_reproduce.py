"""`rankbias reproduce` end to end on tiny experiment files, and the built-in files' schema."""

import base64
import json
import math
import re
import time
from types import SimpleNamespace

import pytest
import yaml

from rankbias.claims.pipeline import list_experiments, select
from rankbias.cli.main import main
from rankbias.runs.sweep import load_sweep
from rankbias.utils import RankbiasError

TINY = {"model": "mlp", "model_args": {"depth": 2, "width": 16}, "dataset": "digits",
        "dataset_args": {"subset": 300}, "epochs": 3, "lr": 0.3, "weight_decay": 0.02}


def write_experiments(folder):
    folder.mkdir()
    (folder / "01_batch.yaml").write_text(yaml.safe_dump({
        "id": "batch_size", "claim": 4, "statement": "rank rises with B",
        "rule_text": "strictly increasing, gap > 3 sigma",
        "rule": {"kind": "monotone", "param": "batch_size", "direction": "increasing"},
        "figures": [{"kind": "rank_curves", "vary": "batch_size"},
                    {"kind": "final_vs_param", "param": "batch_size"},
                    {"kind": "spectra", "vary": "batch_size"}, {"kind": "layer_heatmap"}],
        "scales": {"quick": {"base": TINY, "grid": {"batch_size": [8, 64]}, "seeds": [0, 1]}}}))
    (folder / "02_identity.yaml").write_text(yaml.safe_dump({
        "id": "unrolled_identity", "claim": 2, "statement": "Lemma 3.2 holds",
        "rule_text": "error <= 1e-10", "rule": {"kind": "unrolled_identity", "max_error": 1e-10},
        "check": "unrolled_identity", "figures": [],
        "scales": {"quick": {"models": ["mlp"], "dataset": "digits", "batch_size": 4,
                             "lr": 0.5, "weight_decay": 0.02, "steps": 5, "ks": [1, 5]}}}))


def _no_nan(constant):
    raise ValueError(f"claims.json is not strict JSON: it holds {constant}")


def test_pipeline_on_tiny_experiments(tmp_path, capsys):
    experiments = tmp_path / "experiments"
    write_experiments(experiments)
    out = tmp_path / "out"
    args = ["reproduce", "--out", str(out), "--experiments", str(experiments), "--workers", "1",
            "--no-progress"]
    assert main(args) == 0
    document = json.loads((out / "claims.json").read_text(), parse_constant=_no_nan)
    assert [c["id"] for c in document["claims"]] == ["batch_size", "unrolled_identity"]
    for claim in document["claims"]:
        assert set(claim) >= {"id", "statement", "verdict", "rule", "evidence"}
        assert claim["verdict"] in ("pass", "fail", "inconclusive")
    identity = document["claims"][1]
    assert identity["verdict"] == "pass"
    assert max(identity["evidence"]["max_relative_error"].values()) < 1e-12
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) == 4 and all(f.stat().st_size > 5000 for f in figures)
    html = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 4 and "http" not in "".join(sources)
    for src in sources:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "Claim 4: batch_size" in html and "unrolled_identity" in html
    assert "batch_size" in capsys.readouterr().out
    # a rerun trains nothing, gives the same verdicts and leaves no figure of an earlier run
    stale = out / "figures" / "claim09_gone_0_rank_curves.png"
    stale.write_bytes(figures[0].read_bytes())
    assert main(args) == 0
    assert not stale.exists() and len(list((out / "figures").glob("*.png"))) == 4
    again = json.loads((out / "claims.json").read_text())
    assert again["sweep"]["executed"] == 0 and again["sweep"]["skipped"] == 4
    assert [c["verdict"] for c in again["claims"]] == [c["verdict"] for c in document["claims"]]


def test_unknown_claim_exit_2(tmp_path, capsys):
    assert main(["reproduce", "no_such_claim", "--out", str(tmp_path)]) == 2
    assert "unknown claim" in capsys.readouterr().err


@pytest.mark.parametrize("scale", ["quick", "full", "paper"])
def test_builtin_experiments_cover_every_claim(scale):
    experiments = list_experiments(scale)
    assert sorted({e.claim for e in experiments if e.section == "paper"}) == list(range(1, 12))
    for experiment in experiments:
        assert experiment.statement and experiment.rule_text and experiment.rule
        if not experiment.check:
            assert experiment.configs, experiment.id
    assert [e.id for e in select(experiments, ["4", "no_weight_decay"])] == [
        "batch_size", "batch_size_equal_budget", "no_weight_decay"]
    with pytest.raises(RankbiasError):
        select(experiments, ["99"])


def test_builtin_files_load_as_sweeps():
    from rankbias.claims.pipeline import EXPERIMENTS

    for path in EXPERIMENTS.glob("*.yaml"):
        if yaml.safe_load(path.read_text()).get("check") in (None, "compression"):
            assert load_sweep(path, "quick")


@pytest.mark.parametrize("content, message", [
    ("id: x\nclaim: 4\n", "statement must be a text"),
    ("id: x\nclaim: four\nstatement: s\nrule_text: r\nrule: {kind: monotone}\nscales: {}\n",
     "claim must be a whole number"),
    ("id: x\nclaim: 4\nstatement: s\nrule_text: r\nrule: {kind: monotone}\n"
     "scales: {full: {}}\n", "has no scale 'quick'"),
    ("id: x\nclaim: 4\nstatement: s\nrule_text: r\nrule: {kind: monotone}\nscale: {}\n",
     "unknown key 'scale'"),
])
def test_a_bad_experiment_file_is_a_one_line_error(tmp_path, capsys, content, message):
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "01_x.yaml").write_text(content)
    assert main(["reproduce", "--experiments", str(folder), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("rule, message", [
    ({"kind": "monotone", "param": "batch_size", "gap_sigm": 3}, "did you mean 'gap_sigma'"),
    ({"kind": "monotone", "direction": "increasing"}, "needs param"),
    ({"kind": "monotonic", "param": "batch_size"}, "unknown rule kind 'monotonic'"),
    ({"kind": "unrolled_identity", "max_eror": 1e-10}, "did you mean 'max_error'"),
    ({"all": [{"kind": "monotone", "param": "lr", "margin": 2}]}, "has no parameter 'margin'"),
])
def test_a_misspelled_rule_parameter_is_an_error_not_a_default(tmp_path, capsys, rule, message):
    """Every rule kind declares its parameters once; an experiment file with one it does not
    declare stops the reproduction before any run (exit 2), naming the file and the key."""
    experiments = tmp_path / "experiments"
    write_experiments(experiments)
    path = experiments / "01_batch.yaml"
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "rule": rule}))
    out = tmp_path / "out"
    assert main(["reproduce", "--out", str(out), "--experiments", str(experiments),
                 "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "01_batch.yaml" in err and len(err.strip().splitlines()) == 1
    assert not (out / "results.db").exists()


def test_rule_defaults_are_declared_once_and_filled_in():
    from rankbias.claims.rules import RULES
    from rankbias.claims.verdict import KINDS, REQUIRED, parameters

    assert set(RULES) <= set(KINDS)
    filled = parameters({"kind": "monotone", "param": "lr"})
    assert filled["gap_sigma"] == KINDS["monotone"].params["gap_sigma"] == 3
    assert all(v is not REQUIRED for v in filled.values())


def test_verdicts_at_the_authors_tolerance_and_the_rank_at_fixed_weights(tmp_path):
    """Runs that track a second tolerance (the authors' 0.05) get the rule's verdict there
    too, with the gate at log(2/0.05); claim 9's check truncates every trained run to its
    eps-rank (from its checkpoint) and compares test accuracy, seed by seed."""
    folder = tmp_path / "experiments"
    folder.mkdir()
    tiny = {**TINY, "tolerances": [0.001, 0.05], "schedule": "constant", "epochs": 4}
    (folder / "04_batch.yaml").write_text(yaml.safe_dump({
        "id": "batch_size", "claim": 4, "statement": "rank rises with B", "rule_text": "r",
        "rule": {"kind": "monotone", "param": "batch_size", "direction": "increasing"},
        "figures": [], "scales": {"quick": {"base": tiny, "grid": {"batch_size": [8, 64]},
                                            "seeds": [0, 1]}}}))
    (folder / "09_gen.yaml").write_text(yaml.safe_dump({
        "id": "generalization", "claim": 9, "statement": "marginal", "rule_text": "r",
        "check": "generalization", "figures": [],
        "rule": {"kind": "generalization", "margin_basis": "a test", "min_budget": 0.1,
                 "min_budget_reason": "4 epochs: a test of the mechanics"},
        "scales": {"quick": {"base": tiny, "grid": {"batch_size": [8, 64]},
                             "seeds": [0, 1, 2]}}}))
    out = tmp_path / "out"
    assert main(["reproduce", "--out", str(out), "--experiments", str(folder), "--workers",
                 "1", "--no-progress"]) == 0
    claims = {c["id"]: c for c in json.loads((out / "claims.json").read_text())["claims"]}
    at = claims["batch_size"]["by_tolerance"]["0.05"]
    assert at["verdict"] in ("pass", "fail", "inconclusive")
    assert {v["threshold"] for v in at["validity"]} == {round(math.log(2 / 0.05), 4)}
    assert {v["threshold"] for v in claims["batch_size"]["evidence"]["validity"]} == {
        round(math.log(2000), 4)}
    comparisons = claims["generalization"]["evidence"]["comparisons"]
    truncated = [c for c in comparisons if c["what"].startswith("truncated")]
    assert len(truncated) == 2 and all(c["n"] == 3 for c in truncated)


def test_an_uninformative_design_is_inconclusive_and_an_informative_one_decides(tmp_path):
    """The same B trend (claim 4's MLP, lr 0.5, wd 0.02, B = 8 against 128): over 2 epochs
    at a constant lr its low-rank end has D = 0.02 x 180 x 2 x 0.5 = 3.6 < log(2000), so
    the rule cannot conclude, whatever the ranks; over claim 4's 30 epochs (D = 30 at B = 8)
    it decides."""
    def experiment(folder, epochs):
        folder.mkdir()
        schedule = ({"schedule": "multistep", "milestones": [15, 22]} if epochs == 30
                    else {"schedule": "constant"})
        (folder / "04_batch.yaml").write_text(yaml.safe_dump({
            "id": "batch_size", "claim": 4, "statement": "rank rises with B", "rule_text": "r",
            "rule": {"kind": "monotone", "param": "batch_size", "direction": "increasing"},
            "figures": [], "scales": {"quick": {
                "base": {"model": "mlp", "model_args": {"depth": 4, "width": 64},
                         "lr": 0.5, "weight_decay": 0.02, "epochs": epochs,
                         "track_every": epochs, **schedule},
                "grid": {"batch_size": [8, 128]}, "seeds": [0, 1]}}}))
        return folder

    verdicts = {}
    for epochs in (2, 30):
        out = tmp_path / f"out{epochs}"
        assert main(["reproduce", "--out", str(out), "--no-progress", "--workers", "1",
                     "--experiments", str(experiment(tmp_path / f"e{epochs}", epochs))]) == 0
        verdicts[epochs] = json.loads((out / "claims.json").read_text())["claims"][0]
    assert verdicts[2]["verdict"] == "inconclusive"
    assert "B=8: D=3.60 vs 7.6" in verdicts[2]["reason"]
    assert verdicts[30]["verdict"] == "pass", verdicts[30]["reason"]
    assert [v["informative"] for v in verdicts[30]["evidence"]["validity"]] == [True, False]


@pytest.mark.parametrize("scale", ["quick", "full", "paper"])
def test_the_identity_check_runs_on_every_model_its_scale_names(scale):
    # Claim 2 at full scale once failed after hours of training: the stacked engine's
    # recording reshaped a packed attention in-projection (ViT) as one of its parts. Every
    # model a scale names goes through both recordings here, a few steps each, and the
    # identity holds to float64 precision on each (the stack's members included).
    from rankbias.theory.checks import check_unrolled_identity

    (identity,) = select(list_experiments(scale), ["unrolled_identity"])
    settings = {**identity.spec, "dataset": "digits", "warmup_steps": 0, "steps": 3,
                "ks": [1, 3]}
    result = check_unrolled_identity(settings)
    errors = result.evidence["max_relative_error"]
    names = {m if isinstance(m, str) else m["name"] for m in settings["models"]}
    for name in names:
        assert {f"{name}, stacked member {j}, k={k}" for j in (0, 1) for k in (1, 3)} <= set(errors)
    assert result.verdict == "pass" and max(errors.values()) < 1e-12


def _without_wall(value):
    if isinstance(value, dict):
        return {k: _without_wall(v) for k, v in value.items() if k != "wall_s"}
    return [_without_wall(v) for v in value] if isinstance(value, list) else value


def test_claims_evaluated_on_two_processes_are_those_of_one(tmp_path, monkeypatch, capsys):
    """The verdicts and numbers do not depend on which process evaluated a claim: the same
    store evaluated on a pool of 2 (the expensive theory check sent first) and inline gives
    the same claims.json, less its wall times, and the same report text."""
    from rankbias.claims import pipeline

    monkeypatch.setattr(pipeline, "available_cpus", lambda: 2)  # a pool even on one core
    experiments = tmp_path / "experiments"
    write_experiments(experiments)
    out = tmp_path / "out"
    documents, markdown = [], []
    for workers in ("2", "1"):
        assert main(["reproduce", "--out", str(out), "--experiments", str(experiments),
                     "--workers", workers, "--no-progress"]) == 0
        documents.append(json.loads((out / "claims.json").read_text()))
        markdown.append((out / "claims.md").read_text().split("\n", 1)[1])  # 1st: the time
    assert documents[1]["sweep"]["executed"] == 0  # the second call evaluates only
    for document in documents:
        document["sweep"] = None
    assert _without_wall(documents[0]) == _without_wall(documents[1])
    assert [c["id"] for c in documents[0]["claims"]] == ["batch_size", "unrolled_identity"]
    assert markdown[0] == markdown[1]
    assert len(list((out / "figures").glob("*.png"))) == 4


def test_an_error_in_a_claim_evaluated_in_a_pool_is_the_same_one_line_error(tmp_path,
                                                                             monkeypatch, capsys):
    from rankbias.claims import pipeline

    monkeypatch.setattr(pipeline, "available_cpus", lambda: 2)
    experiments = tmp_path / "experiments"
    write_experiments(experiments)
    spec = yaml.safe_load((experiments / "02_identity.yaml").read_text())
    spec["scales"]["quick"]["models"] = ["no_such_model"]
    (experiments / "02_identity.yaml").write_text(yaml.safe_dump(spec))
    (experiments / "01_batch.yaml").unlink()  # no runs to train: the check alone fails
    (experiments / "03_identity.yaml").write_text(yaml.safe_dump({**spec, "id": "again"}))
    errors = []
    for workers in ("2", "1"):
        assert main(["reproduce", "--out", str(tmp_path / "out"), "--experiments",
                     str(experiments), "--workers", workers, "--no-progress"]) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and len(errors[0].strip().splitlines()) == 1
    assert "unknown model 'no_such_model'" in errors[0]


def _sleep_then_raise(item):
    time.sleep(item.sleep)
    if item.error:
        raise ValueError(item.error)
    return item.error


def test_the_pool_raises_the_first_error_in_order_and_stops_the_rest(monkeypatch):
    """As inline: the error of the first failing experiment in file order (not the first to
    fail), and no task left running to the end once it is known."""
    from rankbias.claims import pipeline

    monkeypatch.setattr(pipeline, "available_cpus", lambda: 2)
    items = [SimpleNamespace(check=None, sleep=1.0, error="first in order"),
             SimpleNamespace(check=None, sleep=0.0, error="first to fail"),
             SimpleNamespace(check=None, sleep=60.0, error=None)]
    started = time.monotonic()
    with pytest.raises(ValueError, match="first in order"):
        pipeline.evaluate_all(items, _sleep_then_raise, workers=2)
    assert time.monotonic() - started < 30
    ok = [SimpleNamespace(check=None, sleep=0.0, error=None)] * 3
    assert pipeline.evaluate_all(ok, _sleep_then_raise, workers=2) == [None] * 3


def test_a_theory_check_runs_on_one_torch_thread_wherever_it_is_evaluated(monkeypatch):
    """Claim 3's numbers on the quick scale differ between 1 and 2 torch threads (float sums
    split per thread): the driver (all cores' threads) and a pool process (one) would give
    different verdicts, so the check itself runs on one."""
    import torch

    from rankbias.claims import pipeline

    (identity,) = select(list_experiments("quick"), ["unrolled_identity"])
    monkeypatch.setitem(pipeline.THEORY_CHECKS, "unrolled_identity",
                        lambda spec, **_: ("pass", "", {"threads": torch.get_num_threads()}))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        verdict = pipeline.decide(identity, None, None, "unused")
        assert verdict.evidence["threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
