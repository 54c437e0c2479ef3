"""`rankbias train`'s run flags are generated from RunConfig: every field has one, with the
field's comment as help, and each flag's value reaches the config (parsing only, no run)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from rankbias.cli.flags import config_values, field_help
from rankbias.cli.main import build_parser, main
from rankbias.training.config import RunConfig
from rankbias.utils import RankbiasError

# One example per field: the flags, and the value the config must then hold (for a mapping:
# items it must contain). A new RunConfig field needs a line here.
EXAMPLES = {
    "model": (["--model", "convnet"], "convnet"),
    "model_args": (["--model-arg", "depth=3", "--model-arg", "width=32"],
                   {"depth": 3, "width": 32}),
    "dataset": (["--dataset", "synthetic"], "synthetic"),
    "dataset_args": (["--dataset-arg", "subset=300"], {"subset": 300}),
    "batch_size": (["--batch-size", "16"], 16),
    "lr": (["--lr", "0.5"], 0.5),
    "weight_decay": (["--weight-decay", "0.02"], 0.02),
    "optimizer": (["--optimizer", "adamw"], "adamw"),
    "momentum": (["--momentum", "0.9"], 0.9),
    "schedule": (["--schedule", "cosine"], "cosine"),
    "milestones": (["--schedule", "multistep", "--milestones", "10", "20"], [10, 20]),
    "gamma": (["--schedule", "multistep", "--gamma", "0.5"], 0.5),
    "epochs": (["--epochs", "7"], 7),
    "loss": (["--loss", "mse"], "mse"),
    "wd_scope": (["--wd-scope", "weights"], "weights"),
    "seed": (["--seed", "3"], 3),
    "track_every": (["--track-every", "2"], 2),
    "tolerances": (["--tol", "0.05", "--tol", "0.01"], [0.05, 0.01]),
    "device": (["--device", "cpu"], "cpu"),
    "checkpoint_every": (["--checkpoint-every", "5"], 5),
    "early_stop": (["--no-early-stop"], False),
    "drop_last": (["--drop-last"], True),
    "track_gradient_rank": (["--track-gradient-rank"], True),
    "gradient_rank_steps": (["--track-gradient-rank", "--gradient-rank-steps", "5"], 5),
}


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def parsed_config(argv: list[str], config_file: str | None = None) -> RunConfig:
    args = build_parser().parse_args(["train", *argv])
    return RunConfig.from_dict(config_values(vars(args), config_file))


def test_every_field_has_a_flag_with_its_comment_and_default_as_help():
    actions = {a.dest: a for a in train_parser()._actions}
    helps = field_help(RunConfig)
    for f in dataclasses.fields(RunConfig):
        assert f.name in actions, f"RunConfig.{f.name} has no `rankbias train` flag"
        assert helps[f.name], f"RunConfig.{f.name} has no comment to serve as its help"
        assert actions[f.name].help.startswith(helps[f.name].replace("%", "%%"))
        assert actions[f.name].help.count("(default: ") == 1
    assert helps["batch_size"].startswith("B: the smaller, the lower the rank")
    assert helps["weight_decay"].startswith("PyTorch convention")  # the comment above it
    text = train_parser().format_help()
    assert "--gradient-rank-steps" in text and "--optimizer {sgd,adam,adamw}" in text
    assert "--batch-size BATCH_SIZE" in text and "(default: 8)" in text


def test_every_field_has_an_example_below():
    assert set(EXAMPLES) == set(RunConfig.field_names())


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_flag_reaches_the_config(name):
    argv, expected = EXAMPLES[name]
    value = getattr(parsed_config(argv), name)
    default = getattr(RunConfig(), name)
    if isinstance(expected, dict):
        assert value.items() >= expected.items()
        assert not default.items() >= expected.items()
    else:
        assert value == expected and type(value) is type(expected)
        assert value != default


def test_unset_flags_keep_the_config_file_and_options_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nlr: 0.2\nmodel_args: {depth: 2}\ntolerances: [0.01]\n")
    cfg = parsed_config(["--lr", "0.05", "--model-arg", "width=16"], str(path))
    assert (cfg.epochs, cfg.lr, cfg.tolerances) == (3, 0.05, [0.01])
    assert (cfg.model_args["depth"], cfg.model_args["width"]) == (2, 16)
    assert parsed_config([]).to_dict() == RunConfig().to_dict()  # no flag: every default
    path.write_text("- lr: 0.1\n")  # a list, not a mapping
    with pytest.raises(RankbiasError, match="must hold a mapping of RunConfig fields"):
        parsed_config([], str(path))


def test_bad_key_value_and_bad_choice_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(RankbiasError, match="--model-arg takes KEY=VALUE, got 'depth'"):
        parsed_config(["--model-arg", "depth"])
    assert main(["train", "--dataset-arg", "=3", "--store", str(tmp_path / "r.db")]) == 2
    assert "--dataset-arg takes KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["train", "--optimizer", "lion"])
    assert stop.value.code == 2
    assert "invalid choice: 'lion'" in capsys.readouterr().err


def test_a_diverging_train_run_is_kept_and_says_what_to_do(tmp_path, capsys):
    from rankbias.runs.store import Store

    store = tmp_path / "r.db"
    argv = ["train", "--model", "mlp", "--dataset", "digits", "--dataset-arg", "subset=200",
            "--epochs", "1", "--lr", "1e6", "--store", str(store), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and "lower --lr (now 1e+06)" in err[0]
    assert set(Store(store).runs().status) == {"diverged"}  # a result: kept in the store
    assert main(argv[:-1] + ["--lr", "0.05", "--no-progress"]) == 0  # a sane lr trains


def test_field_help_reads_comments_above_and_at_the_end_of_a_line():
    @dataclass
    class Toy:
        """A docstring, not a comment # of any field."""

        a: int = 1  # the end of a's line
        # two lines
        # above b
        b: str = "#not a comment"
        c: list = field(default_factory=list)

        # a comment after a blank line belongs to the next field
        d: float = 0.5  # and its own

        def method(self) -> None:
            a: int = 2  # not a's comment
            print(a)

    assert field_help(Toy) == {"a": "the end of a's line", "b": "two lines above b", "c": "",
                               "d": "a comment after a blank line belongs to the next field "
                                    "and its own"}
