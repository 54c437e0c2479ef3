"""What `rankbias train` and `rankbias runs` do, behind the argument parsing of cli.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from rankbias.config import RunConfig
from rankbias.store import FINISHED, checkpoint_dir_for, open_store
from rankbias.train import RunResult, train_run
from rankbias.utils import text_table, to_json


def checkpoint_path_for(store_path: str, run_id: str, checkpoint_dir: str | None) -> Path:
    folder = Path(checkpoint_dir) if checkpoint_dir else checkpoint_dir_for(store_path)
    return folder / f"{run_id}.pt"


def train_command(cfg: RunConfig, store_path: str, checkpoint_dir: str | None = None,
                  resume: bool = False, force: bool = False, fmt: str = "text",
                  progress: bool = True, out: TextIO | None = None) -> RunResult | None:
    """Train one config into the store, with a progress bar; skip it if already finished."""
    out = out or sys.stdout
    run_id = cfg.run_id()
    with open_store(store_path) as store:
        if store.status(run_id) in FINISHED and not force:
            summary = json.loads(store.db.execute(
                "SELECT summary FROM runs WHERE run_id=?", (run_id,)).fetchone()[0])
            _print_summary(summary, fmt, out, note=f"run {run_id} already finished in "
                           f"{store_path}; not rerun (use --force to train again)")
            return None
        ckpt = checkpoint_path_for(store_path, run_id, checkpoint_dir)
        bar: list[_Bar] = []

        def start() -> None:  # the config passed every check: now it is a run
            store.mark(run_id, cfg.to_dict(), "running")
            if progress:
                bar.append(_Bar(cfg))

        try:
            result = train_run(cfg, checkpoint_path=ckpt, resume=resume, on_start=start,
                               on_track=lambda epoch, point: bar and bar[0].update(epoch, point))
        except BaseException as err:
            if store.status(run_id) == "running":
                store.mark(run_id, cfg.to_dict(), "failed",
                           error=f"{type(err).__name__}: {err}".splitlines()[0])
            raise
        finally:
            if bar:
                bar[0].close()
        store.save_result(result)
    if fmt == "text":
        out.write(final_table(result))
    _print_summary(result.summary, fmt, out)
    return result


class _Bar:
    """A tqdm bar over epochs showing loss, accuracy and average rank."""

    def __init__(self, cfg: RunConfig) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.epochs, unit="epoch", file=sys.stderr, dynamic_ncols=True,
                        desc=f"{cfg.model} B={cfg.batch_size} lr={cfg.lr:g} "
                             f"wd={cfg.weight_decay:g}")

    def update(self, epoch: int, point: dict) -> None:
        self.bar.n = epoch
        self.bar.set_postfix(loss=f"{point['train_loss']:.3g}", acc=f"{point['train_acc']:.3f}",
                             rank=f"{point['avg_rank']:.1f}")

    def close(self) -> None:
        self.bar.close()


def final_table(result: RunResult) -> str:
    """Per-layer metrics at the last tracking point."""
    if not result.rows:
        return ""
    last_step = max(step for step, *_ in result.rows)
    per_layer: dict[str, dict[str, float]] = {}
    for step, _, layer, metric, value in result.rows:
        if step == last_step and layer:
            per_layer.setdefault(layer, {})[metric] = value
    tol = result.config["tolerances"][0]
    columns = ["layer", f"rank@{tol:g}", "stable_rank", "effective_rank", "fro_norm",
               "weight_change"]
    return text_table([columns] + [[name] + [_fmt(values.get(c)) for c in columns[1:]]
                                   for name, values in per_layer.items()])


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.4g}"


def _print_summary(summary: dict, fmt: str, out: TextIO, note: str | None = None) -> None:
    if fmt == "json":
        if note:
            print(note, file=sys.stderr)
        keys = ("run_id", "status", "init_avg_rank", "final_avg_rank", "train_acc", "test_acc",
                "epochs", "steps", "wall_s")
        out.write(to_json({k: summary.get(k) for k in keys}) + "\n")
        return
    if note:
        out.write(note + "\n")
    out.write(f"run {summary['run_id']}: {summary['status']} after {summary['epochs']} epochs "
              f"({summary['steps']} steps, {summary['wall_s']:.1f} s); average rank "
              f"{summary['init_avg_rank']:.2f} -> {summary['final_avg_rank']:.2f}; train acc "
              f"{summary['train_acc']:.4f}, test acc {summary['test_acc']:.4f}\n")


def runs_command(store_path: str, fmt: str = "table", out: TextIO | None = None) -> None:
    """List the runs of a store."""
    out = out or sys.stdout
    with open_store(store_path, must_exist=True) as store:
        frame = store.runs()
    columns = ["run_id", "status", "model", "dataset", "batch_size", "lr", "weight_decay", "seed",
               "epochs", "epochs_done", "init_avg_rank", "final_avg_rank", "train_acc",
               "test_acc", "wall_s"]
    frame = frame[[c for c in columns if c in frame.columns]]
    if fmt == "json":
        out.write(frame.to_json(orient="records") + "\n")
    elif fmt == "csv":
        out.write(frame.to_csv(index=False))
    else:
        out.write(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}") + "\n"
                  if len(frame) else "no runs\n")

