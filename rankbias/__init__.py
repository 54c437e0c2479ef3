"""rankbias: measure, reproduce and use the low-rank bias of SGD with weight decay.

Galanti, Siegel, Gupte, Poggio, "SGD and Weight Decay Secretly Minimize the Rank of Your
Neural Network" (arXiv 2206.05794).

    import rankbias
    model = rankbias.create_model("mlp", (1, 8, 8), 10)
    data = rankbias.load_dataset("digits")
    tracker = rankbias.RankTracker(model)          # inside any training loop
    small = rankbias.load_compressed("small.pt")   # a model written by rankbias compress

The folders are the layers, lowest first (tests/test_layout.py keeps imports pointing down):
metrics/, models/, data/ -> training/ -> theory/ -> runs/, compress/, analyze/ -> report/,
fit/, integrations/ -> claims/ -> cli/.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from rankbias.compress.compress import load_compressed
from rankbias.data import list_datasets, load_dataset
from rankbias.metrics.tracker import RankTracker
from rankbias.models import create_model, list_models
from rankbias.utils import RankbiasError
from rankbias.version import __version__

__all__ = ["RankTracker", "RankbiasError", "__version__", "create_model", "list_datasets",
           "list_models", "load_compressed", "load_dataset"]

# rankbias 0.2's flat module paths (its docs, and users' imports such as
# `from rankbias.layers import weight_matrices`), kept working for the 0.3 release: each
# old name is the new module itself, imported on first use.
MOVED = {
    "spectral": "metrics.spectral", "layers": "metrics.layers", "tracker": "metrics.tracker",
    "gradient_rank": "metrics.gradient_rank", "config": "training.config",
    "steps": "training.steps", "train": "training.train", "checkpoint": "training.checkpoint",
    "stack": "training.stack", "mlp_stack": "training.mlp_stack",
    "ensemble": "training.ensemble", "bound": "theory.bound", "store": "runs.store",
    "sweep": "runs.sweep", "estimate": "runs.estimate", "backends": "runs.backends",
    "lowrank": "compress.lowrank", "law": "fit.law", "plots": "report.plots",
    "static_page": "report.static_page", "explorer": "report.explorer",
    "explorer_data": "report.explorer_data", "claims": "claims.rules",
    "runsets": "claims.runsets", "compress_claim": "claims.compress_claim",
    "reproduce": "claims.pipeline", "commands": "cli.commands", "config_flags": "cli.flags",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `rankbias.<old>` (and what is under it) as the moved module."""

    def find_spec(self, name, path=None, target=None):
        head = name.removeprefix("rankbias.").partition(".")[0]
        if name.startswith("rankbias.") and head in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        head, _, rest = spec.name.removeprefix("rankbias.").partition(".")
        return importlib.import_module("rankbias." + MOVED[head] + (f".{rest}" if rest else ""))

    def exec_module(self, module) -> None:
        pass  # the moved module ran when it was imported under its own name


sys.meta_path.append(_OldPaths())
