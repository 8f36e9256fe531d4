"""Attention kernels of the observer's "lse" path: the layer's output from torch's fused CPU flash-attention
kernel, which also returns each query row's log-sum-exp, and the probabilities of a chunk of query rows from
that log-sum-exp with one matmul and one exp (no softmax, no ``probabilities @ V``).

The explicit path (:func:`~difffeat.capture.observer.softmax_probs`, then ``probabilities @ V``) stays the
reference; these functions return None where the fused kernel does not apply (not on CPU, an older torch
without the op, a row whose every key is masked), and the observer then takes the explicit path.

Also here: :func:`dense_linear`, the float32 ``x @ w^T`` of GOCA's head weights, by oneDNN on the CPU.
"""

from __future__ import annotations

import torch

__all__ = ["flash_output_and_lse", "probs_from_lse", "dense_linear"]

#: torch's oneDNN linear op (inductor's CPU linear kernel), or None where torch was built without oneDNN
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None

#: torch's CPU flash-attention op returning ``(output, logsumexp)`` (torch >= 2.3); None on older torch
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def flash_output_and_lse(
    q_bhqd: torch.Tensor, k_bhkd: torch.Tensor, v_bhkd: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Scaled dot-product attention and its log-sum-exp, by torch's fused CPU flash-attention kernel (float32):

    ``O = softmax(s Q K^T + B) V`` (``[B, heads, Nq, d_v]``) and ``lse_i = log sum_j exp(s q_i.k_j + B_ij)``
    (``[B, heads, Nq]``), ``s`` = ``scale``, ``B`` = ``bias`` (additive, broadcastable to
    ``[B, heads, Nq, Nk]``, or None; checked at its own, usually broadcast, size).

    Returns None where the kernel does not apply: tensors not on the CPU, torch without the op, or a bias
    that masks every key of some query row (the kernel returns 0 there, softmax NaN: the explicit path
    decides what such a row holds).
    """
    if _FLASH_CPU is None or q_bhqd.device.type != "cpu":
        return None
    mask = None
    if bias is not None:
        mask = bias.float()
        while mask.ndim < 4:
            mask = mask.unsqueeze(0)
        if torch.isneginf(mask).all(dim=-1).any():  # the kernel returns lse 0 and output 0 for such a row
            return None
    out, lse = _FLASH_CPU(q_bhqd.float(), k_bhkd.float(), v_bhkd.float(), 0.0, False, attn_mask=mask, scale=scale)
    return out, lse


def probs_from_lse(
    q_bhqd: torch.Tensor, kt_bhdk: torch.Tensor, bias: torch.Tensor | None, lse_bhq: torch.Tensor
) -> torch.Tensor:
    """Softmax attention probabilities of a chunk of query rows from their log-sum-exp:
    ``P_ij = exp(q_i.k_j + B_ij - lse_i)`` (``q`` already scaled, ``kt`` = ``K^T``), float32
    ``[B, heads, q, Nk]``; equal to ``softmax(q K^T + B)`` to float32 rounding of ``lse``."""
    logits = torch.matmul(q_bhqd, kt_bhdk)
    if bias is not None:
        logits = logits + bias.float()
    logits.sub_(lse_bhq.unsqueeze(-1))
    return logits.exp_()  # in place: the logits are this chunk's own tensor


def dense_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w^T`` (``x`` ``[..., n]``, ``w`` ``[m, n]``), float32, by oneDNN's matmul on the CPU where torch has
    it, else ``torch.matmul``. Both are float32 products (no reduced-precision mode); oneDNN is used because
    torch's ``mm`` takes MKL's sgemm, which on the project's AMD EPYC CPU ran a [4096, 320] x [320, 320] product
    at ~30 GFLOP/s against oneDNN's ~70 (one thread)."""
    if (_ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and type(x) is torch.Tensor and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return _ONEDNN_LINEAR(x, w, None, "none", [], "")
    return torch.matmul(x, w.transpose(-1, -2))
