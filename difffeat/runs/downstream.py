"""The downstream-task commands (``difffeat probe``, ``difffeat correspond``) as one library call each:
every input is checked (cheap checks first, the model last), then the model loads and the run starts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..checks import check_device, check_number, check_out_dir, check_resolution, split_names
from ..errors import InvalidOptionError

__all__ = ["probe", "probe_predict", "rank", "correspond", "check_probe_data", "check_pairs"]


def check_probe_data(ddpm: str | os.PathLike | None, images: str | os.PathLike | None,
                     labels: str | os.PathLike | None, num_classes: int | None):
    """The labelled set of ``difffeat probe``: a ddpm-segmentation folder or images + label folders."""
    from ..evaluate.scarce_data import ddpm_segmentation, image_label_folders

    if bool(ddpm) == bool(images or labels):
        raise InvalidOptionError("give the labelled images one way: --ddpm DIR (ddpm-segmentation layout) or "
                                 "--images DIR --labels DIR")
    if ddpm:
        return ddpm_segmentation(ddpm, num_classes)
    if not (images and labels):
        raise InvalidOptionError("--images needs --labels (a folder of <stem>.png label maps) and vice versa")
    if num_classes is None:
        raise InvalidOptionError("--images/--labels need --num-classes N (labels 0..N-1, 255 = ignore)")
    return image_label_folders(images, labels, num_classes)


def probe(model: str, *, out_dir: str | os.PathLike, ddpm: str | os.PathLike | None = None,
          images: str | os.PathLike | None = None, labels: str | os.PathLike | None = None,
          num_classes: int | None = None, features: str | Sequence[str] | None = None, preset: str | None = None,
          t: int | None = None, resolution: int | None = None, prompt: str = "", seed: int = 0,
          train_count: int | None = None, test_count: int | None = None, splits: int = 5, models: int = 10,
          epochs: int = 100, batch_size: int = 64, label_size: int | None = None, pool: int = 16,
          void: str = "ignore", num_workers: int = 0, overwrite: bool = False, progress: bool = True,
          device: str | None = None, dtype: str | None = None, model_config: str | os.PathLike | None = None,
          techniques: Sequence[str] | None = None, timesteps: str | Sequence[int] | None = None, ensemble_size: int = 1):
    """``difffeat probe``: the published label-scarce segmentation protocol (see :func:`run_probe`) on the
    features of ``preset`` or ``features`` (with ``techniques`` / ``timesteps`` / ``ensemble_size`` as
    ``difffeat extract``); returns the :class:`ProbeReport`."""
    names = split_names(features)
    if not names and not preset:
        raise InvalidOptionError("name the features with --features a,b or pick --preset (see `difffeat presets`)")
    check_number("--t", t, 0, 999, integer=True)
    check_number("--seed", seed, 0, 2**31 - 1, integer=True)
    check_number("--num-classes", num_classes, 2, 255, integer=True)
    check_number("--num-workers", num_workers, 0, 256, integer=True)
    check_resolution("--resolution", resolution)
    from ..evaluate.pixel_ensemble import ScarceProtocol

    protocol = ScarceProtocol(models=models, epochs=epochs, batch_size=batch_size, splits=splits, seed=seed,
                              pool=pool, label_size=256 if label_size is None else label_size, void_in_eval=void)
    from .extractors import check_extraction, make_extractor

    options = check_extraction(model, techniques, timesteps, ensemble_size)
    data = check_probe_data(ddpm, images, labels, num_classes)
    from .scarce import ProbeJob, check_counts, run_probe

    check_counts(data, protocol, train_count, test_count)
    out_dir = check_out_dir(out_dir, "--out folder")
    check_device(device)

    from ..backbones import load
    from .processes import init_state

    state = init_state(device)
    fx = make_extractor(load(model, device=device, dtype=dtype, config=model_config), names, options, preset=preset,
                        t=t, resolution=resolution, seed=seed)
    job = ProbeJob(Path(out_dir), protocol, train_count, test_count, prompt, num_workers, overwrite, progress)
    return run_probe(fx, data, job, state)


def probe_predict(classifier: str | os.PathLike, images: Sequence[str | os.PathLike], *, out_dir: str | os.PathLike,
                  model: str | None = None, device: str | None = None, dtype: str | None = None,
                  model_config: str | os.PathLike | None = None) -> list[Path]:
    """``difffeat probe-predict``: label maps of ``images`` with a classifier ``difffeat probe`` saved, written
    as ``out_dir/<stem>_labels.png``; the features are extracted with the settings stored in the classifier
    (``model`` overrides where the model is loaded from)."""
    from ..evaluate.pixel_ensemble import PixelEnsemble
    from .sources import collect_images

    ensemble = PixelEnsemble.load(classifier)
    refs = collect_images(images)
    out_dir = check_out_dir(out_dir, "--out folder")
    check_device(device)
    settings = ensemble.info.get("extractor", {})

    import numpy as np
    from PIL import Image

    from ..backbones import load
    from ..features import FeatureExtractor
    from ..io import write_bytes
    from .scarce import predict_label_maps

    fx = FeatureExtractor(load(model or settings["model"], device=device, dtype=dtype, config=model_config),
                          settings["features"], t=settings["t"], resolution=settings["resolution"],
                          square=settings["square"], seed=settings["seed"])
    ensemble.models = [m.to(fx.backbone.device) for m in ensemble.models]
    written = []
    for ref, labels in zip(refs, predict_label_maps(fx, ensemble, [r.path for r in refs], ensemble.info.get("prompt", ""))):
        path = out_dir / f"{ref.stem}_labels.png"
        written.append(write_bytes(path, lambda tmp, a=labels: Image.fromarray(np.asarray(a, np.uint8)).save(tmp, format="PNG")))
    return written


def check_pairs(spair: str | os.PathLike | None = None, pairs_file: str | os.PathLike | None = None,
                images: str | os.PathLike | None = None, split: str = "test", categories: str | Sequence[str] | None = None,
                limit: int | None = None):
    """The keypoint pairs of ``difffeat correspond``: an SPair-71k folder, or a pair-list JSON with its image folder."""
    from ..evaluate.spair import pair_list, spair_pairs

    check_number("--limit", limit, 1, 10**9, integer=True)
    if bool(spair) == bool(pairs_file):
        raise InvalidOptionError("give the pairs one way: --spair DIR (SPair-71k layout) or --pairs FILE.json --images DIR")
    if spair:
        return spair_pairs(spair, split, split_names(categories) or None, limit)
    if not images:
        raise InvalidOptionError("--pairs needs --images (the folder its image paths are relative to)")
    return pair_list(pairs_file, images, limit)


def correspond(model: str, *, out_dir: str | os.PathLike, spair: str | os.PathLike | None = None,
               pairs_file: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
               split: str = "test", categories: str | Sequence[str] | None = None, limit: int | None = None,
               features: str | Sequence[str] | None = None, preset: str | None = None, t: int | None = None,
               resolution: int | None = None, square: bool = True, prompt: str = "", seed: int = 0,
               ensemble_size: int = 1, alpha: float = 0.1, load_size: int = 512, num_workers: int = 0,
               overwrite: bool = False, progress: bool = True, device: str | None = None, dtype: str | None = None,
               model_config: str | os.PathLike | None = None, techniques: Sequence[str] | None = None,
               timesteps: str | Sequence[int] | None = None):
    """``difffeat correspond``: zero-shot nearest-neighbour correspondence and PCK@alpha (see
    :func:`run_correspond`); returns the :class:`CorrespondReport`."""
    names = split_names(features)
    if not names and not preset:
        raise InvalidOptionError("name the features with --features a,b or pick --preset (see `difffeat presets`)")
    check_number("--t", t, 0, 999, integer=True)
    check_number("--seed", seed, 0, 2**31 - 1, integer=True)
    check_number("--load-size", load_size, 8, 4096, integer=True)
    check_number("--num-workers", num_workers, 0, 256, integer=True)
    check_resolution("--resolution", resolution)
    from .correspond import CorrespondJob, run_correspond

    job = CorrespondJob(Path(out_dir), prompt, alpha, (load_size, load_size), ensemble_size, num_workers, overwrite, progress)
    from .extractors import check_extraction, make_extractor

    options = check_extraction(model, techniques, timesteps)  # seeds: ensemble_size, averaged per cached seed
    pairs = check_pairs(spair, pairs_file, images, split, categories, limit)
    out_dir = check_out_dir(out_dir, "--out folder")
    check_device(device)

    from ..backbones import load
    from .processes import init_state

    state = init_state(device)
    fx = make_extractor(load(model, device=device, dtype=dtype, config=model_config), names, options, preset=preset,
                        t=t, resolution=resolution, square=square, seed=seed)
    return run_correspond(fx, pairs, job, state)


def rank(model: str, *, ddpm: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
         labels: str | os.PathLike | None = None, num_classes: int | None = None, kinds: str | None = None,
         blocks: str | None = None, t: int | None = None, resolution: int | None = None, prompt: str = "",
         seed: int = 0, train_count: int | None = None, test_count: int | None = None, pixels_per_image: int = 256,
         label_size: int | None = None, save_preset: str | os.PathLike | None = None, top: int = 3,
         all_kinds: bool = False, progress: bool = True,
         device: str | None = None, dtype: str | None = None, model_config: str | os.PathLike | None = None):
    """``difffeat probe --rank``: every candidate activation (or ``kinds`` / ``blocks``) scored by a linear
    pixel probe (see :func:`rank_activations`); with ``save_preset``, the ``top`` rows as a preset file.
    Returns ``(rows, preset path or None)``."""
    from ..checks import check_out_file

    check_number("--t", t, 0, 999, integer=True)
    check_number("--seed", seed, 0, 2**31 - 1, integer=True)
    check_number("--pixels-per-image", pixels_per_image, 1, 10**6, integer=True)
    label_size = 64 if label_size is None else label_size
    check_number("--label-size", label_size, 8, 4096, integer=True)
    check_number("--top", top, 1, 10**4, integer=True)
    check_resolution("--resolution", resolution)
    if save_preset is not None and not str(save_preset).endswith((".yaml", ".yml")):
        raise InvalidOptionError(f"--save-preset must name a .yaml file (what --preset FILE reads), got {str(save_preset)!r}")
    check_out_file(save_preset, "--save-preset file")
    data = check_probe_data(ddpm, images, labels, num_classes)
    from ..evaluate.pixel_ensemble import ScarceProtocol
    from .scarce import check_counts

    check_counts(data, ScarceProtocol(splits=1), train_count, test_count)
    check_device(device)

    from ..backbones import load
    from .rank import rank_activations, save_rank_preset

    backbone = load(model, device=device, dtype=dtype, config=model_config)
    rows = rank_activations(backbone, data, kinds=kinds, blocks=blocks, t=t, resolution=resolution, prompt=prompt,
                            seed=seed, train_count=train_count, test_count=test_count, pixels_per_image=pixels_per_image,
                            label_size=label_size, candidates_only=not all_kinds, progress=progress)
    path = None
    if save_preset is not None:
        path = save_rank_preset(rows, save_preset, backbone=backbone, top=top, t=t, resolution=resolution,
                                command=f"difffeat probe --rank ({len(rows)} activations, {len(data)} labelled images)")
    return rows, path
