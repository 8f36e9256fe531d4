"""Attention observers: on the selected attention modules only, they compute the attention probabilities
of the *image queries* (what was asked: per-head maps, head-mean maps, or a custom reduction) and hand
them to the capture session. Where the probabilities cover the whole SDPA call (every query row, no mask,
no dropout, float32) the layer's output is ``probabilities @ V`` from the same chunks and SDPA does not run
a second time (``_fusable``); otherwise the layer's output is computed by diffusers itself. On the CPU the
chunks of query rows are spread over worker threads that each run torch's kernels on one thread
(:mod:`~difffeat.capture.chunk_workers`).

One mechanism serves every family whose attention reaches torch's ``scaled_dot_product_attention``: the
stock processors of diffusers (``AttnProcessor2_0``, ``JointAttnProcessor2_0``, and every new-style
processor that calls ``dispatch_attention_fn`` with one of the native backends) hand it queries, keys and
values exactly as attended: projected, q/k-normed, rotated, ``[B, heads, N, d]``. While an observed module
runs, a :class:`torch.overrides.TorchFunctionMode` sees that call (the mechanism diffusers' own
skip-layer guidance uses, ``diffusers.hooks.layer_skip``), so a new family needs no copy of its processor's
math. Which queries and keys of the call are image and text tokens is the forward's
:class:`~difffeat.backbones.layout.TokenLayout` (built by the family's adapter): the observer holds no
layout of its own. Fused projections (``fuse_qkv_projections()``, fused single-stream blocks) change nothing.

Backends that do not run torch SDPA (flash, sage, xformers, flex, NPU/XLA kernels) cannot return maps:
:func:`check_observable` raises :class:`~difffeat.errors.AttentionBackendError` naming the fix before the
forward, and an observed layer that finishes without an SDPA call raises it after.

Legacy processors that compute attention without SDPA (``AttnProcessor``, ``SlicedAttnProcessor``,
``XFormersAttnProcessor``) keep a processor-level observer (a *processor layout*) registered by class name; so
does ReLU linear attention (``SanaLinearAttnProcessor2_0``), whose attention matrix is never formed by the
layer (it multiplies ``V K^T`` first): its maps are that matrix, normalised as the layer normalises it
(:func:`relu_linear_probs`), not softmax probabilities."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode

from ..backbones import diffusers_compat
from ..backbones.layout import TokenLayout
from ..errors import AttentionBackendError, DifffeatError
from .attention_kernels import flash_output_and_lse, probs_from_lse
from .chunk_workers import InRowOrder, chunk_workers, run_chunks

# AttentionTensors, MapReducer, register_layout, head_mean, per_head, attention_probs: listed by difffeat.capture
__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "SDPA_BACKENDS",
    "check_observable",
    "install_observer",
    "softmax_probs",
    "relu_linear_probs",
]

#: elements of the temporary ``[B, heads, rows, keys]`` logits/probabilities tensor of one chunk of query rows.
#: 2**20 floats (4 MiB) stays below glibc's mmap threshold (which grows to at most 32 MiB = 2**23 floats), so
#: chunk buffers are reused from the heap instead of being fresh mmaps zeroed page by page on first touch
#: (at 2**23 a full-size SD1.5 observed forward spent more time in page faults than in the extra softmax).
DEFAULT_CHUNK_ELEMENTS = 2**20


@dataclass
class AttentionTensors:
    """Queries/keys/values of one attention call, with image queries only.

    Attributes:
        q: ``[B, heads, Nq, d]`` queries of the image tokens.
        k: ``[B, heads, Nk, d]`` every key the layer attends to, in the layer's order.
        v: ``[B, heads, Nk, d]`` values, same order.
        bias: additive attention bias broadcastable to ``[B, heads, Nq, Nk]``, or None.
        scale: logit scale (1/sqrt(d) normally).
        image_keys / text_keys: positions of image and text keys in ``k`` (``text_keys`` is None for
            plain self-attention, ``image_keys`` is None for plain cross-attention).
        kernel: how the layer turns q and k into attention weights: "softmax" (scaled dot-product) or
            "relu-linear" (ReLU linear attention, see :func:`relu_linear_probs`).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    image_keys: slice | None
    text_keys: slice | None
    kernel: str = "softmax"


class MapReducer(Protocol):
    """Reduces the probabilities of a chunk of query rows. ``probs_bhqk`` is ``[B, heads, q, K]`` restricted
    to the requested keys; ``rows`` is the slice of query rows; ``full_probs_bhqk`` has every key (needed by
    reductions that use the layer's output, such as GOCA's head weights). A reducer with the attribute
    ``uses_output = True`` also receives ``out_bhqd`` = ``full_probs_bhqk @ V`` (float32, ``[B, heads, q, d]``),
    the chunk's attention output, computed once for it and for the layer's fused output. A reducer with
    ``thread_safe = True`` may be called from several threads at once, for disjoint chunks of rows
    (:mod:`~difffeat.capture.chunk_workers`); others are called one chunk at a time, in row order. A reducer
    never modifies the probabilities in place: the reducers of one call's maps share each chunk's
    (:func:`attention_maps`)."""

    def __call__(
        self, probs_bhqk: torch.Tensor, *, attn: Any, tensors: AttentionTensors, rows: slice, full_probs_bhqk: torch.Tensor
    ) -> torch.Tensor: ...


def per_head(probs_bhqk: torch.Tensor, **_: Any) -> torch.Tensor:
    """Keep every head: ``[B, heads, q, K]``."""
    return probs_bhqk


def head_mean(probs_bhqk: torch.Tensor, **_: Any) -> torch.Tensor:
    """Mean over heads: ``[B, q, K]``."""
    return probs_bhqk.mean(dim=1)


per_head.thread_safe = head_mean.thread_safe = True  # type: ignore[attr-defined]  # pure functions of their chunk


def softmax_probs(q_bhqd: torch.Tensor, kt_bhdk: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T + bias)`` over keys (``q`` already scaled), float32."""
    logits = torch.matmul(q_bhqd, kt_bhdk)
    if bias is not None:
        logits = logits + bias.float()
    return torch.softmax(logits, dim=-1, out=logits)  # in place: the logits are this chunk's own tensor


#: the denominator offset of ``SanaLinearAttnProcessor2_0``
LINEAR_ATTENTION_EPS = 1e-15


def relu_linear_probs(q_bhqd: torch.Tensor, kt_bhdk: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """ReLU linear attention as an attention matrix (``q``, ``k`` already through ReLU):
    ``A_ij = relu(q_i).relu(k_j) / (sum_j relu(q_i).relu(k_j) + 1e-15)``, so that ``A V`` is the layer's
    output before the output projection. Weights are >= 0; a row sums to 1 unless its query overlaps no key,
    where the row is 0 (and so is the layer's output)."""
    scores = torch.matmul(q_bhqd, kt_bhdk)
    return scores / (scores.sum(dim=-1, keepdim=True) + LINEAR_ATTENTION_EPS)


#: kernel -> (prepare ``(q, k, scale) -> (q', k'^T)`` once per layer, probabilities of a chunk of rows)
_KERNELS: dict[str, tuple[Callable, Callable]] = {
    # k^T contiguous: the q.k^T chunk product is ~1.6x faster with a contiguous right operand
    "softmax": (lambda q, k, scale: (q.float() * scale, k.float().transpose(-1, -2).contiguous()), softmax_probs),
    "relu-linear": (lambda q, k, scale: (F.relu(q.float()), F.relu(k.float()).transpose(-1, -2)), relu_linear_probs),
}


def attention_probs(
    tensors: AttentionTensors,
    keys: str,
    reducer: MapReducer,
    attn: Any,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    output_bhqd: torch.Tensor | None = None,
    fused_lse: bool = False,
    workers: int | None = None,
) -> torch.Tensor:
    """Attention probabilities of the image queries (float32; softmax, or the layer's linear-attention
    weights for ``kernel="relu-linear"``), reduced chunk by chunk: :func:`attention_maps` with one map.

    ``keys``: "cross" keeps the text-key columns, "self" the image-key columns, "all" every column. The
    softmax always runs over *all* keys the layer attends to (for joint attention the cross block is
    therefore not normalised over text alone). The other arguments: see :func:`attention_maps`.
    """
    return attention_maps(tensors, [(keys, reducer)], attn, chunk_elements, output_bhqd, fused_lse, workers)[0]


def attention_maps(
    tensors: AttentionTensors,
    maps: Sequence[tuple[str, MapReducer]],
    attn: Any,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    output_bhqd: torch.Tensor | None = None,
    fused_lse: bool = False,
    workers: int | None = None,
) -> list[torch.Tensor]:
    """Several reduced maps of one attention call (``maps``: ``(keys, reducer)`` pairs, ``keys`` as in
    :func:`attention_probs`) from one pass over its chunks: each chunk's probabilities (and ``P V``) are
    computed once and handed to every reducer (a joint-attention layer's cross and self maps share their
    softmax). Each map equals what :func:`attention_probs` returns for it alone (the same chunks, the same
    kernels).

    ``output_bhqd``: optional ``[B, heads, Nq, d]`` tensor that receives the attention output
    ``probabilities @ V`` of the same chunks (what SDPA returns for these query rows).

    ``fused_lse``: where the output is wanted, take it from torch's fused CPU kernel with each row's
    log-sum-exp and form the probabilities as ``exp(q.k^T - lse)``
    (:mod:`~difffeat.capture.attention_kernels`); the explicit path where that kernel does not apply. Off by
    default: on the CPU measured it was 0.94-1.37x the explicit path's time (README, "Observer attention
    kernel").

    ``workers``: threads the chunks are spread over, each running torch's kernels on one thread
    (:mod:`~difffeat.capture.chunk_workers`); None: torch's thread count where that is safe
    (:func:`~difffeat.capture.chunk_workers.chunk_workers`), 1: every chunk in the caller's thread. Reducers
    without ``thread_safe = True`` are then called one chunk at a time, in row order; the result does not
    depend on ``workers`` beyond the float rounding of torch's multi-threaded kernels in the caller's thread.
    """
    q, k = tensors.q, tensors.k
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    columns = {"cross": tensors.text_keys, "self": tensors.image_keys, "all": slice(0, nk)}
    for keys, _ in maps:
        if columns[keys] is None:
            raise DifffeatError(f"this attention layer has no {keys} keys")
    reducers = [(columns[keys], reducer) for keys, reducer in maps]
    if workers is None:
        workers = chunk_workers(q, k, tensors.v)
    rows_per_chunk = max(1, chunk_elements // max(1, b * h * nk))
    if workers > 1:  # a few chunks per worker, so that one that finishes early takes another
        rows_per_chunk = min(rows_per_chunk, -(-nq // (4 * workers)))
    prepare, probs = _KERNELS[tensors.kernel]
    q_prepared, kt = prepare(q, k, tensors.scale)  # scaling the [.., d] queries, not the [.., keys] logits
    uses_output = any(getattr(reducer, "uses_output", False) for _, reducer in reducers)
    wants_output = output_bhqd is not None or uses_output
    v = tensors.v.float() if wants_output else None
    fused = None  # (output [B, heads, Nq, d], lse [B, heads, Nq]) of the fused kernel, or None
    if fused_lse and wants_output and tensors.kernel == "softmax":
        fused = flash_output_and_lse(q, k, tensors.v, tensors.bias, tensors.scale)
    # one row-order gate per reducer that is not thread-safe (each lets the chunks through in row order)
    in_order = [InRowOrder() if workers > 1 and not getattr(r, "thread_safe", False) else None for _, r in reducers]
    made = threading.Lock()
    outs: list[torch.Tensor | None] = [None] * len(reducers)  # [..., nq, K] filled chunk by chunk, one per map

    def chunk(rows: slice) -> None:
        bias = tensors.bias
        if bias is not None and bias.shape[-2] != 1:
            bias = bias[..., rows, :]
        if fused is not None:
            full = probs_from_lse(q_prepared[:, :, rows], kt, bias, fused[1][:, :, rows])
        else:
            full = probs(q_prepared[:, :, rows], kt, bias)
        extra = {}
        if wants_output:
            if fused is not None:
                o_bhqd = fused[0][:, :, rows]
                if output_bhqd is not None:
                    output_bhqd[:, :, rows] = o_bhqd
            elif output_bhqd is not None and output_bhqd.dtype == full.dtype:  # P V where SDPA's output goes
                o_bhqd = torch.matmul(full, v, out=output_bhqd[:, :, rows])
            else:
                o_bhqd = torch.matmul(full, v)
                if output_bhqd is not None:
                    output_bhqd[:, :, rows] = o_bhqd
            if uses_output:
                extra["out_bhqd"] = o_bhqd
        for i, (cols, reducer) in enumerate(reducers):
            with in_order[i](rows) if in_order[i] is not None else nullcontext():
                mine = extra if getattr(reducer, "uses_output", False) else {}
                reduced = reducer(full[..., cols], attn=attn, tensors=tensors, rows=rows, full_probs_bhqk=full, **mine)
            if outs[i] is None:
                with made:
                    if outs[i] is None:
                        outs[i] = reduced.new_empty((*reduced.shape[:-2], nq, reduced.shape[-1]))
            outs[i][..., rows, :] = reduced

    run_chunks(chunk, nq, rows_per_chunk, workers)
    return outs


def _fusable(sdpa: dict[str, Any], tensors: AttentionTensors) -> bool:
    """Whether the observer may return an SDPA call's output itself (``probabilities @ V`` of its own
    chunks) instead of letting SDPA compute the same attention again: the observer's queries, keys and values
    are the call's own (every query row an image query, in order; no grouped-query repetition, no packed or
    padded layout), softmax attention, no mask, no dropout, and float32 (the observer's precision, so the
    output equals SDPA's to float32 rounding)."""
    def same(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
        return mine.shape == theirs.shape and mine.stride() == theirs.stride() and mine.data_ptr() == theirs.data_ptr()

    query = sdpa["query"]
    return (
        tensors.kernel == "softmax"
        and query.dtype == torch.float32
        and query.device.type != "meta"
        and not isinstance(query, FakeTensor)  # shape probing: nothing to save, and fakes have no data pointer
        and sdpa.get("attn_mask") is None
        and not sdpa.get("dropout_p")
        and not sdpa.get("is_causal")
        and same(tensors.q, query)
        and same(tensors.k, sdpa["key"])
        and same(tensors.v, sdpa["value"])
    )


def _empty_output(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An uninitialised SDPA output ``[B, heads, Nq, d_v]`` laid out as ``[B, Nq, heads, d_v]`` (as torch's CPU
    kernels return it), so the processor's ``transpose(1, 2).reshape(B, Nq, heads*d_v)`` is free."""
    b, h, nq, _ = query.shape
    return query.new_empty((b, nq, h, value.shape[-1])).transpose(1, 2)


# --------------------------------------------------------------------------- layouts
def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, heads*d]`` -> ``[B, heads, N, d]``."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _standard(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_) -> AttentionTensors:
    """diffusers ``Attention`` with AttnProcessor / AttnProcessor2_0 / XFormers / Sliced processors."""
    if hidden_states.ndim != 3 or getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None:
        raise DifffeatError("attention maps are only supported for sequence attention in transformer blocks")
    is_cross = encoder_hidden_states is not None
    context = encoder_hidden_states if is_cross else hidden_states
    if is_cross and getattr(attn, "norm_cross", None):
        context = attn.norm_encoder_hidden_states(context)
    h = attn.heads
    q, k, v = _heads(attn.to_q(hidden_states), h), _heads(attn.to_k(context), h), _heads(attn.to_v(context), h)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    bias = None
    if attention_mask is not None:
        b, nk = hidden_states.shape[0], k.shape[2]
        mask = attn.prepare_attention_mask(attention_mask, nk, b)  # [B*heads, 1|Nq, Nk]
        bias = mask.view(b, h, -1, nk)
    nk = k.shape[2]
    return AttentionTensors(
        q, k, v, bias, attn.scale,
        image_keys=None if is_cross else slice(0, nk),
        text_keys=slice(0, nk) if is_cross else None,
    )


def _joint_image_first(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_) -> AttentionTensors:
    """``JointAttnProcessor2_0`` / ``XFormersJointAttnProcessor``: keys are [image, text]."""
    h = attn.heads
    q, k, v = _heads(attn.to_q(hidden_states), h), _heads(attn.to_k(hidden_states), h), _heads(attn.to_v(hidden_states), h)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    n_img = k.shape[2]
    text = None
    if encoder_hidden_states is not None:
        tk = _heads(attn.add_k_proj(encoder_hidden_states), h)
        tv = _heads(attn.add_v_proj(encoder_hidden_states), h)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        k, v = torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)
        text = slice(n_img, k.shape[2])
    return AttentionTensors(q, k, v, None, attn.scale, image_keys=slice(0, n_img), text_keys=text)


def _relu_linear(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_) -> AttentionTensors:
    """``SanaLinearAttnProcessor2_0`` (self-attention over the image tokens): q/k/v as the processor
    projects and norms them, before its ReLU (applied by the ``relu-linear`` kernel)."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    h = attn.heads
    q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    n = k.shape[1]
    return AttentionTensors(_heads(q, h), _heads(k, h), _heads(v, h), None, 1.0, image_keys=slice(0, n), text_keys=None, kernel="relu-linear")


# --------------------------------------------------------------------------- observers
#: ``sink(module_path, attn, tensors, output_bhqd)``; ``output_bhqd`` is None or an empty SDPA output the sink may
#: fill (then it returns True and the SDPA call is not run again)
MapSink = Callable[..., bool | None]


class _Observer:
    """Common part: compute tensors, report them, then run the stock processor for the real output."""

    layout: Callable[..., AttentionTensors]

    def __init__(self, stock: Any, module_path: str, sink: MapSink) -> None:
        self.stock = stock
        self.module_path = module_path
        self.sink = sink

    def _observe(self, attn, hidden_states, encoder_hidden_states, attention_mask, extra: dict) -> None:
        with torch.no_grad():
            tensors = type(self).layout(
                attn, hidden_states, encoder_hidden_states, attention_mask, **extra
            )
        self.sink(self.module_path, attn, tensors, None)


class StandardObserver(_Observer):
    layout = staticmethod(_standard)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        out = self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs) if temb is not None else self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        self._observe(attn, hidden_states, encoder_hidden_states, attention_mask, {})
        return out


class JointObserver(_Observer):
    layout = staticmethod(_joint_image_first)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        self._observe(attn, hidden_states, encoder_hidden_states, attention_mask, {})
        return out


class LinearAttentionObserver(JointObserver):
    layout = staticmethod(_relu_linear)


_OBSERVERS: dict[str, type[_Observer]] = {}


def register_layout(observer_cls: type[_Observer], *stock_processor_names: str) -> None:
    """Register an observer class for stock processors with these class names."""
    for name in stock_processor_names:
        _OBSERVERS[name] = observer_cls


register_layout(StandardObserver, "AttnProcessor", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU")
register_layout(JointObserver, "XFormersJointAttnProcessor")
register_layout(LinearAttentionObserver, "SanaLinearAttnProcessor2_0")



# --------------------------------------------------------------------------- dispatcher observation
#: diffusers attention backends that run torch's ``scaled_dot_product_attention`` (their maps are observable)
SDPA_BACKENDS = frozenset({"native", "_native_math", "_native_efficient", "_native_flash", "_native_cudnn"})

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _backend_name(backend: Any) -> str:
    return str(getattr(backend, "value", backend))


def dispatcher_backend(attn: Any) -> str | None:
    """The dispatcher backend an attention module will use: its processor's own
    (``set_attention_backend``), else the globally active one (``attention_backend()`` context,
    ``DIFFUSERS_ATTN_BACKEND``). None for processors that do not call the dispatcher."""
    processor = getattr(attn, "processor", None)
    if processor is None or not diffusers_compat.calls_dispatcher(processor):
        return None
    own = diffusers_compat.processor_backend(processor)
    if own is not None:
        return _backend_name(own)
    active = diffusers_compat.active_backend()
    return _backend_name(active) if active is not None else None


def _backend_error(module_path: str, attn: Any, backend: str | None) -> AttentionBackendError:
    processor = type(getattr(attn, "processor", None)).__name__
    what = f"attention backend {backend!r}" if backend else f"processor {processor}"
    return AttentionBackendError(
        f"attention maps cannot be captured at {module_path!r}: its {what} does not compute attention with "
        f"torch's scaled_dot_product_attention, so the probabilities never exist. Use a backend that does "
        f"({', '.join(sorted(SDPA_BACKENDS))}): `denoiser.set_attention_backend('native')`, or run inside "
        "`with diffusers.attention_backend('native'):`, or unset DIFFUSERS_ATTN_BACKEND; or capture q/k/v "
        "activations instead of maps."
    )


def check_observable(attn: Any, module_path: str) -> None:
    """Raise :class:`AttentionBackendError` when the module's dispatcher backend cannot return maps."""
    backend = dispatcher_backend(attn)
    if backend is not None and backend not in SDPA_BACKENDS:
        raise _backend_error(module_path, attn, backend)


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    return bound


def _dispatched_tensors(layout: TokenLayout, sdpa: dict[str, Any], cross: bool) -> AttentionTensors:
    """The :class:`AttentionTensors` of one SDPA call: the layout says which queries and keys are image and
    text tokens (:meth:`~difffeat.backbones.layout.TokenLayout.attended`)."""
    q, k, v, bias, image, text = layout.attended(sdpa["query"], sdpa["key"], sdpa["value"], sdpa.get("attn_mask"), cross)
    scale = sdpa.get("scale")
    return AttentionTensors(q, k, v, bias, float(scale) if scale is not None else q.shape[-1] ** -0.5, image_keys=image, text_keys=text)


class _SDPAWatch(TorchFunctionMode):
    """Active only while one observed attention module runs: reports its first SDPA call."""

    def __init__(self, observer: "DispatchObserver") -> None:
        super().__init__()
        self.observer = observer

    @torch.compiler.disable  # under torch.compile: a graph break, the observation runs eagerly
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            output = self.observer.saw(_sdpa_arguments(args, kwargs))
            if output is not None:  # the observer computed the attention output itself (see `_fusable`)
                return output
        return func(*args, **kwargs)


class DispatchObserver:
    """Observes one attention module's SDPA call through forward hooks (always removed by :meth:`remove`)."""

    def __init__(self, attn: torch.nn.Module, module_path: str, sink: MapSink, layout: TokenLayout) -> None:
        self.attn, self.module_path, self.sink, self.layout = attn, module_path, sink, layout
        self._watch: _SDPAWatch | None = None
        self._seen = False
        self._handles = [
            attn.register_forward_pre_hook(self._enter),
            attn.register_forward_hook(self._exit, always_call=True),
        ]

    @torch.compiler.disable
    def _enter(self, module, args) -> None:
        check_observable(self.attn, self.module_path)
        self._seen = False
        self._watch = _SDPAWatch(self)
        self._watch.__enter__()

    @torch.compiler.disable
    def _exit(self, module, args, output) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.__exit__(None, None, None)
        if output is not None and not self._seen:
            raise _backend_error(self.module_path, self.attn, dispatcher_backend(self.attn))

    def saw(self, sdpa: dict[str, Any]) -> torch.Tensor | None:
        """Report one SDPA call's tensors to the sink; returns the call's output when the sink computed it
        (:func:`_fusable` calls outside autograd), else None (SDPA then runs as usual)."""
        if self._seen:  # a second call within the same forward (e.g. reference-token attention)
            return None
        self._seen = True
        if sdpa.get("is_causal"):
            raise DifffeatError(f"attention maps of causal attention are not supported ({self.module_path!r})")
        with torch.no_grad():
            tensors = _dispatched_tensors(self.layout, sdpa, bool(getattr(self.attn, "is_cross_attention", False)))
        output = None
        if not torch.is_grad_enabled() and _fusable(sdpa, tensors):
            output = _empty_output(sdpa["query"], sdpa["value"])
        filled = self.sink(self.module_path, self.attn, tensors, output)
        return output if filled else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._watch is not None:
            self._watch.__exit__(None, None, None)
            self._watch = None


class _ProcessorSwap:
    """A legacy processor observer in place of the stock processor until :meth:`remove`."""

    def __init__(self, attn: Any, observer: _Observer) -> None:
        self.attn, self.stock = attn, attn.processor
        attn.set_processor(observer)

    def remove(self) -> None:
        self.attn.set_processor(self.stock)


def install_observer(
    attn: torch.nn.Module, module_path: str, sink: MapSink, layout: TokenLayout
) -> "DispatchObserver | _ProcessorSwap":
    """Observe one attention module: at its SDPA call, or by a legacy processor layout for processors that
    compute attention themselves. Returns a handle whose ``remove()`` restores the module.

    ``layout``: the forward's :class:`~difffeat.backbones.layout.TokenLayout` (built by the family's adapter):
    where the image queries and the image and text keys are in the module's SDPA call.

    Raises:
        AttentionBackendError: the module's attention backend cannot return maps.
    """
    stock = getattr(attn, "processor", None)
    legacy = _OBSERVERS.get(type(stock).__name__)
    if legacy is not None:
        return _ProcessorSwap(attn, legacy(stock, module_path, sink))
    check_observable(attn, module_path)
    return DispatchObserver(attn, module_path, sink, layout)
