"""The authors' collapse rule, in one place: a run whose train accuracy is at or below
0.15 (chance is 0.10 for ten classes) has collapsed rather than learned. During training
(`RunConfig.early_stop`) such a run is stopped after epoch 50 at three tracking points in a
row, as the authors' code did; afterwards, a finished run at or below it is counted as
collapsed by the claims and left out of the rank law's fit.
"""

from __future__ import annotations

COLLAPSED_ACC = 0.15  # train accuracy at or below: collapsed (the authors' threshold)
AFTER_EPOCH = 50  # the early stop looks only after this epoch ...
POINTS_IN_A_ROW = 3  # ... and stops at this many collapsed tracking points in a row
EARLY_STOP_MESSAGE = (f"train accuracy <= {COLLAPSED_ACC} at {POINTS_IN_A_ROW} tracking "
                      f"points after epoch {AFTER_EPOCH}")


def collapsed(train_acc):
    """Whether a final train accuracy (a number, or a numpy array / pandas Series of them)
    means the run collapsed; a missing (NaN) accuracy is not a collapse."""
    return train_acc <= COLLAPSED_ACC


def learned(train_acc):
    """Whether a final train accuracy shows the run learned: above the threshold (a missing
    accuracy shows nothing)."""
    return train_acc > COLLAPSED_ACC


def low_points(previous: int, epoch: int, train_acc: float) -> int:
    """The early stop's counter after a tracking point at `epoch`: collapsed points in a
    row after AFTER_EPOCH (stop when it reaches POINTS_IN_A_ROW)."""
    if epoch <= AFTER_EPOCH:
        return 0
    return previous + 1 if collapsed(train_acc) else 0
