"""The main job, `rankbias reproduce --scale quick`, end to end: every verdict as expected.

It trains every claim's runs (about 4 minutes on 2 cores). Training is chaotic, so the
numbers differ between CPUs (and between ATen's vector kernels on one CPU); the rules'
margins are stated in seed spreads so that the verdicts do not. CI runs this test under
the default kernels and the reproduction again with ATEN_CPU_CAPABILITY=avx2 and =default
(scalar), and requires the same verdicts (.ci/run). Set RANKBIAS_QUICK_OUT to keep the
output folder.

Expected verdicts: every claim of the paper passes except three, whose controls show them
not to hold in this setting (findings, reported as such in the README):
- claim 7, "early, then flat": with a constant learning rate the rank keeps falling; the
  flat end is the learning-rate schedule's doing;
- claim 9, "marginal effect on test accuracy": on a task that is not saturated, the
  settings that lower the rank by 20-40% cost 1.6-3.4 points of test accuracy, beyond the
  +-0.03 equivalence margin stated in advance;
- claim 11 across B: the bound's scale B/(mu wd) orders the settings but does not collapse
  them: at one scale, a larger B with a larger mu*wd ends at a lower rank.
Beyond the paper: the low-rank bias survives momentum and pays off in compression; under
AdamW and Adam with L2 decay, at their usual settings, it is absent.
"""

import io
import os

import pytest

from rankbias.claims.pipeline import reproduce

FINDINGS = {"early_reduction": "fail", "generalization": "fail", "scale": "fail",
            "adamw": "fail", "adam_l2": "fail"}


@pytest.mark.timeout(1800)  # minutes on 2 cores; ~10 on the slowest CPU seen
def test_quick_reproduction_gives_the_expected_verdicts(tmp_path):
    out = os.environ.get("RANKBIAS_QUICK_OUT") or str(tmp_path / "quick")
    document = reproduce(scale="quick", out=out, progress=False, stdout=io.StringIO())
    verdicts = {c["id"]: c["verdict"] for c in document["claims"]}
    assert document["sweep"]["failed"] == 0
    assert verdicts == {name: FINDINGS.get(name, "pass") for name in verdicts}, verdicts
    assert len(verdicts) == 16  # claim 5 is two experiments (lr, weight decay)
