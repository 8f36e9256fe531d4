"""The auxiliary cross-attention localisation loss and continuing a run with --init-from."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from difffeat.devtools.attention_loss import BACKGROUND, LOSS_KINDS, install_recorders, localisation_loss, word_class_lookup
from difffeat.shapes.models import ModelConfig, build_unet
from difffeat.devtools.train_shapes import TrainConfig, init_from_run, load_checkpoint, make_tokenizer, train
from difffeat.shapes.world import SHAPE_CLASSES

TOY = ModelConfig(vae_channels=(8, 16, 16), unet_channels=(16, 32, 32), norm_groups=8, text_hidden=32, text_intermediate=64)


def test_recorder_keeps_the_stock_output_and_records_probabilities() -> None:
    torch.manual_seed(0)
    unet = build_unet(TOY).eval()
    z, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=ctx).sample
    store: dict[str, torch.Tensor] = {}
    original = install_recorders(unet, store)
    n_cross = sum(".attn2." in k for k in original)  # (set_attn_processor empties the dict it is given)
    try:
        with torch.no_grad():
            out = unet(z, t, encoder_hidden_states=ctx).sample
    finally:
        unet.set_attn_processor(original)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(store) == n_cross == 2 + 1 + 4  # down, mid, up cross-attention layers
    for probs in store.values():  # [B, N, L]: head mean of softmax rows
        assert probs.shape[0] == 2 and probs.shape[2] == 7
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))


def test_lookup_maps_singular_and_plural_shape_words() -> None:
    tok = make_tokenizer(TOY)
    lookup = word_class_lookup(tok)
    for c, name in enumerate(SHAPE_CLASSES):
        assert lookup[tok(name, add_special_tokens=False).input_ids[0]] == c
    assert lookup[tok("red", add_special_tokens=False).input_ids[0]] == -1
    assert int((lookup >= 0).sum()) == 2 * len(SHAPE_CLASSES)
    with_bg = word_class_lookup(tok, "background")
    assert with_bg[tok("background", add_special_tokens=False).input_ids[0]] == BACKGROUND
    assert int((with_bg >= 0).sum()) == 2 * len(SHAPE_CLASSES) + 1


def _loop_loss(store, ids, lookup, masks, keep, kind="mass") -> torch.Tensor:
    """Straightforward per-pair loops: the reference for the vectorised loss."""
    per_layer = []
    background = (masks.amax(1, keepdim=True) == 0).float()  # pixels of no object
    masks = torch.cat([masks, background], 1)
    for probs in store.values():
        res = int(math.isqrt(probs.shape[1]))
        terms = []
        for b in range(ids.shape[0]):
            for p in range(ids.shape[1]):
                c = int(lookup[ids[b, p]])
                if c < 0 or not keep[b] or masks[b, c].sum() == 0:
                    continue
                cell = masks[b, c].reshape(res, masks.shape[2] // res, res, masks.shape[3] // res).mean((1, 3)).flatten()
                spatial = probs[b, :, p] / probs[b, :, p].sum()
                if kind == "mass":
                    terms.append(-torch.log((spatial * cell).sum()))
                else:  # KL(mask distribution || attention distribution), written out term by term
                    q = cell / cell.sum()
                    terms.append(sum(q[i] * torch.log(q[i] / spatial[i]) for i in range(len(q)) if q[i] > 0))
        per_layer.append(torch.stack(terms).mean())
    return torch.stack(per_layer).mean()


def test_localisation_loss_matches_loops_and_its_limits() -> None:
    g = torch.Generator().manual_seed(0)
    lookup = torch.full((20,), -1)
    lookup[5], lookup[6], lookup[7] = 0, 1, 2  # token ids 5, 6, 7 name classes 0, 1, 2
    masks = torch.zeros(2, 8, 16, 16)
    masks[0, 0, :8, :8] = 1
    masks[0, 1, 8:, 8:] = 1
    masks[1, 2, 4:12, 4:12] = 1
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 7, 5, 2, 2]])  # class 2 absent in image 0, class 0 absent in image 1
    store = {f"l{r}": torch.rand(2, r * r, 5, generator=g).softmax(-1) for r in (8, 4)}
    keep = torch.tensor([True, True])
    loss = localisation_loss(store, ids, lookup, masks, keep)
    torch.testing.assert_close(loss, _loop_loss(store, ids, lookup, masks, keep))
    # only sample 1 kept -> only its pair counts
    keep1 = torch.tensor([False, True])
    torch.testing.assert_close(localisation_loss(store, ids, lookup, masks, keep1), _loop_loss(store, ids, lookup, masks, keep1))
    # a token whose map lies exactly on its object scores 0; a uniform map scores -log(area fraction)
    perfect = torch.full((1, 64, 2), 1e-9)
    perfect[0, :, 1] = masks[0:1, 0].reshape(1, 8, 2, 8, 2).mean((2, 4)).flatten()
    uniform = torch.ones(1, 64, 2)
    one_ids = torch.tensor([[1, 5]])
    assert localisation_loss({"a": perfect}, one_ids, lookup, masks[:1], keep[:1]).item() == pytest.approx(0.0, abs=1e-5)
    assert localisation_loss({"a": uniform}, one_ids, lookup, masks[:1], keep[:1]).item() == pytest.approx(-math.log(0.25))
    # "match": KL to the mask distribution; loops agree, an even map over the object scores 0, a map peaked on
    # one object pixel (which "mass" scores 0) is penalised, and a uniform map scores log(1 / area fraction)
    for k in (keep, keep1):
        torch.testing.assert_close(localisation_loss(store, ids, lookup, masks, k, "match"),
                                   _loop_loss(store, ids, lookup, masks, k, "match"))  # fmt: skip
    assert localisation_loss({"a": perfect}, one_ids, lookup, masks[:1], keep[:1], "match").item() == pytest.approx(0.0, abs=1e-5)
    peaked = torch.full((1, 64, 2), 1e-9)
    peaked[0, 0, 1] = 1.0
    assert localisation_loss({"a": peaked}, one_ids, lookup, masks[:1], keep[:1], "mass").item() == pytest.approx(0.0, abs=1e-5)
    assert localisation_loss({"a": peaked}, one_ids, lookup, masks[:1], keep[:1], "match").item() > 2.0
    assert localisation_loss({"a": uniform}, one_ids, lookup, masks[:1], keep[:1], "match").item() == pytest.approx(-math.log(0.25))
    with pytest.raises(ValueError, match="unknown localisation loss kind"):
        localisation_loss(store, ids, lookup, masks, keep, "l2")
    # the background word (lookup value BACKGROUND) is scored against the pixels no object covers
    lookup_bg = lookup.clone()
    lookup_bg[8] = BACKGROUND
    ids_bg = torch.tensor([[1, 5, 8, 2, 2], [1, 8, 7, 2, 2]])
    for kind in ("mass", "match"):
        torch.testing.assert_close(localisation_loss(store, ids_bg, lookup_bg, masks, keep, kind),
                                   _loop_loss(store, ids_bg, lookup_bg, masks, keep, kind))  # fmt: skip
    on_bg = torch.full((1, 64, 2), 1e-9)
    on_bg[0, :, 1] = 1 - masks[0:1, :2].sum(1).reshape(1, 8, 2, 8, 2).mean((2, 4)).flatten()
    assert localisation_loss({"a": on_bg}, torch.tensor([[1, 8]]), lookup_bg, masks[:1], keep[:1], "match").item() == pytest.approx(0.0, abs=1e-5)
    # no shape word of the image in the prompt -> zero loss, no NaN
    assert localisation_loss(store, torch.tensor([[1, 2, 2, 2, 2], [1, 2, 2, 2, 2]]), lookup, masks, keep).item() == 0.0


def test_init_from_continues_a_run_with_the_attention_loss(tmp_path: Path) -> None:
    base = TrainConfig(out=str(tmp_path / "a"), model=TOY, n_train=24, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4,
                       warmup=1, log_every=1, threads=1, decoder_steps=1)  # fmt: skip
    first = train(base)
    cont = TrainConfig(**{**base.__dict__, "out": str(tmp_path / "b"), "unet_steps": 3, "attn_loss_weight": 0.5,
                          "attn_loss_max_t": 1000, "decoder_steps": 0, "init_from": str(tmp_path / "a")})  # fmt: skip
    state = init_from_run(tmp_path / "a", cont)
    assert state["step"] == 0 and "opt" not in state and state["init"][0]["unet_steps"] == 2
    for name, val in first["unet"].items():
        torch.testing.assert_close(state["unet"][name], val)
    done = train(cont, resume=True)
    assert done["step"] == 3
    log = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert all('"attn_loss"' in line for line in log if '"stage": "unet"' in line)
    changed = any(not torch.equal(done["unet"][k], first["unet"][k]) for k in first["unet"])
    assert changed
    with pytest.raises(FileExistsError):
        init_from_run(tmp_path / "a", cont)
    with pytest.raises(RuntimeError, match="no UNet-stage checkpoint"):
        init_from_run(tmp_path / "nowhere", TrainConfig(out=str(tmp_path / "c"), model=TOY))
    assert load_checkpoint(tmp_path / "b")["init"][0]["run"] == str(tmp_path / "a")


def _loop_pixel_term(probs: torch.Tensor, ids: torch.Tensor, lookup: torch.Tensor, masks: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Straightforward per-cell cross-entropy over the named classes (sum of each class's tokens)."""
    full = torch.cat([masks, 1 - masks.sum(1, keepdim=True).clamp(max=1)], 1)
    res = int(round(probs.shape[1] ** 0.5))
    area = torch.nn.functional.adaptive_avg_pool2d(full, res).flatten(2)  # [B, C, N]
    terms = []
    for b in range(len(ids)):
        if not keep[b]:
            continue
        toks = {}
        for j, tid in enumerate(ids[b].tolist()):
            c = int(lookup[tid])
            if c >= 0 and full[b, c].max() > 0:
                toks.setdefault(c, []).append(j)
        if len(toks) < 2:
            continue
        classes = sorted(toks)
        for n in range(probs.shape[1]):
            fr = [float(area[b, c, n]) for c in classes]
            if sum(fr) < 0.5:
                continue
            sc = [float(sum(probs[b, n, j] for j in toks[c])) for c in classes]
            terms.append(-sum(f / sum(fr) * math.log(x / sum(sc)) for f, x in zip(fr, sc, strict=True)))
    return torch.tensor(sum(terms) / len(terms)) if terms else torch.tensor(0.0)


def test_match_pixel_adds_a_per_cell_class_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    lookup = torch.full((20,), -1)
    lookup[5], lookup[6], lookup[7], lookup[8] = 0, 1, 2, BACKGROUND
    masks = torch.zeros(2, 8, 16, 16)
    masks[0, 0, :8, :8] = 1
    masks[0, 1, 8:, 8:] = 1
    masks[1, 2, 4:12, 4:12] = 1
    ids = torch.tensor([[1, 5, 6, 5, 8], [1, 7, 8, 2, 2]])  # class 0 named twice; background word in both
    keep = torch.tensor([True, True])
    store = {f"l{r}": torch.rand(2, r * r, 5, generator=g).softmax(-1) for r in (8, 4)}
    both = localisation_loss(store, ids, lookup, masks, keep, "match_pixel")
    match = localisation_loss(store, ids, lookup, masks, keep, "match")
    pixel = torch.stack([_loop_pixel_term(p, ids, lookup, masks, keep) for p in store.values()]).mean()
    torch.testing.assert_close(both, match + pixel.float(), rtol=1e-4, atol=1e-5)
    # a map that gives each cell to its own class beats the same maps with the two object tokens swapped
    area = torch.cat([masks, 1 - masks.sum(1, keepdim=True)], 1)[:1].reshape(1, 9, 8, 2, 8, 2).mean((3, 5)).flatten(2)
    right = torch.full((1, 64, 5), 1e-3)
    right[0, :, 1], right[0, :, 2], right[0, :, 4] = area[0, 0], area[0, 1], area[0, 8]
    wrong = right[:, :, [0, 2, 1, 3, 4]]
    one = torch.tensor([[1, 5, 6, 3, 8]])
    assert localisation_loss({"a": right}, one, lookup, masks[:1], keep[:1], "match_pixel") < 0.1
    assert localisation_loss({"a": wrong}, one, lookup, masks[:1], keep[:1], "match_pixel") > 2.0
