"""optrush.atomic: a file appears whole or not at all."""
import pytest

from optrush.atomic import written_whole


def test_written_whole_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with written_whole(path) as partial:
            partial.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with written_whole(path) as partial:
        partial.write_text("new")
        assert path.read_text() == "old"  # nothing replaced until the block ends
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
