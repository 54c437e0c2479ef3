"""Files are written whole or not at all, readable as any other file the user writes."""

import stat

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
