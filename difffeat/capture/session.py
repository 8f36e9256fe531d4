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
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..catalog import ActivationInfo
from .observer import DEFAULT_CHUNK_ELEMENTS, AttentionTensors, MapReducer, attention_maps, install_observer, per_head

if TYPE_CHECKING:
    from ..backbones.base import Backbone, DenoiserInputs

__all__: list[str] = []  # Capture, StopForward, sequence_to_spatial: listed by difffeat.capture


class StopForward(Exception):
    """Raised inside the forward once every requested activation is captured (early exit)."""


def _first_tensor(output: Any, index: int | None) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[index or 0]
    elif hasattr(output, "sample") and not isinstance(output, torch.Tensor):
        output = output.sample
    return output


def sequence_to_spatial(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, N, C]`` image-token sequence -> ``[B, C, h, w]``.

    ``grid`` is the denoiser's input token grid (h, w). A sequence of fewer tokens is a downsampled level:
    its grid is ``ceil(h/s) x ceil(w/s)`` for the power of two ``s`` that matches N. (Which tokens of a joint
    sequence are the image's is the forward's :class:`~difffeat.backbones.layout.TokenLayout`'s answer.)
    ``[B, C, H, W]`` tensors pass through.
    """
    if x.ndim == 4:
        return x
    if x.ndim != 3:
        raise ValueError(f"cannot reshape activation of shape {tuple(x.shape)} to [B, C, H, W]")
    h, w = grid
    n = x.shape[1]
    for s in (1, 2, 4, 8, 16, 32, 64):
        gh, gw = math.ceil(h / s), math.ceil(w / s)
        if gh * gw == n:
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)
    raise ValueError(f"a sequence of {n} tokens does not fit the image grid {h}x{w} at any power-of-two scale")


def _samples(tensors: AttentionTensors, batch: slice) -> AttentionTensors:
    """The attention tensors of the samples ``batch`` of the batch (a bias broadcast over the batch is kept)."""
    bias = tensors.bias
    if bias is not None and bias.ndim == 4 and bias.shape[0] != 1:
        bias = bias[batch]
    return replace(tensors, q=tensors.q[batch], k=tensors.k[batch], v=tensors.v[batch], bias=bias)


def _attended(tensors: AttentionTensors, which: str) -> torch.Tensor:
    """The image tokens' attended queries, keys or values ``[B, heads, N, d]`` -> ``[B, N, heads * d]``."""
    x = tensors.q if which == "q" else {"k": tensors.k, "v": tensors.v}[which][:, :, tensors.image_keys]
    return x.transpose(1, 2).flatten(2)


class Capture:
    """Capture activations of one backbone's denoiser during a forward.

    Args:
        backbone: the :class:`~difffeat.backbones.Backbone` whose denoiser is instrumented.
        activations: names (or paper aliases, or :class:`ActivationInfo`) to capture.
        inputs: the :class:`DenoiserInputs` of the forward: its :class:`~difffeat.backbones.layout.TokenLayout`
            (built by the family's adapter) says where the image and text tokens of every sequence are; or
            pass ``grid`` (then the family's layout at that grid, without the forward's text length or
            per-sample offsets: packed sequences are read as if every sample's image tokens came last, true
            for one sample).
        early_exit: stop the forward once everything is captured.
        map_reducer: how attention maps are reduced per layer: ``per_head`` (default, ``[B, heads, HW, K]``),
            ``head_mean`` (``[B, HW, K]``) or any :class:`MapReducer`.
        map_reducers: per-name overrides of ``map_reducer`` (canonical names).
        to_cpu: move captured tensors to the CPU as they arrive (saves accelerator memory).
        shapes_only: record shapes only (used with fake tensors by the catalog).
        chunk_elements: size of the temporary per-chunk probabilities tensor when computing maps (query rows
            are processed in chunks of ``chunk_elements // (B * heads * keys)``); results do not depend on it.
        fuse_output: on observed layers whose SDPA call allows it (``_fusable`` in :mod:`difffeat.capture.observer`),
            return the layer's output as ``probabilities @ V`` from the observer's own chunks instead of
            running SDPA again (saves one attention per observed layer). Activations after an observed layer
            then equal an unobserved forward's to float32 rounding, not bitwise; off by default.
        batch: observe only these samples of the batch (e.g. ``slice(n, 2 * n)``, the conditional half of a
            classifier-free-guidance batch): maps and features are computed and kept for them alone; the forward
            itself is untouched. The fused output is off then (it would need every sample's attention).

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
        fuse_output: bool = False,
        batch: slice | None = None,
    ) -> None:
        if inputs is None and grid is None:
            raise ValueError("Capture needs the forward's inputs (DenoiserInputs) or the token grid")
        self.backbone = backbone
        self.layout = inputs.layout if inputs is not None else backbone.layout(tuple(grid))
        self.grid = self.layout.grid
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
        if batch is not None and not isinstance(batch, slice):
            raise ValueError(f"batch must be a slice of the batch's samples, got {batch!r}")
        self.batch = batch
        self.fuse_output = bool(fuse_output) and batch is None
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
                if info.name in self.shapes:  # a module called again (CogView4's ff: image, then text) keeps its first call
                    continue
                x = self.layout.image_tokens(_first_tensor(output, info.index), info.tokens == "joint")
                self._store(info, sequence_to_spatial(x if self.batch is None else x[self.batch], self.grid))

        return hook

    def _input_hook(self, info: ActivationInfo):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            self._store(info, sequence_to_spatial(x if self.batch is None else x[self.batch], self.grid))

        return hook

    def _map_sink(self, infos_by_module: dict[str, list[ActivationInfo]]):
        def sink(module_path: str, attn: Any, tensors: AttentionTensors, output_bhqd: torch.Tensor | None = None) -> bool:
            """Store this call's activations; fill ``output_bhqd`` (the layer's attention output) from the
            first map's chunks when given. Returns whether it was filled. An early exit raised by a store
            waits until the output is complete (the forward stops either way)."""
            if not self.fuse_output:
                output_bhqd = None
            if self.batch is not None:
                tensors = _samples(tensors, self.batch)
            stop = False
            infos = [info for info in infos_by_module[module_path] if info.name not in self.shapes]
            computed = [info for info in infos if info.is_map and not self.shapes_only]
            maps = {}
            if computed:  # every map of this call from one pass over its chunks (one softmax per chunk)
                requests = [(info.observe, self.map_reducers.get(info.name, self.map_reducer)) for info in computed]
                maps = dict(zip((info.name for info in computed),
                                attention_maps(tensors, requests, attn, self.chunk_elements, output_bhqd)))
            for info in infos:
                try:
                    if not info.is_map:
                        self._store(info, sequence_to_spatial(_attended(tensors, info.observe), self.grid))
                    elif self.shapes_only:
                        b, h, nq, _ = tensors.q.shape
                        keys = tensors.text_keys if info.observe == "cross" else tensors.image_keys
                        self._store(info, torch.empty(b, h, nq, keys.stop - keys.start, device="meta"))
                    else:
                        self._store(info, maps[info.name])
                except StopForward:
                    stop = True
            if stop:
                raise StopForward
            return output_bhqd is not None and bool(computed)

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
                sink = self._map_sink(maps_by_module)
                for path in maps_by_module:
                    self._observers.append(install_observer(denoiser.get_submodule(path), path, sink, self.layout))
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
