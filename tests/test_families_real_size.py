"""Real-size architectures of the newer families (configs/architectures/*.json, the published configs) build on
the meta device, and their catalogs list the published block counts, heads and widths with the shapes of a
fake-tensor forward through the family's own adapter at native resolution."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from difffeat.backbones import wrap_pipeline
from difffeat.backbones.registry import adapter_named
from difffeat.backbones.probing import fake_conditioning
from difffeat.capture import Capture
from difffeat.catalog import Catalog, enumerate_activations
from difffeat.hookpoints import load_table
from difffeat.architectures import DENOISER_KEYS, architecture, build_component

TEXT_LEN = 16  # text tokens of the probe forward (any length works; shorter is faster)


def _arch(name: str) -> dict:
    return architecture(name)


def _meta(name: str, component: str):
    return build_component(name, component, device="meta")


def _flux2_condition(pipe, denoiser):
    embeds = torch.zeros(1, TEXT_LEN, denoiser.config.joint_attention_dim, device="meta")
    return {"encoder_hidden_states": embeds, "txt_ids": pipe._prepare_text_ids(embeds).to("meta")}


def _qwenimage_condition(pipe, denoiser):
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, denoiser.config.joint_attention_dim, device="meta"),
            "encoder_hidden_states_mask": None}  # fmt: skip


def _sd3_condition(pipe, denoiser):
    cfg = denoiser.config
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, cfg.joint_attention_dim, device="meta"),
            "pooled_projections": torch.zeros(1, cfg.pooled_projection_dim, device="meta")}  # fmt: skip


def _chroma_condition(pipe, denoiser):
    embeds = torch.zeros(1, TEXT_LEN, denoiser.config.joint_attention_dim, device="meta")
    return {"encoder_hidden_states": embeds, "txt_ids": torch.zeros(TEXT_LEN, 3, device="meta"), "text_mask": None}


# --- branch hunyuan: HunyuanDiT, Z-Image
def _hunyuandit_condition(pipe, denoiser):
    cfg = denoiser.config
    return {"encoder_hidden_states": torch.zeros(1, cfg.text_len, cfg.cross_attention_dim, device="meta"),
            "text_embedding_mask": torch.ones(1, cfg.text_len, dtype=torch.long, device="meta"),
            "encoder_hidden_states_t5": torch.zeros(1, cfg.text_len_t5, cfg.cross_attention_dim_t5, device="meta"),
            "text_embedding_mask_t5": torch.ones(1, cfg.text_len_t5, dtype=torch.long, device="meta")}  # fmt: skip


def _zimage_condition(pipe, denoiser):
    return {"cap_feats": [torch.zeros(TEXT_LEN, denoiser.config.cap_feat_dim, device="meta")]}


# --- end branch hunyuan


#: architecture -> (tiny family whose pipeline carries the real components, text conditioning of the probe,
#: published numbers: blocks per kind, heads, head dim)
CASES = {
    "flux2-dev": ("flux2", _flux2_condition, {"transformer_blocks": 8, "single_transformer_blocks": 48}, 48, 128),
    "flux2-klein-4b": ("flux2", _flux2_condition, {"transformer_blocks": 5, "single_transformer_blocks": 20}, 24, 128),
    "sd35-large": ("sd35", _sd3_condition, {"transformer_blocks": 38}, 38, 64),
    "sd35-medium": ("sd35", _sd3_condition, {"transformer_blocks": 24}, 24, 64),
    "chroma1-hd": ("chroma", _chroma_condition, {"transformer_blocks": 19, "single_transformer_blocks": 38}, 24, 128),
    "qwen-image": ("qwenimage", _qwenimage_condition, {"transformer_blocks": 60}, 24, 128),
    "hunyuandit-v1.2": ("hunyuandit", _hunyuandit_condition, {"blocks": 40}, 16, 88),
    "z-image-turbo": ("zimage", _zimage_condition, {"noise_refiner": 2, "layers": 30}, 30, 128),
}
#: text keys of the cross maps where they are not the probe's TEXT_LEN: HunyuanDiT's fixed 77 + 256 tokens,
#: Z-Image's text block padded to the adapter's fixed width (512 tokens)
TEXT_KEYS = {"hunyuandit-v1.2": 77 + 256, "z-image-turbo": 512}
#: block kinds without cross-attention (Z-Image's image-only refiner blocks)
NO_CROSS = {"noise_refiner"}
#: published transformer sizes, billions of parameters (+-2%)
PUBLISHED_B = {"flux2-dev": 32.2, "flux2-klein-4b": 3.9, "qwen-image": 20.4, "sd35-large": 8.1, "chroma1-hd": 8.9}
PUBLISHED_B["hunyuandit-v1.2"] = 1.5


# ------------------------------------------------------------------------------------------ 2026 families
def _flux_like_condition(pipe, denoiser):
    """Text states and 3-axis text positions of the FLUX-style families (LongCat-Image, Ovis-Image)."""
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, denoiser.config.joint_attention_dim, device="meta"),
            "txt_ids": torch.zeros(TEXT_LEN, 3, device="meta")}  # fmt: skip


# LongCat-Image: 10 double + 20 single blocks (model card: FLUX.1's depth halved), 24 heads x 128
CASES["longcat-image"] = ("longcatimage", _flux_like_condition, {"transformer_blocks": 10, "single_transformer_blocks": 20}, 24, 128)
# Ovis-Image-7B: 6 double + 27 single blocks, 24 heads x 128 (the published ovis_image_configs)
CASES["ovis-image-7b"] = ("ovisimage", _flux_like_condition, {"transformer_blocks": 6, "single_transformer_blocks": 27}, 24, 128)


def _krea2_condition(pipe, denoiser):
    cfg = denoiser.config
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, cfg.num_text_layers, cfg.text_hidden_dim, device="meta"),
            "encoder_attention_mask": None}  # fmt: skip


# Krea 2: 28 single-stream blocks, 48 query heads x 128 (diffusers' Krea2Transformer2DModel)
CASES["krea2"] = ("krea2", _krea2_condition, {"transformer_blocks": 28}, 48, 128)


def _hunyuanimage_condition(pipe, denoiser):
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, denoiser.config.text_embed_dim, device="meta"),
            "encoder_attention_mask": torch.ones(1, TEXT_LEN, dtype=torch.long, device="meta")}  # fmt: skip


# HunyuanImage 2.1: 20 double + 40 single blocks, 28 heads x 128, 32 px per token at 2048 px
CASES["hunyuanimage-2.1"] = ("hunyuanimage", _hunyuanimage_condition, {"transformer_blocks": 20, "single_transformer_blocks": 40}, 28, 128)
#: pixels per image-token side where not 16 (HunyuanImage 2.1: a 32x VAE, patch 1: 2048 px -> 64 x 64 tokens)
PIXELS_PER_TOKEN = {"hunyuanimage-2.1": 32}


def _briafibo_condition(pipe, denoiser):
    cfg = denoiser.config
    blocks = cfg.num_layers + cfg.num_single_layers
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, cfg.joint_attention_dim, device="meta"),
            "text_encoder_layers": [torch.zeros(1, TEXT_LEN, cfg.text_encoder_dim, device="meta")] * blocks,
            "text_mask": torch.ones(1, TEXT_LEN, device="meta")}  # fmt: skip


# Bria FIBO: 8 dual- + 38 single-stream blocks, 24 heads x 128 (arXiv 2511.06876, its architecture table)
CASES["bria-fibo"] = ("briafibo", _briafibo_condition, {"transformer_blocks": 8, "single_transformer_blocks": 38}, 24, 128)


def _ideogram4_condition(pipe, denoiser):  # built as fake CPU tensors (FAKE_CPU)
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, denoiser.config.llm_features_dim), "text_lengths": [TEXT_LEN]}


# Ideogram 4: 34 single-stream blocks, 18 heads x 256 (the published model_architecture.md)
CASES["ideogram4"] = ("ideogram4", _ideogram4_condition, {"layers": 34}, 18, 256)


def _cogview4_condition(pipe, denoiser):
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, denoiser.config.text_embed_dim, device="meta")}


# CogView4-6B: 28 blocks, 32 heads x 128 (its transformer/config.json)
CASES["cogview4-6b"] = ("cogview4", _cogview4_condition, {"transformer_blocks": 28}, 32, 128)


def _hidream_condition(pipe, denoiser):
    cfg = denoiser.config
    return {"encoder_hidden_states_t5": torch.zeros(1, TEXT_LEN, cfg.caption_channels[0], device="meta"),
            "encoder_hidden_states_llama3": torch.zeros(max(cfg.llama_layers) + 1, 1, TEXT_LEN, cfg.caption_channels[1], device="meta"),
            "pooled_embeds": torch.zeros(1, cfg.text_emb_dim, device="meta")}  # fmt: skip


# HiDream-I1: 16 double + 32 single blocks, 20 heads x 128 (its transformer/config.json)
CASES["hidream-i1"] = ("hidream", _hidream_condition, {"double_stream_blocks": 16, "single_stream_blocks": 32}, 20, 128)
#: text keys: T5 + two Llama blocks of the probe's TEXT_LEN tokens
TEXT_KEYS["hidream-i1"] = 3 * TEXT_LEN
PUBLISHED_B["hidream-i1"] = 17.0  # "HiDream-I1 ... 17B parameters" (its model card)


_CATALOGS: dict[str, tuple[Catalog, dict, tuple[int, int]]] = {}
#: architectures whose probe keeps the text mask on the host (Lumina 2 reads it with tolist(); Sana's follows the
#: pipeline): built as fake CPU tensors (no memory either) instead of on the meta device
FAKE_CPU = {"sana-1600m", "lumina-image-2", "ideogram4"}  # Ideogram 4: its time embedding enters autocast (no meta device)


def real_size_catalog(tiny_pipes, name: str) -> tuple[Catalog, dict, tuple[int, int]]:
    """The catalog of architecture ``name`` with shapes, on meta/fake tensors (no memory, no weights)."""
    if name not in _CATALOGS:
        _CATALOGS[name] = _real_size_catalog(tiny_pipes, name)
    return _CATALOGS[name]


def _real_size_catalog(tiny_pipes, name: str) -> tuple[Catalog, dict, tuple[int, int]]:
    family, condition, *_ = CASES[name]
    arch = _arch(name)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    on_cpu = name in FAKE_CPU

    def build(component: str):
        if not on_cpu:
            return _meta(name, component)
        with mode:
            return build_component(name, component, device="cpu")

    # the real denoiser and VAE (what the catalog's shapes come from); text encoders stay tiny (fake conditioning)
    real = [k for k in arch["components"] if k in (*DENOISER_KEYS, "vae")]
    pipe = tiny_pipes(family).__class__(**{**tiny_pipes(family).components, **{k: build(k) for k in real}})
    backbone = wrap_pipeline(pipe)
    table = load_table(backbone.hook_table)
    infos = enumerate_activations(backbone.denoiser, table)
    res = arch["native_resolution"]
    cond = fake_conditioning(mode, condition(pipe, backbone.denoiser))  # real masks stay readable (Lumina 2)
    with mode:
        latents = torch.zeros(1, *backbone.latent_shape(res, res), device="cpu" if on_cpu else "meta")
        inputs = backbone.denoiser_inputs(latents, 1, cond, (res, res))
        with backbone.probe_context(), Capture(backbone, infos, inputs, early_exit=False, shapes_only=True) as cap:
            backbone.denoise(inputs)  # the adapter's probe context, as the catalog probe uses it (HiDream's MoE)
    shapes = {n: tuple(int(x) for x in s[1:]) for n, s in cap.shapes.items()}
    return Catalog(backbone.family, table, infos), shapes, inputs.grid


#: fake-tensor forwards of the largest models take 5-10 s each on a loaded 2-core machine
_HEAVY = {"flux2-dev", "qwen-image", "sd35-large", "chroma1-hd"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_size_catalog_enumerates_the_published_number_of_blocks(name):
    _, _, blocks, _, _ = CASES[name]
    arch = _arch(name)
    model = _meta(name, "transformer")
    table = load_table(adapter_named(arch["pipeline"]).hook_table)
    cat = Catalog(table.family, table, enumerate_activations(model, table))
    for prefix, count in blocks.items():
        assert len([a for a in cat if a.kind == "block-out" and a.name.startswith(prefix + ".")]) == count


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in sorted(CASES)])
def test_real_size_catalog_has_the_published_blocks_heads_and_widths(tiny_pipes, name):
    _, _, blocks, heads, head_dim = CASES[name]
    cat, shapes, (gh, gw) = real_size_catalog(tiny_pipes, name)
    assert gh * PIXELS_PER_TOKEN.get(name, 16) == _arch(name)["native_resolution"]  # 1024 px -> 64 x 64 tokens
    assert set(shapes) == set(cat.names())  # the whole catalog ran
    for prefix, count in blocks.items():
        outs = [a for a in cat if a.kind == "block-out" and a.name.startswith(prefix + ".")]
        assert len(outs) == count, prefix
        for a in outs:
            assert shapes[a.name] == (heads * head_dim, gh, gw), a.name
        cross = [a for a in cat if a.kind == "cross-map" and a.name.startswith(prefix + ".")]
        assert len(cross) == (0 if prefix in NO_CROSS else count)
        assert {shapes[a.name] for a in cross} <= {(heads, gh * gw, TEXT_KEYS.get(name, TEXT_LEN))}


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_real_size_transformers_have_the_published_parameter_counts(name):
    model = _meta(name, "transformer")
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PUBLISHED_B[name], rel=0.02)


def test_sd35_medium_lists_the_image_only_attention_of_its_13_dual_attention_blocks(tiny_pipes):
    cat, shapes, (gh, gw) = real_size_catalog(tiny_pipes, "sd35-medium")
    second = [a.name for a in cat if a.kind == "self-map" and a.name.endswith(".attn2.map")]
    assert second == [f"transformer_blocks.{i}.attn2.map" for i in range(13)]
    assert {shapes[n] for n in second} == {(24, gh * gw, gh * gw)}


@pytest.mark.parametrize(
    "preset, name",
    [("chroma-practical", "chroma1-hd"), ("flux2-practical", "flux2-dev"), ("qwenimage-practical", "qwen-image"), ("sd35-large-practical", "sd35-large"),
     ("hunyuandit-practical", "hunyuandit-v1.2"), ("zimage-practical", "z-image-turbo"),
     ("sana-practical", "sana-1600m"), ("lumina2-practical", "lumina-image-2"),
     ("longcatimage-practical", "longcat-image"), ("ovisimage-practical", "ovis-image-7b"),
     ("krea2-practical", "krea2"), ("hunyuanimage-practical", "hunyuanimage-2.1"),
     ("briafibo-practical", "bria-fibo"), ("ideogram4-practical", "ideogram4"),
     ("cogview4-practical", "cogview4-6b"), ("hidream-practical", "hidream-i1")],
)
def test_unvalidated_presets_of_the_new_families_name_real_size_activations(preset, name):
    from difffeat.presets import load_preset

    p = load_preset(preset)
    assert p.validated is False
    arch = _arch(name)
    table = load_table(adapter_named(arch["pipeline"]).hook_table)
    names = {a.name for a in enumerate_activations(_meta(name, "transformer"), table)}
    assert set(p.features) <= names


# ------------------------------------------------------------------------------------------ Gemma families
def _sana_condition(pipe, denoiser):
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, denoiser.config.caption_channels),
            "encoder_attention_mask": torch.ones(1, TEXT_LEN, dtype=torch.long)}  # fmt: skip


def _lumina2_condition(pipe, denoiser):
    return {"encoder_hidden_states": torch.zeros(1, TEXT_LEN, denoiser.config.cap_feat_dim),
            "encoder_attention_mask": torch.ones(1, TEXT_LEN, dtype=torch.long)}  # fmt: skip


CASES["sana-1600m"] = ("sana", _sana_condition, {"transformer_blocks": 20}, 70, 32)
CASES["lumina-image-2"] = ("lumina2", _lumina2_condition, {"layers": 26, "noise_refiner": 2}, 24, 96)
PUBLISHED_B["sana-1600m"] = 1.6
#: published (config.json) numbers: pixels per image token side, cross-attention heads and the widths they see
GEMMA_CASES = {
    # Sana 1600M: 32x DC-AE, patch 1; softmax cross-attention 20 heads x 112 = 2240 to 2304-d Gemma states;
    # linear self-attention 70 heads x 32
    "sana-1600m": dict(pixels_per_token=32, cross_heads=20, self_maps="transformer_blocks.{}.attn1.map", self_heads=70),
    # Lumina-Image 2.0: FLUX VAE (8x), patch 2; joint attention 24 query heads x 96 (8 key/value heads)
    "lumina-image-2": dict(pixels_per_token=16, cross_heads=24, self_maps="layers.{}.attn.self_map", self_heads=24),
}


@pytest.mark.parametrize("name", sorted(GEMMA_CASES))
def test_real_size_gemma_family_catalogs_have_the_published_blocks_heads_and_widths(tiny_pipes, name):
    _, _, blocks, heads, head_dim = CASES[name]
    case = GEMMA_CASES[name]
    cat, shapes, (gh, gw) = real_size_catalog(tiny_pipes, name)
    assert gh * case["pixels_per_token"] == gw * case["pixels_per_token"] == _arch(name)["native_resolution"]
    assert set(shapes) == set(cat.names())
    main, n_main = next(iter(blocks.items()))
    for prefix, count in blocks.items():
        outs = [a for a in cat if a.kind == "block-out" and a.name.startswith(prefix + ".")]
        assert len(outs) == count and {shapes[a.name] for a in outs} == {(heads * head_dim, gh, gw)}, prefix
    cross = [a for a in cat if a.kind == "cross-map"]
    assert [a.module for a in cross] == [a.name[: -len(".map")] for a in cross]
    assert len(cross) == n_main and all(a.name.startswith(main + ".") for a in cross)
    assert {shapes[a.name] for a in cross} == {(case["cross_heads"], gh * gw, TEXT_LEN)}
    for i in range(n_main):
        assert shapes[case["self_maps"].format(i)] == (case["self_heads"], gh * gw, gh * gw)


def test_real_size_sana_lists_its_linear_self_attention_maps_as_such():
    table = load_table("sana")
    cat = Catalog("sana", table, enumerate_activations(_meta("sana-1600m", "transformer"), table))
    self_maps = [a for a in cat if a.kind == "self-map"]
    assert len(self_maps) == 20 and all("linear-attention" in a.flags and a.module.endswith("attn1") for a in self_maps)
    assert not any("linear-attention" in a.flags for a in cat if a.kind == "cross-map")


def test_real_size_sana_transformer_has_the_published_parameter_count():
    model = _meta("sana-1600m", "transformer")
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PUBLISHED_B["sana-1600m"], rel=0.02)

