"""The capture session: one context manager owns every hook and attention observer it installs.

    inputs = backbone.prepare(images, prompts, t=50)
    with Capture(backbone, ["up_blocks.1.resnets.2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2.map"], inputs) as cap:
        backbone.denoise(inputs)
    feats = cap.activations          # {name: tensor}

Hooks go only on the modules the requested names need; attention observers only on the attention modules
whose maps were asked for. On exit (also when the forward raises) every hook is removed and every original
processor restored. With ``early_exit=True`` the forward stops as soon as the last requested activation is
captured (the exception that stops it is swallowed by the context manager), so nothing after the last
needed module is computed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..catalog import ActivationInfo
from ..hookpoints import load_table
from .observer import DEFAULT_CHUNK_ELEMENTS, AttentionTensors, MapReducer, attention_probs, install_observer, per_head

if TYPE_CHECKING:
    from ..backbones.base import Backbone, DenoiserInputs

__all__ = ["Capture", "StopForward", "sequence_to_spatial"]


class StopForward(Exception):
    """Raised inside the forward once every requested activation is captured (early exit)."""


def _first_tensor(output: Any, index: int | None) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[index or 0]
    elif hasattr(output, "sample") and not isinstance(output, torch.Tensor):
        output = output.sample
    return output


def packed_image_tokens(x: torch.Tensor, n_image: int, image_offsets: torch.Tensor | None) -> torch.Tensor:
    """``[B, N, C]`` joint sequence packed per sample -> its ``[B, n_image, C]`` image tokens, sample b's
    starting at ``image_offsets[b]`` (the last ``n_image`` tokens when no offsets are given)."""
    if image_offsets is None:
        return x[:, -n_image:]
    b, _, c = x.shape
    idx = image_offsets.to(device=x.device, dtype=torch.long).view(b, 1) + torch.arange(n_image, device=x.device)
    return x.gather(1, idx.unsqueeze(-1).expand(b, n_image, c))


def sequence_to_spatial(
    x: torch.Tensor, grid: tuple[int, int], tokens: str = "image", image_offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, N, C]`` image-token sequence -> ``[B, C, h, w]``.

    ``grid`` is the denoiser's input token grid (h, w). A sequence of fewer tokens is a downsampled level
    (UNet): its grid is ``ceil(h/s) x ceil(w/s)`` for the power of two ``s`` that matches N. With
    ``tokens="last"`` only the last ``h*w`` tokens are image tokens (FLUX single-stream blocks); with
    ``tokens="first"`` the first ``h*w`` (Z-Image: the image block, then its padding and the text); with
    ``tokens="packed"`` they start at each sample's ``image_offsets`` (:func:`packed_image_tokens`).
    ``[B, C, H, W]`` tensors pass through.
    """
    if x.ndim == 4:
        return x
    if x.ndim != 3:
        raise ValueError(f"cannot reshape activation of shape {tuple(x.shape)} to [B, C, H, W]")
    h, w = grid
    if tokens == "last":
        x = x[:, -h * w :]
    elif tokens == "first":
        x = x[:, : h * w]
    elif tokens == "packed":
        x = packed_image_tokens(x, h * w, image_offsets)
    n = x.shape[1]
    for s in (1, 2, 4, 8, 16, 32, 64):
        gh, gw = math.ceil(h / s), math.ceil(w / s)
        if gh * gw == n:
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)
    raise ValueError(f"a sequence of {n} tokens does not fit the image grid {h}x{w} at any power-of-two scale")


def _attended(tensors: AttentionTensors, which: str) -> torch.Tensor:
    """The image tokens' attended queries, keys or values ``[B, heads, N, d]`` -> ``[B, N, heads * d]``."""
    x = tensors.q if which == "q" else {"k": tensors.k, "v": tensors.v}[which][:, :, tensors.image_keys]
    return x.transpose(1, 2).flatten(2)


class Capture:
    """Capture activations of one backbone's denoiser during a forward.

    Args:
        backbone: the :class:`~difffeat.backbones.Backbone` whose denoiser is instrumented.
        activations: names (or paper aliases, or :class:`ActivationInfo`) to capture.
        inputs: the :class:`DenoiserInputs` of the forward (gives the token grid, the text length: the cross maps'
            width where the text block depends on the prompt (Z-Image) and, for joint sequences packed per
            sample, each sample's image offset); or pass ``grid`` (then packed sequences are read as if every
            sample's image tokens came last, true for one sample).
        early_exit: stop the forward once everything is captured.
        map_reducer: how attention maps are reduced per layer: ``per_head`` (default, ``[B, heads, HW, K]``),
            ``head_mean`` (``[B, HW, K]``) or any :class:`MapReducer`.
        map_reducers: per-name overrides of ``map_reducer`` (canonical names).
        to_cpu: move captured tensors to the CPU as they arrive (saves accelerator memory).
        shapes_only: record shapes only (used with fake tensors by the catalog).
        chunk_elements: size of the temporary per-chunk probabilities tensor when computing maps (query rows
            are processed in chunks of ``chunk_elements // (B * heads * keys)``); results do not depend on it.

    After the block: ``activations`` maps each requested canonical name to a tensor: ``[B, C, H, W]`` for
    features, the reducer's output for maps; ``shapes`` maps names to shapes.
    """

    def __init__(
        self,
        backbone: "Backbone",
        activations: Sequence[str | ActivationInfo],
        inputs: "DenoiserInputs | None" = None,
        *,
        grid: tuple[int, int] | None = None,
        early_exit: bool = True,
        map_reducer: MapReducer = per_head,
        map_reducers: dict[str, MapReducer] | None = None,
        to_cpu: bool = False,
        shapes_only: bool = False,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        if inputs is None and grid is None:
            raise ValueError("Capture needs the forward's inputs (DenoiserInputs) or the token grid")
        self.backbone = backbone
        self.grid = tuple(inputs.grid) if inputs is not None else tuple(grid)
        self.image_offsets = inputs.image_offsets if inputs is not None else None
        self.text_len = inputs.text_len if inputs is not None else None
        names = list(activations)
        if not names:
            raise ValueError("empty activation list: name at least one activation (see `difffeat catalog MODEL`)")
        if all(isinstance(a, ActivationInfo) for a in names):
            self.infos = list(dict.fromkeys(names))
        else:
            self.infos = _catalog_of(backbone).resolve([a.name if isinstance(a, ActivationInfo) else a for a in names])
        self.early_exit = early_exit
        self.map_reducer = map_reducer
        self.map_reducers = dict(map_reducers or {})
        self.to_cpu = to_cpu
        self.shapes_only = shapes_only
        if int(chunk_elements) < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.chunk_elements = int(chunk_elements)
        self.activations: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._pending: set[str] = set()
        self._handles: list[Any] = []
        self._observers: list[Any] = []
        self._active = False

    # ------------------------------------------------------------------ storing
    def _store(self, info: ActivationInfo, tensor: torch.Tensor) -> None:
        if info.name in self.shapes:  # module called again in the same forward: keep the first call
            return
        self.shapes[info.name] = tuple(tensor.shape)
        if not self.shapes_only:
            tensor = tensor.detach()
            self.activations[info.name] = tensor.cpu() if self.to_cpu else tensor
        self._pending.discard(info.name)
        if self.early_exit and not self._pending:
            raise StopForward

    def _feature_hook(self, infos: list[ActivationInfo]):
        def hook(module, args, output):
            for info in infos:
                x = _first_tensor(output, info.index)
                self._store(info, sequence_to_spatial(x, self.grid, info.tokens, self.image_offsets))

        return hook

    def _input_hook(self, info: ActivationInfo):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            self._store(info, sequence_to_spatial(x, self.grid))

        return hook

    def _map_sink(self, infos_by_module: dict[str, list[ActivationInfo]]):
        def sink(module_path: str, attn: Any, tensors: AttentionTensors) -> None:
            for info in infos_by_module[module_path]:
                if info.name in self.shapes:
                    continue
                if not info.is_map:
                    self._store(info, sequence_to_spatial(_attended(tensors, info.observe), self.grid))
                elif self.shapes_only:
                    b, h, nq, _ = tensors.q.shape
                    keys = tensors.text_keys if info.observe == "cross" else tensors.image_keys
                    self._store(info, torch.empty(b, h, nq, keys.stop - keys.start, device="meta"))
                else:
                    reducer = self.map_reducers.get(info.name, self.map_reducer)
                    self._store(info, attention_probs(tensors, info.observe, reducer, attn, self.chunk_elements))

        return sink

    # ------------------------------------------------------------------ install / remove
    def __enter__(self) -> "Capture":
        if self._active:
            raise RuntimeError("this Capture is already active")
        self._active = True
        self.activations, self.shapes = {}, {}
        self._pending = {i.name for i in self.infos}
        denoiser = self.backbone.denoiser
        try:
            by_module: dict[str, list[ActivationInfo]] = defaultdict(list)
            maps_by_module: dict[str, list[ActivationInfo]] = defaultdict(list)
            for info in self.infos:
                if info.observe:
                    maps_by_module[info.module].append(info)
                elif info.kind == "input":
                    self._handles.append(denoiser.register_forward_pre_hook(self._input_hook(info), with_kwargs=True))
                else:
                    by_module[info.hook_module].append(info)
            for path, infos in by_module.items():
                module = denoiser.get_submodule(path) if path else denoiser
                self._handles.append(module.register_forward_hook(self._feature_hook(infos)))
            if maps_by_module:
                n_image = self.grid[0] * self.grid[1]
                sink = self._map_sink(maps_by_module)
                table = load_table(self.backbone.hook_table)
                text_first = table.token_order == "text-first"
                for path in maps_by_module:
                    self._observers.append(install_observer(
                        denoiser.get_submodule(path), path, sink, n_image, text_first, self.image_offsets, self.text_len,
                        table.sequence_multiple,
                    ))  # fmt: skip
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for observer in reversed(self._observers):
            observer.remove()
        self._observers = []
        self._active = False

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        return exc_type is not None and issubclass(exc_type, StopForward)

    @property
    def missing(self) -> list[str]:
        """Requested names not captured (e.g. modules the forward never ran)."""
        return [i.name for i in self.infos if i.name not in self.shapes]

    def __getitem__(self, name: str) -> torch.Tensor:
        canonical = _catalog_of(self.backbone).canonical(name) if name not in self.activations else name
        return self.activations[canonical]


def _catalog_of(backbone: "Backbone"):
    from .probe import catalog_of  # probe builds on Capture

    return catalog_of(backbone)
