"""Every JSON rankbias writes parses with a strict parser: no NaN, no Infinity."""

import json

import pytest
import torch

from rankbias.cli.main import main
from rankbias.utils import plain, to_json


def strict_loads(text: str):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=reject)


def test_to_json_writes_null_for_non_finite_numbers():
    value = {"a": float("nan"), "b": [float("inf"), -float("inf")], "c": torch.tensor(2.5),
             "d": torch.tensor([1.0, float("nan")]), 3: (1, 2)}
    assert strict_loads(to_json(value)) == {"a": None, "b": [None, None], "c": 2.5,
                                            "d": [1.0, None], "3": [1, 2]}
    assert plain(float("nan")) is None
    with pytest.raises(ValueError):
        strict_loads('{"a": NaN}')  # the parser of these tests is strict indeed


def test_every_json_output_is_strict(tmp_path, capsys):
    store = str(tmp_path / "r.db")
    tiny = ["--model-arg", "depth=2", "--model-arg", "width=16", "--dataset-arg", "subset=200",
            "--store", store, "--no-progress", "--format", "json", "--device", "cpu"]
    outputs = []
    # A run that diverges at once: its ranks and accuracies are NaN inside (exit 1: the
    # hint goes to stderr, the JSON to stdout).
    assert main(["train", "--lr", "1e6", "--epochs", "2", "--batch-size", "8", *tiny]) == 1
    outputs.append(capsys.readouterr().out)
    assert main(["train", "--lr", "0.1", "--epochs", "1", "--batch-size", "32", *tiny]) == 0
    outputs.append(capsys.readouterr().out)
    assert main(["runs", "--store", store, "--format", "json"]) == 0
    outputs.append(capsys.readouterr().out)
    assert main(["bound", "--batch-size", "8", "--lr", "0.5", "--weight-decay", "0",
                 "--format", "json"]) == 0
    outputs.append(capsys.readouterr().out)
    assert main(["data", "list", "--format", "json"]) == 0
    outputs.append(capsys.readouterr().out)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert main(["analyze", str(tmp_path / "m.pt"), "--format", "json"]) == 0
    outputs.append(capsys.readouterr().out)
    documents = [strict_loads(text) for text in outputs]
    assert documents[0]["status"] == "diverged"
    assert documents[3]["bound"] is None and documents[3]["min_steps"] is None


def test_a_summary_with_nan_prints_and_stores_as_null(tmp_path, capsys):
    import io

    from rankbias.cli.commands import _print_summary

    summary = {"run_id": "r", "status": "diverged", "final_avg_rank": float("nan"),
               "train_acc": float("nan"), "wall_s": 1.0}
    out = io.StringIO()
    _print_summary(summary, "json", out)
    assert strict_loads(out.getvalue())["final_avg_rank"] is None
