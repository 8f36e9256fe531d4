"""Auxiliary cross-attention localisation loss for training the shapes model.

Large text-to-image models learn, from web-scale data, cross-attention in which a noun's map covers the
object it names; GOCA and every training-free segmenter rely on that property. A 6M-parameter UNet trained
for an hour on a CPU does not get there from the denoising loss alone (its attention stays nearly uniform
over the 77 tokens and its text encoder maps every shape word to almost the same vector). This loss adds the
missing pressure: for each shape word in a caption, the token's spatial attention (head mean, per
cross-attention layer) should lie on the pixels of the class it names ("mass") and, in the stricter "match"
form, spread evenly over the whole object (KL from the class mask to the attention distribution).

Only *training-split* masks are used; the quality benchmarks measure the property on held-out scenes. The
shipped model's card says the model was trained with this loss. Training-only: the exported pipeline uses
diffusers' stock attention processors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difffeat.shapes.captions import plural
from difffeat.shapes.world import SHAPE_CLASSES

__all__ = ["install_recorders", "word_class_lookup", "localisation_loss", "LOSS_KINDS", "BACKGROUND"]

LOSS_KINDS = ("mass", "match", "match_pixel")


class AttentionRecorder:
    """Cross-attention processor with the stock math that also keeps the head-mean probabilities (with grad).

    Stores ``[B, N, L]`` (queries x text tokens) under its layer name in ``store``.
    """

    def __init__(self, store: dict[str, torch.Tensor], name: str) -> None:
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):  # noqa: ANN001, ANN204
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [B*h, N, d]
        key = attn.head_to_batch_dim(attn.to_k(context))  # [B*h, L, d]
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*h, N, L]
        self.store[self.name] = probs.view(b, attn.heads, n, -1).mean(1)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))  # [B, N, C]
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_recorders(unet: torch.nn.Module, store: dict[str, torch.Tensor]) -> dict:
    """Put an :class:`AttentionRecorder` on every cross-attention (``attn2``); returns the original processors."""
    original = unet.attn_processors
    unet.set_attn_processor({k: AttentionRecorder(store, k) if ".attn2." in k else v for k, v in original.items()})
    return original


BACKGROUND = len(SHAPE_CLASSES)  # lookup value of the background word: the pixels no object covers


def word_class_lookup(tokenizer, background_word: str | None = None) -> torch.Tensor:  # noqa: ANN001 - CLIPTokenizer
    """``[vocab]`` tensor: class index (0-based, into SHAPE_CLASSES) of each shape-word token id, else -1.

    With ``background_word`` (e.g. ``"background"``), that word's token maps to :data:`BACKGROUND`, so the
    loss also teaches it to attend to the pixels no object covers (what a segmenter's background entity needs).
    """
    lookup = torch.full((len(tokenizer),), -1, dtype=torch.long)
    words = [(c, w) for c, name in enumerate(SHAPE_CLASSES) for w in (name, plural(name))]
    if background_word:
        words.append((BACKGROUND, background_word))
    for c, word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"word {word!r} is not a single token ({ids}); rebuild the tokenizer")
        lookup[ids[0]] = c
    return lookup


def localisation_loss(
    store: dict[str, torch.Tensor],
    ids: torch.Tensor,
    lookup: torch.Tensor,
    masks: torch.Tensor,
    keep: torch.Tensor,
    kind: str = "mass",
) -> torch.Tensor:
    """Mean over layers and (sample, shape-word token) pairs of a per-token localisation loss.

    ``kind="mass"``: ``-log`` of the share of the token's spatial attention mass that lies on its class. It
    is satisfied by a map peaked on a few pixels of the object. ``kind="match"``: KL divergence from the
    class mask, normalised to a distribution over cells, to the token's spatial attention distribution; zero
    only when the map covers the whole object evenly and nothing else, which is what a thresholded map needs.
    ``kind="match_pixel"``: ``"match"`` plus, per layer, the cross-entropy at each cell between the cell's
    class fractions and the caption's named classes' attention renormalised over those classes (a class's
    score is the sum over its tokens), averaged over the cells that named classes cover for at least half and
    over samples that name at least two classes.

    Args:
        store: layer name -> head-mean probabilities ``[B, N, L]`` from :class:`AttentionRecorder`.
        ids: token ids ``[B, L]``.
        lookup: from :func:`word_class_lookup`.
        masks: ``[B, 8, H, W]`` float one-hot class masks at image resolution; the background channel
            (:data:`BACKGROUND`, pixels of no class) is derived from them.
        keep: ``[B]`` bool, which samples take part (e.g. not too noisy).
        kind: ``"mass"`` or ``"match"`` (see above).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown localisation loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    masks = torch.cat([masks, 1 - masks.sum(1, keepdim=True).clamp(max=1)], 1)  # + background channel
    cls = lookup.to(ids.device)[ids]  # [B, L]
    present = masks.flatten(2).amax(-1) > 0  # [B, 8]
    pair = (cls >= 0) & keep[:, None]
    pair &= torch.gather(present, 1, cls.clamp(min=0))  # the word names a class that is in the image
    if not pair.any():
        return masks.new_zeros(())
    b_idx, tok_idx = pair.nonzero(as_tuple=True)
    c_idx = cls[b_idx, tok_idx]
    losses = []
    for probs in store.values():
        res = int(round(probs.shape[1] ** 0.5))
        area = F.adaptive_avg_pool2d(masks, res).flatten(2)  # [B, 8, N]: class fraction of each cell
        spatial = probs[b_idx, :, tok_idx]  # [P, N]
        spatial = spatial / spatial.sum(-1, keepdim=True).clamp_min(1e-12)
        own = area[b_idx, c_idx]  # [P, N]
        if kind == "mass":
            inside = (spatial * own).sum(-1)  # [P]
            losses.append(-torch.log(inside.clamp_min(1e-6)).mean())
        else:
            target = own / own.sum(-1, keepdim=True).clamp_min(1e-12)
            kl = (target * (torch.log(target.clamp_min(1e-12)) - torch.log(spatial.clamp_min(1e-12)))).sum(-1)
            losses.append(kl.mean())
        if kind == "match_pixel":
            losses[-1] = losses[-1] + _pixel_loss(probs, cls, pair, area)
    return torch.stack(losses).mean()


def _pixel_loss(probs: torch.Tensor, cls: torch.Tensor, pair: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Per-cell cross-entropy over the named classes (see :func:`localisation_loss`, ``"match_pixel"``).

    ``probs`` [B, N, L]; ``cls`` [B, L] class per token (-1 none); ``pair`` [B, L] tokens that take part;
    ``area`` [B, C, N] class fraction per cell.
    """
    n_cls = area.shape[1]
    onehot = F.one_hot(cls.clamp(min=0), n_cls).float() * pair[..., None]  # [B, L, C]
    score = torch.bmm(probs, onehot)  # [B, N, C]: attention summed over each class's tokens
    named = onehot.amax(1) > 0  # [B, C]
    tgt = area.transpose(1, 2) * named[:, None, :]  # [B, N, C]
    covered = tgt.sum(-1)  # [B, N]
    cell = (covered >= 0.5) & (named.sum(-1) >= 2)[:, None]
    if not cell.any():
        return probs.new_zeros(())
    tgt = tgt / covered.clamp_min(1e-12)[..., None]
    norm = (score * named[:, None, :]).sum(-1, keepdim=True).clamp_min(1e-12)
    logp = torch.log((score / norm).clamp_min(1e-12))
    ce = -(tgt * logp).sum(-1)  # [B, N]; tgt is 0 on classes the caption does not name
    return ce[cell].mean()
