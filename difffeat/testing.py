"""Tiny random pipelines of every supported family, built fully offline (no hub access).

    pipe = difffeat.testing.tiny_pipeline("sdxl")      # a real StableDiffusionXLPipeline, random weights
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    backbone = difffeat.load(pipe)

The component configs follow the dummy components of diffusers' own pipeline tests, written here as data
(module-level dicts) and adjusted so every kind of activation a capture library looks for exists: two or more
heads in every denoiser attention, cross-attention on the UNet's down *and* up paths, two transformer layers
per SDXL attention block at the inner level (so ``...transformer_blocks.1...`` names exist), two or more
PixArt / SD3 blocks, and FLUX with both a double-stream and single-stream blocks. Every VAE downsamples by 2,
so a 64x64 px image is a 32x32 latent (16x16 tokens for the patch-2 DiTs and for FLUX's 2x2 packing); a
forward pass at that size takes milliseconds on a CPU. HunyuanDiT's VAE downsamples by 8 (its pipeline
hard-codes that factor), so there 64 px is 4x4 tokens.

Tokenizers are built here, offline, over :data:`WORDS` (a few hundred common English words plus the COCO,
VOC and ``shapes`` class names): CLIP's with :func:`difffeat.tokenizers.build_clip_tokenizer` (every word one
token, anything else byte-level pieces), T5's as a sentencepiece-style Unigram (``"▁"`` word pieces, every
word one piece, anything else single characters). Both support ``return_offsets_mapping=True``, and every id
they produce is below the vocabulary size of the text encoder they feed (sized from the tokenizer).

Weights are seeded: the same ``seed`` gives identical weights, and building never disturbs the caller's
global torch RNG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_CALL_KWARGS",
    "TINY_FAMILIES",
    "WORDS",
    "save_tiny_pipeline",
    "sd15_shaped_pipeline",
    "sdxl_shaped_pipeline",
    "tiny_clip_tokenizer",
    "tiny_controlnet",
    "tiny_pipeline",
    "tiny_t5_tokenizer",
    "tiny_chat_tokenizer",
    "tiny_bert_tokenizer",
    "tiny_gemma_tokenizer",
    "tiny_glm_tokenizer",
    "CHAT_TEMPLATE",
    "sd_original_state_dict",
    "original_state_dict",
    "save_single_file",
    "single_file_pipeline",
    "SINGLE_FILE_LAYOUTS",
]

# ------------------------------------------------------------------------------------------------ vocabulary
_WORD_TEXT = """
a an the and or of on in at by for to from with without into over under near next behind above below
between inside outside around through up down left right top bottom front back middle center side
is are was be it its this that these those there here some many few one two three four five six seven
eight nine ten several all no not very more most other another each every only also just
photo photograph picture image painting drawing sketch render illustration view scene shot closeup portrait
background foreground object objects shape shapes thing things part area corner edge surface pattern
high low quality best detailed realistic sharp blurry bright dark light shadow colorful colourful plain
flat simple textured striped noisy gradient stripes noise soft hard smooth rough clean dirty old new young
small big large tiny huge little long short tall wide narrow round square thin thick empty full open closed
red green blue yellow orange purple pink brown black white grey gray gold silver cyan magenta
person people man men woman women child children boy girl baby player crowd face hand hands head hair eye
eyes arm legs body smile
cat cats dog dogs bird birds horse horses sheep cow cows elephant bear zebra giraffe animal animals fish
mouse duck chicken rabbit lion tiger monkey
car cars bus truck train boat ship plane airplane aeroplane bicycle bike motorcycle motorbike vehicle
traffic signal stop sign parking meter fire hydrant bench road street sidewalk highway bridge
tree trees grass flower flowers plant plants potted leaf leaves forest garden park field lawn bush
sky cloud clouds sun moon star stars rain snow water sea ocean river lake beach sand mountain mountains
hill rock stone ground floor wall window door roof house home building city town village tower
room kitchen bathroom bedroom office table dining chair chairs sofa couch bed toilet sink refrigerator
oven microwave toaster lamp clock vase book books shelf cup bowl plate glass wine bottle fork knife spoon
food pizza cake donut sandwich apple banana orange broccoli carrot hot bread fruit meal breakfast
tv tvmonitor monitor television laptop computer keyboard remote phone cell screen
backpack umbrella handbag bag tie suitcase hat shirt dress shoe shoes
frisbee skis ski snowboard sports ball kite baseball bat glove skateboard surfboard tennis racket
scissors teddy drier toothbrush pottedplant diningtable
circle circles square squares triangle triangles star heart hearts cross crosses ring rings
diamond diamonds line lines dot dots box
sitting standing running walking jumping flying swimming eating drinking playing holding looking lying
riding driving parked sleeping
day night morning evening summer winter indoor outdoor indoors outdoors
, . -
"""
#: Words every tiny tokenizer keeps as single tokens (lower case; other text still tokenizes, as pieces).
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))

# ------------------------------------------------------------------------------------------------ configs (data)
#: CLIP text encoders (``vocab_size`` comes from the tokenizer; ids: BOS 0, EOS 1).
CLIP_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, projection_dim=32,
    layer_norm_eps=1e-5, hidden_act="gelu", max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
    pad_token_id=1,
)  # fmt: skip
#: T5 encoders (``vocab_size`` comes from the tokenizer; ids: <pad> 0, </s> 1, <unk> 2).
T5_TEXT_CONFIG: dict[str, Any] = dict(
    d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5, relative_attention_num_buckets=8,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip
#: VAE: two levels, so an 8x smaller spatial factor than the real models' (64 px -> 32x32 latents).
VAE_CONFIG: dict[str, Any] = dict(
    block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=16, sample_size=64,
)  # fmt: skip
#: the latent scale/shift that SD3 and FLUX VAEs carry (real values of SD3's VAE).
FLOW_VAE_OVERRIDES: dict[str, Any] = dict(shift_factor=0.0609, scaling_factor=1.5035)

#: SD 1.x/2.x UNet: cross-attention at both levels on the down and up paths, 4 heads (UNet2DConditionModel's
#: legacy ``attention_head_dim`` is the number of heads).
SD_UNET_CONFIG: dict[str, Any] = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
)  # fmt: skip
#: SDXL UNet: no attention at the outer level (like SDXL), 2 transformer layers x 4 heads at the inner one,
#: text-time additional conditioning (6 size/crop numbers x 8 + the pooled 32-d text embedding = 80).
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=16,
)  # fmt: skip
#: PixArt-Sigma DiT: 3 blocks, 3 heads of 8, self- and cross-attention, learned sigma (8 output channels).
#: ``sample_size=32`` (a 64 px default image) is one of the sizes the pipeline's resolution binning accepts.
PIXART_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=32, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=3,
    caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6,
)  # fmt: skip
#: SD3 MMDiT: 2 joint blocks (the last is ``context_pre_only``), 4 heads of 8; the text stream is
#: CLIP-L + CLIP-G (2 x 32, pooled 2 x 32 = 64) zero-padded to the T5 width 64 along features, then the
#: 77 CLIP tokens are followed by the T5 tokens along the sequence.
SD3_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
    caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
)  # fmt: skip
SD3_T5_OVERRIDES: dict[str, Any] = dict(d_model=64)
#: SD3.5 (Medium-style): q/k RMS norms, and block 0 a dual-attention block (a second, image-only attention attn2).
SD35_TRANSFORMER_CONFIG: dict[str, Any] = dict(SD3_TRANSFORMER_CONFIG, qk_norm="rms_norm", dual_attention_layers=(0,))
#: FLUX: 1 double-stream + 2 single-stream blocks, 2 heads of 16 (RoPE axes 4+4+8 = 16). The latents are
#: packed 2x2, so ``in_channels`` = 4 VAE channels x 4.
FLUX_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
)  # fmt: skip
#: FLUX.1-dev's resolution-dependent timestep shift (the pipeline computes ``mu`` from the token count).
FLUX_SCHEDULER_CONFIG: dict[str, Any] = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
    max_image_seq_len=4096,
)  # fmt: skip
#: FLUX.2: in_channels = 4 VAE channels x 4 (2x2 patchified latents), RoPE over 4 axes (T, H, W, L) summing to
#: the head dim, joint_attention_dim = 3 stacked text-encoder layers x its hidden size.
FLUX2_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
)  # fmt: skip
#: the FLUX.2 VAE (32 latent channels and batch-norm statistics over the 2x2 patchified latents at real size).
FLUX2_VAE_CONFIG: dict[str, Any] = dict(
    block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4, norm_num_groups=16, sample_size=64,
)  # fmt: skip
#: Qwen3 text encoders (``vocab_size`` from the tokenizer). FLUX.2 [klein] stacks hidden layers 9, 18 and 27,
#: so the encoder keeps 28 (tiny) layers.
QWEN3_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
    head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
)  # fmt: skip
#: Qwen-Image: in_channels = 4 VAE channels x 4 (2x2 packing); RoPE axes sum to the head dim.
QWENIMAGE_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
)  # fmt: skip
#: Qwen-Image's causal video VAE, one spatial downsampling (factor 2), 4 latent channels with per-channel stats.
QWENIMAGE_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
    latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 1.2, 0.8],
)  # fmt: skip
#: Qwen2.5-VL (text tower used; a one-layer vision tower completes the class).
QWEN25VL_CONFIG: dict[str, Any] = dict(
    text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=1024, rope_theta=1e6,
                     rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
    vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16, patch_size=2,
                       spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0], window_size=4),
)  # fmt: skip
#: Chroma: FLUX's tiny layout (no pooled projection, no guidance) plus a small modulation approximator.
CHROMA_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=8, approximator_hidden_dim=32,
    approximator_layers=1,
)  # fmt: skip
#: ControlNets, by the family whose UNet they match (keys shared with that UNet's config are copied from it).
CONTROLNET_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sd": (SD_UNET_CONFIG, dict(conditioning_embedding_out_channels=(16, 32))),
}
_CONTROLNET_SHARED_KEYS = (
    "block_out_channels", "layers_per_block", "in_channels", "down_block_types", "cross_attention_dim",
    "attention_head_dim", "norm_num_groups", "use_linear_projection", "transformer_layers_per_block",
)  # fmt: skip

#: SD 1.x-style noise schedule (1000 training steps), shared by the DDPM-family schedulers below.
_SD_BETAS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)


# ------------------------------------------------------------------------------------------------ helpers
@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the body under ``torch.manual_seed(seed)`` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@lru_cache(maxsize=None)
def _clip_vocab_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """The tiny CLIP tokenizer's (vocab, merges), trained once per process (ids are canonical: see
    :func:`difffeat.tokenizers.build_clip_tokenizer`), so every word of :data:`WORDS` gets the same id
    in every process."""
    from .tokenizers import build_clip_tokenizer

    model = json.loads(build_clip_tokenizer(WORDS, model_max_length=77).backend_tokenizer.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return tuple(model["vocab"].items()), merges


def tiny_clip_tokenizer(model_max_length: int = 77):  # noqa: ANN201 - transformers.CLIPTokenizer
    """A fresh CLIP tokenizer over :data:`WORDS` (built with :func:`difffeat.tokenizers.build_clip_tokenizer`).

    Args:
        model_max_length: the sequence length the text encoder is built for (SD uses 77).

    Returns:
        A :class:`transformers.CLIPTokenizer`; ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1 (also padding).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


#: Unigram log-probabilities: whole words beat any split, "▁x" starts beat bare continuation characters.
_T5_SCORES = {"word": -5.0, "space": -6.0, "start_char": -9.0, "char": -10.0}
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]-_/&+%#*@"


def tiny_t5_tokenizer(model_max_length: int = 512):  # noqa: ANN201 - transformers.T5Tokenizer(Fast)
    """A T5 tokenizer (sentencepiece-style Unigram with ``"▁"`` word starts) over :data:`WORDS`.

    Ids: ``<pad>`` = 0, ``</s>`` = 1 (appended to every sequence), ``<unk>`` = 2, then ``"▁word"`` for every
    word (one piece each), then single characters with and without ``"▁"`` (so any other ASCII text splits
    into pieces, as real T5 does, rather than becoming ``<unk>``). No sentinel ``<extra_id_*>`` tokens.

    Args:
        model_max_length: the longest sequence the pipelines may ask for (FLUX uses 512).

    Returns:
        A :class:`transformers.T5Tokenizer` (the tokenizers-backed class, ``T5TokenizerFast`` in
        transformers 4) that ``save_pretrained`` / ``from_pretrained`` round-trip.
    """
    from transformers import T5Tokenizer

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    for word in WORDS:
        pieces.setdefault("▁" + word, _T5_SCORES["word"])
    pieces.setdefault("▁", _T5_SCORES["space"])
    for ch in _T5_CHARS:
        pieces.setdefault("▁" + ch, _T5_SCORES["start_char"])
    for ch in _T5_CHARS:
        pieces.setdefault(ch, _T5_SCORES["char"])
    return T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=model_max_length)


#: The chat markup of Qwen-family tokenizers (one user turn, its content a string or a list of text parts as
#: vision-language processors send it; generation prompt; Qwen3's empty think block when ``enable_thinking`` is
#: False), written as a Jinja chat template.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}{{ part['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_CHAT_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
#: words of the chat roles and of Qwen-Image's system prompt, so templates tokenize to whole words
_CHAT_WORDS = (
    "system", "user", "assistant", "describe", "detailing", "color", "size", "texture", "quantity", "text", "spatial",
    "relationships",
)  # fmt: skip


@lru_cache(maxsize=None)
def _chat_vocab() -> tuple[str, ...]:
    punctuation = tuple(".,;:!?'\"()[]-_/&+%#*@<>|{}=")
    lowercase = tuple(dict.fromkeys(w.lower() for w in WORDS + _CHAT_WORDS))
    chars = tuple("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces = lowercase + chars + tuple("##" + c for c in chars) + punctuation
    return _CHAT_SPECIAL + ("<unk>", "\n") + tuple(dict.fromkeys(pieces))


def _word_tokenizer(pieces: tuple[str, ...]):  # noqa: ANN202 - tokenizers.Tokenizer
    """Lower-cased word-level tokenizer over ``pieces``: a newline, a word, or one punctuation character per
    piece (other whitespace separates and is dropped); words outside ``pieces`` split into ``##`` character
    pieces."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token="<unk>", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    return tok


def tiny_chat_tokenizer(model_max_length: int = 1024):  # noqa: ANN201 - transformers.PreTrainedTokenizerFast
    """A word-level tokenizer with Qwen's chat markup (``<|im_start|>``, ``<|im_end|>``, think tags) and chat
    template, for the LLM-encoded families (FLUX.2 [klein], Qwen-Image, Z-Image).

    Words of :data:`WORDS` (lower-cased) are one token each, so are newlines (as in Qwen's tokenizer),
    punctuation one token per character; any other
    word splits into single-character word pieces (never ``<unk>``). Padding (``<|endoftext|>`` = 0) is on the right. Offsets are returned, so prompt
    token positions are found exactly as with the real tokenizers."""
    from transformers import PreTrainedTokenizerFast

    tok = _word_tokenizer(_chat_vocab())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=list(_CHAT_SPECIAL[1:]), model_max_length=model_max_length, padding_side="right",
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _qwen3(seed: int, **overrides: Any):  # noqa: ANN202
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=len(_chat_vocab()), pad_token_id=0, **{**QWEN3_TEXT_CONFIG, **overrides})
    with _seeded(seed):
        return Qwen3ForCausalLM(cfg).eval()


def _qwen25vl(seed: int):  # noqa: ANN202
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = len(_chat_vocab())
    text = {**QWEN25VL_CONFIG["text_config"], "vocab_size": n, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=QWEN25VL_CONFIG["vision_config"], vocab_size=n,
                           bos_token_id=0, eos_token_id=2, image_token_id=n - 1, video_token_id=n - 2,
                           vision_start_token_id=n - 3)  # fmt: skip
    with _seeded(seed):
        return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _clip_text(seed: int, *, projection: bool = False, **overrides: Any):  # noqa: ANN202
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tiny_clip_tokenizer()), **{**CLIP_TEXT_CONFIG, **overrides})
    with _seeded(seed):
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(seed: int, **overrides: Any):  # noqa: ANN202
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tiny_t5_tokenizer()), **{**T5_TEXT_CONFIG, **overrides})
    with _seeded(seed):
        return T5EncoderModel(cfg).eval()


def _vae(seed: int, **overrides: Any):  # noqa: ANN202
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(**{**VAE_CONFIG, **overrides}).eval()


def _model(cls: type, config: dict[str, Any], seed: int):  # noqa: ANN202
    with _seeded(seed):
        return cls(**config).eval()


# ------------------------------------------------------------------------------------------------ builders
_BUILDERS: dict[str, Callable[[int], Any]] = {}


def _register(family: str) -> Callable[[Callable[[int], Any]], Callable[[int], Any]]:
    def deco(fn: Callable[[int], Any]) -> Callable[[int], Any]:
        _BUILDERS[family] = fn
        return fn

    return deco


# Component seeds are ``seed + k`` with a fixed k per role, so one component's shape never shifts another's
# weights (e.g. a larger vocabulary leaves the denoiser unchanged).
def _sd_pipeline(unet_config: dict[str, Any], vae: Any, seed: int):  # noqa: ANN202 - StableDiffusionPipeline
    """A ``StableDiffusionPipeline`` of a UNet built from ``unet_config`` (weights ``seed``), ``vae``, the tiny
    CLIP text encoder (``seed + 2``) and DDIM, without a safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    return StableDiffusionPipeline(
        unet=_model(UNet2DConditionModel, unet_config, seed),
        vae=vae,
        text_encoder=_clip_text(seed + 2),
        tokenizer=tiny_clip_tokenizer(),
        scheduler=DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@_register("sd")
def _build_sd(seed: int):  # noqa: ANN202 - StableDiffusionPipeline
    return _sd_pipeline(SD_UNET_CONFIG, _vae(seed + 1), seed)


@_register("sdxl")
def _build_sdxl(seed: int):  # noqa: ANN202 - StableDiffusionXLPipeline
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    return StableDiffusionXLPipeline(
        unet=_model(UNet2DConditionModel, SDXL_UNET_CONFIG, seed),
        vae=_vae(seed + 1),
        text_encoder=_clip_text(seed + 2),
        text_encoder_2=_clip_text(seed + 3, projection=True),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading"),
    )


@_register("pixart")
def _build_pixart(seed: int):  # noqa: ANN202 - PixArtSigmaPipeline
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    return PixArtSigmaPipeline(
        transformer=_model(PixArtTransformer2DModel, PIXART_TRANSFORMER_CONFIG, seed),
        vae=_vae(seed + 1),
        text_encoder=_t5(seed + 2),
        tokenizer=tiny_t5_tokenizer(),
        scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear"),
    )


@_register("sd3")
def _build_sd3(seed: int, transformer_config: dict[str, Any] = SD3_TRANSFORMER_CONFIG):  # noqa: ANN202
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=_model(SD3Transformer2DModel, transformer_config, seed),
        vae=_vae(seed + 1, **FLOW_VAE_OVERRIDES),
        text_encoder=_clip_text(seed + 2, projection=True),
        text_encoder_2=_clip_text(seed + 3, projection=True),
        text_encoder_3=_t5(seed + 4, **SD3_T5_OVERRIDES),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        tokenizer_3=tiny_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


@_register("sd35")
def _build_sd35(seed: int):  # noqa: ANN202 - StableDiffusion3Pipeline (SD3.5 transformer)
    return _build_sd3(seed, SD35_TRANSFORMER_CONFIG)


@_register("flux")
def _build_flux(seed: int):  # noqa: ANN202 - FluxPipeline
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline(
        transformer=_model(FluxTransformer2DModel, FLUX_TRANSFORMER_CONFIG, seed),
        vae=_vae(seed + 1, **FLOW_VAE_OVERRIDES),
        text_encoder=_clip_text(seed + 2),
        text_encoder_2=_t5(seed + 3),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    )
    pipe.default_sample_size = 32  # default image 64 px (FluxPipeline hard-codes 128, i.e. 256 px here)
    return pipe


@_register("flux2")
def _build_flux2(seed: int):  # noqa: ANN202 - Flux2KleinPipeline
    """FLUX.2 [klein] (Qwen3 text encoder): FLUX.2 [dev]'s Mistral-3 encoder comes with a Pixtral processor
    (tokenizer + image processor) that cannot be built offline without its files; both share the transformer."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    pipe = Flux2KleinPipeline(
        transformer=_model(Flux2Transformer2DModel, FLUX2_TRANSFORMER_CONFIG, seed),
        vae=_model(AutoencoderKLFlux2, FLUX2_VAE_CONFIG, seed + 1),
        text_encoder=_qwen3(seed + 2),
        tokenizer=tiny_chat_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    )
    pipe.default_sample_size = 32  # default image 64 px
    return pipe


@_register("qwenimage")
def _build_qwenimage(seed: int):  # noqa: ANN202 - QwenImagePipeline
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    tokenizer = tiny_chat_tokenizer()
    pipe = QwenImagePipeline(
        transformer=_model(QwenImageTransformer2DModel, QWENIMAGE_TRANSFORMER_CONFIG, seed),
        vae=_model(AutoencoderKLQwenImage, QWENIMAGE_VAE_CONFIG, seed + 1),
        text_encoder=_qwen25vl(seed + 2),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    )
    # the pipeline drops the system prompt's tokens (34 with Qwen's tokenizer): count them with this tokenizer
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix)["input_ids"])
    pipe.default_sample_size = 32  # default image 64 px
    return pipe


@_register("chroma")
def _build_chroma(seed: int):  # noqa: ANN202 - ChromaPipeline
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    pipe = ChromaPipeline(
        transformer=_model(ChromaTransformer2DModel, CHROMA_TRANSFORMER_CONFIG, seed),
        vae=_vae(seed + 1, **FLOW_VAE_OVERRIDES),
        text_encoder=_t5(seed + 2),
        tokenizer=tiny_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    )
    pipe.default_sample_size = 32  # default image 64 px
    return pipe


# ------------------------------------------------------------------------------------------------ HunyuanDiT, Z-Image
#: HunyuanDiT: 4 blocks (block 3 takes the long skip from block 0), 2 heads of 8 (2-D RoPE needs a head dim
#: divisible by 4), the real text lengths (77 BERT + 256 mT5 tokens: the pipeline hard-codes them), learned sigma.
HUNYUANDIT_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
    num_layers=4, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=32, cross_attention_dim_t5=32,
    pooled_projection_dim=16, text_len=77, text_len_t5=256, use_style_cond_and_image_meta_size=False,
)  # fmt: skip
#: HunyuanDiT's VAE downsamples by 8 (its pipeline hard-codes the factor in the RoPE grid): 4 levels.
HUNYUANDIT_VAE_OVERRIDES: dict[str, Any] = dict(
    block_out_channels=[16, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8, scaling_factor=0.13025,
)  # fmt: skip
#: the bilingual CLIP text tower of HunyuanDiT is a BERT (``vocab_size`` from the tokenizer; [PAD] = 0).
BERT_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=128,
    pad_token_id=0,
)  # fmt: skip
#: Z-Image: 1 image refiner + 1 text refiner + 2 joint blocks, 2 heads of 16 (RoPE axes 8+4+4), text states of
#: the Qwen3 encoder (16 wide) as ``cap_feat_dim``.
ZIMAGE_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
    n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64],
)  # fmt: skip
_BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tiny_bert_tokenizer(model_max_length: int = 77):  # noqa: ANN201 - transformers.BertTokenizer
    """A lower-casing WordPiece BERT tokenizer over :data:`WORDS` (HunyuanDiT's CLIP-style text tower).

    Ids: ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2 (first), ``[SEP]`` 3 (last), ``[MASK]`` 4, then every word (one
    token each), single characters and their ``##`` continuations (other words split, never ``[UNK]``) and
    punctuation."""
    from transformers import BertTokenizer

    chars = tuple("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces = tuple(w.lower() for w in WORDS) + chars + tuple("##" + c for c in chars) + tuple(".,;:!?'\"()[]-_/&+%#*@")
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(_BERT_SPECIAL + pieces))}
    return BertTokenizer(vocab=vocab, model_max_length=model_max_length)


def _bert(seed: int):  # noqa: ANN202
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(tiny_bert_tokenizer()), **BERT_TEXT_CONFIG)
    with _seeded(seed):
        return BertModel(cfg).eval()


@_register("hunyuandit")
def _build_hunyuandit(seed: int):  # noqa: ANN202 - HunyuanDiTPipeline
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    return HunyuanDiTPipeline(
        transformer=_model(HunyuanDiT2DModel, HUNYUANDIT_TRANSFORMER_CONFIG, seed),
        vae=_vae(seed + 1, **HUNYUANDIT_VAE_OVERRIDES),
        text_encoder=_bert(seed + 2),
        tokenizer=tiny_bert_tokenizer(),
        text_encoder_2=_t5(seed + 3),
        tokenizer_2=tiny_t5_tokenizer(model_max_length=256),
        scheduler=DDPMScheduler(**_SD_BETAS, prediction_type="v_prediction", clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@_register("zimage")
def _build_zimage(seed: int):  # noqa: ANN202 - ZImagePipeline
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    pipe = ZImagePipeline(
        transformer=_model(ZImageTransformer2DModel, ZIMAGE_TRANSFORMER_CONFIG, seed),
        vae=_vae(seed + 1, **FLOW_VAE_OVERRIDES),
        text_encoder=_qwen3(seed + 2, num_hidden_layers=2),
        tokenizer=tiny_chat_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.default_sample_size = 32  # default image 64 px (the adapter's native size; the pipeline's is 1024)
    return pipe
# ------------------------------------------------------------------------------------------------ Gemma families
#: Gemma 2 text encoder (``vocab_size`` from the tokenizer; ids: <pad> 0, <eos> 1, <bos> 2).
GEMMA2_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=8, max_position_embeddings=1024, sliding_window=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip
#: Sana: 2 blocks, linear self-attention 2 heads of 16, cross-attention 2 heads of 16 to the 16-d Gemma states,
#: patch size 1 on 4-channel latents; ``sample_size=16`` with the 4x DC-AE below: a 64 px default image.
SANA_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=16,
    mlp_ratio=2.5, sample_size=16, patch_size=1,
)  # fmt: skip
#: DC-AE with three levels (4x downsampling; the real one has six, 32x), its last level an EfficientViT block.
SANA_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, latent_channels=4, attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
    encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
    upsample_block_type="interpolate", downsample_block_type="conv", scaling_factor=0.41407,
)  # fmt: skip
#: Sana's flow-matching DPM-Solver (the pipeline's scheduler).
SANA_SCHEDULER_CONFIG: dict[str, Any] = dict(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
#: Lumina 2: 1 + 1 refiner blocks, 2 joint blocks, 2 query heads of 16 with 1 key/value head, RoPE axes 4+6+6.
LUMINA2_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
    num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), cap_feat_dim=16,
)  # fmt: skip
#: Lumina 2 encodes with the FLUX VAE (8x; the pipeline assumes 8): four levels here too, so a 128 px default
#: image (``sample_size=16``) is 8 x 8 image tokens.
LUMINA2_VAE_OVERRIDES: dict[str, Any] = dict(
    block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8, sample_size=128, **FLOW_VAE_OVERRIDES,
)  # fmt: skip
#: words of Lumina 2's system prompt (Sana's instruction words are read from its pipeline), one token each
_GEMMA_WORDS = (
    "you", "assistant", "designed", "generate", "superior", "images", "degree", "alignment", "based", "textual",
    "prompts", "user", "prompt", "start",
)  # fmt: skip
_GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>")


@lru_cache(maxsize=None)
def _gemma_vocab() -> tuple[str, ...]:
    import inspect
    import re

    from diffusers import SanaPipeline

    instruction = " ".join(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)
    words = tuple(w.lower() for w in WORDS + _CHAT_WORDS + _GEMMA_WORDS) + tuple(re.findall(r"[a-z]+", instruction.lower()))
    chars = tuple("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces = words + chars + tuple("##" + c for c in chars) + tuple(".,;:!?'\"()[]-_/&+%#*@<>|{}=")
    return _GEMMA_SPECIAL + ("\n",) + tuple(dict.fromkeys(pieces))


def tiny_gemma_tokenizer(model_max_length: int = 1024):  # noqa: ANN201 - transformers.PreTrainedTokenizerFast
    """A word-level tokenizer with Gemma's special tokens (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2 prepended to
    every text, no end token; padding on the right) for Sana and Lumina 2. Words of :data:`WORDS`, of Sana's
    complex human instruction and of Lumina 2's system prompt are one token each, newlines too; other words
    split into character pieces (never ``<unk>``). Offsets are returned."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _word_tokenizer(_gemma_vocab())
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        model_max_length=model_max_length, padding_side="right",
    )  # fmt: skip


def _gemma2(seed: int):  # noqa: ANN202 - transformers.Gemma2Model
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(vocab_size=len(_gemma_vocab()), **GEMMA2_TEXT_CONFIG)
    with _seeded(seed):
        return Gemma2Model(cfg).eval()


@_register("sana")
def _build_sana(seed: int):  # noqa: ANN202 - SanaPipeline
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    return SanaPipeline(
        transformer=_model(SanaTransformer2DModel, SANA_TRANSFORMER_CONFIG, seed),
        vae=_model(AutoencoderDC, SANA_VAE_CONFIG, seed + 1),
        text_encoder=_gemma2(seed + 2),
        tokenizer=tiny_gemma_tokenizer(),
        scheduler=DPMSolverMultistepScheduler(**SANA_SCHEDULER_CONFIG),
    )


@_register("lumina2")
def _build_lumina2(seed: int):  # noqa: ANN202 - Lumina2Pipeline
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    return Lumina2Pipeline(
        transformer=_model(Lumina2Transformer2DModel, LUMINA2_TRANSFORMER_CONFIG, seed),
        vae=_vae(seed + 1, **LUMINA2_VAE_OVERRIDES),
        text_encoder=_gemma2(seed + 2),
        tokenizer=tiny_gemma_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


# ------------------------------------------------------------------------------------------------ 2026 families
#: LongCat-Image: FLUX's tiny layout (1 double-stream + 2 single-stream blocks, 2 heads of 16, RoPE axes 4+6+6) on
#: 16 latent channels packed 2x2 (the pipeline hard-codes 16), text states of the tiny Qwen2.5-VL (16 wide).
LONGCAT_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6],
)  # fmt: skip


@_register("longcatimage")
def _build_longcatimage(seed: int):  # noqa: ANN202 - LongCatImagePipeline
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

    pipe = LongCatImagePipeline(
        transformer=_model(LongCatImageTransformer2DModel, LONGCAT_TRANSFORMER_CONFIG, seed),
        vae=_vae(seed + 1, latent_channels=16, **FLOW_VAE_OVERRIDES),
        text_encoder=_qwen25vl(seed + 2),
        tokenizer=tiny_chat_tokenizer(),
        # the VL processor serves only the optional prompt rewriting (a generation with the VL model); Qwen2-VL's
        # processor needs torchvision, so the tokenizer (its text half) stands in
        text_processor=tiny_chat_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    )
    pipe.default_sample_size = 32  # default image 64 px
    return pipe


#: Ovis-Image: the same tiny FLUX layout (SwiGLU MLPs) on 4 latent channels, text states of a tiny Qwen3 (16 wide).
OVIS_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[4, 6, 6],
)  # fmt: skip


def _qwen3_model(seed: int, **overrides: Any):  # noqa: ANN202 - transformers.Qwen3Model
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(vocab_size=len(_chat_vocab()), pad_token_id=0, **{**QWEN3_TEXT_CONFIG, **overrides})
    with _seeded(seed):
        return Qwen3Model(cfg).eval()


@_register("ovisimage")
def _build_ovisimage(seed: int):  # noqa: ANN202 - OvisImagePipeline
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel

    pipe = OvisImagePipeline(
        transformer=_model(OvisImageTransformer2DModel, OVIS_TRANSFORMER_CONFIG, seed),
        vae=_vae(seed + 1, **FLOW_VAE_OVERRIDES),
        text_encoder=_qwen3_model(seed + 2, num_hidden_layers=2),
        tokenizer=tiny_chat_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    )
    pipe.default_sample_size = 32  # default image 64 px
    return pipe


#: Krea 2: 2 single-stream blocks, 2 query heads of 16 with 1 key/value head (RoPE axes 4+6+6), a text-fusion
#: stage of one layer-wise and one token block over 4 tapped layers of the 16-wide tiny Qwen3-VL; in_channels = 4
#: Qwen-Image VAE channels x 2x2 patches.
KREA2_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=16, num_text_layers=4, text_num_attention_heads=2,
    text_num_key_value_heads=2, text_intermediate_size=32, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
    axes_dims_rope=(4, 6, 6),
)  # fmt: skip
#: Qwen3-VL (text tower used; a one-block vision tower completes the class): 4 layers, interleaved 3-axis mRoPE.
QWEN3VL_CONFIG: dict[str, Any] = dict(
    text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                     rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
    vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16, patch_size=2,
                       spatial_merge_size=1, temporal_patch_size=1, deepstack_visual_indexes=[]),
)  # fmt: skip


def _qwen3vl(seed: int, **text_overrides: Any):  # noqa: ANN202 - transformers.Qwen3VLModel
    from transformers import Qwen3VLConfig, Qwen3VLModel

    n = len(_chat_vocab())
    text = {**QWEN3VL_CONFIG["text_config"], "vocab_size": n, "pad_token_id": 0, **text_overrides}
    cfg = Qwen3VLConfig(text_config=text,
                        vision_config=QWEN3VL_CONFIG["vision_config"], image_token_id=n - 1, video_token_id=n - 2,
                        vision_start_token_id=n - 3, vision_end_token_id=n - 4)  # fmt: skip
    with _seeded(seed):
        return Qwen3VLModel(cfg).eval()


@_register("krea2")
def _build_krea2(seed: int):  # noqa: ANN202 - Krea2Pipeline
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel

    pipe = Krea2Pipeline(
        transformer=_model(Krea2Transformer2DModel, KREA2_TRANSFORMER_CONFIG, seed),
        vae=_model(AutoencoderKLQwenImage, QWENIMAGE_VAE_CONFIG, seed + 1),
        text_encoder=_qwen3vl(seed + 2),
        tokenizer=tiny_chat_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        text_encoder_select_layers=(1, 2, 3, 4),  # one tap per tiny layer (the real pipeline taps 12 of 36)
    )
    pipe.default_sample_size = 32  # default image 64 px (the adapter's native size; the pipeline's is 1024)
    return pipe


#: HunyuanImage 2.1: 1 double-stream + 2 single-stream blocks, 2 heads of 16 (2-axis RoPE 8+8), a one-block token
#: refiner, the latents as tokens (patch 1) on 8 channels; text states of the tiny Qwen2.5-VL (16 wide) and of a
#: tiny T5 for glyph text (32 wide).
HUNYUANIMAGE_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=2,
    num_refiner_layers=1, mlp_ratio=2.0, patch_size=(1, 1), text_embed_dim=16, text_embed_2_dim=32,
    rope_axes_dim=(8, 8),
)  # fmt: skip
#: HunyuanImage's VAE (32x at real size, its latents the denoiser's tokens): three levels here, 4x, 8 channels, so a
#: 64 px image is 16 x 16 tokens as in the other tiny families.
HUNYUANIMAGE_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(32, 32, 64), layers_per_block=1,
    spatial_compression_ratio=4, sample_size=64, scaling_factor=0.75,
)  # fmt: skip


@_register("hunyuanimage")
def _build_hunyuanimage(seed: int):  # noqa: ANN202 - HunyuanImagePipeline
    from diffusers import (
        AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline, HunyuanImageTransformer2DModel,
    )  # fmt: skip

    pipe = HunyuanImagePipeline(
        transformer=_model(HunyuanImageTransformer2DModel, HUNYUANIMAGE_TRANSFORMER_CONFIG, seed),
        vae=_model(AutoencoderKLHunyuanImage, HUNYUANIMAGE_VAE_CONFIG, seed + 1),
        text_encoder=_qwen25vl(seed + 2),
        tokenizer=tiny_chat_tokenizer(),
        # the real glyph encoder is a ByT5 (byte-level, no offsets); the tiny T5's word pieces serve the same role
        text_encoder_2=_t5(seed + 3),
        tokenizer_2=tiny_t5_tokenizer(model_max_length=128),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipe.default_sample_size = 16  # default image 64 px (16 x 16 tokens)
    return pipe


#: Bria FIBO: FLUX's tiny layout (1 double-stream + 2 single-stream blocks, 2 heads of 16, RoPE axes 4+6+6) on the
#: 8 channels of the tiny Wan VAE, one token per latent; per-block text layers of a 16-wide tiny SmolLM3 (its
#: last two layers side by side: 32-wide text states).
BRIAFIBO_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=[4, 6, 6], text_encoder_dim=16,
)  # fmt: skip
#: Wan 2.2's VAE layout (residual blocks, 2x2 input patches) at 16x as the pipeline assumes: 3 levels x 2 and the
#: patch, 8 latent channels with unit statistics.
WAN22_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=16, decoder_base_dim=16, z_dim=8, dim_mult=[1, 1, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, False, False], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
    latents_mean=[0.1, -0.2, 0.3, 0.0, 0.2, -0.1, 0.0, 0.1], latents_std=[1.5, 2.0, 1.2, 0.8, 1.0, 1.1, 0.9, 1.3],
    scale_factor_spatial=16,
)  # fmt: skip
#: SmolLM3 (FIBO's text encoder), 2 layers; the real vocabulary size, as the pipeline feeds id 128000 (begin of
#: text) for an empty prompt.
SMOLLM3_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=1024, pad_token_id=0, bos_token_id=128000, eos_token_id=2,
    tie_word_embeddings=True,
)  # fmt: skip


def _smollm3(seed: int):  # noqa: ANN202 - transformers.SmolLM3ForCausalLM
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    with _seeded(seed):
        return SmolLM3ForCausalLM(SmolLM3Config(**SMOLLM3_TEXT_CONFIG)).eval()


@_register("briafibo")
def _build_briafibo(seed: int):  # noqa: ANN202 - BriaFiboPipeline
    from diffusers import AutoencoderKLWan, BriaFiboPipeline, BriaFiboTransformer2DModel, FlowMatchEulerDiscreteScheduler

    pipe = BriaFiboPipeline(
        transformer=_model(BriaFiboTransformer2DModel, BRIAFIBO_TRANSFORMER_CONFIG, seed),
        vae=_model(AutoencoderKLWan, WAN22_VAE_CONFIG, seed + 1),
        text_encoder=_smollm3(seed + 2),
        tokenizer=tiny_chat_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    )
    pipe.default_sample_size = 8  # default image 128 px (8 x 8 tokens at 16x)
    return pipe


#: Ideogram 4: 2 single-stream blocks, 2 heads of 16 (MRoPE sections 4+2+2), text features of the 13 layers the
#: pipeline taps (0, 3, ..., 33, 35) of a 36-layer, 16-wide tiny Qwen3-VL; in_channels = 4 VAE channels x 2x2 patches.
IDEOGRAM4_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, intermediate_size=64, adaln_dim=16,
    llm_features_dim=13 * 16, rope_theta=10_000, mrope_section=(4, 2, 2),
)  # fmt: skip


@_register("ideogram4")
def _build_ideogram4(seed: int):  # noqa: ANN202 - Ideogram4Pipeline
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline, Ideogram4Transformer2DModel

    text_encoder = _qwen3vl(seed + 2, num_hidden_layers=36)  # the pipeline taps layers up to 35
    pipe = Ideogram4Pipeline(
        transformer=_model(Ideogram4Transformer2DModel, IDEOGRAM4_TRANSFORMER_CONFIG, seed),
        unconditional_transformer=_model(Ideogram4Transformer2DModel, IDEOGRAM4_TRANSFORMER_CONFIG, seed + 3),
        vae=_model(AutoencoderKLFlux2, FLUX2_VAE_CONFIG, seed + 1),
        text_encoder=text_encoder,
        tokenizer=tiny_chat_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.default_sample_size = 16  # default image 64 px (16 x 16 tokens; the pipeline's default is 2048 px)
    return pipe


#: CogView4: 2 blocks, 2 heads of 16 (2-axis RoPE), 16-wide tiny GLM text states; 4 latent channels, patch 2.
COGVIEW4_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=32, rope_axes_dim=(16, 16),
)  # fmt: skip


_GLM_PREFIX = ("[gMASK]", "<sop>")


def tiny_glm_tokenizer(model_max_length: int = 1024):  # noqa: ANN201 - transformers.PreTrainedTokenizerFast
    """:func:`tiny_chat_tokenizer`'s words with GLM-4's text prefix (``[gMASK]<sop>`` before every text) and its
    left padding (``<|endoftext|>`` = 0), for CogView4."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    pieces = _chat_vocab() + _GLM_PREFIX
    tok = _word_tokenizer(pieces)
    ids = [(p, pieces.index(p)) for p in _GLM_PREFIX]
    tok.post_processor = processors.TemplateProcessing(single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B", special_tokens=ids)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=list(_GLM_PREFIX), model_max_length=model_max_length, padding_side="left",
    )  # fmt: skip


def _glm(seed: int):  # noqa: ANN202 - transformers.GlmModel
    from transformers import GlmConfig, GlmModel

    cfg = GlmConfig(vocab_size=len(_chat_vocab()) + len(_GLM_PREFIX), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                    pad_token_id=0)  # fmt: skip
    with _seeded(seed):
        return GlmModel(cfg).eval()


@_register("cogview4")
def _build_cogview4(seed: int):  # noqa: ANN202 - CogView4Pipeline
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    return CogView4Pipeline(
        transformer=_model(CogView4Transformer2DModel, COGVIEW4_TRANSFORMER_CONFIG, seed),
        vae=_vae(seed + 1, scaling_factor=1.0),
        text_encoder=_glm(seed + 2),
        tokenizer=tiny_glm_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                  use_dynamic_shifting=True, time_shift_type="linear"),  # fmt: skip
    )


#: HiDream-I1: 1 double-stream + 2 single-stream blocks, 2 heads of 16 (RoPE axes 8+4+4), mixture-of-experts
#: feed-forwards (4 routed experts, 2 active); text: T5 (32 wide) and every layer of a 3-layer, 16-wide tiny Llama
#: (block i reads layer llama_layers[i]); pooled CLIP-L + CLIP-G projections (32 + 32). The pipeline generates at
#: the area of its 128-latent default size (256 px here), so the model's maximal sequence holds 128 x 128 latents.
HIDREAM_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, caption_channels=[32, 16], text_emb_dim=64, num_routed_experts=4, num_activated_experts=2,
    axes_dims_rope=(8, 4, 4), max_resolution=(128, 128), llama_layers=[0, 1, 2],
)  # fmt: skip


def _llama(seed: int):  # noqa: ANN202 - transformers.LlamaForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(_chat_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                      pad_token_id=2, bos_token_id=1, eos_token_id=2)  # fmt: skip
    with _seeded(seed):
        return LlamaForCausalLM(cfg).eval()


@_register("hidream")
def _build_hidream(seed: int):  # noqa: ANN202 - HiDreamImagePipeline
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

    return HiDreamImagePipeline(
        transformer=_model(HiDreamImageTransformer2DModel, HIDREAM_TRANSFORMER_CONFIG, seed),
        vae=_vae(seed + 1, **FLOW_VAE_OVERRIDES),
        # HiDream's CLIP encoders are long-context (248 positions; the pipeline feeds up to 218 tokens)
        text_encoder=_clip_text(seed + 2, projection=True, max_position_embeddings=248),
        tokenizer=tiny_clip_tokenizer(model_max_length=248),
        text_encoder_2=_clip_text(seed + 3, projection=True, max_position_embeddings=248),
        tokenizer_2=tiny_clip_tokenizer(model_max_length=248),
        text_encoder_3=_t5(seed + 4),
        tokenizer_3=tiny_t5_tokenizer(),
        text_encoder_4=_llama(seed + 5),
        tokenizer_4=tiny_chat_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


#: The families :func:`tiny_pipeline` builds.
TINY_FAMILIES: tuple[str, ...] = tuple(_BUILDERS)

#: Extra ``pipe(...)`` arguments for a fast generation at exactly the requested size. PixArt-Sigma's default
#: resolution binning would generate at a 256 px bin (100x the work) and resize back; its default caption
#: cleaning needs BeautifulSoup and ftfy and only warns without them.
TINY_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "pixart": {"use_resolution_binning": False, "clean_caption": False},
    "hunyuandit": {"use_resolution_binning": False},
    "sana": {"use_resolution_binning": False},
    "longcatimage": {"enable_prompt_rewrite": False},  # rewriting generates with the VL model's processor
    "briafibo": {"guidance_scale": 1.0},  # a 16x VAE: the tiny sizes are few tokens; no second (negative) pass
    "ideogram4": {"guidance_schedule": None, "guidance_scale": 4.0, "max_sequence_length": 32},  # 2-step runs
}


# ------------------------------------------------------------------------------------------------ public API
def tiny_pipeline(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):  # noqa: ANN201
    """A tiny random diffusers pipeline of ``family``, built offline.

    Args:
        family: one of :data:`TINY_FAMILIES` ("sd", "sdxl", "pixart", "sd3", "flux", ..., "sana", "lumina2").
        seed: weight seed; the same seed gives identical weights, another seed different ones.
        dtype: parameter dtype of every component.

    Returns:
        A ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``PixArtSigmaPipeline``,
        ``StableDiffusion3Pipeline``, ``FluxPipeline``, ... (``SanaPipeline`` and ``Lumina2Pipeline`` with a tiny
        Gemma 2 and :func:`tiny_gemma_tokenizer`) on the CPU, modules in eval mode, progress bar off.
        A 64x64 px image is a 32x32 latent. For a quick generation pass ``**TINY_CALL_KWARGS.get(family, {})``
        (PixArt-Sigma otherwise bins the size up to 256 px).

    Raises:
        ValueError: for an unknown family (the message lists the valid ones).
    """
    try:
        build = _BUILDERS[family]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tiny pipeline family {family!r}; valid families: {', '.join(TINY_FAMILIES)}") from None
    pipe = build(seed)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it (safetensors) to ``path``.

    ``diffusers.DiffusionPipeline.from_pretrained(path)`` then loads it offline (tokenizers included), as the
    same pipeline class with the same weights.

    Args:
        family: one of :data:`TINY_FAMILIES`.
        path: output folder (created).
        seed: weight seed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from .checks import check_out_dir

    path = check_out_dir(path, "output folder")  # an existing file there: one clear error, not diffusers' traceback
    tiny_pipeline(family, seed=seed).save_pretrained(path, safe_serialization=True)
    return path


def tiny_controlnet(family: str = "sd", *, seed: int = 0, zero_init: bool = False):  # noqa: ANN201
    """A tiny random ``ControlNetModel`` matching the tiny UNet of ``family``.

    It takes the UNet's inputs (latents, timestep, text states) plus a control image at pixel resolution
    (``controlnet_cond``: B x 3 x 2H x 2W for H x W latents) and returns residuals shaped like the UNet's
    down-block and mid-block outputs (``down_block_additional_residuals`` / ``mid_block_additional_residual``).

    Args:
        family: the UNet family to match (only "sd" has a ControlNet).
        seed: weight seed.
        zero_init: keep diffusers' zero-initialised output convolutions (the control then has no effect);
            by default they are random too, so the control really shifts the UNet's activations.

    Raises:
        ValueError: for a family without a tiny ControlNet.
    """
    from diffusers import ControlNetModel

    if family not in CONTROLNET_CONFIGS:
        raise ValueError(f"no tiny ControlNet for family {family!r}; valid families: {', '.join(CONTROLNET_CONFIGS)}")
    unet_config, extra = CONTROLNET_CONFIGS[family]
    config = {k: unet_config[k] for k in _CONTROLNET_SHARED_KEYS if k in unet_config}
    with _seeded(seed):
        net = ControlNetModel(**config, **extra)
        if not zero_init:
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                torch.nn.init.normal_(conv.weight, std=0.1)
                torch.nn.init.normal_(conv.bias, std=0.1)
    return net.eval()


def sd15_shaped_pipeline(seed: int = 0):  # noqa: ANN201 - StableDiffusionPipeline
    """A small-channel pipeline with SD1.5's exact block structure, for benchmarks.

    4 UNet levels with cross-attention at the first three, 8 heads, 2 resnets per down level / 3 per up level,
    and a 4-level VAE (factor 8): 512 px inputs give SD1.5's 64x64 / 32x32 / 16x16 / 8x8 grids and its 16
    cross-attention layers.
    """
    unet_config = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )  # fmt: skip
    vae = _vae(seed + 1, block_out_channels=[16, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8, sample_size=512)  # fmt: skip
    pipe = _sd_pipeline(unet_config, vae, seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_shaped_pipeline(seed: int = 0):  # noqa: ANN201 - StableDiffusionPipeline
    """A small-channel pipeline with SDXL's UNet block structure, for memory benchmarks of GOCA's maps.

    3 UNet levels with cross-attention at the inner two, 1 / 2 / 10 transformer layers per attention at
    levels 0 / 1 / 2 (SDXL's 70 transformer blocks: 4 + 60 + 6 around the reference ``up_blocks.1``), 1-2
    heads, and a 4-level VAE (factor 8): 1024 px inputs give SDXL's 64x64 / 32x32 attention grids. The map
    memory of a GOCA observation depends on the grids and the block count only, so it is SDXL's; its
    convolutions and projections are small (a plain SD pipeline with a tiny CLIP text encoder, so no SDXL
    micro-conditioning), so its times are not SDXL's.
    """
    unet_config = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(1, 2, 2), cross_attention_dim=32,
        norm_num_groups=16, use_linear_projection=True,
    )  # fmt: skip
    vae = _vae(seed + 1, block_out_channels=[16, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8, sample_size=1024)  # fmt: skip
    pipe = _sd_pipeline(unet_config, vae, seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ single files
# Writers of the original (non-diffusers) key layouts: each is the inverse of one of diffusers' converters in
# ``diffusers/loaders/single_file_utils.py``, so ``from_single_file`` reads the file back to the same weights.
Tensors = dict[str, torch.Tensor]


def _unet_to_original(unet) -> dict[str, str]:
    """diffusers -> original (CompVis / SGM ``model.diffusion_model``) prefixes of a UNet2DConditionModel."""
    cfg = unet.config
    n, per = len(cfg.block_out_channels), cfg.layers_per_block
    pairs = {
        "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
    }  # fmt: skip
    for j in range(2):
        pairs[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    for i in range(n):
        for j in range(per):
            pairs[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(per + 1) * i + j + 1}.0."
            pairs[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(per + 1) * i + j + 1}.1."
        if i < n - 1:
            pairs[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(per + 1) * (i + 1)}.0.op."
        for j in range(per + 1):
            pairs[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(per + 1) * i + j}.0."
            pairs[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(per + 1) * i + j}.1."
        if i < n - 1:
            has_attn = "CrossAttn" in cfg.up_block_types[i]
            pairs[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(per + 1) * i + per}.{2 if has_attn else 1}."
    return pairs


_RESNET_TO_ORIGINAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                       "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip


def _vae_to_original(vae) -> dict[str, str]:
    n = len(vae.config.block_out_channels)
    per = vae.config.layers_per_block
    pairs = {"encoder.mid_block.attentions.0.": "encoder.mid.attn_1.", "decoder.mid_block.attentions.0.": "decoder.mid.attn_1.",
             "encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}  # fmt: skip
    for part in ("encoder", "decoder"):
        for j in range(2):
            pairs[f"{part}.mid_block.resnets.{j}."] = f"{part}.mid.block_{j + 1}."
    for i in range(n):
        for j in range(per):
            pairs[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        if i < n - 1:
            pairs[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            pairs[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
        for j in range(per + 1):
            pairs[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
    return pairs


_VAE_ATTN_TO_ORIGINAL = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _rename(key: str, prefixes: dict[str, str]) -> str:
    for new, old in sorted(prefixes.items(), key=lambda kv: -len(kv[0])):
        if key.startswith(new):
            return old + key[len(new):]
    return key


def _unet_original(unet) -> Tensors:  # noqa: ANN001 - UNet2DConditionModel
    """Inverse of ``convert_ldm_unet_checkpoint``: SD 1.x/2.x and SDXL UNets (incl. SDXL's ``label_emb``)."""
    out: Tensors = {}
    prefixes = _unet_to_original(unet)
    for key, value in unet.state_dict().items():
        key = _rename(key, prefixes)
        parts = key.split(".")
        resnet_part = parts[2] if parts[0] == "middle_block" else parts[3] if len(parts) > 3 else ""
        in_resnet = parts[0] == "middle_block" or (parts[0] in ("input_blocks", "output_blocks") and parts[2] == "0")
        if in_resnet and resnet_part in _RESNET_TO_ORIGINAL:
            key = key.replace(f".{resnet_part}.", f".{_RESNET_TO_ORIGINAL[resnet_part]}.", 1)
        out[key] = value
    return out


def _vae_original(vae) -> Tensors:  # noqa: ANN001 - AutoencoderKL
    """Inverse of ``convert_ldm_vae_checkpoint`` (attention projections as 1x1 convolutions)."""
    out: Tensors = {}
    prefixes = _vae_to_original(vae)
    for key, value in vae.state_dict().items():
        key = _rename(key, prefixes).replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in key:
            for new, old in _VAE_ATTN_TO_ORIGINAL.items():
                key = key.replace(".attn_1." + new, ".attn_1." + old)
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[key] = value
    return out


def _clip_original(text_encoder, *, projection: bool = True) -> Tensors:  # noqa: ANN001 - CLIPTextModel(WithProjection)
    """Inverse of ``convert_ldm_clip_checkpoint``: transformers' own CLIP names under ``text_model.`` (and
    ``text_projection.weight``; SD3's CLIP-L file has none: diffusers sets it to the identity)."""
    out: Tensors = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("text_projection."):
            if projection:
                out[key] = value
            continue
        out["text_model." + key.removeprefix("text_model.")] = value
    return out


_OPEN_CLIP_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}  # fmt: skip


def _open_clip_original(text_encoder) -> Tensors:  # noqa: ANN001 - CLIPTextModel(WithProjection)
    """Inverse of ``convert_open_clip_checkpoint``: OpenCLIP names (``transformer.resblocks.i``, fused
    ``attn.in_proj_weight``, ``positional_embedding``, ``ln_final``, ``text_projection`` as [width, dim])."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    out: Tensors = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state.pop("text_projection.weight").T
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in "qkv"]
            )
            for new, old in _OPEN_CLIP_NAMES.items():
                out[f"{block}{old}.{kind}"] = state.pop(f"{layer}{new}.{kind}")
    if state:
        raise ValueError(f"OpenCLIP writer left keys unmapped: {sorted(state)[:5]}")
    return out


def _t5_original(text_encoder) -> Tensors:  # noqa: ANN001 - T5EncoderModel
    """SD3's ``text_encoders.t5xxl.transformer.*``: transformers' own T5 names."""
    return dict(text_encoder.state_dict())


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous (scale, shift) <-> the original (shift, scale); its own inverse."""
    a, b = weight.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _pop_linear(state: Tensors, new: str, out: Tensors, old: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    for kind in ("weight", "bias"):
        if f"{new}.{kind}" in state:
            value = state.pop(f"{new}.{kind}")
            out[f"{old}.{kind}"] = transform(value) if transform else value


def _pop_fused(state: Tensors, news: list[str], out: Tensors, old: str) -> None:
    for kind in ("weight", "bias"):
        out[f"{old}.{kind}"] = torch.cat([state.pop(f"{n}.{kind}") for n in news])


def _check_consumed(state: Tensors, what: str) -> None:
    if state:
        raise ValueError(f"{what} writer left keys unmapped: {sorted(state)[:5]}")


def _mmdit_original(transformer) -> Tensors:  # noqa: ANN001 - SD3Transformer2DModel
    """Inverse of ``convert_sd3_transformer_checkpoint_to_diffusers`` (SD3 and SD3.5: q/k norms, dual attention)."""
    state = dict(transformer.state_dict())
    out: Tensors = {"pos_embed": state.pop("pos_embed.pos_embed")}
    for new, old in {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
                     "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
                     "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
                     "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}.items():  # fmt: skip
        _pop_linear(state, new, out, old)
    _pop_linear(state, "norm_out.linear", out, "final_layer.adaLN_modulation.1", _swap_halves)
    n = transformer.config.num_layers
    for i in range(n):
        b, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == n - 1
        _pop_fused(state, [f"{b}attn.to_{p}" for p in "qkv"], out, f"{x}attn.qkv")
        _pop_fused(state, [f"{b}attn.add_{p}_proj" for p in "qkv"], out, f"{c}attn.qkv")
        for new, old in {"attn.norm_q": f"{x}attn.ln_q", "attn.norm_k": f"{x}attn.ln_k", "attn.norm_added_q": f"{c}attn.ln_q",
                         "attn.norm_added_k": f"{c}attn.ln_k", "attn.to_out.0": f"{x}attn.proj", "attn.to_add_out": f"{c}attn.proj",
                         "norm1.linear": f"{x}adaLN_modulation.1", "ff.net.0.proj": f"{x}mlp.fc1", "ff.net.2": f"{x}mlp.fc2",
                         "ff_context.net.0.proj": f"{c}mlp.fc1", "ff_context.net.2": f"{c}mlp.fc2",
                         "attn2.norm_q": f"{x}attn2.ln_q", "attn2.norm_k": f"{x}attn2.ln_k", "attn2.to_out.0": f"{x}attn2.proj"}.items():  # fmt: skip
            _pop_linear(state, b + new, out, old)
        if f"{b}attn2.to_q.weight" in state:
            _pop_fused(state, [f"{b}attn2.to_{p}" for p in "qkv"], out, f"{x}attn2.qkv")
        _pop_linear(state, f"{b}norm1_context.linear", out, f"{c}adaLN_modulation.1", _swap_halves if last else None)
    _check_consumed(state, "MMDiT")
    return out


def _flux_original(transformer) -> Tensors:  # noqa: ANN001 - FluxTransformer2DModel
    """Inverse of ``convert_flux_transformer_checkpoint_to_diffusers`` (BFL's ``flux1-*.safetensors`` layout)."""
    state = dict(transformer.state_dict())
    out: Tensors = {}
    for new, old in {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                     "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                     "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                     "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                     "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                     "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
                     "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}.items():  # fmt: skip
        _pop_linear(state, new, out, old)
    _pop_linear(state, "norm_out.linear", out, "final_layer.adaLN_modulation.1", _swap_halves)
    for i in range(transformer.config.num_layers):
        b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _pop_fused(state, [f"{b}attn.to_{p}" for p in "qkv"], out, f"{d}img_attn.qkv")
        _pop_fused(state, [f"{b}attn.add_{p}_proj" for p in "qkv"], out, f"{d}txt_attn.qkv")
        for new, old in {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0",
                         "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                         "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}.items():  # fmt: skip
            _pop_linear(state, b + new, out, d + old)
        for new, old in {"norm_q": "img_attn.norm.query_norm", "norm_k": "img_attn.norm.key_norm",
                         "norm_added_q": "txt_attn.norm.query_norm", "norm_added_k": "txt_attn.norm.key_norm"}.items():  # fmt: skip
            out[f"{d}{old}.scale"] = state.pop(f"{b}attn.{new}.weight")
    for i in range(transformer.config.num_single_layers):
        b, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        _pop_fused(state, [f"{b}attn.to_q", f"{b}attn.to_k", f"{b}attn.to_v", f"{b}proj_mlp"], out, f"{s}linear1")
        _pop_linear(state, f"{b}norm.linear", out, f"{s}modulation.lin")
        _pop_linear(state, f"{b}proj_out", out, f"{s}linear2")
        out[f"{s}norm.query_norm.scale"] = state.pop(f"{b}attn.norm_q.weight")
        out[f"{s}norm.key_norm.scale"] = state.pop(f"{b}attn.norm_k.weight")
    _check_consumed(state, "FLUX")
    return out


_SD_FILE = {"unet": ("model.diffusion_model.", _unet_original), "vae": ("first_stage_model.", _vae_original)}
_SD3_FILE = {
    "transformer": ("model.diffusion_model.", _mmdit_original), "vae": ("first_stage_model.", _vae_original),
    "text_encoder": ("text_encoders.clip_l.transformer.", lambda m: _clip_original(m, projection=False)),
    "text_encoder_2": ("text_encoders.clip_g.transformer.", _clip_original),
    "text_encoder_3": ("text_encoders.t5xxl.transformer.", _t5_original),
}  # fmt: skip
#: layout -> {pipeline component: (key prefix in the file, writer of its original-layout state dict)}; the
#: denoiser comes first. A FLUX.1 file (as BFL releases it) holds the transformer alone, without a prefix.
SINGLE_FILE_LAYOUTS: dict[str, dict[str, tuple[str, Callable[[Any], Tensors]]]] = {
    "sd": {**_SD_FILE, "text_encoder": ("cond_stage_model.transformer.", _clip_original)},
    "sd2": {**_SD_FILE, "text_encoder": ("cond_stage_model.model.", _open_clip_original)},
    "sdxl": {**_SD_FILE, "text_encoder": ("conditioner.embedders.0.transformer.", _clip_original),
             "text_encoder_2": ("conditioner.embedders.1.model.", _open_clip_original)},
    "sd3": _SD3_FILE,
    "sd35": _SD3_FILE,
    "flux": {"transformer": ("", _flux_original)},
}  # fmt: skip

#: SD 2.x: linear transformer projections, per-level heads, an OpenCLIP-style text encoder, v-prediction.
SD2_UNET_CONFIG: dict[str, Any] = dict(SD_UNET_CONFIG, use_linear_projection=True, attention_head_dim=(2, 4))
#: the second (OpenCLIP-G style) text encoder of the single-file SDXL / SD3 sources: wider than the first, as
#: in the released models (diffusers tells the two CLIPs of a single file apart by their width).
WIDE_CLIP_OVERRIDES: dict[str, Any] = dict(hidden_size=48)
#: single-file SDXL: cross-attention over both text encoders' states (32 + 48), pooled 32 + 6 x 8 time ids.
SDXL_SINGLE_FILE_UNET_CONFIG: dict[str, Any] = dict(SDXL_UNET_CONFIG, cross_attention_dim=80, projection_class_embeddings_input_dim=80)
#: single-file SD3: the CLIP states (32 + 48) zero-padded to the T5 width 96; pooled 32 + 32.
SD3_SINGLE_FILE_T5_OVERRIDES: dict[str, Any] = dict(d_model=96)
SD3_SINGLE_FILE_TRANSFORMER_CONFIG: dict[str, Any] = dict(SD3_TRANSFORMER_CONFIG, joint_attention_dim=96, pooled_projection_dim=64)
#: the smallest FLUX.1 transformer diffusers' converter reads: it splits the single blocks' fused ``linear1``
#: at the released width (``inner_dim = 3072``, MLP ratio 4), so the width cannot shrink; 1 + 1 blocks, 24
#: heads of 128 (RoPE axes 16 + 56 + 56) as released. ~0.5 G parameters: for slow tests only.
FLUX_SINGLE_FILE_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[16, 56, 56],
)  # fmt: skip


def _sd2_source(seed: int):  # noqa: ANN202 - StableDiffusionPipeline (SD 2.x layout)
    from diffusers import DDIMScheduler, UNet2DConditionModel

    pipe = tiny_pipeline("sd", seed=seed)
    pipe.unet = _model(UNet2DConditionModel, SD2_UNET_CONFIG, seed)
    pipe.scheduler = DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    return pipe


def _sdxl_source(seed: int):  # noqa: ANN202 - StableDiffusionXLPipeline with a wider second text encoder
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline("sdxl", seed=seed)
    pipe.unet = _model(UNet2DConditionModel, SDXL_SINGLE_FILE_UNET_CONFIG, seed)
    pipe.text_encoder_2 = _clip_text(seed + 3, projection=True, **WIDE_CLIP_OVERRIDES)
    return pipe


def _sd3_source(seed: int, family: str = "sd3"):  # noqa: ANN202 - StableDiffusion3Pipeline
    from diffusers import SD3Transformer2DModel

    pipe = tiny_pipeline(family, seed=seed)
    config = SD3_SINGLE_FILE_TRANSFORMER_CONFIG if family == "sd3" else dict(SD35_TRANSFORMER_CONFIG, **{
        k: SD3_SINGLE_FILE_TRANSFORMER_CONFIG[k] for k in ("joint_attention_dim", "pooled_projection_dim")})
    pipe.transformer = _model(SD3Transformer2DModel, config, seed)
    with torch.no_grad():  # SD3's single-file CLIP-L has no projection: diffusers loads the identity
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(pipe.text_encoder.config.hidden_size))
    pipe.text_encoder_2 = _clip_text(seed + 3, projection=True, **WIDE_CLIP_OVERRIDES)
    pipe.text_encoder_3 = _t5(seed + 4, **SD3_SINGLE_FILE_T5_OVERRIDES)
    return pipe


def _flux_source(seed: int):  # noqa: ANN202 - FluxPipeline with the smallest convertible transformer
    from diffusers import FluxTransformer2DModel

    pipe = tiny_pipeline("flux", seed=seed)
    pipe.transformer = _model(FluxTransformer2DModel, FLUX_SINGLE_FILE_TRANSFORMER_CONFIG, seed).to(torch.bfloat16)
    return pipe


_SINGLE_FILE_SOURCES: dict[str, Callable[[int], Any]] = {
    "sd": lambda seed: tiny_pipeline("sd", seed=seed), "sd2": _sd2_source, "sdxl": _sdxl_source,
    "sd3": _sd3_source, "sd35": lambda seed: _sd3_source(seed, "sd35"), "flux": _flux_source,
}  # fmt: skip


def single_file_pipeline(layout: str, *, seed: int = 0):  # noqa: ANN201 - a diffusers pipeline
    """The pipeline :func:`save_single_file` writes for ``layout`` (one of :data:`SINGLE_FILE_LAYOUTS`).

    "sd", "sd2", "sdxl", "sd3", "sd35": tiny pipelines, as :func:`tiny_pipeline` but shaped the way the original
    layouts need (SD 2.x linear projections; SDXL / SD3 second CLIPs wider than the first; SD3's CLIP-L
    projection the identity that its single files imply). "flux": the tiny FLUX pipeline with the smallest
    transformer diffusers' FLUX converter reads (width 3072, bf16, ~1 GB; see
    :data:`FLUX_SINGLE_FILE_TRANSFORMER_CONFIG`).
    """
    if layout not in _SINGLE_FILE_SOURCES:
        raise ValueError(f"no original-layout writer for {layout!r}; valid layouts: {', '.join(_SINGLE_FILE_SOURCES)}")
    pipe = _SINGLE_FILE_SOURCES[layout](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def original_state_dict(pipe, layout: str, *, denoiser_only: bool = False) -> Tensors:  # noqa: ANN001
    """The weights of ``pipe`` in the original single-file layout ``layout`` (the inverse of diffusers'
    single-file conversion), every tensor its own contiguous copy. ``denoiser_only``: the denoiser alone,
    as FLUX.1 and SD3.5 releases ship it."""
    components = SINGLE_FILE_LAYOUTS[layout]
    if denoiser_only:
        components = dict(list(components.items())[:1])
    out: Tensors = {}
    for name, (prefix, write) in components.items():
        for key, value in write(getattr(pipe, name)).items():
            out[prefix + key] = value.detach().clone().contiguous()
    return out


def sd_original_state_dict(pipe) -> Tensors:  # noqa: ANN001 - StableDiffusionPipeline
    """The weights of a Stable Diffusion 1.x pipeline in the original CompVis single-file layout
    (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), as the released
    ``v1-5-pruned.safetensors`` files hold them."""
    return original_state_dict(pipe, "sd")


def save_single_file(
    layout: str, path: str | os.PathLike, *, seed: int = 0, config: str | os.PathLike | None = None,
    denoiser_only: bool = False,
) -> Path:  # fmt: skip
    """Write :func:`single_file_pipeline` ``(layout, seed=seed)`` as one ``.safetensors`` file in the original key
    layout, which ``difffeat.load(path, config=...)`` (diffusers' ``from_single_file``) reads back.

    Args:
        layout: "sd" (CompVis SD 1.x), "sd2" (SD 2.x, OpenCLIP text encoder), "sdxl" (SGM: ``conditioner.*``),
            "sd3" / "sd35" (MMDiT + VAE + ``text_encoders.{clip_l,clip_g,t5xxl}``) or "flux" (BFL's layout,
            the transformer alone; the smallest width diffusers converts, ~1 GB).
        path: the ``.safetensors`` file to write.
        seed: weight seed.
        config: also write the matching config folder here: the pipeline saved with ``save_pretrained`` minus
            the weights of the components the file holds (their configs stay), i.e. exactly what
            ``from_single_file`` needs besides the file.
        denoiser_only: write the denoiser alone (then the config folder keeps the VAE and text encoders).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from safetensors.torch import save_file

    from .checks import check_out_dir, check_out_file

    path = check_out_file(path, "checkpoint file")
    if config is not None:
        check_out_dir(config, "config folder")
    pipe = single_file_pipeline(layout, seed=seed)
    state = original_state_dict(pipe, layout, denoiser_only=denoiser_only)
    save_file(state, str(path))
    if config is not None:
        folder = Path(config)
        pipe.save_pretrained(folder, safe_serialization=True)
        in_file = list(SINGLE_FILE_LAYOUTS[layout])[: 1 if denoiser_only else None]
        for name in in_file:
            for weights in (folder / name).glob("*.safetensors*"):
                weights.unlink()
    return path
