"""Quality figures of the shapes model (generation, probe features, cross-attention localisation).

Usage::

    python benchmarks/shapes_model_quality.py --model difffeat/weights/shapes --out results.json

Four measurements, all on scenes the model never saw (``val``/``test`` splits of the shapes world):

1. **Generation sanity** - for single-shape captions ("a red star on a white background") generate with DDIM
   and mild guidance; cut the object out by colour (pixels nearer the named object colour than the named,
   strongly contrasting background colour) and classify the silhouette with a tiny CNN trained on the
   world's own single-object masks; report the hit rate per class.
2. **Semantic features** - UNet activations at a small timestep (up-path block outputs, upsampled to 64x64,
   concatenated) -> per-pixel linear softmax probe fit on ``train`` scenes, scored on ``test`` scenes
   (9-way pixel accuracy); the same probe on a random-weight UNet + text encoder as the baseline. Two
   feature selections (``FEATURE_SETS``), extracted with ``difffeat.FeatureExtractor`` by activation name.
3. **Cross-attention meaning** - softmax(QK^T/sqrt(d)) of every cross-attention layer, averaged over heads
   and layers, per shape-word token; min-max normalised per image, thresholded at a value chosen on ``val``,
   IoU against that shape's mask on ``test``.
4. **Autoencoder** - mean absolute error (0-255 units) of decode(posterior mean) on the ``test`` scenes,
   overall and on object pixels.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import difffeat
from difffeat.io import write_json

from difffeat.capture import head_mean
from difffeat.evaluate.probe import probe_score
from difffeat.segment.prompts import build_layout
from difffeat.shapes.captions import list_prompt
from difffeat.shapes.world import COLOURS, SHAPE_CLASSES, ShapeSample, sample

log = logging.getLogger("shapes_model_quality")


@dataclass
class BenchConfig:
    """Sizes and settings of the benchmark (defaults = the figures in the model card)."""

    gen_per_class: int = 8
    gen_steps: int = 40
    gen_guidance: float = 3.0
    gen_guidance_extra: tuple[float, ...] = ()  # further guidance scales reported beside the main one
    clf_train_scenes: int = 12_000  # train-split indices scanned for single-object scenes
    clf_steps: int = 1500
    probe_train: int = 200
    probe_test: int = 200
    probe_t: int = 75
    probe_pixels_per_image: int = 512
    attn_val: int = 100
    attn_test: int = 200
    attn_timesteps: tuple[int, ...] = (50, 100, 200, 400)
    seed: int = 0


# ------------------------------------------------------------------------------------ 1. generation check
class TinyShapeClassifier(torch.nn.Module):
    """A small CNN on binary silhouettes: [B, 1, 64, 64] -> 8 shape classes (max-pooled, so position-free)."""

    def __init__(self) -> None:
        super().__init__()
        chans = [1, 32, 64, 96, 128]
        layers: list[torch.nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU()]
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(chans[-1], len(SHAPE_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 64, 64] -> [B, 8]
        return self.head(self.features(x).amax(dim=(2, 3)))


def _single_object_scenes(split: str, n_scan: int) -> list[ShapeSample]:
    return [s for s in (sample(split, i) for i in range(n_scan)) if len(s.instances) == 1]


def _silhouettes(scenes: list[ShapeSample]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.mask > 0 for s in scenes])).float()[:, None]  # [B, 1, 64, 64]


def silhouette(images: torch.Tensor, object_rgb: tuple[int, int, int], background_rgb: tuple[int, int, int]) -> torch.Tensor:
    """Binary object mask of generated ``[B, 3, H, W]`` images in [0, 1]: pixels nearer the named object
    colour than the named background colour."""
    obj = torch.tensor(object_rgb, dtype=torch.float32).view(1, 3, 1, 1) / 255
    bg = torch.tensor(background_rgb, dtype=torch.float32).view(1, 3, 1, 1) / 255
    return ((images - obj).norm(dim=1, keepdim=True) < (images - bg).norm(dim=1, keepdim=True)).float()


def train_classifier(pipe, cfg: BenchConfig) -> tuple[TinyShapeClassifier, float]:  # noqa: ANN001
    """Fit the silhouette classifier on single-object ``train`` masks; returns (model, ``val`` accuracy)."""
    train = _single_object_scenes("train", cfg.clf_train_scenes)
    val = _single_object_scenes("val", 1500)
    x_tr, x_va = _silhouettes(train), _silhouettes(val)
    y_tr = torch.tensor([s.instances[0].class_index - 1 for s in train])
    y_va = torch.tensor([s.instances[0].class_index - 1 for s in val])
    torch.manual_seed(cfg.seed)
    clf = TinyShapeClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.clf_steps)
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.clf_steps):
        idx = torch.randint(0, len(x_tr), (64,), generator=g)
        xb = x_tr[idx]
        if step % 2:  # flips/rot90 keep every class's identity
            xb = torch.rot90(xb.flip(-1), k=int(step // 2 % 4), dims=(2, 3))
        loss = F.cross_entropy(clf(xb), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(x_va).argmax(1) == y_va).float().mean())
    return clf, acc


def _contrasting_pairs() -> list[tuple[str, str]]:
    """(object colour, background colour) pairs with strong contrast, cycled over the generation prompts."""
    return [("red", "white"), ("blue", "yellow"), ("yellow", "black"), ("green", "pink"),
            ("white", "blue"), ("black", "cyan"), ("orange", "purple"), ("purple", "grey")]  # fmt: skip


@torch.no_grad()
def generation_rate(pipe, clf: TinyShapeClassifier, cfg: BenchConfig) -> dict:  # noqa: ANN001
    """Generate ``gen_per_class`` images per class and report how often the classifier sees the named shape."""
    pairs = _contrasting_pairs()
    per_class, examples = {}, []
    for k, cls in enumerate(SHAPE_CLASSES):
        prompts = [f"a {pairs[i % len(pairs)][0]} {cls} on a {pairs[i % len(pairs)][1]} background"
                   for i in range(cfg.gen_per_class)]  # fmt: skip
        g = torch.Generator().manual_seed(cfg.seed * 1000 + k)
        out = pipe(prompts, num_inference_steps=cfg.gen_steps, guidance_scale=cfg.gen_guidance, height=64,
                   width=64, generator=g, output_type="pt").images.cpu()  # [B, 3, 64, 64] in [0, 1]  # fmt: skip
        masks = torch.cat([silhouette(out[i : i + 1], COLOURS[pairs[i % len(pairs)][0]], COLOURS[pairs[i % len(pairs)][1]])
                           for i in range(len(out))])  # fmt: skip
        pred = clf(masks).argmax(1)
        per_class[cls] = float((pred == k).float().mean())
        examples.append(out[0])
    rate = float(np.mean(list(per_class.values())))
    return {"rate": rate, "per_class": per_class, "examples": torch.stack(examples)}


# ------------------------------------------------------------------------------------------- 2. the probe
_CROSS_OUT = "up_blocks.2.attentions.{}.transformer_blocks.0.attn2.out"
FEATURE_SETS = {
    # the block outputs the generic-feature papers start from
    "up-block outputs": ["up_blocks.0", "up_blocks.1", "up_blocks.2"],
    # cross-attention outputs at 16x16 (activations the block outputs hide) plus the two finest block outputs
    "cross-attention outputs + up blocks": [_CROSS_OUT.format(0), _CROSS_OUT.format(1), "up_blocks.1", "up_blocks.2"],
}


@torch.no_grad()
def pixel_features(backbone, names: list[str], scenes: list[ShapeSample], t: int, seed: int) -> torch.Tensor:  # noqa: ANN001
    """Per-pixel features [B, C, 64, 64]: the named activations extracted by :class:`difffeat.FeatureExtractor`
    (prompt = the scene's class names), each L2-normalised over channels, upsampled and concatenated."""
    fx = difffeat.FeatureExtractor(backbone, features=names, t=t, seed=seed, batch_size=50)
    feats = fx([s.image for s in scenes], prompts=[list_prompt(s.classes_present) for s in scenes])
    maps = [F.normalize(F.interpolate(feats[n].float(), size=(64, 64), mode="bilinear", align_corners=False), dim=1)
            for n in names]  # fmt: skip
    return torch.cat(maps, 1)


# --------------------------------------------------------------------------------- 3. cross-attention maps
LAYER_SETS: dict[str, int] = {"all_layers": 1, "16x16+8x8_layers": 8}  # name -> minimum map resolution


@torch.no_grad()
def cross_attention_maps(
    backbone, scenes: list[ShapeSample], t: int, seed: int, prompt_style: str = "list"  # noqa: ANN001
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per layer set, per scene: {class name: [64, 64] head/layer-averaged attention map of its word token(s)}.

    Through the library: :meth:`Backbone.prepare` (preprocessing, VAE, noising at ``t``), :class:`difffeat.Capture`
    of every cross-attention map with the head mean, and the class tokens of
    :func:`difffeat.segment.prompts.build_layout` (character offsets, as the segmenter finds them).
    ``prompt_style`` "list" prompts ``"a photo of circle, star"`` (the segmenter's style); "caption" uses the
    scene's full descriptive caption (with colours and background).
    """
    maps_info = [a for a in difffeat.list_activations(backbone) if a.kind == "cross-map"]
    results: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in LAYER_SETS}
    for i, s in enumerate(scenes):
        caption = list_prompt(s.classes_present) if prompt_style == "list" else s.caption
        layout = build_layout(list(s.classes_present), backbone.text_segments(), caption=caption)
        inputs = backbone.prepare([s.image], layout.caption, t, seed + i)
        with difffeat.Capture(backbone, maps_info, inputs, map_reducer=head_mean) as cap:
            backbone.denoise(inputs)
        for set_name, min_res in LAYER_SETS.items():
            total, count = None, 0
            for probs in cap.activations.values():  # [1, N, L] (head mean)
                res = int(round(probs.shape[1] ** 0.5))
                if res < min_res:
                    continue
                m = probs.float().transpose(1, 2).reshape(1, -1, res, res)  # [1, L, r, r]
                m = F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)
                total, count = (m if total is None else total + m), count + 1
            total = total[0] / count  # [L, 64, 64]
            results[set_name].append({cls: total[pos].mean(0).cpu() for cls, pos in zip(layout.classes, layout.class_tokens)})
    return results


def _average_maps(runs: list[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """Average per-scene class maps over several runs (e.g. timesteps)."""
    return [{cls: torch.stack([r[i][cls] for r in runs]).mean(0) for cls in runs[0][i]} for i in range(len(runs[0]))]


def _minmax(m: torch.Tensor) -> torch.Tensor:
    return (m - m.min()) / (m.max() - m.min() + 1e-8)


def attention_ious(maps: list[dict[str, torch.Tensor]], scenes: list[ShapeSample], thresholds: np.ndarray) -> np.ndarray:
    """IoU of every (scene, class present) pair at each threshold: [pairs, thresholds]."""
    rows = []
    for m, s in zip(maps, scenes):
        for cls, amap in m.items():
            gt = torch.from_numpy(s.mask == SHAPE_CLASSES.index(cls) + 1)
            norm = _minmax(amap)
            row = []
            for th in thresholds:
                pred = norm >= th
                row.append(float((pred & gt).sum()) / max(1.0, float((pred | gt).sum())))
            rows.append(row)
    return np.asarray(rows)


# ------------------------------------------------------------------------------------ 4. the autoencoder
@torch.no_grad()
def vae_reconstruction(pipe, scenes: list[ShapeSample]) -> dict:  # noqa: ANN001
    """Decode(posterior mean of encode(image)) vs the image: mean absolute error in [0, 255] pixel units,
    overall and on object pixels only (where colour shifts show); plus the posterior's mean std next to its
    mean |mean| (unscaled latents), i.e. how noisy a posterior sample is relative to the signal."""
    x = difffeat.load(pipe).preprocess([s.image for s in scenes], resolution=64)  # [N, 3, 64, 64] in [-1, 1], the library's preprocessing
    posts = [pipe.vae.encode(x[i : i + 32].to(pipe.device)).latent_dist for i in range(0, len(x), 32)]
    rec = torch.cat([pipe.vae.decode(post.mean).sample.cpu() for post in posts])
    err = (rec.clamp(-1, 1) - x).abs().mean(1) * 127.5  # [N, H, W]
    objects = torch.from_numpy(np.stack([s.mask for s in scenes]) > 0)
    return {"scenes": len(scenes), "mean_abs_error": float(err.mean()), "mean_abs_error_objects": float(err[objects].mean()),
            "posterior_std_mean": float(torch.cat([post.std for post in posts]).mean()),
            "posterior_abs_mean_mean": float(torch.cat([post.mean for post in posts]).abs().mean())}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- main
def run(model: str | Path, cfg: BenchConfig, parts: tuple[str, ...] = ("attn", "probe", "gen", "vae"),
        device: str = "cpu") -> dict:
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(cfg.seed)
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    results: dict = {"model": str(model), "config": asdict(cfg)}
    t0 = time.time()

    # 3. cross-attention localisation: choose timestep and threshold on val, score on test
    test = [sample("test", i) for i in range(max(cfg.attn_test, cfg.probe_test))]
    if "attn" in parts:
        _cross_attention_figures(pipe, cfg, test, results)
        log.info("cross-attention: %s (%.0fs)", results["cross_attention"], time.time() - t0)
    if "probe" in parts:
        _probe_figures(pipe, cfg, test, results)
        log.info("probe: %s (%.0fs)", results["probe"], time.time() - t0)
    if "vae" in parts:
        results["vae_reconstruction"] = vae_reconstruction(pipe, test[: cfg.probe_test])
        log.info("VAE reconstruction: %s", results["vae_reconstruction"])
    if "gen" in parts:
        _generation_figures(pipe, cfg, results)
        log.info("generation: %s (%.0fs)", results["generation"], time.time() - t0)
    results["elapsed_s"] = round(time.time() - t0, 1)
    return results


def _cross_attention_figures(pipe, cfg: BenchConfig, test_all_scenes: list[ShapeSample], results: dict) -> None:  # noqa: ANN001
    results["cross_attention"] = _cross_attention_style(pipe, cfg, test_all_scenes[: cfg.attn_test], "list")
    results["cross_attention_full_caption"] = _cross_attention_style(
        pipe, cfg, test_all_scenes[: cfg.attn_test], "caption"
    )


def _cross_attention_style(pipe, cfg: BenchConfig, test: list[ShapeSample], style: str) -> dict:  # noqa: ANN001
    """Choose timestep(s), layer set and threshold on ``val``; report the mean IoU on ``test``."""
    thresholds = np.round(np.arange(0.05, 0.96, 0.05), 2)
    val = [sample("val", i) for i in range(cfg.attn_val)]
    backbone = difffeat.load(pipe)
    val_maps = {t: cross_attention_maps(backbone, val, t, cfg.seed, style) for t in cfg.attn_timesteps}
    t_sets: dict[str, list[int]] = {str(t): [t] for t in cfg.attn_timesteps}
    t_sets["mean_over_t"] = list(cfg.attn_timesteps)
    by_t, best = {}, (-1.0, "", "", 0.0)
    for layer_set in LAYER_SETS:
        for key, ts in t_sets.items():
            maps = _average_maps([val_maps[t][layer_set] for t in ts])
            ious = attention_ious(maps, val, thresholds).mean(0)
            k = int(ious.argmax())
            by_t[f"{layer_set}@t={key}"] = {"threshold": float(thresholds[k]), "val_iou": float(ious[k])}
            if ious[k] > best[0]:
                best = (float(ious[k]), key, layer_set, float(thresholds[k]))
    _, t_best, layers_best, th_best = best
    test_runs = [cross_attention_maps(backbone, test, t, cfg.seed + 1, style) for t in t_sets[t_best]]
    test_ious = attention_ious(_average_maps([r[layers_best] for r in test_runs]), test, np.asarray([th_best]))
    all_key = "all_layers"
    test_all = attention_ious(_average_maps([r[all_key] for r in test_runs]), test,
                              np.asarray([by_t[f"{all_key}@t={t_best}"]["threshold"]]))  # fmt: skip
    return {
        "mean_iou_test": float(test_ious.mean()),
        "pairs_test": int(len(test_ious)),
        "timestep": t_best,
        "layers": layers_best,
        "threshold": th_best,
        "mean_iou_test_all_layers": float(test_all.mean()),
        "val_by_timestep": by_t,
        "prompt_style": "a photo of <class>, <class>" if style == "list" else "full scene caption",
    }


def _probe_figures(pipe, cfg: BenchConfig, test: list[ShapeSample], results: dict) -> None:  # noqa: ANN001
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    # 2. per-pixel probe: trained vs random weights, for each feature selection
    tr = [sample("train", 1_000_000 + i) for i in range(cfg.probe_train)]  # beyond the training scenes' indices
    te = test[: cfg.probe_test]
    y_tr = torch.from_numpy(np.stack([s.mask for s in tr])).long()
    y_te = torch.from_numpy(np.stack([s.mask for s in te])).long()
    torch.manual_seed(cfg.seed)  # random-weight baseline: same architecture, fresh init (the VAE stays trained)
    random_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": UNet2DConditionModel.from_config(pipe.unet.config),
                                             "text_encoder": CLIPTextModel(pipe.text_encoder.config)})  # fmt: skip
    random_pipe.to(pipe.device)
    backbones = {"trained": difffeat.load(pipe), "random": difffeat.load(random_pipe)}
    by_set = {}
    for set_name, names in FEATURE_SETS.items():
        row = {}
        for label, backbone in backbones.items():
            f_tr = pixel_features(backbone, names, tr, cfg.probe_t, cfg.seed)
            f_te = pixel_features(backbone, names, te, cfg.probe_t, cfg.seed + 1)
            row[label] = probe_score(f_tr, y_tr, f_te, y_te, num_classes=9, pixels_per_image=cfg.probe_pixels_per_image,
                                     seed=cfg.seed).to_json()  # fmt: skip
            del f_tr, f_te
        by_set[set_name] = {**row, "activations": names}
        log.info("probe %s: %s", set_name, row)
    results["probe"] = {"by_features": by_set, "timestep": cfg.probe_t, "train_scenes": len(tr), "test_scenes": len(te)}


def _generation_figures(pipe, cfg: BenchConfig, results: dict) -> None:  # noqa: ANN001
    # 1. generation
    clf, clf_acc = train_classifier(pipe, cfg)
    gen = generation_rate(pipe, clf, cfg)
    results["generation"] = {"rate": gen["rate"], "per_class": gen["per_class"], "classifier_val_accuracy": clf_acc,
                             "per_class_samples": cfg.gen_per_class, "steps": cfg.gen_steps,
                             "guidance_scale": cfg.gen_guidance, "sampler": "DDIM"}  # fmt: skip
    results["_generation_examples"] = gen["examples"]
    if cfg.gen_guidance_extra:  # same classifier, same seeds, other guidance scales
        results["generation"]["rate_by_guidance"] = {str(cfg.gen_guidance): gen["rate"]}
        for w in cfg.gen_guidance_extra:
            other = generation_rate(pipe, clf, replace(cfg, gen_guidance=w))
            results["generation"]["rate_by_guidance"][str(w)] = other["rate"]
            log.info("generation rate at guidance %s: %.3f %s", w, other["rate"], other["per_class"])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="difffeat/weights/shapes")
    p.add_argument("--out", default="results.json")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way; figures match to numerics)")
    p.add_argument("--parts", default="attn,probe,gen,vae", help="comma list of: attn, probe, gen, vae")
    p.add_argument("--gen-guidance", help="guidance scale(s) of the generation check, comma-separated; the first is "
                                          "the headline figure (default 3.0)")
    p.add_argument("--gen-per-class", type=int, help="generated images per class (default 8)")
    p.add_argument("--save-grid", help="also write a PNG grid of one generated image per class")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = BenchConfig()
    if args.quick:
        cfg = BenchConfig(gen_per_class=2, gen_steps=10, clf_train_scenes=1500, clf_steps=40, probe_train=20,
                          probe_test=20, attn_val=20, attn_test=20, attn_timesteps=(100,))  # fmt: skip
    if args.gen_guidance:
        scales = [float(x) for x in args.gen_guidance.split(",")]
        cfg = replace(cfg, gen_guidance=scales[0], gen_guidance_extra=tuple(scales[1:]))
    if args.gen_per_class:
        cfg = replace(cfg, gen_per_class=args.gen_per_class)
    res = run(args.model, cfg, tuple(args.parts.split(",")), device=args.device)
    examples = res.pop("_generation_examples", None)
    if args.save_grid and examples is not None:
        from PIL import Image

        grid = (examples.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # [8, 64, 64, 3]
        Image.fromarray(np.concatenate(list(grid), axis=1)).save(args.save_grid)
    write_json(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
