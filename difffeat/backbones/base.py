"""The backbone interface: one adapter per model family turns (images, prompts, t, seed) into one
denoiser forward. Everything family-specific (latent packing, extra conditioning, timestep convention,
noising rule) lives in the adapters; everything else in difffeat talks to this interface only."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import DiffusionPipeline

from ..errors import InvalidPromptError, InvalidTimestepError
from ..images import ImageInput, resize_to_multiple, to_rgb, to_tensor
from .layout import TokenLayout

if TYPE_CHECKING:
    from .latents import LatentCache


NUM_TRAIN_TIMESTEPS = 1000
#: the VAE posterior draw (``vae_latents="sample"``) uses ``seed ^ POSTERIOR_SEED_XOR``, the forward noise ``seed``
POSTERIOR_SEED_XOR = 0x5EED


@dataclass
class DenoiserInputs:
    """Everything one denoiser forward needs, plus the token layout capture needs to read its sequences.

    Attributes:
        kwargs: keyword arguments for ``backbone.denoiser(**kwargs)``.
        layout: the forward's :class:`~difffeat.backbones.layout.TokenLayout` (built by the adapter,
            :meth:`Backbone.layout`): token grid, text length, where image and text tokens sit.
        timestep: the timestep on the 1000-step training scale.
        image_size: (height, width) in pixels of the images fed to the VAE.
        prompts: the prompts, one per image.
    """

    kwargs: dict[str, Any]
    layout: TokenLayout
    timestep: int
    image_size: tuple[int, int]
    prompts: list[str] = field(default_factory=list)
    #: clean latents and the noise used, kept for techniques that re-noise (multi-step start)
    latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the image-token grid at the denoiser's input resolution; sequence activations of
        ``h * w`` image tokens reshape to ``[B, C, h, w]``."""
        return self.layout.grid

    @property
    def text_len(self) -> int | None:
        """Text-key columns of the forward's cross maps."""
        return self.layout.text_len

    @property
    def image_offsets(self) -> torch.Tensor | None:
        """``[B]`` first image token of each sample in joint sequences packed per sample; None otherwise."""
        return self.layout.image_offsets

    @property
    def batch_size(self) -> int:
        return len(self.prompts)


def check_timestep(t: int) -> int:
    """Validate a timestep on the 1000-step scale."""
    if isinstance(t, bool) or not isinstance(t, (int,)) and not (hasattr(t, "__int__") and float(t).is_integer()):
        raise InvalidTimestepError(f"timestep must be an integer in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {t!r}")
    t = int(t)
    if not 0 <= t < NUM_TRAIN_TIMESTEPS:
        raise InvalidTimestepError(
            f"timestep {t} is outside [0, {NUM_TRAIN_TIMESTEPS - 1}] (the 1000-step training scale); the papers use "
            "t=50 for features and t=100 for segmentation"
        )
    return t


@dataclass(frozen=True)
class TextSegment:
    """One tokenizer's part of the denoiser's text sequence: its tokens occupy positions
    ``offset .. offset + max_length - 1`` (SD3 concatenates CLIP then T5 tokens).

    ``template`` is the text the pipeline really tokenizes, with ``{}`` for the prompt (a chat template for
    LLM text encoders); ``drop`` is how many leading tokens the pipeline removes before the denoiser sees
    the sequence (Qwen-Image drops its system prompt); ``lowercase``: the pipeline lower-cases the prompt before
    tokenizing it (Sana); ``pad_left``: the pipeline pads the tokenized text on the left to ``max_length`` tokens
    (after the dropped ones), so its last token sits at ``offset + max_length - 1`` whatever its length
    (Ideogram 4, CogView4)."""

    tokenizer: Any
    offset: int
    max_length: int
    template: str = "{}"
    drop: int = 0
    lowercase: bool = False
    pad_left: bool = False


class Backbone(ABC):
    """A loaded diffusion pipeline seen as a feature extractor.

    Subclasses set ``family`` (registry key and user-facing name), ``hook_table`` (the file in ``hooks/``
    naming its activations), ``denoiser_attr`` and ``token_layout``, and implement the family's conditioning.
    """

    family: ClassVar[str]
    hook_table: ClassVar[str]
    denoiser_attr: ClassVar[str] = "unet"
    #: how the family lays out its sequences (joint order, block padding, per-sample packing); each forward's
    #: layout is this one :meth:`~difffeat.backbones.layout.TokenLayout.at` the forward's geometry (:meth:`layout`)
    token_layout: ClassVar[TokenLayout] = TokenLayout()
    #: default timesteps per use, on the 1000-step scale
    default_feature_t: ClassVar[int] = 50
    default_segment_t: ClassVar[int] = 100

    def __init__(self, pipeline: DiffusionPipeline, name: str | None = None) -> None:
        self.pipeline = pipeline
        self.name = name or getattr(pipeline, "name_or_path", None) or pipeline.__class__.__name__

    # ----------------------------------------------------------------- properties
    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or transformer that capture hooks attach to (the original module when the pipeline holds
        ``torch.compile(module)``: activation names are its module paths)."""
        module = getattr(self.pipeline, self.denoiser_attr)
        return getattr(module, "_orig_mod", module)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def vae_scale_factor(self) -> int:
        vae = self.pipeline.vae
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """Pixel resolution the model was trained at (sample_size x VAE factor)."""
        sample = self.denoiser.config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * self.vae_scale_factor * self.latent_per_sample

    #: latent pixels per ``sample_size`` unit (1 for every family here; kept for packed-latent families)
    latent_per_sample: ClassVar[int] = 1

    @property
    @abstractmethod
    def size_multiple(self) -> int:
        """Image sides must be multiples of this many pixels."""

    # ----------------------------------------------------------------- images
    def preprocess(
        self, images: Sequence[ImageInput], resolution: int | None = None, square: bool = False
    ) -> torch.Tensor:
        """Images -> ``[B, 3, H, W]`` in [-1, 1] at the model's resolution (long side) and size multiple."""
        res = resolution or self.native_resolution
        rgb = [resize_to_multiple(to_rgb(im), res, self.size_multiple, square) for im in images]
        return to_tensor(rgb)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> scaled VAE latents (the distribution's mean, deterministic)."""
        vae = self.pipeline.vae
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    #: an active :class:`~difffeat.backbones.latents.LatentCache`, or None (every prepare encodes)
    latent_cache: "LatentCache | None" = None

    @torch.no_grad()
    def sample_latents(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """``[B, 3, H, W]`` -> scaled latents drawn from the VAE posterior, ``mean + std * eps``, as the published
        img2img pipelines' ``retrieve_latents`` does (difffeat's default, :meth:`encode_image`, takes the
        mean). ``eps`` has one latent's shape, is drawn on the CPU from ``seed ^ POSTERIOR_SEED_XOR`` (so it is
        independent of the forward noise drawn from ``seed``) and is repeated over the batch, so an image's
        latents never depend on its batch; for one image it equals diffusers' ``latent_dist.sample(generator)``
        with that generator."""
        if type(self).encode_image is not Backbone.encode_image:
            from ..errors import ConfigError

            raise ConfigError(f"vae_latents='sample' needs latents that are the VAE posterior's; {type(self).__name__} "
                              "encodes images its own way: use vae_latents='mean'")  # fmt: skip
        vae = self.pipeline.vae
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        gen = torch.Generator("cpu").manual_seed(int(seed) ^ POSTERIOR_SEED_XOR)
        eps = torch.randn((1, *dist.mean.shape[1:]), generator=gen, dtype=dist.mean.dtype)
        latents = dist.mean + dist.std * eps.to(dist.mean.device).expand_as(dist.mean)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_image` through :attr:`latent_cache` when one is set (images seen before are not
        encoded again)."""
        if self.latent_cache is None:
            return self.encode_image(pixels)
        vae = self.pipeline.vae
        return self.latent_cache.encode(pixels, (id(vae), str(vae.dtype), str(vae.device)), self.encode_image)

    @contextmanager
    def reusing_latents(self, cache: "LatentCache | None" = None) -> Iterator["LatentCache"]:
        """Within the block every image is encoded once: through ``cache``, else the cache already set,
        else a fresh one dropped at the end."""
        from .latents import LatentCache

        before = self.latent_cache
        self.latent_cache = cache if cache is not None else before if before is not None else LatentCache()
        try:
            yield self.latent_cache
        finally:
            self.latent_cache = before

    def set_vae_dtype(self, dtype: torch.dtype) -> "Backbone":
        """Encode images in ``dtype`` (e.g. ``torch.bfloat16``; the latents are cast back to the denoiser's
        dtype). The VAE serves only encoding here; the error this costs is measured by ``difffeat bench``."""
        self.pipeline.vae.to(dtype=dtype)
        return self

    def make_noise(self, latents: torch.Tensor, seed: int) -> torch.Tensor:
        """Gaussian noise shaped like one latent, drawn from ``seed`` on the CPU (device independent) and
        repeated over the batch, so an image's features never depend on what else is in its batch."""
        gen = torch.Generator("cpu").manual_seed(int(seed))
        one = torch.randn(latents.shape[1:], generator=gen, dtype=torch.float32)
        return one.unsqueeze(0).expand_as(latents).to(device=latents.device, dtype=latents.dtype).contiguous()

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of one image's latents (what :meth:`encode_image` returns) at ``height x width`` px."""
        f = self.vae_scale_factor
        return int(self.pipeline.vae.config.latent_channels), height // f, width // f

    @abstractmethod
    def add_noise(self, latents: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean latents to timestep ``t`` with the family's training rule."""

    # ----------------------------------------------------------------- text
    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """Prompts -> the conditioning keyword arguments of the denoiser (and ``text_len``)."""

    def text_segments(self) -> list:
        """How the denoiser's text sequence is made: a list of :class:`TextSegment` (tokenizer, first
        position, length)."""
        tok = self.pipeline.tokenizer
        return [TextSegment(tok, 0, tok.model_max_length)]

    # ----------------------------------------------------------------- forward
    def layout(self, grid: tuple[int, int], cond: dict[str, Any] | None = None) -> TokenLayout:
        """The :class:`~difffeat.backbones.layout.TokenLayout` of a forward at token ``grid`` with the encoded
        prompts ``cond`` (None: no prompt known; the text length is then unknown). The text length is the
        ``encoder_hidden_states``' token count; adapters whose text block is laid out otherwise override this."""
        states = (cond or {}).get("encoder_hidden_states")
        return self.token_layout.at(grid, int(states.shape[1]) if isinstance(states, torch.Tensor) else None)

    @abstractmethod
    def denoiser_inputs(
        self, noisy_latents: torch.Tensor, t: int, cond: dict[str, Any], image_size: tuple[int, int]
    ) -> DenoiserInputs:
        """Assemble the denoiser call for noisy latents, a timestep and encoded prompts."""

    def prepare(
        self,
        images: Sequence[ImageInput],
        prompts: str | Sequence[str] = "",
        t: int = 50,
        seed: int = 0,
        resolution: int | None = None,
        square: bool = False,
        vae_sample: bool = False,
    ) -> DenoiserInputs:
        """Images + prompts -> the inputs of one denoiser forward at timestep ``t``; ``vae_sample``: latents
        drawn from the VAE posterior (:meth:`sample_latents`) instead of its mean."""
        t = check_timestep(t)
        images = list(images)
        if not images:
            raise ValueError("no images given")
        prompt_list = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != len(images):
            raise InvalidPromptError(
                f"got {len(prompt_list)} prompts for {len(images)} images; pass one prompt, or one per image"
            )
        pixels = self.preprocess(images, resolution, square)
        with torch.no_grad():
            latents = (self.sample_latents(pixels, seed) if vae_sample else self.encode_latents(pixels)).to(self.dtype)
            noise = self.make_noise(latents, seed)
            noisy = self.add_noise(latents, t, noise)
            cond = self.encode_prompt(prompt_list)
        inputs = self.denoiser_inputs(noisy, t, cond, (pixels.shape[-2], pixels.shape[-1]))
        inputs.prompts, inputs.latents, inputs.noise = prompt_list, latents, noise
        return inputs

    def denoise(self, inputs: DenoiserInputs) -> Any:
        """Run the denoiser once (no gradient), compiled when the pipeline holds a compiled one.

        ``torch.compile`` works with capture whether hooks are installed before or after compiling
        (``module.compile()`` in place, or ``torch.compile(module)`` assigned to the pipeline): dynamo
        re-traces when hooks change and runs difffeat's hooks and attention observers as graph breaks."""
        with torch.no_grad():
            return getattr(self.pipeline, self.denoiser_attr)(**inputs.kwargs, return_dict=False)

    @contextmanager
    def probe_context(self) -> Iterator[None]:
        """Around the catalog's fake-tensor forward (the shape probe, :func:`difffeat.capture.probe_shapes`):
        adapters whose denoiser keeps state from a forward (a RoPE table built on the first call, a method
        cache of frequencies) restore it here, so no fake tensor stays behind for the next real forward."""
        yield

    def probe_conditioning(self, mode: Any) -> dict[str, Any]:
        """The empty prompt's conditioning for the catalog's fake-tensor forward under ``mode`` (a
        ``FakeTensorMode``). By default the text encoders run on fake tensors too (no compute) where they can;
        one whose output length depends on its data runs for real, its integer/bool tensors (masks) then
        becoming constant fakes of ``mode`` (:func:`~difffeat.backbones.probing.fake_conditioning`). Adapters
        whose denoiser reads its conditioning on the host override this."""
        from .probing import encode_for_probe

        return encode_for_probe(self, mode)

    # ----------------------------------------------------------------- misc
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Backbone":
        self.pipeline.to(device=device, dtype=dtype) if dtype is not None else self.pipeline.to(device)
        return self

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(name={self.name!r}, family={self.family!r}, device={self.device}, dtype={self.dtype})"


class PatchedLatents:
    """Geometry mixin for denoisers that patchify the VAE latents themselves: image sides are multiples of
    the VAE factor times the denoiser's ``patch_size``. Place it before :class:`Backbone` in the bases."""

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.denoiser.config.patch_size)


class PipelineVaeScale:
    """Geometry mixin: the VAE factor the pipeline itself reports (``pipeline.vae_scale_factor``), for VAEs
    whose downsampling is not ``2 ** (len(block_out_channels) - 1)`` (DC-AE, Wan-style VAEs)."""

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)
