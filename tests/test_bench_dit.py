"""The DiT architectures of the real-size benchmarks (PixArt-Sigma, SD3.5 Medium, Sana 1600M, Lumina-Image 2.0):
their whole pipelines build from configs/architectures (meta device, no memory), the text encoders give the width
the transformer reads, and ``difffeat bench goca|features --arch ...`` runs end to end on the family's tiny
geometry, writes its JSON and becomes rows of the README's generated real-scale table."""

from __future__ import annotations

import json

import pytest

import difffeat
from difffeat.architectures import architecture, architecture_aliases, build_component, build_denoiser, build_pipeline
from difffeat.devtools import bench_real
from difffeat.devtools.bench import run_benchmark
from difffeat.errors import ConfigError, InvalidOptionError
from difffeat.testing import tiny_pipeline

#: the names issue 32 asks for -> (the file they name, the tiny family of the same pipeline class)
DIT = {"pixart-sigma": ("pixart", "pixart"), "sd35-medium": ("sd35-medium", "sd35"),
       "sana": ("sana-1600m", "sana"), "lumina2": ("lumina-image-2", "lumina2")}  # fmt: skip


def _text_width(denoiser) -> int:
    """The width of the text states the transformer reads (each class keeps it under its own config name)."""
    cfg = denoiser.config
    for key in ("joint_attention_dim", "caption_channels", "cap_feat_dim"):
        if cfg.get(key) is not None:
            return int(cfg[key])
    raise AssertionError(f"no text width in {type(denoiser).__name__}'s config")


def _encoder_width(encoder) -> int:
    cfg = encoder.config
    return int(getattr(cfg, "d_model", None) or cfg.hidden_size)


@pytest.mark.parametrize("name", sorted(DIT))
def test_the_name_and_its_file_give_one_architecture(name):
    file, _ = DIT[name]
    assert architecture(name) == architecture(file)
    if name != file:
        assert architecture_aliases()[name] == file


def test_an_unknown_architecture_lists_the_aliases_too():
    with pytest.raises(ConfigError, match=r"aliases: .*lumina2.*sana"):
        architecture("sana-600m")


@pytest.mark.parametrize("name", sorted(DIT))
def test_whole_dit_pipelines_build_with_text_encoders_of_the_transformer_width(name):
    pipe = build_pipeline(name, device="meta", text_layers=1)
    assert type(pipe).__name__ == architecture(name)["pipeline"]
    assert dict(build_denoiser(name).config) == dict(pipe.transformer.config)
    # the last text encoder is the one whose states the transformer reads (T5 for SD3.5; CLIP feeds the pooled input)
    encoder = pipe.text_encoder_3 if hasattr(pipe, "text_encoder_3") else pipe.text_encoder
    assert _encoder_width(encoder) == _text_width(pipe.transformer)


@pytest.mark.parametrize("name", ["sana", "lumina2"])
def test_gemma_text_encoder_has_the_published_size_and_text_layers_caps_it(name):
    full = build_component(name, "text_encoder", device="meta")
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(2.614e9, rel=0.005)  # Gemma-2-2B: 2,614M
    short = build_component(name, "text_encoder", device="meta", text_layers=2)
    assert len(short.layers) == 2 < len(full.layers) == 26


def test_sd35_medium_uses_the_sd3_text_encoders():
    sd3, sd35 = architecture("sd3")["components"], architecture("sd35-medium")["components"]
    for key in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        assert sd35[key] == sd3[key]


# ------------------------------------------------------------------------------------------ end to end, tiny
#: the transformer config keys that set the depth and block structure (the rest is width)
DEPTH_KEYS = ("num_layers", "num_refiner_layers", "dual_attention_layers")


def tiny_at_real_depth(file: str, family: str):
    """The family's tiny pipeline (tiny widths, tiny text encoder) with the real transformer's depth and block
    structure: the blocks that the architecture's GOCA settings and feature preset name exist."""
    pipe = tiny_pipeline(family)
    real = architecture(file)["components"]["transformer"]["config"]
    tiny = pipe.transformer
    config = {**tiny.config, **{k: real[k] for k in DEPTH_KEYS if k in real}}
    return type(pipe)(**{**pipe.components, "transformer": type(tiny).from_config(config).eval()})


@pytest.fixture
def tiny_geometry(monkeypatch):
    """The bench builds each architecture at tiny width (:func:`tiny_at_real_depth`) instead of real size; the
    memory figures are measured in this process instead of a fresh one (same function, same peak reading)."""
    built = {}

    def backbone(arch, device, dtype, text_layers):
        family = next(f for file, f in DIT.values() if file == arch)
        if family not in built:
            built[family] = difffeat.load(tiny_at_real_depth(arch, family))
        return built[family]

    monkeypatch.setattr(bench_real, "_backbone", backbone)
    monkeypatch.setattr(bench_real, "_memory_in_subprocess",
                        lambda arch, res, dtype, text_layers: bench_real.memory_child(arch, res, "cpu", dtype, text_layers))
    return built


@pytest.mark.parametrize("name", sorted(DIT))
def test_goca_and_features_suites_run_on_the_tiny_geometry_and_write_their_json(name, tiny_geometry, tmp_path):
    file, _ = DIT[name]
    goca = tmp_path / f"bench_{file}_goca_64.json"
    out = run_benchmark("goca", arch=name, resolution=64, repeats=1, out_file=str(goca), text_layers=1)
    assert json.loads(goca.read_text()) == out
    assert out["arch"] == file and out["text_layers"] == 1  # the figures name the file and the text depth
    assert all(v > 0 for v in out["vs_bare_forward"].values())
    assert out["kept_maps_every_head_mb"] >= out["kept_maps_mb"] >= 0  # MiB to 0.1: tiny maps round to 0
    assert set(out["memory_mb"]) == {"bare_peak_mb", "observe_extra_peak_mb", "segment_extra_peak_mb"}
    feats = tmp_path / f"bench_{file}_features_64.json"
    out = run_benchmark("features", arch=name, resolution=64, repeats=1, out_file=str(feats), text_layers=1)
    assert json.loads(feats.read_text()) == out
    (preset, p), = out["presets"].items()
    assert preset == bench_real._DEFAULT_PRESET[file]
    assert set(p["vs_bare_forward"]) == {"forward_full", "forward_early_exit", "end_to_end"}


def test_the_readme_table_gets_the_dit_rows_with_the_command_that_reproduces_them(tiny_geometry, tmp_path):
    from _helpers import load_benchmark

    run_benchmark("goca", arch="sana", resolution=64, repeats=1, out_file=str(tmp_path / "bench_sana-1600m_goca_64.json"),
                  text_layers=1)
    figures = json.loads((tmp_path / "bench_sana-1600m_goca_64.json").read_text())
    figures["dtype"] = "bfloat16"  # as a bf16 CPU run records it
    (tmp_path / "bench_sana-1600m_goca_64.json").write_text(json.dumps(figures))
    table = load_benchmark("real_scale_readme").render(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| sana-1600m, 64 |")]
    for what in ("GOCA segment end to end vs bare forward", "maps kept by the observer", "extra peak memory"):
        assert sum(what in row for row in rows) == 1
    command = "`difffeat bench goca --arch sana-1600m --resolution 64 --repeats 1 --dtype bf16 --text-layers 1`"
    assert all(command in row for row in rows)


def test_an_unknown_dit_name_is_an_option_error_naming_the_aliases():
    with pytest.raises(InvalidOptionError, match="or an alias: .*pixart-sigma"):
        run_benchmark("goca", arch="pixart-alpha", resolution=64, repeats=1)
