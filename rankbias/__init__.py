"""rankbias: measure, reproduce and use the low-rank bias of SGD with weight decay.

Galanti, Siegel, Gupte, Poggio, "SGD and Weight Decay Secretly Minimize the Rank of Your
Neural Network" (arXiv 2206.05794).
"""

__version__ = "0.1.0"

from rankbias.utils import RankbiasError  # noqa: E402

__all__ = ["RankbiasError", "__version__"]
