"""Tracing a generation: GOCA maps (and chosen activations) of an ordinary diffusers pipeline call, step by
step, and optionally S-CFG guidance of that call.

    with difffeat.trace(pipe, "a red circle and a blue star", classes=["circle", "star"]) as tc:
        image = pipe("a red circle and a blue star", generator=torch.Generator().manual_seed(0)).images[0]
    result = tc.result(0, image)        # SegmentationResult: labels, class_maps, heatmap("star"), ...

One :class:`Trace` owns every hook it installs and removes them on exit (also when the call raises). At each
denoiser call (one per denoising step) a fresh :class:`~difffeat.capture.Capture` observes the forward — the
same observers and GOCA reducers as :class:`~difffeat.segment.Segmenter` — and, after the forward, the
step's class scores of every image (the conditional half of a CFG batch) are added to a running sum: memory
holds one step's observation and the sums, never a list of steps. The result of an image is GOCA's decision
on the mean over the traced steps.

Observation never changes the generation: the observers compute maps beside the layer's own attention
(the fused output is off), so the denoiser's output is the untraced one bit for bit.

With ``guidance=SCFG(...)`` the denoiser's output on a CFG batch ``[u, c]`` is rewritten (a forward hook: a
supported extension point, no copy of the pipeline's ``__call__``) to ``[g, g]`` with ``g`` the S-CFG guided
prediction; the pipeline's own CFG then computes ``g + w (g - g) = g`` exactly.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..backbones.loading import load
from ..capture import Capture, catalog_of, head_mean
from ..errors import InvalidOptionError, InvalidPromptError, UnsupportedBackboneError
from ..segment.prompts import FILLER_WORDS, build_layout
from ..segment.segmenter import SegmentationResult, Segmenter, decide, global_map, goca_scores
from .scfg import SCFG, guided_prediction, scfg_rate, token_masks

__all__: list[str] = []  # all listed by the package (difffeat.tracing) or the facade


class ClassNotInPromptWarning(UserWarning):
    """A requested class word does not occur in a prompt: that prompt's images get no map for it."""


@dataclass
class _Sums:
    """Running sums of one image's per-step scores."""

    classes: torch.Tensor  # [n, H, W]
    support: torch.Tensor  # [H, W]
    steps: int = 1


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _in_prompt(cls: str, prompt: str) -> bool:
    return re.search(r"(?<![a-z0-9])" + re.escape(cls.lower()) + r"(?![a-z0-9])", prompt.lower()) is not None


def _position(word: str, low_prompt: str) -> int:
    m = re.search(r"(?<![a-z0-9])" + re.escape(word.lower()) + r"(?![a-z0-9])", low_prompt)
    return m.start() if m else -1


def _first_output(output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample if hasattr(output, "sample") else output


def _replace_output(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    if hasattr(output, "sample"):
        output.sample = new
        return output
    return new


class Trace:
    """Observe (and optionally guide) the generation of one pipeline call. Made by :func:`trace`."""

    def __init__(
        self,
        pipe: Any,
        prompt: str | Sequence[str],
        classes: Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        steps: Sequence[int] | None = None,
        activations: Sequence[str] = (),
        num_images_per_prompt: int = 1,
        guidance: SCFG | None = None,
        cfg: bool | None = None,
        fuse_output: bool = False,
        **settings: Any,
    ) -> None:
        self.fuse_output = bool(fuse_output)
        self.prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise InvalidPromptError("trace needs the pipeline call's prompt(s): a non-empty string or list of strings")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise InvalidOptionError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        self.per_prompt = num_images_per_prompt
        self.steps = self._check_steps(steps)
        if guidance is not None and not isinstance(guidance, SCFG):
            raise InvalidOptionError(f"guidance must be a difffeat.tracing.SCFG, got {guidance!r}")
        self.guidance = guidance
        self.cfg = cfg
        self.pipe = pipe
        self.backbone = load(pipe)
        method = {"scfg": "vanilla", "scfg-goca": "goca"}.get(guidance.mode) if guidance is not None else None
        # raises ConfigError for a family without text cross-attention
        self.segmenter = Segmenter(self.backbone, method=method, **settings)
        cat = catalog_of(self.backbone)
        self.activation_names = [cat.canonical(a) for a in activations]
        for name in self.activation_names:
            if cat[name].kind == "input":
                raise InvalidOptionError(f"{name!r} is the denoiser's input: read it from the pipeline's latents instead")
        self.classes, self.layouts = self._layouts(classes)
        self.features: dict[int, dict[str, torch.Tensor]] = {}
        self._sums: dict[int, _Sums] = {}
        self._handles: list[Any] = []
        self._step = 0
        self._capture: Capture | None = None
        self._stream = None
        self._grid: tuple[int, int] | None = None

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_steps(steps: Sequence[int] | None) -> list[int] | None:
        if steps is None:
            return None
        steps = [steps] if isinstance(steps, int) else list(steps)
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if not steps or bad:
            raise InvalidOptionError(f"steps must be denoising step indices >= 0 (0 = the first step), got {steps!r}")
        return sorted(set(steps))

    def _layouts(self, classes):
        if classes is None:
            per = [[w for w in dict.fromkeys(_words(p)) if w not in FILLER_WORDS] for p in self.prompts]
        elif isinstance(classes, str) or (classes and isinstance(classes[0], str)):
            per = [list([classes] if isinstance(classes, str) else classes)] * len(self.prompts)
        else:
            per = [list(c) for c in classes]
            if len(per) != len(self.prompts):
                raise InvalidPromptError(f"got {len(per)} class lists for {len(self.prompts)} prompts; pass one list, or one per prompt")
        kept, layouts = [], []
        segments = self.backbone.text_segments()
        for prompt, cls in zip(self.prompts, per):
            present = [c for c in cls if _in_prompt(c, prompt)]
            for c in cls:
                if c not in present:
                    warnings.warn(
                        f"class {c!r} is not a word of the prompt {prompt!r} (its words: {', '.join(_words(prompt))}); "
                        "its images get no map for it: name classes with the prompt's own words",
                        ClassNotInPromptWarning, stacklevel=3,
                    )
            if not present:
                raise InvalidPromptError(
                    f"none of the classes {cls} occurs in the prompt {prompt!r} (its words: {', '.join(_words(prompt))}); "
                    "name classes with the prompt's own words"
                )
            low = prompt.lower()
            present.sort(key=lambda c: _position(c, low))  # the layout finds phrases in caption order
            last = max(_position(c, low) for c in present)
            # background entities the prompt names after its classes ("... on a green background"): their
            # maps are GOCA's supporting map, so the background can win where they dominate
            entities = [e for e in self.segmenter.settings.background_entities
                        if e.lower() not in {c.lower() for c in present} and _in_prompt(e, prompt) and _position(e, low) > last]
            kept.append(present)
            layouts.append(build_layout(present, segments, entities=entities, caption=prompt))
        return kept, layouts

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "Trace":
        if self._handles:
            raise RuntimeError("this Trace is already active")
        self._step, self._sums, self.features = 0, {}, {}
        den = self.backbone.denoiser
        self._handles = [
            den.register_forward_pre_hook(self._before, with_kwargs=True),
            den.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._close_capture()

    def _close_capture(self) -> None:
        cap, self._capture = self._capture, None
        if cap is not None:
            cap.__exit__(None, None, None)

    def _grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        if x is None or x.ndim != 4:
            raise UnsupportedBackboneError(
                f"tracing a generation needs a denoiser whose input is a [B, C, H, W] latent (SD, SDXL, PixArt, SD3 "
                f"families); {type(self.backbone.denoiser).__name__} receives packed token sequences"
            )
        p = getattr(self.backbone.denoiser.config, "patch_size", None) or 1
        return x.shape[-2] // p, x.shape[-1] // p

    def _observed(self, step: int) -> bool:
        if self.guidance is not None and self.guidance.uses_masks:
            return True
        return self.steps is None or step in self.steps

    def _before(self, module, args, kwargs) -> None:
        step = self._step
        if step == 0 and self.steps is not None:
            timesteps = getattr(self.pipe.scheduler, "timesteps", None)
            n = len(timesteps) if timesteps is not None else 0
            if n and self.steps[-1] >= n:
                raise InvalidOptionError(
                    f"steps {self.steps} are outside the schedule: this call denoises in {n} steps (0..{n - 1})"
                )
        if not self._observed(step):
            return
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self._grid = self._grid_of(x)
        reducers, self._stream = self.segmenter.observation_reducers(self._grid)
        names = self.segmenter.activation_names() + [n for n in self.activation_names]
        self._capture = Capture(
            self.backbone, list(dict.fromkeys(names)), grid=self._grid, early_exit=False, map_reducer=head_mean,
            map_reducers=reducers, fuse_output=self.fuse_output,
        )
        self._capture.__enter__()

    def _is_cfg(self, batch: int) -> bool:
        if self.cfg is not None:
            return self.cfg
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)
        if isinstance(flag, bool):
            return flag
        return batch == 2 * len(self.prompts) * self.per_prompt

    def _after(self, module, args, kwargs, output) -> Any:
        step = self._step
        self._step += 1
        cap = self._capture
        if cap is None and not (self.guidance is not None and output is not None):
            return None
        self._close_capture()
        if output is None:  # the forward raised
            return None
        pred = _first_output(output)
        batch = pred.shape[0]
        cfg = self._is_cfg(batch)
        if self.guidance is not None and not cfg:
            raise InvalidOptionError(
                "S-CFG/CFG guidance needs the pipeline to run classifier-free guidance: call it with guidance_scale > 1"
            )
        half = batch // 2 if cfg else 0
        if half + len(self.prompts) * self.per_prompt != batch:
            raise InvalidOptionError(
                f"the denoiser ran a batch of {batch} for {len(self.prompts)} prompt(s) x {self.per_prompt} image(s)"
                f"{' with CFG' if cfg else ''}: pass trace() the call's prompts and num_images_per_prompt"
            )
        acts = refine = None
        if cap is not None:
            acts = cap.activations
            ref = acts.get(self.segmenter.ref_name)
            refine = self._stream.finish(acts, tuple(ref.shape[-2:]) if ref is not None else None) if self._stream else None
            if self.steps is None or step in self.steps:
                self._accumulate(step, acts, refine, half)
        if self.guidance is None:
            return None
        g = self._guide(pred, acts, refine, half)
        return _replace_output(output, torch.cat([g, g]))

    def _image_acts(self, acts: dict[str, torch.Tensor], j: int) -> dict[str, torch.Tensor]:
        return {k: v[j : j + 1] for k, v in acts.items()}

    def _accumulate(self, step: int, acts, refine, half: int) -> None:
        s, seg = self.segmenter.settings, self.segmenter
        if self.activation_names:
            self.features[step] = {n: acts[n][half:].detach().cpu() for n in self.activation_names}
        for i in range(len(self.prompts) * self.per_prompt):
            j = half + i
            cls, support, _ = goca_scores(
                s, self.layouts[i // self.per_prompt], self._image_acts(acts, j), self._grid, seg.cross_names,
                seg.self_names, seg.ref_name, seg.refine_names, None if refine is None else refine[j : j + 1],
            )
            if i in self._sums:
                sums = self._sums[i]
                sums.classes += cls[0]
                sums.support += support[0]
                sums.steps += 1
            else:
                self._sums[i] = _Sums(cls[0].clone(), support[0].clone())

    def _guide(self, pred: torch.Tensor, acts, refine, half: int) -> torch.Tensor:
        gd = self.guidance
        uncond, cond = pred[:half], pred[half:]
        if not gd.uses_masks:
            return guided_prediction(uncond, cond, gd.guidance_scale, 1.0)
        seg = self.segmenter
        token_m, fore_m = [], []
        for i in range(half):
            layout = self.layouts[i // self.per_prompt]
            a_u, _ = global_map(seg.settings, self._image_acts(acts, i), self._grid, seg.cross_names, seg.self_names, seg.ref_name)
            a_c, _ = global_map(seg.settings, self._image_acts(acts, half + i), self._grid, seg.cross_names, seg.self_names, seg.ref_name)
            content, last, glob = self._token_roles(layout.caption, a_c.shape[1])
            tm, fm = token_masks(
                a_c, a_u, None if refine is None else refine[half + i : half + i + 1], content, last, glob,
                rescale=seg.settings.rescale == "goca", refine_order=seg.settings.refine_order,
                blur_kernel=seg.settings.blur_kernel, blur_sigma=seg.settings.blur_sigma,
            )
            size = tuple(pred.shape[-2:])
            token_m.append(torch.nn.functional.interpolate(tm, size=size, mode="nearest"))
            fore_m.append(torch.nn.functional.interpolate(fm, size=size, mode="nearest"))
        rate = scfg_rate(cond - uncond, torch.cat(token_m), torch.cat(fore_m), gd)
        return guided_prediction(uncond, cond, gd.guidance_scale, rate)

    def _token_roles(self, prompt: str, n_tokens: int) -> tuple[list[int], int, tuple[str, int]]:
        """Content token positions (every token but the special ones), the last one, and the global token
        whose map gives S-CFG's foreground: a tokenizer with a start token (CLIP) -> that token (position 0)
        of the unconditional half; otherwise (T5) -> the end token of the conditional half."""
        seg = self.backbone.text_segments()[0]
        tok = seg.tokenizer
        ids = tok(prompt, truncation=True, max_length=seg.max_length)["input_ids"]
        special = set(tok.all_special_ids)
        blank = {i for i, t in enumerate(tok.convert_ids_to_tokens(ids)) if t in ("▁", "")}
        content = [seg.offset + k for k, t in enumerate(ids) if t not in special and k not in blank and seg.offset + k < n_tokens]
        if not content:
            raise InvalidPromptError(f"the prompt {prompt!r} has no content tokens")
        bos = getattr(tok, "bos_token_id", None)
        if bos is not None and ids and ids[0] == bos:
            glob = ("uncond", seg.offset)
        else:
            eos = getattr(tok, "eos_token_id", None)
            ends = [k for k, t in enumerate(ids) if t == eos]
            glob = ("cond", seg.offset + (ends[0] if ends else len(ids) - 1))
        return content, content[-1], glob

    # ------------------------------------------------------------------ results
    @property
    def traced_steps(self) -> int:
        """How many steps went into the maps (the same for every image)."""
        return next(iter(self._sums.values())).steps if self._sums else 0

    def result(self, index: int = 0, image: Any = None) -> SegmentationResult:
        """Image ``index``'s segmentation (images ordered as the pipeline returns them: prompt by prompt,
        ``num_images_per_prompt`` each): GOCA's decision on its class scores averaged over the traced steps.
        ``image`` (PIL or array): the generated image, whose size the label map takes (default: the
        latent grid's pixel size)."""
        if index not in self._sums:
            raise InvalidOptionError(
                f"no traced maps for image {index}: {len(self._sums)} image(s) traced"
                + ("" if self._sums else " (run the pipeline inside the `with` block, on a traced step)")
            )
        sums = self._sums[index]
        cls = sums.classes / sums.steps
        support = sums.support / sums.steps
        s = self.segmenter.settings
        background = s.tau + support
        if image is not None:
            from ..images import to_rgb

            w, h = to_rgb(image).size
        else:
            f = self.backbone.vae_scale_factor * (getattr(self.backbone.denoiser.config, "patch_size", None) or 1)
            h, w = self._grid[0] * f, self._grid[1] * f
        labels = decide(cls[None], background[None], (h, w))[0]
        layout = self.layouts[index // self.per_prompt]
        return SegmentationResult(
            labels=labels, class_maps=cls.cpu(), background=background.cpu(), support=support.cpu(),
            classes=list(layout.classes), caption=layout.caption, layer_names=list(self.segmenter.blocks),
            settings={**s.to_dict(), "model": str(self.backbone.name), "traced_steps": sums.steps},
        )

    def results(self, images: Sequence[Any] | None = None) -> list[SegmentationResult]:
        """:meth:`result` of every traced image (``images``: the generated images, in order)."""
        n = len(self.prompts) * self.per_prompt
        return [self.result(i, None if images is None else images[i]) for i in range(n)]


def trace(
    pipe: Any,
    prompt: str | Sequence[str],
    classes: Sequence[str] | Sequence[Sequence[str]] | None = None,
    *,
    steps: Sequence[int] | None = None,
    activations: Sequence[str] = (),
    num_images_per_prompt: int = 1,
    guidance: SCFG | None = None,
    cfg: bool | None = None,
    fuse_output: bool = False,
    **settings: Any,
) -> Trace:
    """Trace an ordinary diffusers pipeline call: ``with difffeat.trace(pipe, prompt, classes) as tc: pipe(prompt)``.

    Args:
        pipe: the pipeline (any family with text cross-attention whose denoiser takes ``[B, C, H, W]``
            latents: SD 1.x/2.x, SDXL, PixArt, SD3).
        prompt: the call's prompt(s), as passed to the pipeline.
        classes: words of the prompt to segment (one list, or one per prompt); a word absent from a prompt
            warns (:class:`ClassNotInPromptWarning`) naming the prompt's words. Default: the prompt's words.
            A result lists its classes in prompt order; the settings' ``background_entities`` ("background")
            that the prompt names after them give GOCA's supporting (background) map.
        steps: denoising step indices to trace (0 = first); default every step. Maps are averaged over them.
        activations: catalog names of features to keep at the traced steps (``tc.features[step][name]``,
            the conditional half).
        num_images_per_prompt: as passed to the pipeline.
        guidance: :class:`SCFG` to guide the call with S-CFG (or plain CFG, ``mode="cfg"``).
        cfg: whether the call runs classifier-free guidance (default: the pipeline's
            ``do_classifier_free_guidance``, else inferred from the batch size).
        fuse_output: let observed attention layers return ``probabilities @ V`` from the observer's own
            chunks instead of running SDPA again (faster; the images then equal an untraced call's to float32
            rounding, not bit for bit). Off by default.
        **settings: :class:`~difffeat.segment.SegmentSettings` fields (``tau``, ``refine_order``, ...).

    Raises:
        ConfigError: the family has no text cross-attention. InvalidOptionError: bad steps / guidance
        (S-CFG with guidance_scale <= 1). InvalidPromptError: no class occurs in a prompt.
    """
    return Trace(pipe, prompt, classes, steps=steps, activations=activations, num_images_per_prompt=num_images_per_prompt,
                 guidance=guidance, cfg=cfg, fuse_output=fuse_output, **settings)
