"""Files are written whole or not at all, readable as any other file the user writes."""

import json
import os
import stat
import subprocess
import sys

import pytest

from rankbias.utils import atomic_path, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "claims.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claims.json"]


def test_written_files_get_the_mode_open_gives(tmp_path):
    """mkstemp's temporary is private (0600); after the rename the file must not be, or a
    report written on a shared cluster folder is unreadable to everyone else."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "report.html", "x")
    mode = stat.S_IMODE((tmp_path / "report.html").stat().st_mode)
    assert mode == stat.S_IMODE(plain.stat().st_mode)


@pytest.mark.parametrize("variables, capability", [
    ({"ATEN_CPU_CAPABILITY": "default"}, "DEFAULT"),
    ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}, "AVX2"),
])
def test_a_run_records_the_cpu_and_the_kernel_path(variables, capability):
    """The kernels change a run's numbers, so its provenance names them: torch's own report
    of the path it took (a fresh process: the path is fixed when torch loads)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR",
                                                             "ONEDNN_MAX_CPU_ISA")}
    code = "import json; from rankbias.utils import library_versions as v; print(json.dumps(v()))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, **variables}, text=True,
                         capture_output=True, check=True).stdout
    versions = json.loads(out)
    assert versions["cpu_capability"] == capability
    assert {k: versions[k] for k in variables} == variables
    assert versions["cpu"] and "ONEDNN_MAX_CPU_ISA" not in versions

