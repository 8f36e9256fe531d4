"""difffeat.testing: tiny random pipelines of every family, offline tokenizers, the tiny ControlNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difffeat.testing import (
    TINY_CALL_KWARGS,
    TINY_FAMILIES,
    WORDS,
    save_tiny_pipeline,
    tiny_clip_tokenizer,
    tiny_controlnet,
    tiny_pipeline,
    tiny_t5_tokenizer,
)

PIPELINE_CLASS = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "pixart": "PixArtSigmaPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "sd35": "StableDiffusion3Pipeline",
    "flux2": "Flux2KleinPipeline",
    "qwenimage": "QwenImagePipeline",
    "chroma": "ChromaPipeline",
    "hunyuandit": "HunyuanDiTPipeline",
    "zimage": "ZImagePipeline",
    "sana": "SanaPipeline",
    "lumina2": "Lumina2Pipeline",
    "longcatimage": "LongCatImagePipeline",
    "ovisimage": "OvisImagePipeline",
    "krea2": "Krea2Pipeline",
    "hunyuanimage": "HunyuanImagePipeline",
    "briafibo": "BriaFiboPipeline",
    "ideogram4": "Ideogram4Pipeline",
    "cogview4": "CogView4Pipeline",
    "hidream": "HiDreamImagePipeline",
}
CAPTION = "A photo of a cat, a dog and a zebra-crossing!"  # in-vocabulary, upper case, punctuation, unknown word


#: sizes the pipelines accept (Sana's checks multiples of 32, Lumina 2's of 16); others: 32 x 24
_SMALL_SIZE = {"sana": (32, 64), "lumina2": (32, 48), "briafibo": (32, 48), "cogview4": (32, 48)}  # FIBO, CogView4: multiples of 16
_REQUESTED_SIZE = {"sana": (64, 32), "hidream": (256, 256)}  # HiDream rescales to its default area


def _generate(pipe, family: str, height: int | None = None, width: int | None = None) -> np.ndarray:
    if height is None:
        height, width = _SMALL_SIZE.get(family, (32, 24))
    return pipe(
        prompt="a cat",
        num_inference_steps=2,
        height=height,
        width=width,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **TINY_CALL_KWARGS.get(family, {}),
    ).images


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.state_dict().items()
    }


def _text_pairs(pipe) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, the text encoder it feeds) for every text branch of the pipeline."""
    pairs = []
    for suffix in ("", "_2", "_3"):
        tok, enc = getattr(pipe, "tokenizer" + suffix, None), getattr(pipe, "text_encoder" + suffix, None)
        if tok is not None and enc is not None:
            pairs.append((tok, enc))
    return pairs


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_family_generates_an_image_of_the_requested_size(tiny_pipes, family):
    pipe = tiny_pipes(family)
    assert type(pipe).__name__ == PIPELINE_CLASS[family]
    h, w = _REQUESTED_SIZE.get(family, (48, 32))
    images = _generate(pipe, family, height=h, width=w)
    assert images.shape == (1, h, w, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0  # a real decode, not a constant frame


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_same_seed_gives_identical_weights_another_seed_different_weights(family):
    pipe = tiny_pipeline(family, seed=0)
    a, b, c = _weights(pipe), _weights(tiny_pipeline(family, seed=0)), _weights(tiny_pipeline(family, seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    random_init = [  # parameters drawn at random (not constant norms, not fixed position tables)
        f"{name}.{key}"
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.named_parameters()
        if value.std() > 0
    ]
    for component in ("unet" if family in ("sd", "sdxl") else "transformer", "vae", "text_encoder"):
        keys = [k for k in random_init if k.startswith(component + ".")]
        assert keys and all(not torch.equal(a[k], c[k]) for k in keys), component


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_pipeline("flux", seed=7)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_saved_pipeline_loads_offline_as_the_same_class_with_identical_outputs(family, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_tiny_pipeline(family, tmp_path / family)
    assert (path / "model_index.json").is_file()
    loaded = DiffusionPipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    original = tiny_pipeline(family)  # seed 0, like the saved one (fresh: other tests may adapt the shared one)
    assert type(loaded) is type(original)
    for (tok_a, _), (tok_b, _) in zip(_text_pairs(original), _text_pairs(loaded)):
        assert type(tok_b) is type(tok_a)
        assert tok_b(CAPTION)["input_ids"] == tok_a(CAPTION)["input_ids"]
    weights = _weights(original)
    assert all(torch.equal(value, weights[key]) for key, value in _weights(loaded).items())
    # Loaded tensors live in a safetensors buffer at another memory alignment, so CPU matmuls may round the
    # last bit differently (~1e-7): identical weights, outputs equal to float precision.
    np.testing.assert_allclose(_generate(loaded, family), _generate(original, family), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tokenizers_give_character_offsets_and_ids_within_the_encoder_vocab(tiny_pipes, family):
    for tok, encoder in _text_pairs(tiny_pipes(family)):
        enc = tok(CAPTION, return_offsets_mapping=True)
        content = [(CAPTION[a:b].lower(), i) for (a, b), i in zip(enc["offset_mapping"], enc["input_ids"]) if b > a]
        assert {"photo", "cat", "dog", ","} <= {piece for piece, _ in content}  # words located by char offsets
        assert tok.unk_token_id not in {i for _, i in content}  # unknown words split into pieces, not <unk>
        padded = tok([CAPTION, "a"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                     return_tensors="pt")["input_ids"]  # fmt: skip
        assert padded.shape[1] == tok.model_max_length
        vocab_size = encoder.config.get_text_config().vocab_size  # Qwen3-VL keeps it in its text config only
        assert 0 <= int(padded.min()) and int(padded.max()) < vocab_size
        assert len(tok) <= vocab_size


@pytest.mark.parametrize("make", [tiny_clip_tokenizer, tiny_t5_tokenizer], ids=["clip", "t5"])
def test_every_vocabulary_word_is_a_single_token(make):
    tok = make()
    split = [w for w in WORDS if len(tok(w, add_special_tokens=False)["input_ids"]) != 1]
    assert not split


def test_clip_ids_do_not_depend_on_bpe_tie_breaking():
    """BPE training breaks frequency ties differently on every run (in and across processes); the tiny
    CLIP tokenizer's ids must not change with it."""
    from difffeat.testing import _clip_vocab_merges

    builds = []
    for _ in range(3):
        _clip_vocab_merges.cache_clear()
        tok = tiny_clip_tokenizer()
        builds.append((tok.get_vocab(), tok(CAPTION)["input_ids"]))
    assert all(build == builds[0] for build in builds[1:])


def test_unknown_family_raises_value_error_naming_the_valid_ones():
    with pytest.raises(ValueError) as err:
        tiny_pipeline("sd4")
    assert "sd4" in str(err.value)
    assert all(family in str(err.value) for family in TINY_FAMILIES)


def test_dtype_applies_to_every_component():
    pipe = tiny_pipeline("sd", dtype=torch.bfloat16)
    dtypes = {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()}
    assert dtypes == {torch.bfloat16}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_denoisers_have_every_kind_of_attention_capture_tests_need(tiny_pipes, family):
    pipe = tiny_pipes(family)
    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    attn = {n: m for n, m in denoiser.named_modules() if hasattr(m, "processor") and hasattr(m, "to_q")}
    assert attn and all(getattr(m, "heads", getattr(m, "num_heads", 0)) >= 2 for m in attn.values())  # Krea 2: num_heads
    names = list(attn)
    if family == "sd":
        assert any(n.startswith("down_blocks.") and n.endswith("attn2") for n in names)
        assert any(n.startswith("up_blocks.") and n.endswith("attn2") for n in names)
    elif family == "sdxl":
        assert any(".transformer_blocks.1." in n for n in names)
    elif family == "sd35":
        assert any(n.endswith("attn2") for n in names) and denoiser.transformer_blocks[0].attn.norm_q is not None
    elif family in ("pixart", "sd3", "qwenimage", "krea2", "cogview4"):
        assert len(denoiser.transformer_blocks) >= 2
    elif family == "hidream":  # double- and single-stream blocks, mixture-of-experts feed-forwards
        assert len(denoiser.double_stream_blocks) >= 1 and len(denoiser.single_stream_blocks) >= 1
        assert denoiser.config.num_routed_experts >= 2
    elif family == "ideogram4":  # single-stream blocks only
        assert len(denoiser.layers) >= 2
    elif family == "hunyuandit":  # a block past the middle takes the long skip connection
        assert len(denoiser.blocks) >= 3 and denoiser.blocks[-1].skip_linear is not None
    elif family == "zimage":  # image refiner, text refiner and joint blocks
        assert len(denoiser.noise_refiner) >= 1 and len(denoiser.context_refiner) >= 1 and len(denoiser.layers) >= 2
    elif family == "sana":  # linear self-attention and softmax cross-attention in every block
        assert len(denoiser.transformer_blocks) >= 2 and all(n.endswith(("attn1", "attn2")) for n in names)
    elif family == "lumina2":  # text refiner, image refiner and joint blocks
        assert all(len(getattr(denoiser, k)) >= 1 for k in ("context_refiner", "noise_refiner", "layers"))
    else:
        assert len(denoiser.transformer_blocks) >= 1 and len(denoiser.single_transformer_blocks) >= 1


def _unet_inputs(pipe) -> dict[str, torch.Tensor]:
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
    return {"sample": torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)),
            "timestep": torch.tensor([500]), "encoder_hidden_states": text}  # fmt: skip


def _controlled_unet(pipe, controlnet) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet output without, with the ControlNet's residuals) for a 64 px control image."""
    inputs = _unet_inputs(pipe)
    cond = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        down, mid = controlnet(**inputs, controlnet_cond=cond, return_dict=False)
        plain = pipe.unet(**inputs).sample
        controlled = pipe.unet(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert controlled.shape == plain.shape == inputs["sample"].shape
    return plain, controlled


def test_tiny_controlnet_accepts_the_tiny_sd_unet_inputs_and_shifts_its_output(tiny_pipes):
    plain, controlled = _controlled_unet(tiny_pipes("sd"), tiny_controlnet("sd"))
    assert not torch.allclose(plain, controlled)


def test_zero_initialised_controlnet_leaves_the_unet_output_unchanged(tiny_pipes):
    plain, controlled = _controlled_unet(tiny_pipes("sd"), tiny_controlnet("sd", zero_init=True))
    torch.testing.assert_close(controlled, plain, rtol=0, atol=0)


def test_controlnet_for_a_family_without_one_raises_value_error():
    with pytest.raises(ValueError, match="sd"):
        tiny_controlnet("flux")
