"""difffeat.io: outputs appear whole or not at all, with ordinary file permissions."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from difffeat.io import atomic_path, load_features, save_features, write_json


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    write_json(target, {"miou": 0.5})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"miou": ')  # half-written
            raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "miou": 0.5\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_written_files_get_the_permissions_of_an_ordinary_write(tmp_path):
    """The temporary file is owner-only (mkstemp); the result must not be (outputs were 0600 before)."""
    ordinary = tmp_path / "ordinary"
    ordinary.write_text("x")
    path = save_features(tmp_path / "f.safetensors", {"a": torch.ones(2, 3, 4)}, metadata={"t": 50})
    json_path = write_json(tmp_path / "r.json", {})
    expected = 0o666 & ~_umask()
    assert stat.S_IMODE(path.stat().st_mode) == expected == stat.S_IMODE(ordinary.stat().st_mode)
    assert stat.S_IMODE(json_path.stat().st_mode) == expected
    torch.testing.assert_close(load_features(path)["a"], torch.ones(2, 3, 4))
