"""Command-line interface: argument parsing only. Each command's body is the function of
the same name in rankbias/cli/commands.py (`rankbias data list` -> `commands.data_list`), and
`rankbias train`'s run flags are generated from RunConfig (rankbias/cli/flags.py).

Every command has --help with its defaults; bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from rankbias.cli import commands
from rankbias.cli.flags import add_run_flags
from rankbias.utils import RankbiasError


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-made line breaks of descriptions and adds "(default: X)" to a flag's
    help, except where there is nothing to show: no default (None), a switch, a required
    flag, or a help text that states its default in words already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS
        if nothing or action.required or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


# --- flags that several commands share ---------------------------------------------------
def _store_flag(p) -> None:
    p.add_argument("--store", default="results.db", metavar="FILE.db",
                   help="SQLite results file")


def _format_flag(p, choices: tuple[str, ...] = ("text", "json"), help: str = "") -> None:
    p.add_argument("--format", choices=choices, default=choices[0],
                   help=help or "output format")


def _progress_flag(p, help: str = "no progress bar") -> None:
    p.add_argument("--no-progress", action="store_true", help=help)


def _threads_flag(p, help: str = "torch threads (small models are fastest on one)") -> None:
    p.add_argument("--threads", type=int, default=1, help=help)


def _trust_flag(p) -> None:
    p.add_argument("--trust", action="store_true",
                   help="allow unpickling a full saved model (runs code from the file: "
                        "only for files you trust)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as argparse but shorter
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _command(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help,
                          formatter_class=_Formatter)


# --- rankbias analyze -------------------------------------------------------------------
def _add_analyze(sub) -> None:
    p = _command(sub, "analyze", "rank of every weight matrix of a saved model or checkpoint",
                 "Per-layer rank, stable rank, effective rank and norms of a state_dict, a\n"
                 "rankbias checkpoint, a full saved model (needs --trust), a .safetensors file\n"
                 "or a Hugging Face model folder (safetensors or .bin, single or sharded).\n"
                 "Tensors are read one at a time and only those analyzed, so memory stays near\n"
                 "the largest matrix. The average covers the hidden matrices: embeddings, the\n"
                 "output head, a classifier and 1x1 shortcuts are left out (and not read)\n"
                 "unless --all; every tensor not analyzed is listed with its reason.\n"
                 "examples: rankbias analyze model.pt --tol 1e-3 --tol 0.05 --format json\n"
                 "          rankbias analyze gpt2/ --split-qkv --attention-products")
    p.add_argument("path", help="a torch.save file, a .safetensors file, an index json or a "
                                "Hugging Face model folder")
    p.add_argument("--tol", type=float, action="append", default=None,
                   help="rank tolerance on sigma(W/||W||_F); repeatable (default 1e-3)")
    p.add_argument("--relative", action="store_true",
                   help="count sigma > tol * sigma_max instead of the paper's absolute tolerance")
    _format_flag(p, ("table", "csv", "json"))
    p.add_argument("--spectra", metavar="FILE.npz", default=None,
                   help="also write every layer's singular values to this .npz file")
    p.add_argument("--all", dest="include_all", action="store_true",
                   help="also analyze and average the classifier, 1x1 shortcut convolutions, "
                        "embeddings and the output head")
    p.add_argument("--include", action="append", metavar="GLOB", default=[],
                   help="analyze only tensors whose name matches (fnmatch, e.g. '*.mlp.*'); "
                        "repeatable")
    p.add_argument("--exclude", action="append", metavar="GLOB", default=[],
                   help="skip tensors whose name matches; repeatable")
    p.add_argument("--split-qkv", action="store_true",
                   help="split fused q/k/v projections (c_attn, qkv, Wqkv, query_key_value) "
                        "into <name>.q/.k/.v, with config.json's head layout where needed")
    p.add_argument("--attention-products", action="store_true",
                   help="also W_Q^T W_K and W_O W_V of every attention layer and head "
                        "(grouped-query attention too); needs the heads from config.json")
    p.add_argument("--device", default="cpu",
                   help="where the SVDs run: cpu, cuda or auto (cuda when available); "
                        "float64 on every device")
    _threads_flag(p, help="CPU cores: this many matrices' SVDs at once, one core each")
    _trust_flag(p)
    _progress_flag(p)
    p.set_defaults(handler=commands.analyze)


# --- rankbias compress ------------------------------------------------------------------
def _add_compress(sub) -> None:
    p = _command(sub, "compress", "factorize low-rank layers into a smaller model",
                 "Replace each selected layer (those rankbias analyze reports) by its truncated\n"
                 "SVD at its rank: a Linear by two Linears of width r, a Conv by a k x k conv\n"
                 "to r channels and a 1x1 conv. A layer stays dense where that saves nothing.\n"
                 "The file written holds weights only: rankbias.load_compressed(OUT) rebuilds\n"
                 "the model, rankbias analyze OUT reports the products. Accuracy is measured\n"
                 "on the run's own test set (or --dataset's); the reported test_acc_after is\n"
                 "the saved file's. FLOPs: multiply-accumulates per example (see\n"
                 "rankbias/compress/compress.py).\n"
                 "example: rankbias compress checkpoints/RUN.pt --out small.pt --tol 1e-3\n"
                 "         rankbias compress checkpoints/RUN.pt --out small.pt "
                 "--max-acc-drop 0.01 --format json")
    p.add_argument("checkpoint", help="a checkpoint of rankbias train (or a full saved model "
                                      "with --trust)")
    p.add_argument("--out", required=True,
                   help="where to write the compressed model (required)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--tol", type=float,
                      help="the paper's rank: keep sigma_i(W/||W||_F) > tol (default 1e-3 "
                           "when no rule is given)")
    rule.add_argument("--energy", type=float,
                      help="keep the fewest singular values holding this share of sum sigma^2")
    rule.add_argument("--max-acc-drop", type=float,
                      help="the largest tolerance (one for all layers) whose test accuracy "
                           "is at most this far below the dense model's")
    p.add_argument("--dataset",
                   help="data set for the accuracy (default: the run's own, from the "
                        "checkpoint)")
    p.add_argument("--dataset-arg", action="append", metavar="KEY=VALUE", default=[],
                   help="option of --dataset, repeatable, e.g. subset=1000 root=DIR")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune the factorized model this many epochs with the run's own "
                        "SGD settings (its last learning rate); kept only if test accuracy "
                        "does not fall")
    p.add_argument("--all", dest="include_all", action="store_true",
                   help="also factorize the classifier and 1x1 shortcut convolutions")
    _trust_flag(p)
    _format_flag(p, ("text", "json"),
                 help="json: one line {params_before, params_after, flops_before, "
                        "flops_after, test_acc_before, test_acc_after, tol, layers, ...}")
    _threads_flag(p, help="torch threads")
    _progress_flag(p)
    p.set_defaults(handler=commands.compress)


# --- rankbias bound ---------------------------------------------------------------------
def _add_bound(sub) -> None:
    p = _command(sub, "bound", "Theorem 3.4's rank bound and the steps it needs",
                 "Rank bound patches * B * log(2/eps) / (2 mu lambda) and min steps\n"
                 "T* = log(2/eps) / (2 mu lambda). Convention: PyTorch SGD weight_decay =\n"
                 "2*lambda of the paper, so 2 mu lambda = lr * weight_decay. Infinite at\n"
                 "weight decay 0; JSON has no infinity, so --format json writes null there.\n"
                 "example: rankbias bound --batch-size 8 --lr 0.5 --weight-decay 5e-3 "
                 "--shape 100x100")
    p.add_argument("--batch-size", type=int, required=True,
                   help="mini-batch size B (required)")
    p.add_argument("--lr", type=float, required=True,
                   help="learning rate mu (required)")
    p.add_argument("--weight-decay", type=float, required=True,
                   help="PyTorch SGD weight_decay = 2*lambda (required)")
    p.add_argument("--eps", type=float, default=1e-3, help="distance tolerance, in (0, 2)")
    p.add_argument("--patches", type=int, default=1,
                   help="m: 1 for a fully connected layer, output spatial positions of a conv")
    p.add_argument("--shape", metavar="OUTxIN", default=None,
                   help="matrix shape: also say whether the bound is vacuous (>= min(out, in))")
    _format_flag(p, ("text", "json"),
                 help='json: one line {"bound", "min_steps", "vacuous", ...}; '
                        "inf -> null; vacuous is null without --shape")
    p.set_defaults(handler=commands.bound)


# --- rankbias data ----------------------------------------------------------------------
_ROOT_HELP = "data root (default: $RANKBIAS_DATA, else ~/.cache/rankbias/data)"


def _add_data(sub) -> None:
    p = _command(sub, "data", "list the data sets and where they are; download them",
                 "Data sets are read from a data root: --root, else $RANKBIAS_DATA, else\n"
                 "~/.cache/rankbias/data. Fashion-MNIST is also found in\n"
                 "/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist).\n"
                 "examples: rankbias data list --format json\n"
                 "          rankbias data download cifar10 --root ~/data")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    q = _command(actions, "list", "which data sets are available, where, and how to get them")
    q.add_argument("--root", help=_ROOT_HELP)
    _format_flag(q, ("table", "json"))
    q.set_defaults(handler=commands.data_list)
    q = _command(actions, "download", "fetch a data set's official files, checksums verified",
                 "Downloads mnist, fashion-mnist, cifar10, cifar100 or svhn from the official\n"
                 "host, checks each file's published MD5, writes atomically (a failed or\n"
                 "mismatched download leaves nothing) and unpacks the CIFAR tarballs.\n"
                 "example: rankbias data download svhn --root ~/data")
    q.add_argument("name", metavar="NAME", help="mnist, fashion-mnist, cifar10, cifar100, svhn")
    q.add_argument("--root", help=_ROOT_HELP)
    q.add_argument("--base-url", default=None,
                   help="fetch the files from this address (a mirror) instead of the official "
                        "host; the official checksums still apply")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(handler=commands.data_download)


# --- rankbias train / runs ----------------------------------------------------------------
def _add_train(sub) -> None:
    p = _command(sub, "train", "one training run with rank tracking",
                 "Train one network with mini-batch SGD + weight decay, measuring the rank of\n"
                 "every weight matrix at initialization, every --track-every epochs and at the\n"
                 "end. Flags override --config; unset flags keep the config's (or the shown\n"
                 "default) value. The run flags are RunConfig's fields\n"
                 "(rankbias/training/config.py).\n"
                 "example: rankbias train --model mlp --dataset digits --batch-size 8 --lr 0.5 "
                 "--weight-decay 5e-3 --epochs 50")
    p.add_argument("--config", metavar="FILE.yaml", help="run config (RunConfig field names)")
    add_run_flags(p.add_argument_group(
        "run config (default: the config file, else the value shown)"))
    _store_flag(p)
    p.add_argument("--checkpoint-dir",
                   help="where checkpoints go (default: <store name>-checkpoints/ beside the "
                        "store)")
    p.add_argument("--resume", action="store_true",
                   help="continue from this config's checkpoint when there is one")
    p.add_argument("--force", action="store_true", help="train again even if already finished")
    _format_flag(p, ("text", "json"),
                 help="json: the last stdout line is the run summary")
    _threads_flag(p)
    _progress_flag(p)
    p.set_defaults(handler=commands.train)


def _add_runs(sub) -> None:
    p = _command(sub, "runs", "list the runs of a results store")
    _store_flag(p)
    _format_flag(p, ("table", "csv", "json"))
    p.set_defaults(handler=commands.runs)


# --- rankbias sweep -------------------------------------------------------------------------
def _add_execution_flags(p) -> None:
    """How the runs of `sweep` and `reproduce` are executed."""
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, one torch thread each (default: the CPUs this "
                        "process may use: affinity, cgroup quota, $SLURM_CPUS_PER_TASK)")
    p.add_argument("--backend", choices=["local", "ray", "slurm"], default="local",
                   help="slurm: one job array, one task per stack of runs (docs/cluster.md)")
    p.add_argument("--address", default=None,
                   help="ray: join this cluster (e.g. auto) instead of starting a local node")
    p.add_argument("--ensemble", choices=["auto", "off"], default="auto",
                   help="train compatible runs (differing only in lr, weight decay, seed) "
                        "together as one batched computation")
    p.add_argument("--run-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a run (or a stack of runs trained together) after this long "
                        "and mark it failed; the sweep goes on (default: no limit)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="where runs keep checkpoints (default: <store name>-checkpoints/ "
                        "beside the store; on a cluster, a folder every node sees)")
    _add_slurm_flags(p.add_argument_group("SLURM (with --backend slurm; see docs/cluster.md)"))


def _add_slurm_flags(g) -> None:
    """What each array task asks SLURM for; rankbias.runs.backends.slurm.SlurmOptions.
    Flags whose default is the cluster's own are None when not given."""
    g.add_argument("--slurm-partition", default=None, metavar="NAME",
                   help="partition (default: the cluster's default partition)")
    g.add_argument("--slurm-time", type=int, default=60, metavar="MINUTES",
                   help="time limit per task; a task that reaches it checkpoints and is "
                        "requeued, resuming where it stopped")
    g.add_argument("--slurm-cpus-per-task", type=int, default=1, metavar="N",
                   help="CPU cores per task (a stack trains on one torch thread)")
    g.add_argument("--slurm-gpus-per-task", type=int, default=0, metavar="N",
                   help="1 on a GPU partition: each stack of runs trains on its own GPU")
    g.add_argument("--slurm-mem", default=None, metavar="SIZE",
                   help="memory per task, e.g. 16G (default: the partition's)")
    g.add_argument("--slurm-account", default=None, metavar="NAME",
                   help="account to charge (default: the user's default account)")
    g.add_argument("--slurm-qos", default=None, metavar="NAME",
                   help="quality of service (default: the account's default)")
    g.add_argument("--slurm-parallelism", type=int, default=16, metavar="N",
                   help="array tasks running at once (replaces --workers)")
    g.add_argument("--slurm-signal-delay", type=int, default=90, metavar="SECONDS",
                   help="SLURM signals a task this long before its time limit, to requeue it")
    g.add_argument("--slurm-opt", action="append", default=None,
                   metavar="KEY[=VALUE]",
                   help="one more #SBATCH line, repeatable: --slurm-opt constraint=a100 gives "
                        "#SBATCH --constraint=a100; a KEY alone gives #SBATCH --KEY")
    g.add_argument("--slurm-folder", default=None, metavar="DIR",
                   help="job scripts, logs and results (default: <store name>-slurm/ beside "
                        "the store; every node must see it)")


def _add_sweep(sub) -> None:
    p = _command(sub, "sweep", "run a grid of training runs from a YAML file",
                 "Run every config of a sweep file (base x grid x zip x seeds) not yet finished "
                 "in the store; rerun the same command to continue after Ctrl-C.\n"
                 "example: rankbias sweep experiments/batch_size.yaml --scale quick --workers 2")
    p.add_argument("file", help="sweep file, or an experiment file with scales")
    p.add_argument("--scale", choices=["quick", "full", "paper"], default=None,
                   help="the scale of an experiment file (default quick)")
    _store_flag(p)
    _add_execution_flags(p)
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs and count their SGD steps and stacks, with a wall-time "
                        "estimate from a 2-second probe where this machine can run them "
                        "(--backend slurm: the job array and its script instead); train "
                        "nothing")
    _format_flag(p, ("text", "json"),
                 help="json: the last stdout line is the sweep summary")
    _progress_flag(p)
    p.set_defaults(handler=commands.sweep)


# --- rankbias report ------------------------------------------------------------------------
def _add_report(sub) -> None:
    p = _command(sub, "report", "figures and a self-contained HTML report of a results store",
                 "Groups the finished runs into experiments (same config but batch size, lr,\n"
                 "weight decay, seed) and draws, for each hyperparameter that varies: rank,\n"
                 "accuracy and weight-change curves (mean over seeds, min-max band) and final\n"
                 "rank vs the parameter; then a per-layer heatmap, spectra per batch size and\n"
                 "rank vs test accuracy. Writes the PNGs and OUT/report.html: the interactive\n"
                 "explorer (works offline; the figures embedded) with OUT/report_files/.\n"
                 "example: rankbias report --store results.db --out report/")
    _store_flag(p)
    p.add_argument("--out", default="report", help="output folder (created when missing)")
    p.add_argument("--max-groups", type=int, default=4,
                   help="curve figures for at most this many settings per varied parameter")
    _progress_flag(p, help="no line per figure on stderr")
    p.set_defaults(handler=commands.report)


# --- rankbias fit / predict -------------------------------------------------------------------
def _add_fit(sub) -> None:
    p = _command(sub, "fit", "fit a rank law to a store's runs: rank = min(r_max, a * x^b)",
                 "Fit the final eps-rank against x = B*m/(lr*wd) (m: patches per example, 1 for\n"
                 "Linear; the mean over matrices for the average rank) on finished plain-SGD\n"
                 "runs (momentum 0) with wd > 0 and train accuracy > 0.15, per model and\n"
                 "training recipe. Least squares in log space; the knee where the law reaches\n"
                 "r_max (the matrix size) is chosen by least squares too. Judged by\n"
                 "leave-one-setting-out: loo_error is the RMS error, in rank, of a held-out\n"
                 "(B, lr, wd)'s mean rank predicted from the other settings.\n"
                 "example: rankbias fit --store out/results.db --per-layer --figure fit.png")
    _store_flag(p)
    p.add_argument("--by", choices=["model", "model,dataset"], default="model",
                   help="one fit per model (name and options), or per model and data set")
    p.add_argument("--per-layer", action="store_true",
                   help="also one fit per hidden weight matrix")
    _format_flag(p, ("text", "json"),
                 help='json: {"fits": [{"model", "layer", "a", "b", "r2", "loo_error", ...}]}')
    p.add_argument("--figure", metavar="PATH.png", default=None,
                   help="also draw the measured ranks, the fits and Theorem 3.4's bound vs x")
    p.set_defaults(handler=commands.fit)


def _add_predict(sub) -> None:
    p = _command(sub, "predict", "predict the final average rank of a new (B, lr, wd)",
                 "With --store: the law `rankbias fit` fits on that store's runs of the model,\n"
                 "evaluated at x = B*m/(lr*wd), with an interval prediction * exp(-+2 s), s the\n"
                 "RMS log error of held-out runs (leave-one-setting-out); a warning when x lies\n"
                 "outside the fitted range. Without --store: Theorem 3.4's bound per matrix,\n"
                 "an upper bound, not a prediction. At weight decay 0 no fit or bound applies.\n"
                 "example: rankbias predict --model mlp --batch-size 16 --lr 0.5 "
                 "--weight-decay 0.02 --store out/results.db")
    p.add_argument("--model", required=True,
                   help="model name (required)")
    p.add_argument("--batch-size", type=int, required=True,
                   help="mini-batch size B (required)")
    p.add_argument("--lr", type=float, required=True,
                   help="learning rate mu (required)")
    p.add_argument("--weight-decay", type=float, required=True,
                   help="PyTorch SGD weight_decay = 2*lambda (required)")
    p.add_argument("--store", default=None,
                   help="results store to fit; without it, the theorem's bound is printed")
    p.add_argument("--dataset", default=None, help="use the fit of this data set's runs only")
    p.add_argument("--eps", type=float, default=1e-3, help="bound only: distance tolerance")
    p.add_argument("--patches", type=int, default=1,
                   help="bound only: m of the matrix (1 for Linear, output positions of a conv)")
    _format_flag(p, ("text", "json"),
                 help='json: {"predicted", "low", "high", "source": "fit"|"bound", "x", ...}; '
                        "inf -> null")
    p.set_defaults(handler=commands.predict)


# --- rankbias serve -------------------------------------------------------------------------
def _add_serve(sub) -> None:
    p = _command(sub, "serve", "serve the interactive explorer of a results store, live",
                 "Serves the explorer of `rankbias report` over HTTP and reads the store anew on\n"
                 "every page load: while a sweep writes the store, reload to see its new runs.\n"
                 "claims.json beside the store (as `rankbias reproduce` writes it) fills the\n"
                 "claims table. Binds 127.0.0.1 (this machine only) unless --host says\n"
                 "otherwise. Ctrl-C stops.\n"
                 "example: rankbias serve --store out/results.db --port 8000")
    _store_flag(p)
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (0.0.0.0: every network interface)")
    p.set_defaults(handler=commands.serve)


# --- rankbias reproduce ---------------------------------------------------------------------
def _add_reproduce(sub) -> None:
    p = _command(sub, "reproduce", "reproduce every claim of the paper, with figures and verdicts",
                 "Run the experiments of the paper's claims (all, or those named by id or "
                 "number), then write DIR/report.html (figures embedded), DIR/claims.json "
                 "and DIR/results.db. Finished runs are reused: rerun to continue.\n"
                 "example: rankbias reproduce --scale quick --out out/\n"
                 "         rankbias reproduce batch_size 6 --scale full --out out/")
    p.add_argument("claims", nargs="*", metavar="CLAIM",
                   help="claim ids or numbers (default: all)")
    p.add_argument("--scale", choices=["quick", "full", "paper"], default="quick",
                   help="quick: CPU, digits, minutes; full: CPU, digits + Fashion-MNIST, "
                        "hours; paper: the authors' CIFAR-10 settings, for GPU clusters")
    p.add_argument("--out", default="out", help="output folder")
    _add_execution_flags(p)
    p.add_argument("--experiments", metavar="DIR", default=None,
                   help="a folder of your own experiment files (default: the built-in ones)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the claims with their runs and SGD steps, and the sweep's plan "
                        "and estimated wall time (--backend slurm: the job array and its "
                        "script instead); train nothing")
    _progress_flag(p)
    p.set_defaults(handler=commands.reproduce)


def build_parser() -> argparse.ArgumentParser:
    from rankbias.version import __version__

    parser = _Parser(prog="rankbias", formatter_class=_Formatter,
                     description="Measure, reproduce and use the low-rank bias of SGD with "
                                 "weight decay (Galanti et al., arXiv 2206.05794).")
    parser.add_argument("--version", action="version", version=f"rankbias {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


# Order of the commands in --help.
COMMANDS = [_add_reproduce, _add_train, _add_sweep, _add_runs, _add_analyze, _add_compress,
            _add_fit, _add_predict, _add_bound, _add_data, _add_report, _add_serve]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except RankbiasError as err:
        print(f"rankbias {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = ("rerun with --resume to continue from the last checkpoint"
               if args.command == "train" else "rerun the same command to continue")
        print(f"rankbias {args.command}: interrupted; finished runs are kept: {how}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
