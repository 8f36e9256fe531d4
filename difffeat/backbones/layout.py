"""Where the image and text tokens sit in a denoiser's sequences: the :class:`TokenLayout` of one forward.

Every family's adapter builds one with its denoiser inputs (:meth:`~difffeat.backbones.Backbone.layout`), from
the family's class-level layout (its ``token_layout``: which block comes first in joint sequences, block
padding, per-sample packing) and the forward's geometry (token grid, text length, per-sample offsets). Capture
and the attention observers read token positions from it and from nothing else, so a family with a new
sequence layout brings it in its adapter and edits nothing under ``difffeat/capture``.

The layouts a denoiser's sequences can have:

- image only: ``h*w`` image tokens, or fewer at a downsampled level (UNets);
- cross-attention: image queries, every key a text token;
- joint: one sequence of image and text tokens, ``image-first`` (``[image, text]``) or ``text-first``
  (``[text, image]``);
- joint with padded blocks (``block_multiple``): each block rounded up to a multiple of tokens with padding
  tokens that are attended to but are neither image nor text (``[image, pad, text, pad]``);
- joint packed per sample (``packed``): sample ``b`` holds its unpadded text, its image tokens from
  ``image_offsets[b]`` on, then padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch

__all__ = ["TokenLayout", "TokenOrder", "AttendedTokens", "padded_length"]

TokenOrder = Literal["image-first", "text-first"]


def padded_length(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


class AttendedTokens(NamedTuple):
    """One SDPA call seen through a layout: the image queries and every key the layer attends to.

    ``q``: ``[B, heads, Nq, d]`` image queries; ``k``/``v``: ``[B, heads, Nk, d]`` keys/values (grouped-query
    keys repeated to the query heads); ``bias``: additive bias broadcastable to ``[B, heads, Nq, Nk]`` or
    None; ``image_keys``/``text_keys``: where the image and text keys are in ``k`` (None when absent)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None
    image_keys: slice | None
    text_keys: slice | None


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """The token layout of a family's sequences, and (once :meth:`at` a forward) of one forward's.

    Attributes:
        order: where the image tokens sit in a joint sequence: ``"image-first"`` or ``"text-first"``.
        block_multiple: each block of a joint sequence (image, text) is padded to a multiple of this many
            tokens (1: no padding); the image block then has :attr:`image_block` tokens, the image first.
        packed: joint sequences are packed per sample (text first): sample ``b``'s image tokens start at
            ``image_offsets[b]``; without offsets they are read as the last tokens (true for one sample).
        grid: ``(h, w)`` of the image-token grid at the denoiser's input; ``h*w`` image tokens.
        text_len: the text-key columns of every cross map of this forward. Where the text block's length
            varies with the prompt (padded blocks, packed sequences) the keys are laid out over this many
            slots, those past a prompt's text getting zero probability, so every prompt gives one width.
        image_offsets: ``[B]`` first image token of each sample in a packed joint sequence, or None.
    """

    order: TokenOrder = "image-first"
    block_multiple: int = 1
    packed: bool = False
    grid: tuple[int, int] | None = None
    text_len: int | None = None
    image_offsets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.order not in ("image-first", "text-first"):
            raise ValueError(f"bad token order {self.order!r}: use 'image-first' or 'text-first'")
        if isinstance(self.block_multiple, bool) or not isinstance(self.block_multiple, int) or self.block_multiple < 1:
            raise ValueError(f"bad block_multiple {self.block_multiple!r}: use a positive integer (1: no padding)")
        if self.packed and self.order != "text-first":
            raise ValueError("packed joint sequences hold each sample's text first: use order='text-first'")

    def at(
        self, grid: tuple[int, int], text_len: int | None = None, image_offsets: torch.Tensor | None = None
    ) -> "TokenLayout":
        """This layout for one forward: its token grid, text length and (packed layouts) per-sample offsets."""
        return replace(self, grid=(int(grid[0]), int(grid[1])), text_len=text_len, image_offsets=image_offsets)

    # ------------------------------------------------------------------ geometry
    @property
    def text_first(self) -> bool:
        return self.order == "text-first"

    @property
    def n_image(self) -> int:
        """Image tokens at the input grid."""
        if self.grid is None:
            raise ValueError("this TokenLayout has no grid: call .at(grid, ...) first")
        return self.grid[0] * self.grid[1]

    @property
    def image_block(self) -> int:
        """Tokens of the image block of a joint sequence (the image tokens and their padding)."""
        return padded_length(self.n_image, self.block_multiple)

    def padded_text(self, n_text: int) -> int:
        """Tokens of a text block of ``n_text`` tokens once padded."""
        return padded_length(n_text, self.block_multiple)

    # ------------------------------------------------------------------ sequence activations
    def image_tokens(self, x_bnc: torch.Tensor, joint: bool) -> torch.Tensor:
        """The image tokens ``[B, n, C]`` of a sequence activation ``[B, N, C]``.

        ``joint=False``: the sequence holds image tokens only (all of them, or a downsampled level's fewer);
        returned unchanged. ``joint=True``: it is a joint sequence and the image tokens are taken where the
        layout puts them: the first ``h*w`` (image-first, padding after them), the last ``h*w`` (text-first),
        or each sample's ``h*w`` from its offset (packed)."""
        if not joint:
            return x_bnc
        n = self.n_image
        if not self.text_first:
            return x_bnc[:, :n]
        if self.packed and self.image_offsets is not None:
            b, _, c = x_bnc.shape
            offsets = self.image_offsets.to(device=x_bnc.device, dtype=torch.long).view(b, 1)
            idx = offsets + torch.arange(n, device=x_bnc.device)
            return x_bnc.gather(1, idx.unsqueeze(-1).expand(b, n, c))
        return x_bnc[:, -n:]

    # ------------------------------------------------------------------ attention calls
    def attended(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cross: bool = False,
    ) -> AttendedTokens:
        """One SDPA call's image queries and keys (``[B, heads, N, d]`` each).

        A call with as many queries as keys is self-attention over the image tokens while its sequence fits
        the image block (a UNet's lower levels have fewer tokens; padded blocks add padding), unless the
        module is a cross-attention (``cross``); with more, it is joint attention laid out as the layout says.
        A call with a different number of keys is cross-attention: every key is text. Grouped-query
        keys/values are repeated to the query heads.

        Padded blocks: the first ``h*w`` tokens are the image (queries and self keys); the padding after them
        is attended to but is neither image nor text; the text keys start after the image block and are
        padded to :attr:`text_len` columns of zero probability. Packed per sample: see :meth:`_packed`."""
        nq, nk, heads = query.shape[-2], key.shape[-2], query.shape[1]
        n_image = self.n_image
        if self.packed and self.image_offsets is not None and nq == nk and nq > n_image and not cross:
            return self._packed(query, key, value, self.text_len or nk - n_image)
        if key.shape[1] != heads:  # grouped-query attention (enable_gqa)
            key = key.repeat_interleave(heads // key.shape[1], dim=1)
            value = value.repeat_interleave(heads // value.shape[1], dim=1)
        n_block = self.image_block
        if nq != nk or (nq <= n_image and cross):
            rows, image, text = slice(0, nq), None, slice(0, nk)
        elif nq <= n_block:  # self-attention over the image tokens (fewer at a lower level; padded blocks)
            rows = image = slice(0, min(nq, n_image))
            text = None
        elif self.text_first:
            n_text = nk - n_image
            rows = image = slice(n_text, nk)
            text = slice(0, n_text)
        else:
            rows = image = slice(0, n_image)
            text = slice(n_block, nk)
        bias = _additive_bias(attn_mask, rows, nq)
        text_len = self.text_len
        if self.block_multiple > 1 and text_len is not None and text is not None and text.stop == nk and text.stop - text.start < text_len:
            key, value, bias = _pad_keys(key, value, bias, text_len - (text.stop - text.start))
            text = slice(text.start, text.start + text_len)
        return AttendedTokens(query[:, :, rows], key, value, bias, image, text)

    def _packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_len: int) -> AttendedTokens:
        """A joint call packed per sample: sample b holds its ``image_offsets[b]`` unpadded text tokens, then its
        ``h*w`` image tokens, then padding. Keys and values are gathered into one layout for all samples,
        ``[text (text_len slots), image]``, the text slots past a sample's own text masked (-inf bias, zero
        probability), so maps have the same width for every prompt and a batch equals its single runs. The
        layer's padding keys (masked there) are left out; its softmax over the remaining keys is unchanged."""
        b, heads, n, d = query.shape
        n_image = self.n_image
        dev = query.device
        offsets = self.image_offsets.to(device=dev, dtype=torch.long).view(b, 1)
        image_idx = offsets + torch.arange(n_image, device=dev).view(1, n_image)  # [B, n_image]
        slots = torch.arange(text_len, device=dev).view(1, text_len)
        text_idx = slots.clamp(max=n - 1).expand(b, text_len)  # [B, text_len]; slots past the text are masked below
        keys_idx = torch.cat([text_idx, image_idx], dim=1)

        def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            if x.shape[1] != heads:  # grouped-query attention (enable_gqa)
                x = x.repeat_interleave(heads // x.shape[1], dim=1)
            return x.gather(2, idx.view(b, 1, -1, 1).expand(b, heads, idx.shape[1], d))

        bias = torch.zeros(b, 1, 1, text_len + n_image, device=dev)
        bias[:, 0, 0, :text_len] = bias[:, 0, 0, :text_len].masked_fill(slots >= offsets, float("-inf"))
        return AttendedTokens(
            gather(query, image_idx), gather(key, keys_idx), gather(value, keys_idx), bias,
            slice(text_len, text_len + n_image), slice(0, text_len),
        )  # fmt: skip


def _additive_bias(mask: torch.Tensor | None, rows: slice, nq: int) -> torch.Tensor | None:
    """An SDPA ``attn_mask`` (bool: True = attend, or additive) -> additive bias ``[B|1, H|1, q|1, Nk]``
    restricted to the query ``rows``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    return mask[..., rows, :] if mask.shape[-2] == nq and nq > 1 else mask


def _pad_keys(key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, width: int):
    """Append ``width`` keys that no query can attend to: zero keys/values with a ``-inf`` bias, so the
    probabilities over the real keys are unchanged and the extra columns are exactly 0."""
    b, h, nk, d = key.shape
    key = torch.cat([key, key.new_zeros(b, h, width, d)], dim=2)
    value = torch.cat([value, value.new_zeros(b, value.shape[1], width, value.shape[-1])], dim=2)
    if bias is None:
        bias = torch.zeros(1, 1, 1, nk, dtype=torch.float32, device=key.device)
    blocked = torch.full((*bias.shape[:-1], width), float("-inf"), dtype=bias.dtype, device=bias.device)
    return key, value, torch.cat([bias, blocked], dim=-1)
