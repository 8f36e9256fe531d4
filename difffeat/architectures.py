"""Real-size architectures with random weights, built offline from configs kept as data.

    pipe = difffeat.architectures.build_pipeline("sd15")              # full-size SD1.5, random weights, CPU
    unet = difffeat.architectures.build_denoiser("sdxl", device="meta")  # no memory: shapes and catalogs only

Each ``configs/architectures/<name>.json`` holds the published component configs of one model (the numbers of
its ``config.json`` files on the hub: layers, heads, widths, VAE levels, latent scale/shift) and the pipeline
class they go into. They serve the benchmarks (``difffeat bench --arch NAME``) and the meta-device tests of
catalogs and presets, so both use one source.

Weights are random (seeded); tokenizers are the small offline ones of :mod:`difffeat.testing` (every id is
below the real vocabulary size, so the real-size text encoders accept them). Because those tokenizers number
``<|startoftext|>`` 0 and ``<|endoftext|>`` 1, the CLIP text configs get those ids (the pooled output is read at
the end-of-text position). ``text_layers`` caps the depth of every text encoder: it changes neither the
denoiser nor the VAE (their cost is what the benchmarks measure), and makes T5-XXL (4.7B parameters) and
Gemma-2-2B (2.6B) fit a CPU benchmark. A file's ``aliases`` are other names it answers to (``sana`` for
``sana-1600m``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch

from .errors import ConfigError
from .resources import data_dir

__all__ = ["architecture_names", "architecture_aliases", "canonical_architecture", "architecture", "build_component", "build_denoiser", "build_pipeline", "DENOISER_KEYS"]

#: pipeline component names that hold the denoiser, in lookup order
DENOISER_KEYS = ("unet", "transformer")
#: ids of the tiny CLIP tokenizer (see :func:`difffeat.testing.tiny_clip_tokenizer`)
_TINY_CLIP_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
_LAYER_KEYS = {"CLIPTextConfig": "num_hidden_layers", "T5Config": "num_layers", "Gemma2Config": "num_hidden_layers"}


def _folder():
    return data_dir("configs") / "architectures"


def architecture_names() -> list[str]:
    """Names of the shipped architectures (``configs/architectures/*.json``)."""
    return sorted(p.stem for p in _folder().glob("*.json"))


def architecture_aliases() -> dict[str, str]:
    """Other names of the shipped architectures (each file's ``aliases``, e.g. ``sana`` for ``sana-1600m``)."""
    return {alias: name for name in architecture_names() for alias in json.loads(_load(name)).get("aliases", [])}


def canonical_architecture(name: str) -> str:
    """The file name of architecture ``name`` or of the architecture it is an alias of.

    Raises:
        ConfigError: neither a shipped architecture nor an alias (the message lists both).
    """
    if (_folder() / f"{name}.json").is_file():
        return name
    aliases = architecture_aliases()
    if name not in aliases:
        raise ConfigError(f"unknown architecture {name!r}; shipped architectures: {', '.join(architecture_names())} "
                          f"(aliases: {', '.join(sorted(aliases))})")
    return aliases[name]


@lru_cache(maxsize=None)
def _load(name: str) -> str:
    path = _folder() / f"{name}.json"
    if not path.is_file():
        return _load(canonical_architecture(name))
    return path.read_text()


def architecture(name: str) -> dict[str, Any]:
    """The architecture's data (``name`` or one of its ``aliases``): ``description``, ``pipeline`` (diffusers
    class name), ``native_resolution``,
    ``components`` ({component: {library, class, config[, config_class]}} or a tokenizer's ``{tiny, model_max_length}``)
    and ``pipeline_kwargs``. A fresh copy on every call."""
    return json.loads(_load(name))


def _denoiser_key(arch: dict[str, Any]) -> str:
    return next(k for k in DENOISER_KEYS if k in arch["components"])


def _tokenizer(spec: dict[str, Any]):  # noqa: ANN202
    from .testing import tiny_clip_tokenizer, tiny_gemma_tokenizer, tiny_t5_tokenizer

    build = {"clip": tiny_clip_tokenizer, "t5": tiny_t5_tokenizer, "gemma": tiny_gemma_tokenizer}[spec["tiny"]]
    return build(model_max_length=spec["model_max_length"])


def build_component(
    name: str, component: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    seed: int = 0, text_layers: int | None = None,
) -> Any:
    """One component of architecture ``name`` with random (seeded) weights.

    Args:
        component: a key of ``architecture(name)["components"]`` ("unet", "vae", "text_encoder", "tokenizer" ...).
        device: "meta" builds without memory (shapes only); otherwise where the weights are created.
        dtype: parameter dtype (default float32).
        seed: weight seed; each component draws from ``seed`` plus its position in the config.
        text_layers: cap on the number of layers of text encoders (None: the real depth).
    """
    import diffusers
    import transformers

    arch = architecture(name)
    comps = arch["components"]
    if component not in comps:
        raise ConfigError(f"architecture {name!r} has no component {component!r}; it has: {', '.join(comps)}")
    spec = comps[component]
    if "tiny" in spec:
        return _tokenizer(spec)
    config = dict(spec["config"])
    if spec["library"] == "diffusers" and component == "scheduler":
        return getattr(diffusers, spec["class"])(**config)
    if text_layers is not None and spec.get("config_class") in _LAYER_KEYS:
        if text_layers < 1:
            raise ConfigError(f"text_layers must be >= 1, got {text_layers}")
        key = _LAYER_KEYS[spec["config_class"]]
        config[key] = min(config[key], int(text_layers))
    if spec.get("config_class") == "CLIPTextConfig":
        config.update(_TINY_CLIP_IDS)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed + list(comps).index(component))
        if spec["library"] == "transformers":
            cfg = getattr(transformers, spec["config_class"])(**config)
            model = getattr(transformers, spec["class"])(cfg)
        else:
            model = getattr(diffusers, spec["class"])(**config)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def build_denoiser(name: str, *, device: str | torch.device = "meta", dtype: torch.dtype | None = None, seed: int = 0) -> torch.nn.Module:
    """The denoiser (UNet or transformer) of architecture ``name``; on the meta device by default."""
    return build_component(name, _denoiser_key(architecture(name)), device=device, dtype=dtype, seed=seed)


def build_pipeline(
    name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
    text_layers: int | None = None,
):  # noqa: ANN201 - a diffusers DiffusionPipeline
    """The whole pipeline of architecture ``name`` with random weights (see the module docstring).

    Returns:
        An instance of ``architecture(name)["pipeline"]`` (e.g. ``StableDiffusionPipeline``), progress bar off.
    """
    import diffusers

    arch = architecture(name)
    parts = {
        c: build_component(name, c, device=device, dtype=dtype, seed=seed, text_layers=text_layers) for c in arch["components"]
    }
    pipe = getattr(diffusers, arch["pipeline"])(**parts, **arch["pipeline_kwargs"])
    pipe.set_progress_bar_config(disable=True)
    return pipe
