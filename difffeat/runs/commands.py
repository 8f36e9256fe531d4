"""What each dataset command does, as one library call: check every input (cheap checks first, the model
last), load the model, run the engine. ``difffeat.cli`` only parses options and calls these."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from ..checks import check_batch_size, check_device, check_number, check_out_dir, check_out_file, check_resolution, split_names
from ..errors import InvalidOptionError

if TYPE_CHECKING:
    from .engine import RunSummary
    from .sources import ImageRef

# Only the checks are imported at the top: a bad option is reported before torch or diffusers load.

__all__ = ["extract", "segment", "evaluate_dataset", "generate"]


def image_sources(images: Sequence[str | os.PathLike] | None = None, coco: str | os.PathLike | None = None,
                  coco_images_dir: str | os.PathLike | None = None, voc: str | os.PathLike | None = None,
                  voc_split: str | None = None) -> "tuple[list[ImageRef], dict[str, Any]]":
    """The images of exactly one source (files/folders/globs, a COCO file, a VOC folder) and its description."""
    from .sources import coco_images, collect_images, voc_images

    if sum(bool(x) for x in (images, coco, voc)) != 1:
        raise InvalidOptionError("give the images one way: IMAGE... (files, folders, globs), --coco ANN, or --voc DIR")
    if coco:
        folder = Path(coco_images_dir) if coco_images_dir else Path(coco).parent / "images"
        refs, desc = coco_images(coco, folder), {"coco": str(Path(coco).resolve()), "images": str(folder.resolve())}
    elif voc:
        refs, desc = voc_images(voc, voc_split), {"voc": str(Path(voc).resolve()), "split": voc_split}
    else:
        refs, desc = collect_images(images), {"sources": [str(p) for p in images]}
    desc["n"] = len(refs)
    return refs, desc


def _check_run_options(batch_size: int = 1, num_workers: int = 0, seed: int = 0, t: int | None = None) -> None:
    check_number("--batch-size", batch_size, 1, 4096, integer=True)
    check_number("--num-workers", num_workers, 0, 256, integer=True)
    check_number("--seed", seed, 0, 2**63 - 1, integer=True)
    check_number("--t", t, 0, 999, integer=True)


def _check_images(refs: "Sequence[ImageRef]", skip_unreadable: bool) -> None:
    """Open and verify every input image before the model loads (unless unreadable ones are to be skipped)."""
    from .sources import check_image_files

    if not skip_unreadable:
        check_image_files([r.path for r in refs], "Fix or remove it, or pass --skip-unreadable to skip such images")


def extract(model: str, images: Sequence[str | os.PathLike] | None = None, *, out_dir: str | os.PathLike,
            features: str | Sequence[str] | None = None, preset: str | None = None, t: int | None = None,
            coco: str | os.PathLike | None = None, coco_images_dir: str | os.PathLike | None = None,
            voc: str | os.PathLike | None = None, voc_split: str | None = None, prompt: str = "",
            resolution: int | None = None, square: bool = False, seed: int = 0, batch_size: int = 8,
            num_workers: int = 2, overwrite: bool = False, skip_unreadable: bool = False, device: str | None = None,
            dtype: str | None = None, model_config: str | os.PathLike | None = None,
            techniques: Sequence[str] | None = None, timesteps: str | Sequence[int] | None = None,
            ensemble_size: int = 1) -> "tuple[RunSummary, list[str]]":
    """``difffeat extract``: features of every image into ``out_dir`` (see :func:`run_extract`); returns the
    summary and the feature names. ``model_config``: the architecture of a single-file ``model`` (``config=`` of
    :func:`difffeat.load`). ``techniques`` (one variant each, channels concatenated as the content-shift paper
    combines them), ``timesteps`` (concatenated) and ``ensemble_size`` (seeds averaged): see
    :class:`~difffeat.shift.combined.CombinedExtractor`."""
    names = split_names(features)
    if not names and not preset:
        raise InvalidOptionError("name the features with --features a,b or pick --preset (see `difffeat presets`)")
    _check_run_options(batch_size, num_workers, seed, t)
    check_resolution("--resolution", resolution)
    check_out_dir(out_dir, "--out folder")
    from .extractors import check_extraction, make_extractor

    options = check_extraction(model, techniques, timesteps, ensemble_size)

    from ..backbones import load
    from .extract import ExtractJob, run_extract
    from .processes import init_state

    refs, desc = image_sources(images, coco, coco_images_dir, voc, voc_split)
    _check_images(refs, skip_unreadable)
    check_device(device)
    state = init_state(device)
    fx = make_extractor(load(model, device=device, dtype=dtype, config=model_config), names, options, preset=preset, t=t,
                        resolution=resolution, square=square, seed=seed, batch_size=batch_size)
    job = ExtractJob(Path(out_dir), prompt=prompt, num_workers=num_workers, overwrite=overwrite, dataset=desc,
                     skip_unreadable=skip_unreadable)
    return run_extract(fx, refs, job, state), fx.names


def segmenter_overrides(heads=None, layers=None, rescale=None, tau=None, t=None, refine_order=None) -> dict[str, Any]:
    """The segmentation settings given on the command line (None = the model's config), range-checked."""
    check_number("--tau", tau, -1.0, 1.0)
    check_number("--refine-order", refine_order, 0, 8, integer=True)
    check_number("--t", t, 0, 999, integer=True)
    given = dict(heads=heads, layers=layers, rescale=rescale, tau=tau, t=t, refine_order=refine_order)
    return {k: v for k, v in given.items() if v is not None}


def segment(images: Sequence[str | os.PathLike], classes: str | Sequence[str], *, out_dir: str | os.PathLike,
            model: str = "shapes", method: str | None = None, config: str = "default", heatmaps: bool = False,
            label_file: str | os.PathLike | None = None, caption_file: str | os.PathLike | None = None,
            coco_results: str | os.PathLike | None = None, num_workers: int = 2, overwrite: bool = False,
            skip_unreadable: bool = False, device: str | None = None, dtype: str | None = None, batch_size: int = 1,
            model_config: str | os.PathLike | None = None, **overrides: Any) -> "tuple[RunSummary, list[str]]":
    """``difffeat segment``: label maps of every image into ``out_dir`` (see :func:`run_segment`), resumable and
    sharded over processes, ``batch_size`` images per forward; ``overrides`` are :class:`SegmentSettings`
    fields (heads, layers, tau, ...). ``config`` names the GOCA settings; ``model_config`` the architecture of
    a single-file ``model``."""
    if method not in (None, "goca", "vanilla"):
        raise InvalidOptionError(f"--method must be goca or vanilla, got {method!r}")
    settings = segmenter_overrides(**{k: overrides.pop(k) for k in ("heads", "layers", "rescale", "tau", "t", "refine_order") if k in overrides})
    if overrides.get("resize") is not None and overrides["resize"] not in ("keep", "square"):  # segment.settings.RESIZE
        raise InvalidOptionError(f"--resize must be square or keep, got {overrides['resize']!r}")
    if overrides.get("memory") is not None and overrides["memory"] not in ("auto", "one-pass", "two-pass"):  # segment.settings.MEMORY
        raise InvalidOptionError(f"--memory must be auto, one-pass or two-pass, got {overrides['memory']!r}")
    check_number("--num-workers", num_workers, 0, 256, integer=True)
    check_batch_size(batch_size)
    check_out_dir(out_dir, "--out folder")
    check_out_file(coco_results, "--coco-results file")

    from ..backbones import load
    from ..segment.prompts import check_classes
    from ..segment.postprocess import check_postprocess
    from ..segment.segmenter import Segmenter
    from .processes import init_state
    from ..evaluate.label_sources import ImageFiles, label_source, source_spec
    from .segment import SegmentJob, run_segment

    names = check_classes(split_names(classes))
    refs, desc = image_sources(images)
    source = label_source(source_spec("all", label_file, caption_file))
    source.check(ImageFiles([r.path for r in refs], names))  # a bad label/caption file: before the model loads
    _check_images(refs, skip_unreadable)
    check_device(device)
    if overrides.get("postprocess") is not None:  # unknown name or missing [crf] extra: before the model loads
        check_postprocess(overrides["postprocess"])
    state = init_state(device)
    seg = Segmenter(load(model, device=device, dtype=dtype, config=model_config), method=method, config=config, **settings, **overrides)
    job = SegmentJob(Path(out_dir), names, heatmaps=heatmaps, coco_results=Path(coco_results) if coco_results else None,
                     num_workers=num_workers, overwrite=overwrite, skip_unreadable=skip_unreadable, dataset=desc,
                     label_source=source_spec("all", label_file, caption_file), batch_size=batch_size)
    return run_segment(seg, refs, job, state), names


@dataclass
class EvalOutcome:
    """What ``difffeat eval`` reports: the report, where it was written, and the settings used."""

    report: Any  # EvalReport
    report_path: Path
    method: str
    tau: float
    main_process: bool


def evaluate_dataset(model: str = "shapes", *, coco: str | os.PathLike | None = None,
                     images: str | os.PathLike | None = None, voc_labels: str | os.PathLike | None = None,
                     class_names: str | Sequence[str] | None = None, shapes_split: str | None = None, n: int = 300,
                     setting: str = "oracle", method: str = "goca", config: str = "default", tune_shapes_split: str | None = None,
                     label_file: str | os.PathLike | None = None, caption_file: str | os.PathLike | None = None,
                     void: str = "ignore", tau_grid: bool = False,
                     tune_n: int = 100, limit: int | None = None, out_dir: str | os.PathLike = "eval_out",
                     report: str | os.PathLike | None = None, chunk_size: int = 8, batch_size: int = 1, num_workers: int = 2,
                     overwrite: bool = False, device: str | None = None, dtype: str | None = None,
                     model_config: str | os.PathLike | None = None, dataset: str | None = None,
                     root: str | os.PathLike | None = None, append_background: bool | None = None,
                     append_missing_class: bool | None = None, miou_average: str | None = None,
                     **overrides: Any) -> EvalOutcome:
    """``difffeat eval``: mIoU of a dataset (one of the GOCA benchmarks read from ``root`` as published, COCO,
    VOC-style or generated shapes), tau optionally tuned on a separate shapes split first; the run folder
    ``out_dir`` holds the resumable parts and, by default, the report (``out_dir/report.json``); ``batch_size``
    images per forward (within a chunk). ``config`` names the GOCA settings; ``model_config`` the architecture
    of a single-file ``model``.

    ``dataset`` (voc, context, coco-object, coco-stuff, cityscapes, ade20k): the benchmark's published split,
    id map and void handling; with ``caption_file`` (the reference's GPT noun list) its published captions,
    whose switches ``append_background`` / ``append_missing_class`` default to the benchmark's. Published
    defaults for such runs: ``miou_average="published"`` and ``resize="square"`` (override either)."""
    if setting not in ("oracle", "all"):  # difffeat.evaluate.SETTINGS
        raise InvalidOptionError(f"--setting must be oracle or all, got {setting!r}")
    if method not in ("goca", "vanilla"):
        raise InvalidOptionError(f"--method must be goca or vanilla, got {method!r}")
    if void not in ("ignore", "background"):  # difffeat.evaluate.VOID
        raise InvalidOptionError(f"--void must be ignore or background, got {void!r}")
    if miou_average is not None and miou_average not in ("present", "published"):  # evaluate.metrics.MIOU_AVERAGES
        raise InvalidOptionError(f"--miou-average must be published or present, got {miou_average!r}")
    if overrides.get("resize") is not None and overrides["resize"] not in ("keep", "square"):  # segment.settings.RESIZE
        raise InvalidOptionError(f"--resize must be square or keep, got {overrides['resize']!r}")
    if dataset is not None and any(x is not None for x in (coco, voc_labels, shapes_split)):
        raise InvalidOptionError("give one dataset: --dataset NAME --root DIR, --coco, --voc-labels or --shapes-split")
    if (append_background is not None or append_missing_class is not None) and not (dataset and caption_file):
        raise InvalidOptionError("--append-background / --append-missing-class set the caption rules of --dataset runs "
                                 "with --caption-file")
    check_number("--n", n, 1, 10**7, integer=True)
    check_number("--tune-n", tune_n, 1, 10**7, integer=True)
    check_number("--limit", limit, 1, 10**9, integer=True)
    check_number("--chunk-size", chunk_size, 1, 10**6, integer=True)
    check_batch_size(batch_size, chunk_size)
    check_number("--num-workers", num_workers, 0, 256, integer=True)
    settings = segmenter_overrides(**{k: overrides.pop(k) for k in ("heads", "layers", "rescale", "tau", "t", "refine_order") if k in overrides})
    if tune_shapes_split and shapes_split == tune_shapes_split:
        raise InvalidOptionError("tau must be chosen on a different split than the one evaluated")
    out_dir = check_out_dir(out_dir, "--out folder")
    report_path = check_out_file(Path(report) if report else out_dir / "report.json", "--report file")

    from ..backbones import load
    from ..evaluate import CocoDataset, ShapesDataset, VocDataset, with_void
    from ..evaluate.label_sources import label_source, source_spec
    from ..evaluate.runner import PUBLISHED_TAU_GRID
    from ..io import write_json
    from ..segment.postprocess import check_postprocess
    from ..segment.segmenter import Segmenter
    from .evaluation import EvalJob, run_eval, tune_tau
    from .processes import init_state
    from .sources import check_image_files

    benchmark = None
    if dataset is not None:
        from ..evaluate.benchmarks import BenchmarkCaptions, open_benchmark

        if root is None:
            raise InvalidOptionError(f"--dataset {dataset} needs --root DIR, the folder its official download unpacks "
                                     "to (`difffeat datasets` shows the layout)")  # fmt: skip
        if label_file is not None:
            raise InvalidOptionError("--dataset runs take their classes from the ground truth (oracle, as published); "
                                     "drop --label-file")  # fmt: skip
        data = open_benchmark(dataset, root)
        desc = data.describe()
        if caption_file is not None:
            source = BenchmarkCaptions(caption_file, dataset, append_background, append_missing_class)
            setting, caption_file = source.spec, None
            overrides.setdefault("background_entities", ())  # the caption rules decide about "background"
            rules = {"append_background": source.append_background, "append_missing_class": source.append_missing_class,
                     "synonyms": f"configs/datasets/{dataset}.json", "caption_file": str(Path(source.path).resolve())}
        else:
            rules = {"captions": None, "prompt": "oracle classes in the template (no --caption-file)"}
        miou_average = miou_average or "published"
        if overrides.get("resize") is None:
            overrides["resize"] = "square"
        benchmark = {"dataset": dataset, "split": data.spec.split, "void": data.spec.void, "caption_rules": rules,
                     "miou_average": miou_average, "resize": overrides["resize"]}
    elif root is not None:
        raise InvalidOptionError("--root goes with --dataset NAME")
    elif coco:
        data = CocoDataset(coco, images or Path(coco).parent / "images")
        desc = {"coco": str(Path(coco).resolve()), "images": str(data.images.resolve())}
    elif voc_labels:
        if not images or not class_names:
            raise InvalidOptionError("a VOC-style dataset needs --images, --voc-labels and --class-names")
        data = VocDataset(images, voc_labels, split_names(class_names))
        desc = {"voc_images": str(Path(images).resolve()), "voc_labels": str(Path(voc_labels).resolve())}
    elif shapes_split:
        data = ShapesDataset(shapes_split, n)
        desc = {"shapes_split": shapes_split, "shapes_n": n}
    else:
        raise InvalidOptionError("name a dataset: --dataset NAME --root DIR, --coco FILE [--images DIR], --voc-labels "
                                 "DIR --images DIR --class-names a,b, or --shapes-split test")
    check_image_files(data.image_files()[:limit], "eval never skips an image (that would change the mIoU): fix or remove it")
    if benchmark is None:
        data, desc["void"] = with_void(data, void), void
        setting = source_spec(setting, label_file, caption_file)
    label_source(setting).check(data, limit)  # a bad label/caption file fails before the model loads
    if benchmark is not None:
        data.check_labels(limit, num_workers)  # every label of the run decodes and maps: before the model loads
        benchmark["n_images"] = min(limit or len(data), len(data))
    tune_data = ShapesDataset(tune_shapes_split, tune_n) if tune_shapes_split else None
    check_device(device)
    if overrides.get("postprocess") is not None:  # unknown name or missing [crf] extra: before the model loads
        check_postprocess(overrides["postprocess"])
    state = init_state(device)
    seg = Segmenter(load(model, device=device, dtype=dtype, config=model_config), method=method, config=config, **settings, **overrides)
    tuned = None
    if tune_data is not None:
        best, scores = tune_tau(seg, tune_data, setting, limit=tune_n, progress=True, out_dir=out_dir / "tune_tau",
                                num_workers=num_workers, state=state, batch_size=batch_size)
        seg.settings = seg.settings.update(tau=best)
        tuned = {"split": tune_shapes_split, "n": tune_n, "tau": best}
    job = EvalJob(out_dir, setting=setting, limit=limit, chunk_size=chunk_size, num_workers=num_workers,
                  overwrite=overwrite, dataset=desc, tau_grid=PUBLISHED_TAU_GRID if tau_grid else (), batch_size=batch_size,
                  miou_average=miou_average or "present")
    result = run_eval(seg, data, job, state, extra_manifest={"tau_tuning": tuned or {}})  # the average does not change the counts
    if benchmark is not None:
        result.extra["benchmark"] = benchmark
    if tuned:
        result.extra["tau_tuning"] = {**tuned, "miou_by_tau": scores}
    if state.is_main_process:
        write_json(report_path, result.to_json())
    return EvalOutcome(result, report_path, seg.settings.method, seg.settings.tau, state.is_main_process)


def generate(prompts: Sequence[str] | None = None, *, out_dir: str | os.PathLike, prompts_file: str | os.PathLike | None = None,
             classes: str | Sequence[str] | None = None, model: str = "shapes", guidance: str = "scfg-goca",
             guidance_scale: float = 7.5, steps: int = 20, trace_steps: str | Sequence[int] | None = None, seed: int = 0,
             resolution: int | None = None, aggregate: str = "maps", self_step: int | None = None, heatmaps: bool = False,
             overwrite: bool = False, device: str | None = None, dtype: str | None = None, model_config: str | os.PathLike | None = None, **overrides: Any) -> "RunSummary":
    """``difffeat generate``: every prompt's generated image with its GOCA label map, overlay and a COCO json
    of the set into ``out_dir`` (:func:`~difffeat.runs.generate.run_generate`), resumable and sharded over
    processes. ``aggregate`` / ``self_step``: how the traced steps combine (:func:`difffeat.trace`). Without
    ``classes`` each prompt's classes are its default class words for the model
    (:func:`difffeat.runs.prompt_class_words`, as the demo). Every option is checked before the model
    loads (the default class words, which depend on the model's vocabulary, right after it loads)."""
    from ..tracing.scfg import GUIDANCE_MODES, SCFG

    if guidance not in GUIDANCE_MODES:
        raise InvalidOptionError(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, got {guidance!r}")
    SCFG(guidance_scale, guidance)  # S-CFG / CFG need --guidance-scale > 1
    check_number("--steps", steps, 1, 1000, integer=True)
    check_number("--seed", seed, 0, 2**63 - 1, integer=True)
    check_resolution("--resolution", resolution)
    chosen = None
    if trace_steps is not None:
        raw = split_names(trace_steps) if isinstance(trace_steps, str) else [str(s) for s in trace_steps]
        try:
            picked: set[int] = set()
            for token in raw:  # "5" or a range "10-19"
                lo, _, hi = token.partition("-")
                picked.update(range(int(lo), int(hi or lo) + 1))
            chosen = tuple(sorted(picked))
        except ValueError:
            raise InvalidOptionError(f"--trace-steps must be step indices or ranges such as 0,5,10-19; got {trace_steps!r}") from None
        if not chosen or chosen[0] < 0 or chosen[-1] >= steps:
            raise InvalidOptionError(f"--trace-steps {list(chosen)} are outside the schedule of --steps {steps} (0..{steps - 1})")
    from .generate import GenerateJob, check_aggregate, prompt_classes, read_prompts, run_generate

    check_aggregate(aggregate, self_step, int(steps), chosen, cli=True)
    settings = segmenter_overrides(**{k: overrides.pop(k) for k in ("tau", "refine_order") if k in overrides})
    check_out_dir(out_dir, "--out folder")
    check_device(device)

    from ..backbones import load
    from .processes import init_state

    pairs = read_prompts(list(prompts or []), prompts_file)
    named = split_names(classes) if classes else None
    items = prompt_classes(pairs, named) if named else None  # given classes are checked before the model loads
    state = init_state(device)
    backbone = load(model, device=device, dtype=dtype, config=model_config)
    if items is None:
        items = prompt_classes(pairs, None, backbone)
    job = GenerateJob(Path(out_dir), guidance, float(guidance_scale), int(steps), chosen, int(seed), resolution,
                      aggregate, self_step, heatmaps, overwrite)
    return run_generate(backbone, items, job, state, **settings, **overrides)
