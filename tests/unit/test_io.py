import os
import stat

import pytest

from hnclip.io import atomic_dir, atomic_path


@pytest.fixture
def group_umask():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_atomic_outputs_are_readable_by_the_group_as_the_umask_says(tmp_path, group_umask):
    with atomic_path(tmp_path / "file.json") as tmp:
        tmp.write_text("{}")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "file.json").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o775


def test_a_failed_block_leaves_neither_the_output_nor_a_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
