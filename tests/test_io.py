"""atomic_dir: writes land whole, and --overwrite only ever replaces folders taskvec wrote."""

import pytest

from taskvec.errors import TaskvecError
from taskvec.io import OUTPUT_MARKER, atomic_dir


def _write(path, overwrite=False):
    with atomic_dir(path, overwrite=overwrite) as tmp:
        (tmp / "a.json").write_text("{}")


def test_out_that_is_a_file_is_refused_and_kept(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    for ow in (False, True):
        with pytest.raises(TaskvecError, match="is a file, not a folder"):
            _write(f, overwrite=ow)
    assert f.read_text() == "keep me"


def test_overwrite_replaces_only_taskvec_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(TaskvecError, match="not written by taskvec"):
        _write(model, overwrite=True)
    assert (model / "model.safetensors").read_bytes() == b"weights"
    out = tmp_path / "out"
    _write(out)
    assert (out / OUTPUT_MARKER).is_file()
    with pytest.raises(TaskvecError, match="already exists"):
        _write(out)
    _write(out, overwrite=True)  # its own folder: replaced
    cached = tmp_path / "cache" / "ntk" / "k"
    cached.mkdir(parents=True)
    (cached / "old.npy").write_bytes(b"x")
    _write(cached, overwrite=True)  # the cache is taskvec's by definition
    assert not (cached / "old.npy").exists()
