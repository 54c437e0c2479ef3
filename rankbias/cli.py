"""Command-line interface: argument parsing only; the work lives in importable modules.

Every command has --help with its defaults; bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from rankbias.utils import RankbiasError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults in --help and keeps the hand-made line breaks of descriptions."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as argparse but shorter
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _command(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help,
                          formatter_class=_Formatter)


# --- rankbias analyze -------------------------------------------------------------------
def _add_analyze(sub) -> None:
    p = _command(sub, "analyze", "rank of every weight matrix of a saved model or checkpoint",
                 "Per-layer rank, stable rank, effective rank and norms of a state_dict, a "
                 "full saved model (needs --trust) or a rankbias checkpoint.\n"
                 "example: rankbias analyze model.pt --tol 1e-3 --tol 0.05 --format json")
    p.add_argument("path", help="file saved with torch.save")
    p.add_argument("--tol", type=float, action="append", default=None,
                   help="rank tolerance on sigma(W/||W||_F); repeatable (default 1e-3)")
    p.add_argument("--relative", action="store_true",
                   help="count sigma > tol * sigma_max instead of the paper's absolute tolerance")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--spectra", metavar="FILE.npz", default=None,
                   help="also write every layer's singular values to this .npz file")
    p.add_argument("--all", dest="include_all", action="store_true",
                   help="include the classifier and 1x1 shortcut convolutions")
    p.add_argument("--trust", action="store_true",
                   help="allow unpickling a full saved model (runs code from the file: "
                        "only for files you trust)")
    p.set_defaults(handler=_run_analyze)


def _run_analyze(args) -> int:
    from rankbias.analyze import analyze_file

    analyze_file(args.path, tols=args.tol or [1e-3], relative=args.relative,
                 fmt=args.format, spectra_path=args.spectra, include_all=args.include_all,
                 trust=args.trust, out=sys.stdout)
    return 0


# --- rankbias bound ---------------------------------------------------------------------
def _add_bound(sub) -> None:
    p = _command(sub, "bound", "Theorem 3.4's rank bound and the steps it needs",
                 "Rank bound patches * B * log(2/eps) / (2 mu lambda) and min steps\n"
                 "T* = log(2/eps) / (2 mu lambda). Convention: PyTorch SGD weight_decay =\n"
                 "2*lambda of the paper, so 2 mu lambda = lr * weight_decay. Infinite at\n"
                 "weight decay 0; JSON has no infinity, so --format json writes null there.\n"
                 "example: rankbias bound --batch-size 8 --lr 0.5 --weight-decay 5e-3 "
                 "--shape 100x100")
    p.add_argument("--batch-size", type=int, required=True, default=argparse.SUPPRESS,
                   help="mini-batch size B (required)")
    p.add_argument("--lr", type=float, required=True, default=argparse.SUPPRESS,
                   help="learning rate mu (required)")
    p.add_argument("--weight-decay", type=float, required=True, default=argparse.SUPPRESS,
                   help="PyTorch SGD weight_decay = 2*lambda (required)")
    p.add_argument("--eps", type=float, default=1e-3, help="distance tolerance, in (0, 2)")
    p.add_argument("--patches", type=int, default=1,
                   help="m: 1 for a fully connected layer, output spatial positions of a conv")
    p.add_argument("--shape", metavar="OUTxIN", default=None,
                   help="matrix shape: also say whether the bound is vacuous (>= min(out, in))")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help='json: one line {"bound", "min_steps", "vacuous", ...}; '
                        "inf -> null; vacuous is null without --shape")
    p.set_defaults(handler=_run_bound)


def _run_bound(args) -> int:
    from rankbias.theory import bound_report

    print(bound_report(args.batch_size, args.lr, args.weight_decay, eps=args.eps,
                       patches=args.patches, shape=args.shape, fmt=args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rankbias import __version__

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
COMMANDS = [_add_analyze, _add_bound]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except RankbiasError as err:
        print(f"rankbias {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rankbias {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
