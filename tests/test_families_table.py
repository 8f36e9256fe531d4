"""The README's families table is the registry's (difffeat.families), and the CLI prints the same table."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from difffeat.backbones import FAMILIES
from difffeat.cli import app
from difffeat.families import families_markdown, family_rows

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_families_table_matches_the_registry():
    block = re.search(r"<!-- families:start -->\n(.*?)<!-- families:end -->", README.read_text(), re.S)
    assert block, "README lost its families markers"
    assert block.group(1) == families_markdown(), "README families table is stale: paste `difffeat families`"


def test_every_registered_family_has_a_row_with_pipelines_maps_and_a_preset():
    rows = {r.family: r for r in family_rows()}
    assert set(rows) == set(FAMILIES)
    for family, row in rows.items():
        assert row.pipelines and row.maps != "none" and row.presets, family
    assert "fused qkv" in rows["flux2"].attention and "text first" in rows["qwenimage"].attention
    assert rows["hunyuandit"].attention == "cross + self" and "padded to 32 tokens" in rows["zimage"].attention
    assert rows["sd"].validated and not rows["flux2"].validated


def test_cli_prints_the_same_table():
    result = CliRunner().invoke(app, ["families"])
    assert result.exit_code == 0 and result.output == families_markdown()


def test_an_unsupported_pipeline_class_names_every_supported_family_pipeline():
    import pytest

    from difffeat.backbones.registry import adapter_named
    from difffeat.errors import UnsupportedBackboneError

    with pytest.raises(UnsupportedBackboneError) as err:
        adapter_named("PRXPipeline")  # not supported: its image queries attend to [text, image] keys
    for name in ("Flux2KleinPipeline", "QwenImagePipeline", "ChromaPipeline", "StableDiffusion3Pipeline", "SanaPipeline", "Lumina2Pipeline"):
        assert name in str(err.value)
