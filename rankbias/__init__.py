"""rankbias: measure, reproduce and use the low-rank bias of SGD with weight decay.

Galanti, Siegel, Gupte, Poggio, "SGD and Weight Decay Secretly Minimize the Rank of Your
Neural Network" (arXiv 2206.05794).

    import rankbias
    model = rankbias.create_model("mlp", (1, 8, 8), 10)
    data = rankbias.load_dataset("digits")
    tracker = rankbias.RankTracker(model)          # inside any training loop
    small = rankbias.load_compressed("small.pt")   # a model written by rankbias compress
"""

from rankbias.compress import load_compressed  # noqa: E402
from rankbias.data import list_datasets, load_dataset  # noqa: E402
from rankbias.models import create_model, list_models  # noqa: E402
from rankbias.tracker import RankTracker  # noqa: E402
from rankbias.utils import RankbiasError  # noqa: E402
from rankbias.version import __version__  # noqa: E402

__all__ = ["RankTracker", "RankbiasError", "__version__", "create_model", "list_datasets",
           "list_models", "load_compressed", "load_dataset"]
