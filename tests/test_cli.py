"""The CLI contracts of design.md: `catalog --json` and `extract` outputs, and clean errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from difffeat.cli import app

from _helpers import random_image

runner = CliRunner()


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from difffeat.testing import save_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    save_tiny_pipeline("sd", path)
    return path


def test_catalog_json_lists_name_kind_shape(sd_folder):
    result = runner.invoke(app, ["catalog", str(sd_folder), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    items = json.loads(result.stdout)
    assert items and all({"name", "kind", "shape", "flags"} <= set(i) for i in items)
    names = {i["name"] for i in items}
    assert "up_blocks.0.attentions.0.transformer_blocks.0.attn2.map" in names


def test_catalog_kind_filter(sd_folder):
    result = runner.invoke(app, ["catalog", str(sd_folder), "--json", "--kind", "cross-q", "--device", "cpu"])
    items = json.loads(result.stdout)
    assert items and {i["kind"] for i in items} == {"cross-q"}


def test_extract_writes_chw_tensors_per_image(sd_folder, tmp_path):
    imgs = []
    for i in range(2):
        p = tmp_path / f"pic{i}.png"
        random_image(64, 48, seed=i).save(p)
        imgs.append(str(p))
    name = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.q"
    result = runner.invoke(
        app, ["extract", str(sd_folder), *imgs, "--features", name + ",down_blocks.1.resnets.0", "--t", "50",
              "--out", str(tmp_path / "out"), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    for i in range(2):
        with safe_open(str(tmp_path / "out" / f"pic{i}.safetensors"), "pt") as f:
            assert set(f.keys()) == {name, "down_blocks.1.resnets.0"}
            assert f.get_tensor(name).ndim == 3


def test_extract_unknown_feature_is_a_one_line_error(sd_folder, tmp_path):
    p = tmp_path / "x.png"
    random_image(64, 64).save(p)
    result = runner.invoke(app, ["extract", str(sd_folder), str(p), "--features", "up_blocks.9.nope", "--out", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2
    assert "unknown activation name" in result.output and "Traceback" not in result.output


def test_missing_model_folder_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["catalog", str(tmp_path / "nothing-here"), "--device", "cpu"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_presets_command_lists_the_paper_presets():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0 and "sd15-practical" in result.stdout and "sdxl-legacy" in result.stdout


def test_bench_on_a_missing_or_unknown_device_is_a_one_line_error():
    result = runner.invoke(app, ["bench", "goca", "--device", "gpu"])
    assert result.exit_code == 2 and "unknown device 'gpu'" in result.output and "Traceback" not in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["bench", "goca", "--device", "cuda"])
        assert result.exit_code == 2 and "no usable CUDA GPU" in result.output


def test_bench_arch_errors_are_one_line():
    result = runner.invoke(app, ["bench", "goca", "--arch", "sd99"])
    assert result.exit_code == 2 and "unknown architecture 'sd99'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["bench", "throughput-x", "--arch", "sd15"])
    assert result.exit_code == 2 and "unknown suite" in result.output


def test_catalog_table_piped_to_a_file_is_not_wrapped_at_80_columns(sd_folder):
    result = runner.invoke(app, ["catalog", str(sd_folder), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    name = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.map"
    row = next(line for line in result.stdout.splitlines() if name in line)  # whole, on one line
    assert len(row) > 80 and "cross-map" in row


def test_import_difffeat_reaches_difffeat_testing_as_the_readme_shows():
    import subprocess
    import sys

    code = "import difffeat; print(difffeat.testing.tiny_pipeline.__name__, difffeat.ConfigError.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["tiny_pipeline", "ConfigError"], out.stderr[-2000:]
