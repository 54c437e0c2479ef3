"""`rankbias analyze` end to end on saved files, against numpy float64 SVD."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from rankbias.cli.main import main
from rankbias.models import create_model
from rankbias.training.checkpoint import CHECKPOINT_FORMAT


def oracle_rank(w: torch.Tensor, tol: float) -> int:
    m = w.detach().double().reshape(w.shape[0], -1).numpy()
    s = np.linalg.svd(m, compute_uv=False)
    return int(np.sum(s / np.linalg.norm(m) > tol))


def low_rank_mlp() -> nn.Sequential:
    """Hidden layers of known rank 3 and 5, and a classifier."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(16, 3) @ torch.randn(3, 12))
        model[2].weight.copy_(torch.randn(16, 5) @ torch.randn(5, 16))
    return model


def run_json(capsys, *args) -> dict:
    assert main(["analyze", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_state_dict_ranks_match_float64_oracle(tmp_path, capsys):
    model = low_rank_mlp()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    report = run_json(capsys, str(path))
    ranks = {row["name"]: row["rank"] for row in report["layers"]}
    # a bare state_dict gets the paper's selection too: the classifier (4.weight) is out
    assert ranks == {"0.weight": 3, "2.weight": 5}
    assert report["left_out"] == ["4.weight"] and report["matrices_averaged"] == 2
    for name, tensor in model.state_dict().items():
        if name in ranks:
            assert ranks[name] == oracle_rank(tensor, 1e-3)
    assert report["average_rank"] == pytest.approx(4.0)
    everything = run_json(capsys, str(path), "--all")
    assert {row["name"]: row["rank"] for row in everything["layers"]} == {
        "0.weight": 3, "2.weight": 5, "4.weight": oracle_rank(model[4].weight, 1e-3)}


def test_checkpoint_uses_paper_selection_and_many_tolerances(tmp_path, capsys):
    model = create_model("mlp", (1, 8, 8), 10, depth=3, width=30)
    path = tmp_path / "ckpt.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_spec": model.spec,
                "model": model.state_dict()}, path)
    report = run_json(capsys, str(path), "--tol", "1e-3", "--tol", "0.05")
    assert len(report["layers"]) == 3  # hidden layers only; no classifier
    hidden = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    for row, layer in zip(report["layers"], hidden):
        assert row["ranks"]["0.001"] == oracle_rank(layer.weight, 1e-3)
        assert row["ranks"]["0.05"] == oracle_rank(layer.weight, 0.05)
    assert report["average_ranks"]["0.05"] == pytest.approx(
        np.mean([oracle_rank(m.weight, 0.05) for m in hidden]))


def test_full_model_needs_trust(tmp_path, capsys):
    path = tmp_path / "full.pt"
    torch.save(low_rank_mlp(), path)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--trust" in err and len(err.strip().splitlines()) == 1
    report = run_json(capsys, str(path), "--trust")
    assert [r["rank"] for r in report["layers"]] == [3, 5]  # a module: paper selection


def test_table_csv_and_spectra(tmp_path, capsys):
    model = low_rank_mlp()
    path, spectra = tmp_path / "sd.pt", tmp_path / "spectra.npz"
    torch.save(model.state_dict(), path)
    assert main(["analyze", str(path), "--spectra", str(spectra)]) == 0
    table = capsys.readouterr().out
    assert "0.weight" in table and "average rank over 2 matrices: 4.00" in table
    assert "left out (the paper's selection, --all includes them): 4.weight" in table
    saved = np.load(spectra)
    oracle = np.linalg.svd(model[2].weight.detach().double().numpy(), compute_uv=False)
    np.testing.assert_allclose(saved["2.weight"], oracle, rtol=1e-9, atol=1e-12)
    assert main(["analyze", str(path), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("name,shape,rank@0.001") and len(lines) == 3


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04truncated zip"])
def test_corrupt_files_exit_2_with_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and len(err.strip().splitlines()) == 1


def test_truncated_checkpoint_and_missing_file(tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save(low_rank_mlp().state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert main(["analyze", str(cut)]) == 2
    assert main(["analyze", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "missing.pt" in err[1]


def test_non_finite_weights_exit_2(tmp_path, capsys):
    model = low_rank_mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(model.state_dict(), path)
    assert main(["analyze", str(path)]) == 2
    assert "2.weight" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "x.pt", "--format", "xml"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "x.pt", "--tol", "abc"])
    assert exc.value.code == 2
    path = tmp_path / "sd.pt"
    torch.save(low_rank_mlp().state_dict(), path)
    assert main(["analyze", str(path), "--tol", "-1"]) == 2


def test_spectra_not_written_on_failure(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"junk")
    spectra = tmp_path / "s.npz"
    assert main(["analyze", str(path), "--spectra", str(spectra)]) == 2
    assert list(tmp_path.iterdir()) == [path]
