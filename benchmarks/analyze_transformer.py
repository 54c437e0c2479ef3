"""`rankbias analyze` on GPT-2-small and a GPT-2-medium-shaped checkpoint, end to end (read +
SVDs), against WeightWatcher 0.7.7's `analyze()` and a plain torch loop of `svdvals` over the
same matrices, with the peak memory of each.

    pip install -e ".[huggingface,bench]"       # bench: weightwatcher==0.7.7 (optional)
    python benchmarks/analyze_transformer.py [--models small,medium] [--dir DIR] [--threads 1]

Checkpoints: random weights (torch.manual_seed(0)), `save_pretrained` as one
model.safetensors (GPT-2-small 124M parameters, 498 MB; GPT-2-medium-shaped 355M, 1.42 GB),
built once in --dir. Each side runs in a fresh process: its time and peak RSS are those of
reading the checkpoint and computing (imports and a first LAPACK call, which pages in ~12 MB
of library code, come before the clock and the baseline). All sides in this one run:
- rankbias: `rankbias analyze DIR --format json --threads T`: the 4 hidden matrices of each
  block (c_attn as one fused matrix, c_proj, c_fc, mlp c_proj; embeddings left out), float64,
  each on its tall orientation, every metric from one SVD.
- svdvals loop: `safetensors.torch.load_file`, then `torch.linalg.svdvals(W.double())` on the
  same matrices as stored (GPT-2's Conv1D: in x out), as one writes it by hand.
- WeightWatcher 0.7.7: `WeightWatcher(model=DIR).analyze()` (it reads the folder itself; on
  a CPU it computes float64 SVDs with SciPy, then its own power-law fits: more than ranks).
  Skipped, with the reason printed, where it is not installed.
Threads: torch, MKL, OpenBLAS and OpenMP at --threads for every side (the repository's
convention is one per process; see docs/performance.md).
Prints `RESULT <name> value=<x> target=<op><y>` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"small": dict(n_embd=768, n_layer=12, n_head=12),
          "medium": dict(n_embd=1024, n_layer=24, n_head=16)}
HIDDEN = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def build(name: str, folder: Path) -> Path:
    """The checkpoint of GPT-2 `name` with random weights (made once)."""
    path = folder / f"gpt2-{name}"
    if not (path / "model.safetensors").is_file():
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPES[name]))
        model.save_pretrained(path)
    return path


# --- one side, in a child process ------------------------------------------------------------
def child(side: str, folder: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.linalg.svdvals(torch.linalg.qr(torch.randn(300, 30, dtype=torch.float64)).R)
    if side == "weightwatcher":
        import logging

        import weightwatcher

        logging.disable(logging.WARNING)
    elif side == "rankbias":
        import io

        from rankbias.cli.main import main
    else:
        from safetensors.torch import load_file
    baseline = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS (Linux)
    start = time.perf_counter()
    if side == "rankbias":
        out, sys.stdout = sys.stdout, io.StringIO()
        code = main(["analyze", folder, "--format", "json", "--no-progress",
                     "--threads", str(threads)])
        report, sys.stdout = json.loads(sys.stdout.getvalue()), out
        assert code == 0
        ranks = {r["name"]: r["rank"] for r in report["layers"]}
    elif side == "svdvals":
        ranks = {}
        for name, w in load_file(f"{folder}/model.safetensors").items():
            if name.endswith(HIDDEN):
                sigma = torch.linalg.svdvals(w.double())
                ranks[name] = int((sigma > 1e-3 * torch.linalg.norm(sigma)).sum())
    else:
        frame = weightwatcher.WeightWatcher(model=folder).analyze()
        ranks = {str(n): int(r) for n, r in zip(frame["name"], frame["matrix_rank"])}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": rss("VmHWM"), "baseline": baseline, "ranks": ranks}


def run_side(side: str, folder: Path, threads: int) -> dict | None:
    env = {**os.environ, **{k: str(threads) for k in (
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    done = subprocess.run([sys.executable, __file__, "--child", side, str(folder),
                           "--threads", str(threads)], capture_output=True, text=True, env=env)
    if done.returncode:
        print(f"  {side}: failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def best(runs) -> dict | None:
    """The fastest of a side's runs, with the highest peak of them."""
    runs = [r for r in runs if r]
    if not runs:
        return None
    fastest = min(runs, key=lambda r: r["seconds"])
    return {**fastest, "peak": max(r["peak"] - r["baseline"] for r in runs)
            + fastest["baseline"], "times": [round(r["seconds"], 2) for r in runs]}


def rounds(sides: list[str], path: Path, args) -> dict:
    """Each round runs every side once, in turn, so that load from elsewhere falls on all."""
    runs: dict[str, list] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side in sides:
            runs[side].append(run_side(side, path, args.threads))
    return {side: best(r) for side, r in runs.items()}


def weightwatcher_missing() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("weightwatcher")
    except PackageNotFoundError:
        return 'not installed (pip install "rankbias[bench]")'
    if installed != "0.7.7":
        return f"version {installed} installed, the comparison is with 0.7.7"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small,medium", help="small, medium or both")
    parser.add_argument("--dir", default=None, help="where the checkpoints are kept "
                                                    "(default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds, the sides in turn each round; the best time of each side "
                             "(the machine is shared: a side slowed by a neighbour is not "
                             "its speed), the highest peak")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.threads)))
        return
    folder = Path(args.dir or tempfile.mkdtemp(prefix="rankbias-bench-"))
    ww_missing = weightwatcher_missing()
    if ww_missing:
        print(f"WeightWatcher skipped: {ww_missing}")
    for name in args.models.split(","):
        path = build(name, folder)
        size = (path / "model.safetensors").stat().st_size
        print(f"GPT-2-{name}: {size / 1e6:.0f} MB, threads={args.threads}")
        sides = ["rankbias", "svdvals"] + ([] if ww_missing else ["weightwatcher"])
        got = rounds(sides, path, args)
        ours = got["rankbias"]
        for side, r in got.items():
            if r:
                print(f"  {side:14s} {r['seconds']:7.2f} s (runs: {r['times']})  peak RSS "
                      f"{r['peak'] / 1e6:5.0f} MB (+{(r['peak'] - r['baseline']) / 1e6:.0f} MB "
                      f"over the process before reading), {len(r['ranks'])} matrices")
        if ours is None:
            continue
        loop = got["svdvals"]
        if loop:
            same = all(ours["ranks"].get(n) == r
                       for n, r in loop["ranks"].items())
            print(f"  ranks equal to the svdvals loop's: {same}")
            print(f"RESULT analyze_gpt2_{name}_vs_svdvals_loop "
                  f"value={loop['seconds'] / ours['seconds']:.2f} target=>1")
        if got.get("weightwatcher"):
            print(f"RESULT analyze_gpt2_{name}_vs_weightwatcher "
                  f"value={got['weightwatcher']['seconds'] / ours['seconds']:.2f} target=>1")
        print(f"RESULT analyze_gpt2_{name}_seconds value={ours['seconds']:.2f} target=none")
        # the process's whole peak RSS (Python and torch: ~240 MB of it) against the file;
        # the bound is on the 355M checkpoint
        print(f"RESULT analyze_gpt2_{name}_peak_rss_over_size value={ours['peak'] / size:.3f} "
              f"target={'<0.5' if name == 'medium' else 'none'}")
        print(f"RESULT analyze_gpt2_{name}_peak_rss_increase_over_size "
              f"value={(ours['peak'] - ours['baseline']) / size:.3f} target=<0.5")


if __name__ == "__main__":
    main()
