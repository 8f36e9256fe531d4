"""Tracing a generation: GOCA maps (and chosen activations) of an ordinary diffusers pipeline call, step by
step, and optionally S-CFG guidance of that call.

    with difffeat.trace(pipe, "a red circle and a blue star", classes=["circle", "star"]) as tc:
        image = pipe("a red circle and a blue star", generator=torch.Generator().manual_seed(0)).images[0]
    result = tc.result(0, image)        # SegmentationResult: labels, class_maps, heatmap("star"), ...

One :class:`Trace` owns every hook it installs and removes them on exit (also when the call raises). At each
traced denoiser call (one per denoising step) a fresh :class:`~difffeat.capture.Capture` observes the forward
with the same observers and GOCA reducers as :class:`~difffeat.segment.Segmenter`, on the conditional half of a
CFG batch only (the unconditional half's maps are never formed). How the steps are combined is the
``aggregate`` setting:

- ``"maps"`` (default): at every traced step only the cross-attention maps are observed (GOCA's per-pixel
  head weights, inside the attention computation) and added to a running sum per layer; the self-attention
  maps and the reference feature, which GOCA needs for its layer weights and its refinement, are observed at
  one step, ``self_step`` (default: the traced step whose timestep is nearest the settings' ``t``, the
  timestep GOCA observes an image at). GOCA's decision (layer weights, global map, rescaling, blur, min-max,
  refinement, background) then runs once, on the per-layer mean over the traced steps. The weighted layer sum
  is linear, so this is GOCA's weighted sum of every step averaged over the steps, with one step's layer
  weights; its clamp and per-pixel renormalisation and the later normalisations come after the average (as
  DAAM sums heat maps over steps, then normalises).
- ``"steps"``: every traced step is decided by GOCA on its own maps (self maps and layer weights of that
  step), and the class scores are averaged. The self-attention maps are then observed at every traced step
  (and, before the conditional half was observed alone, this made a 20-step 256-px SD1.5 generation 1.75x
  slower than an untraced one: ``benchmarks/generate_cost.py``, README "What tracing costs").

Memory holds one step's observation, the per-layer sums (``"maps"``) or class-score sums (``"steps"``), and
the self step's layer weights and refinement mean; never a list of steps.

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
from ..segment.prompts import build_layout
from ..segment.vocabulary import prompt_class_words
from ..segment.segmenter import SegmentationResult, Segmenter, decide, global_map, goca_layer_weights, goca_scores, map_grid
from ..segment.selfmaps import mean_self_map
from .scfg import SCFG, guided_prediction, scfg_rate, token_masks

__all__: list[str] = []  # all listed by the package (difffeat.tracing) or the facade

#: ``aggregate`` values: GOCA's decision once on the step-mean cross maps, or per step with the scores averaged
AGGREGATES = ("maps", "steps")


class ClassNotInPromptWarning(UserWarning):
    """A requested class word does not occur in a prompt: that prompt's images get no map for it."""


@dataclass
class _Sums:
    """Running sums of one image's per-step scores (``aggregate="steps"``)."""

    classes: torch.Tensor  # [n, H, W]
    support: torch.Tensor  # [H, W]
    steps: int = 1


@dataclass
class _MapSums:
    """Running sums of one image's per-step cross maps, and its self step's GOCA inputs (``aggregate="maps"``)."""

    cross: dict[str, torch.Tensor]  # name: [1, HW_m, T], summed over the traced steps
    steps: int = 1
    weights: torch.Tensor | None = None  # [1, M] layer weights of the self step
    refine: torch.Tensor | None = None  # [1, HW, HW] refinement mean of the self step (None: no refinement)


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
        aggregate: str = "maps",
        self_step: int | None = None,
        **settings: Any,
    ) -> None:
        self.fuse_output = bool(fuse_output)
        if aggregate not in AGGREGATES:
            raise InvalidOptionError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        self.aggregate = aggregate
        self.prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise InvalidPromptError("trace needs the pipeline call's prompt(s): a non-empty string or list of strings")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise InvalidOptionError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        self.per_prompt = num_images_per_prompt
        self.steps = self._check_steps(steps)
        self.self_step = self._check_self_step(self_step)
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
        self._sums: dict[int, _Sums | _MapSums] = {}
        self._self_step: int | None = self.self_step  # resolved at the first step (None: every traced step)
        self._rows: slice | None = None  # the samples the current step observes (None: the whole batch)
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

    def _check_self_step(self, self_step: int | None) -> int | None:
        if self_step is None:
            return None
        if self.aggregate != "maps":
            raise InvalidOptionError('self_step chooses the self-attention step of aggregate="maps"; aggregate="steps" uses every step\'s')
        if isinstance(self_step, bool) or not isinstance(self_step, int) or self_step < 0:
            raise InvalidOptionError(f"self_step must be a denoising step index >= 0 (0 = the first step), got {self_step!r}")
        if self.steps is not None and self_step not in self.steps:
            raise InvalidOptionError(f"self_step {self_step} is not one of the traced steps {self.steps}: trace it too")
        return self_step

    def _layouts(self, classes):
        if classes is None:
            per = [prompt_class_words(p, self.backbone) for p in self.prompts]
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
                what = f"none of the classes {cls} occurs in" if cls else "no word this model can segment is in"
                raise InvalidPromptError(
                    f"{what} the prompt {prompt!r} (its words: {', '.join(_words(prompt))}); "
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
        self._self_step = self.self_step
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
        if step == 0:
            self._start_schedule()
        if not self._observed(step):
            return
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self._grid = self._grid_of(x)
        full = self._full(step)
        self._rows = self._observed_rows(x.shape[0])
        reducers, self._stream = self.segmenter.observation_reducers(self._grid)
        seg_names = self.segmenter.activation_names() if full else list(self.segmenter.cross_names)
        if not full:  # the cross maps' reducers only, no self-map stream
            reducers, self._stream = {n: r for n, r in reducers.items() if n in seg_names}, None
        names = seg_names + [n for n in self.activation_names]
        self._capture = Capture(
            self.backbone, list(dict.fromkeys(names)), grid=self._grid, early_exit=False, map_reducer=head_mean,
            map_reducers=reducers, fuse_output=self.fuse_output, batch=self._rows,
        )
        self._capture.__enter__()

    def _start_schedule(self) -> None:
        """At the first step: check the traced steps against the call's schedule and resolve the self step
        (the traced step whose timestep is nearest the settings' ``t``)."""
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        n = len(timesteps) if timesteps is not None else 0
        if n and self.steps is not None and self.steps[-1] >= n:
            raise InvalidOptionError(
                f"steps {self.steps} are outside the schedule: this call denoises in {n} steps (0..{n - 1})"
            )
        if n and self.self_step is not None and self.self_step >= n:
            raise InvalidOptionError(
                f"self_step {self.self_step} is outside the schedule: this call denoises in {n} steps (0..{n - 1})"
            )
        if self.aggregate != "maps" or self.self_step is not None or not n:
            return  # no schedule known: the self maps of every traced step, the last one kept
        traced = self.steps if self.steps is not None else range(n)
        t = float(self.segmenter.settings.t)
        # nearest t; on a tie the later (less noisy) step
        self._self_step = min(traced, key=lambda i: (abs(float(timesteps[i]) - t), -i))

    def _full(self, step: int) -> bool:
        """Whether this step observes everything GOCA needs (self maps, reference feature), not only the cross maps."""
        if self.guidance is not None and self.guidance.uses_masks:
            return True
        return self.aggregate == "steps" or self._self_step is None or step == self._self_step

    def _observed_rows(self, batch: int) -> slice | None:
        """The samples a step observes: the conditional half of a CFG batch (S-CFG needs both halves)."""
        if self.guidance is not None and self.guidance.uses_masks:
            return None
        n = len(self.prompts) * self.per_prompt
        if not self._is_cfg(batch) or batch != 2 * n:
            return None  # no CFG, or a batch the trace does not match (refused after the forward)
        return slice(n, 2 * n)

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
                # index of the first image's conditional sample in the observed batch
                offset = 0 if self._rows is not None else half
                if self.aggregate == "maps":
                    self._accumulate_maps(step, acts, refine, offset)
                else:
                    self._accumulate(step, acts, refine, offset)
        if self.guidance is None:
            return None
        g = self._guide(pred, acts, refine, half)
        return _replace_output(output, torch.cat([g, g]))

    def _image_acts(self, acts: dict[str, torch.Tensor], j: int) -> dict[str, torch.Tensor]:
        return {k: v[j : j + 1] for k, v in acts.items()}

    def _accumulate(self, step: int, acts, refine, offset: int) -> None:
        """``aggregate="steps"``: GOCA's decision on this step's maps, added to each image's class-score sums."""
        s, seg = self.segmenter.settings, self.segmenter
        if self.activation_names:
            self.features[step] = {n: acts[n][offset:].detach().cpu() for n in self.activation_names}
        for i in range(len(self.prompts) * self.per_prompt):
            j = offset + i
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

    def _accumulate_maps(self, step: int, acts, refine, offset: int) -> None:
        """``aggregate="maps"``: add each image's cross maps to its sums; at the self step (every full step when
        the schedule was unknown) keep its layer weights and refinement mean."""
        seg = self.segmenter
        if self.activation_names:
            self.features[step] = {n: acts[n][offset:].detach().cpu() for n in self.activation_names}
        keep_self = self._self_step is None or step == self._self_step
        for i in range(len(self.prompts) * self.per_prompt):
            j = offset + i
            sums = self._sums.get(i)
            if sums is None:
                sums = self._sums[i] = _MapSums({n: acts[n][j : j + 1].float().clone() for n in seg.cross_names}, steps=1)
            else:
                for n in seg.cross_names:
                    sums.cross[n] += acts[n][j : j + 1].float()
                sums.steps += 1
            if keep_self:
                image = self._image_acts(acts, j)
                sums.weights = goca_layer_weights(seg.settings, image, self._grid, seg.cross_names, seg.self_names, seg.ref_name)
                sums.refine = self._refine_mean(image, None if refine is None else refine[j : j + 1].clone())

    def _refine_mean(self, image_acts, streamed: torch.Tensor | None) -> torch.Tensor | None:
        """The refinement mean ``[1, HW, HW]`` of one image's observation (None without refinement)."""
        seg, s = self.segmenter, self.segmenter.settings
        if s.refine_order <= 0:
            return None
        if streamed is not None:
            return streamed
        size = map_grid(image_acts, self._grid, seg.cross_names)
        return mean_self_map(image_acts, seg.refine_names, self._grid, size, s.self_map_resize == "mass-preserving")

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
    def used_self_step(self) -> int | None:
        """The step whose self-attention maps gave the layer weights and refinement (``aggregate="maps"``;
        resolved at the call's first step); None for ``aggregate="steps"`` or before the call."""
        return self._self_step if self.aggregate == "maps" else None

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
        layout = self.layouts[index // self.per_prompt]
        if isinstance(sums, _MapSums):
            cls, support, weights = self._decide_maps(sums, layout)
        else:
            cls, support, weights = sums.classes / sums.steps, sums.support / sums.steps, None
        s = self.segmenter.settings
        background = s.tau + support
        if image is not None:
            from ..images import to_rgb

            w, h = to_rgb(image).size
        else:
            f = self.backbone.vae_scale_factor * (getattr(self.backbone.denoiser.config, "patch_size", None) or 1)
            h, w = self._grid[0] * f, self._grid[1] * f
        labels = decide(cls[None], background[None], (h, w))[0]
        return SegmentationResult(
            labels=labels, class_maps=cls.cpu(), background=background.cpu(), support=support.cpu(),
            classes=list(layout.classes), caption=layout.caption, layer_names=list(self.segmenter.blocks),
            layer_weights=[] if weights is None else [float(x) for x in weights[0]],
            settings={**s.to_dict(), "model": str(self.backbone.name), "traced_steps": sums.steps,
                      "aggregate": self.aggregate, **({"self_step": self._self_step} if weights is not None else {})},
        )

    def _decide_maps(self, sums: _MapSums, layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GOCA's decision on the step-mean cross maps with the self step's layer weights and refinement mean:
        class maps ``[n, H, W]``, supporting map ``[H, W]``, layer weights ``[1, M]``."""
        if sums.weights is None:
            raise InvalidOptionError(
                f"self_step {self._self_step} was not traced: this generation ran {self._step} step(s)"
            )
        seg = self.segmenter
        mean = {n: x / sums.steps for n, x in sums.cross.items()}
        cls, support, weights = goca_scores(seg.settings, layout, mean, self._grid, seg.cross_names, seg.self_names,
                                            seg.ref_name, seg.refine_names, sums.refine, weights=sums.weights)
        return cls[0], support[0], weights

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
    aggregate: str = "maps",
    self_step: int | None = None,
    **settings: Any,
) -> Trace:
    """Trace an ordinary diffusers pipeline call: ``with difffeat.trace(pipe, prompt, classes) as tc: pipe(prompt)``.

    Args:
        pipe: the pipeline (any family with text cross-attention whose denoiser takes ``[B, C, H, W]``
            latents: SD 1.x/2.x, SDXL, PixArt, SD3).
        prompt: the call's prompt(s), as passed to the pipeline.
        classes: words of the prompt to segment (one list, or one per prompt); a word absent from a prompt
            warns (:class:`ClassNotInPromptWarning`) naming the prompt's words. Default: the prompt's class
            words for the model (:func:`difffeat.runs.prompt_class_words`: a closed vocabulary's class words, else
            every word but the fillers).
            A result lists its classes in prompt order; the settings' ``background_entities`` ("background")
            that the prompt names after them give GOCA's supporting (background) map.
        steps: denoising step indices to trace (0 = first); default every step. Maps are averaged over them.
            Only the conditional half of a CFG batch is observed (S-CFG observes both halves).
        activations: catalog names of features to keep at the traced steps (``tc.features[step][name]``,
            the conditional half).
        num_images_per_prompt: as passed to the pipeline.
        guidance: :class:`SCFG` to guide the call with S-CFG (or plain CFG, ``mode="cfg"``).
        cfg: whether the call runs classifier-free guidance (default: the pipeline's
            ``do_classifier_free_guidance``, else inferred from the batch size).
        fuse_output: let observed attention layers return ``probabilities @ V`` from the observer's own
            chunks instead of running SDPA again (the images then equal an untraced call's to float32
            rounding, not bit for bit). Off by default. It applies where the whole batch is observed (S-CFG,
            or a call without CFG): the conditional half alone cannot give the layer's output.
        aggregate: how the traced steps combine (see the module docstring). "maps" (default): the GOCA
            head-weighted cross maps of every layer are averaged over the traced steps and GOCA's decision runs
            once on them, with the layer weights and refinement of one step's self-attention maps
            (``self_step``); the self maps are observed at that step only. "steps": GOCA's decision at every
            traced step on that step's own maps, the class scores averaged (self maps at every traced step;
            the published S-CFG masks are per step like this).
        self_step: the step whose self-attention maps and reference feature give the layer weights and the
            refinement (``aggregate="maps"``); one of the traced steps. Default: the traced step whose
            timestep is nearest the settings' ``t`` (GOCA observes an image at t = 100), the later one on a tie.
        **settings: :class:`~difffeat.segment.SegmentSettings` fields (``tau``, ``refine_order``, ...).

    Raises:
        ConfigError: the family has no text cross-attention. InvalidOptionError: bad steps / self_step /
        aggregate / guidance (S-CFG with guidance_scale <= 1). InvalidPromptError: no class occurs in a prompt.
    """
    return Trace(pipe, prompt, classes, steps=steps, activations=activations, num_images_per_prompt=num_images_per_prompt,
                 guidance=guidance, cfg=cfg, fuse_output=fuse_output, aggregate=aggregate, self_step=self_step, **settings)
