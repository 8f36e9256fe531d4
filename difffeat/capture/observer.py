"""Attention observers: processors installed through diffusers' processor mechanism on the selected
attention modules only. Each computes the attention probabilities of the *image queries* (what was asked:
per-head maps, head-mean maps, or a custom reduction), hands them to the capture session, and delegates
the layer's real output to the stock processor it replaced. Diffusers source is never modified.

A *layout* knows how one family of stock processors forms queries and keys (projections, q/k norms,
RoPE, the order of image and text tokens in joint attention); layouts are registered by the stock
processor's class name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import DifffeatError

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "AttentionTensors",
    "MapReducer",
    "observer_for",
    "register_layout",
    "head_mean",
    "per_head",
    "attention_probs",
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
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    image_keys: slice | None
    text_keys: slice | None


class MapReducer(Protocol):
    """Reduces the probabilities of a chunk of query rows. ``probs_bhqk`` is ``[B, heads, q, K]`` restricted
    to the requested keys; ``rows`` is the slice of query rows; ``full_probs_bhqk`` has every key (needed by
    reductions that use the layer's output, such as GOCA's head weights)."""

    def __call__(
        self, probs_bhqk: torch.Tensor, *, attn: Any, tensors: AttentionTensors, rows: slice, full_probs_bhqk: torch.Tensor
    ) -> torch.Tensor: ...


def per_head(probs_bhqk: torch.Tensor, **_: Any) -> torch.Tensor:
    """Keep every head: ``[B, heads, q, K]``."""
    return probs_bhqk


def head_mean(probs_bhqk: torch.Tensor, **_: Any) -> torch.Tensor:
    """Mean over heads: ``[B, q, K]``."""
    return probs_bhqk.mean(dim=1)


def attention_probs(
    tensors: AttentionTensors,
    keys: str,
    reducer: MapReducer,
    attn: Any,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Softmax attention probabilities of the image queries (float32), reduced chunk by chunk.

    ``keys``: "cross" keeps the text-key columns, "self" the image-key columns, "all" every column. The
    softmax always runs over *all* keys the layer attends to (for joint attention the cross block is
    therefore not normalised over text alone).
    """
    q, k = tensors.q, tensors.k
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    cols = {"cross": tensors.text_keys, "self": tensors.image_keys, "all": slice(0, nk)}[keys]
    if cols is None:
        raise DifffeatError(f"this attention layer has no {keys} keys")
    rows_per_chunk = max(1, chunk_elements // max(1, b * h * nk))
    q_scaled = q.float() * tensors.scale  # scaling the [.., d] queries, not the [.., keys] logits
    kt = k.float().transpose(-1, -2)
    out = None  # [..., nq, K] filled chunk by chunk: no list of pieces and no concatenated copy
    for start in range(0, nq, rows_per_chunk):
        rows = slice(start, min(nq, start + rows_per_chunk))
        logits = torch.matmul(q_scaled[:, :, rows], kt)
        if tensors.bias is not None:
            bias = tensors.bias
            if bias.shape[-2] != 1:
                bias = bias[..., rows, :]
            logits = logits + bias.float()
        full = logits.softmax(dim=-1)
        reduced = reducer(full[..., cols], attn=attn, tensors=tensors, rows=rows, full_probs_bhqk=full)
        if out is None:
            out = reduced.new_empty((*reduced.shape[:-2], nq, reduced.shape[-1]))
        out[..., rows, :] = reduced
    return out


# --------------------------------------------------------------------------- layouts
def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, heads*d]`` -> ``[B, heads, N, d]``."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _standard(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, n_image=None, **_) -> AttentionTensors:
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


def _joint_image_first(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, n_image=None, **_) -> AttentionTensors:
    """SD3 ``JointAttnProcessor2_0``: keys are [image, text]."""
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


def _flux(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, n_image=None, **_) -> AttentionTensors:
    """FLUX ``FluxAttnProcessor``: keys are [text, image]; RoPE over the whole sequence. Single-stream blocks
    pass the concatenated [text, image] sequence as ``hidden_states``; the last ``n_image`` tokens are image."""
    from diffusers.models.embeddings import apply_rotary_emb

    d = attn.head_dim
    q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, d)))
    k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, d)))
    v = attn.to_v(hidden_states).unflatten(-1, (-1, d))
    if encoder_hidden_states is not None:
        tq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, d)))
        tk = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, d)))
        tv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, d))
        q, k, v = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    total = k.shape[1]
    n_img = n_image if n_image is not None else hidden_states.shape[1]
    n_txt = total - n_img
    q, k, v = q[:, n_txt:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bias = None
    if attention_mask is not None:
        bias = attention_mask if attention_mask.dtype != torch.bool else torch.zeros_like(attention_mask, dtype=q.dtype).masked_fill(~attention_mask, float("-inf"))
        bias = bias[..., n_txt:, :] if bias.shape[-2] == total else bias
    return AttentionTensors(q, k, v, bias, d**-0.5, image_keys=slice(n_txt, total), text_keys=slice(0, n_txt) if n_txt else None)


# --------------------------------------------------------------------------- observers
MapSink = Callable[[str, Any, AttentionTensors], None]


class _Observer:
    """Common part: compute tensors, report them, then run the stock processor for the real output."""

    layout: Callable[..., AttentionTensors]

    def __init__(self, stock: Any, module_path: str, sink: MapSink, n_image: int | None) -> None:
        self.stock = stock
        self.module_path = module_path
        self.sink = sink
        self.n_image = n_image

    def _observe(self, attn, hidden_states, encoder_hidden_states, attention_mask, extra: dict) -> None:
        with torch.no_grad():
            tensors = type(self).layout(
                attn, hidden_states, encoder_hidden_states, attention_mask, n_image=self.n_image, **extra
            )
        self.sink(self.module_path, attn, tensors)


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


class FluxObserver(_Observer):
    layout = staticmethod(_flux)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        out = self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self._observe(attn, hidden_states, encoder_hidden_states, attention_mask, {"image_rotary_emb": image_rotary_emb})
        return out


_OBSERVERS: dict[str, type[_Observer]] = {}


def register_layout(observer_cls: type[_Observer], *stock_processor_names: str) -> None:
    """Register an observer class for stock processors with these class names."""
    for name in stock_processor_names:
        _OBSERVERS[name] = observer_cls


register_layout(StandardObserver, "AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU")
register_layout(JointObserver, "JointAttnProcessor2_0", "XFormersJointAttnProcessor")
register_layout(FluxObserver, "FluxAttnProcessor", "FluxAttnProcessor2_0")


def observer_for(stock: Any, module_path: str, sink: MapSink, n_image: int | None) -> _Observer:
    """An observer wrapping the stock processor of one attention module."""
    name = type(stock).__name__
    cls = _OBSERVERS.get(name)
    if cls is None:
        raise DifffeatError(
            f"attention maps cannot be captured at {module_path!r}: its processor {name} is not supported "
            f"(supported: {', '.join(sorted(_OBSERVERS))}). Reset it with `denoiser.set_default_attn_processor()` "
            "or capture q/k/v instead of maps."
        )
    return cls(stock, module_path, sink, n_image)
