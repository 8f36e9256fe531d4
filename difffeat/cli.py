"""The ``difffeat`` command line: a thin shell over the Python API (no logic of its own)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import DifffeatError

app = typer.Typer(
    name="difffeat",
    help="Diffusion models as feature extractors and training-free segmenters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)
out = Console()

MODEL_HELP = "Hub id, local diffusers folder, single-file checkpoint (with --config), or 'shapes' (embedded, no download)."
CONFIG_HELP = (
    "For a single-file checkpoint (--model file.safetensors in the original key layout): a hub id or local "
    "diffusers folder of the same architecture (offline: a local folder)."
)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _split(csv: Optional[str]) -> list[str]:
    return [s.strip() for s in csv.split(",") if s.strip()] if csv else []


@app.command()
def catalog(
    model: str = typer.Argument("shapes", help=MODEL_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {name, kind, shape, flags, ...}."),
    kind: Optional[str] = typer.Option(None, help="Only these kinds (comma-separated), e.g. cross-q,resnet-out."),
    candidates: bool = typer.Option(False, help="Only the paper's filtered candidates (no noisy kinds/stages, no maps)."),
    resolution: Optional[int] = typer.Option(None, help="Probe resolution for shapes (default: native)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ..."),
) -> None:
    """List every capturable activation of MODEL with kind, shape and property flags."""
    from . import list_activations, load

    try:
        cat = list_activations(load(model, device=device, config=config), probe_resolution=resolution)
        items = cat.candidates() if candidates else list(cat)
        if kind:
            kinds = set(_split(kind))
            items = [a for a in items if a.kind in kinds]
    except (DifffeatError, ValueError) as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps([a.to_dict() for a in items]))
        return
    table = Table(title=f"{model}: {len(items)} activations (shapes at {cat.probe_size[1]}x{cat.probe_size[0]} px)")
    for col in ("name", "kind", "shape", "flags"):
        table.add_column(col, overflow="fold")
    for a in items:
        table.add_row(a.name, a.kind, "x".join(map(str, a.shape or ())), ",".join(a.flags))
    out.print(table)


@app.command()
def families() -> None:
    """Print the supported model families as the README's Markdown table (generated from the registry)."""
    from .families import families_markdown

    print(families_markdown(), end="")


@app.command()
def presets() -> None:
    """List the feature presets in configs/features."""
    from .presets import list_presets, load_preset

    table = Table(title="feature presets")
    for col in ("preset", "family", "t", "resolution", "validated", "features"):
        table.add_column(col, overflow="fold")
    for name in list_presets():
        p = load_preset(name)
        table.add_row(name, p.family, str(p.t), str(p.resolution), "yes" if p.validated else "NO", "\n".join(p.features))
    out.print(table)


@app.command()
def extract(
    model: str = typer.Argument(..., help=MODEL_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    images: Optional[list[Path]] = typer.Argument(None, help="Image files, folders or quoted glob patterns ('data/**/*.jpg')."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Comma-separated activation names."),
    preset: Optional[str] = typer.Option(None, help="A feature preset (see `difffeat presets`)."),
    t: Optional[int] = typer.Option(None, "--t", help="Timestep on the 1000-step scale (default: preset's or 50)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder: <stem>.safetensors per image, manifest.json."),
    coco: Optional[Path] = typer.Option(None, help="Extract the images of this COCO annotation JSON."),
    coco_images: Optional[Path] = typer.Option(None, help="Image folder of --coco (default: <ann dir>/images)."),
    voc: Optional[Path] = typer.Option(None, help="Extract a VOC folder (its JPEGImages/)."),
    voc_split: Optional[str] = typer.Option(None, help="Only the images of ImageSets/Segmentation/<split>.txt."),
    prompt: str = typer.Option("", help="Prompt used for every image."),
    resolution: Optional[int] = typer.Option(None, help="Long side in px (default: preset's or native)."),
    square: bool = typer.Option(False, help="Resize to a square instead of keeping the aspect ratio."),
    seed: int = typer.Option(0, help="Noise seed."),
    batch_size: int = typer.Option(8, help="Images per forward (images of one size share a batch)."),
    num_workers: int = typer.Option(2, help="DataLoader workers decoding/resizing ahead of the model (0 = inline)."),
    overwrite: bool = typer.Option(False, help="Recompute every image, replacing outputs of other settings."),
    skip_unreadable: bool = typer.Option(False, help="Skip images that cannot be read and list them in OUT/unreadable.json (default: stop at the first)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: the process's accelerate device)."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16, bf16 (default: fp16 on CUDA, fp32 on CPU)."),
) -> None:
    """Extract features of IMAGES (or --coco / --voc) and write OUT/<stem>.safetensors ([C, H, W] per name).

    Runs unchanged under `accelerate launch --multi_gpu --num_processes N` (one shard per process); a restart
    with the same command skips finished images.
    """
    from . import FeatureExtractor, load
    from .scale import ExtractJob, coco_images as coco_refs, collect_images, init_state, run_extract, voc_images

    try:
        names = _split(features)
        if not names and not preset:
            raise ValueError("name the features with --features a,b or pick --preset (see `difffeat presets`)")
        if sum(bool(x) for x in (images, coco, voc)) != 1:
            raise ValueError("give the images one way: IMAGE... (files, folders, globs), --coco ANN, or --voc DIR")
        if coco:
            refs, desc = coco_refs(coco, coco_images), {"coco": str(coco.resolve()), "images": str((coco_images or coco.parent / "images").resolve())}
        elif voc:
            refs, desc = voc_images(voc, voc_split), {"voc": str(voc.resolve()), "split": voc_split}
        else:
            refs, desc = collect_images(images), {"sources": [str(p) for p in images]}
        desc["n"] = len(refs)
        state = init_state(device)
        backbone = load(model, device=device, dtype=dtype, config=config)
        fx = FeatureExtractor(backbone, names or None, preset=preset, t=t, resolution=resolution, square=square, seed=seed, batch_size=batch_size)
        job = ExtractJob(out_dir, prompt=prompt, num_workers=num_workers, overwrite=overwrite, dataset=desc, skip_unreadable=skip_unreadable)
        summary = run_extract(fx, refs, job, state)
    except (DifffeatError, ValueError) as exc:
        _fail(exc)
    if state.is_main_process:
        console.print(f"wrote {summary.written} feature files to {out_dir} ({', '.join(fx.names)}); "
                      f"{summary.skipped} already done; {summary.processes} process(es), {summary.seconds:.1f} s")
        if summary.unreadable:
            console.print(f"[yellow]{summary.unreadable} unreadable image(s) skipped, listed in {out_dir / 'unreadable.json'}[/yellow]")


def _segment_overrides(heads, layers, rescale, tau, t, refine_order) -> dict:
    return {k: v for k, v in dict(heads=heads, layers=layers, rescale=rescale, tau=tau, t=t, refine_order=refine_order).items() if v is not None}


@app.command()
def segment(
    images: list[Path] = typer.Argument(..., help="Image files."),
    classes: str = typer.Option(..., "--classes", "-c", help="Comma-separated class names, e.g. cat,dog,grass."),
    model: str = typer.Option("shapes", "--model", "-m", help=MODEL_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    method: str = typer.Option("goca", help="goca or vanilla (then --heads/--layers/--rescale override)."),
    heads: Optional[str] = typer.Option(None, help="Head aggregation: goca | mean."),
    layers: Optional[str] = typer.Option(None, help="Layer aggregation: goca | uniform."),
    rescale: Optional[str] = typer.Option(None, help="Per-pixel rescaling: goca | none."),
    tau: Optional[float] = typer.Option(None, help="Background offset (default: the model's config)."),
    t: Optional[int] = typer.Option(None, "--t", help="Timestep (default: the model's config)."),
    refine_order: Optional[int] = typer.Option(None, help="Self-attention propagation order (0 = off)."),
    heatmaps: bool = typer.Option(False, help="Also write <stem>_heat_<class>.png per class."),
    coco_results: Optional[Path] = typer.Option(None, help="Also write COCO results JSON (RLE) here."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ..."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16, bf16."),
) -> None:
    """Segment IMAGES into CLASSES: OUT/<stem>_labels.png (0 = background, i = i-th class), _overlay.png, .json."""
    from tqdm.auto import tqdm

    from . import Segmenter, load
    from .io import write_json
    from .segment.outputs import save_result, to_coco_results
    from .segment.prompts import check_classes

    try:
        names = check_classes(_split(classes))
        seg = Segmenter(load(model, device=device, dtype=dtype, config=config), method=method,
                        **_segment_overrides(heads, layers, rescale, tau, t, refine_order))
        stems = [p.stem for p in images]
        if len(set(stems)) != len(stems):
            raise ValueError("several images share a file stem; their outputs would overwrite each other")
        coco = []
        cat_ids = {c: i + 1 for i, c in enumerate(names)}
        for i, path in enumerate(tqdm(images, desc="segment", unit="img")):
            result = seg(path, names)
            save_result(result, path, out_dir, path.stem, heatmaps=heatmaps)
            coco += to_coco_results(result, i + 1, cat_ids)
        if coco_results:
            write_json(coco_results, coco)
    except (DifffeatError, ValueError) as exc:
        _fail(exc)
    console.print(f"segmented {len(images)} image(s) into {names} -> {out_dir}")


@app.command("eval")
def evaluate_cmd(
    model: str = typer.Option("shapes", "--model", "-m", help=MODEL_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    coco: Optional[Path] = typer.Option(None, help="COCO instances annotation JSON."),
    images: Optional[Path] = typer.Option(None, help="Image folder (COCO or VOC-style)."),
    voc_labels: Optional[Path] = typer.Option(None, help="VOC-style label PNG folder (with --images, --class-names)."),
    class_names: Optional[str] = typer.Option(None, help="VOC-style class names, comma-separated (label i = i-th)."),
    shapes_split: Optional[str] = typer.Option(None, help="Evaluate on generated shapes: train | val | test."),
    n: int = typer.Option(300, help="Number of generated shapes images."),
    setting: str = typer.Option("oracle", help="oracle (prompt = classes present, as in the papers) | all."),
    method: str = typer.Option("goca", help="goca or vanilla."),
    heads: Optional[str] = typer.Option(None), layers: Optional[str] = typer.Option(None), rescale: Optional[str] = typer.Option(None),
    tau: Optional[float] = typer.Option(None, help="Fixed background offset (default: the model's config)."),
    tune_shapes_split: Optional[str] = typer.Option(None, help="Choose tau on this generated split first (e.g. val)."),
    tune_n: int = typer.Option(100, help="Images used to choose tau."),
    t: Optional[int] = typer.Option(None, "--t"),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N images."),
    report: Path = typer.Option(Path("eval_report.json"), help="Where to write the JSON report."),
    run_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (manifest, per-chunk confusion counts for resuming); default: <report>_run/."),
    chunk_size: int = typer.Option(8, help="Images per resumable chunk."),
    num_workers: int = typer.Option(2, help="DataLoader workers preparing images ahead of the model (0 = inline)."),
    overwrite: bool = typer.Option(False, help="Recompute everything in --out, replacing results of other settings."),
    device: Optional[str] = typer.Option(None), dtype: Optional[str] = typer.Option(None),
) -> None:
    """Evaluate segmentation mIoU on a dataset and write a JSON report with per-class IoU.

    Runs unchanged under `accelerate launch --multi_gpu --num_processes N` (the confusion matrices are summed
    across processes; the result equals one process's); a restart with the same command resumes.
    """
    from . import Segmenter, load
    from .evaluate import CocoDataset, ShapesDataset, VocDataset
    from .io import write_json
    from .scale import EvalJob, init_state, run_eval, tune_tau_distributed

    try:
        if coco:
            data = CocoDataset(coco, images or coco.parent / "images")
            desc = {"coco": str(coco.resolve()), "images": str(data.images.resolve())}
        elif voc_labels:
            if not images or not class_names:
                raise ValueError("a VOC-style dataset needs --images, --voc-labels and --class-names")
            data = VocDataset(images, voc_labels, _split(class_names))
            desc = {"voc_images": str(images.resolve()), "voc_labels": str(voc_labels.resolve())}
        elif shapes_split:
            data = ShapesDataset(shapes_split, n)
            desc = {"shapes_split": shapes_split, "shapes_n": n}
        else:
            raise ValueError("name a dataset: --coco FILE [--images DIR], --voc-labels DIR --images DIR --class-names a,b, or --shapes-split test")
        state = init_state(device)
        seg = Segmenter(load(model, device=device, dtype=dtype, config=config), method=method,
                        **_segment_overrides(heads, layers, rescale, tau, t, None))
        tuned = None
        if tune_shapes_split:
            if shapes_split == tune_shapes_split:
                raise ValueError("tau must be chosen on a different split than the one evaluated")
            best, scores = tune_tau_distributed(seg, ShapesDataset(tune_shapes_split, tune_n), setting, tune_n, state, progress=True)
            seg.settings = seg.settings.update(tau=best)
            tuned = {"split": tune_shapes_split, "n": tune_n, "tau": best, "miou_by_tau": scores}
        run_dir = run_dir or report.with_name(report.stem + "_run")
        job = EvalJob(run_dir, setting=setting, limit=limit, chunk_size=chunk_size, num_workers=num_workers,
                      overwrite=overwrite, dataset=desc)
        result = run_eval(seg, data, job, state, extra_manifest={"tau_tuning": {k: v for k, v in (tuned or {}).items() if k != "miou_by_tau"}})
        if tuned:
            result.extra["tau_tuning"] = tuned
        if state.is_main_process:
            write_json(report, result.to_json())
    except (DifffeatError, ValueError) as exc:
        _fail(exc)
    if state.is_main_process:
        out.print(f"mIoU {result.miou:.4f} ({setting}: {result.n_images} images, method {seg.settings.method}, tau {seg.settings.tau})")
        console.print(f"report: {report}")


@app.command()
def gate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    images: list[Path] = typer.Argument(..., help="Image files."),
    technique: list[str] = typer.Option(..., "--technique", help="prompt:quality=natural | prompt:template=a photo of {} | controlnet:ID[,scale=1,start_t=60,steps=2] | lora:PATH[,scale=1] (repeatable)."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Activations to score (default: the model's practical preset or the first cross-attention q)."),
    prompt: str = typer.Option("", help="Base prompt."),
    t: int = typer.Option(50, "--t", help="Extraction timestep."),
    out_dir: Path = typer.Option(Path("gate_out"), "--out", "-o", help="Where the img2img comparisons go."),
    img2img: bool = typer.Option(True, help="Also run the img2img comparison per image and technique."),
    strength: float = typer.Option(0.75, help="img2img strength."),
    steps: int = typer.Option(20, help="img2img steps."),
    device: Optional[str] = typer.Option(None), dtype: Optional[str] = typer.Option(None),
) -> None:
    """Score content-shift suppression techniques (GATE): Laplacian score per activation, img2img comparisons."""
    from . import FeatureExtractor, list_activations, load
    from .io import write_bytes, write_json
    from .shift import gate_img2img, gate_scores, parse_technique

    try:
        techs = [parse_technique(spec) for spec in technique]
        backbone = load(model, device=device, dtype=dtype, config=config)
        cat = list_activations(backbone)
        queries = [a.name for a in cat.candidates() if a.kind in ("cross-q", "joint-q")] or [a.name for a in cat if a.kind in ("cross-q", "joint-q")]
        names = _split(features) or queries[:1]
        fx = FeatureExtractor(backbone, names, t=t)
        table = Table(title=f"GATE Laplacian score (1 = no shift, <= 0 = no better than plain) at t={t}")
        table.add_column("technique")
        for n in names:
            table.add_column(n, overflow="fold")
        results = []
        for spec, tech in zip(technique, techs):
            scores = gate_scores(fx, images, prompt, [tech])
            table.add_row(spec, *[f"{scores[n]:.3f}" for n in names])
            entry = {"technique": spec, "scores": scores, "img2img": []}
            if img2img:
                for path in images:
                    cmp = gate_img2img(backbone, path, prompt, tech, strength=strength, steps=steps)
                    target = out_dir / f"{path.stem}_{tech.name}.png"
                    write_bytes(target, lambda tmp, img=cmp.side_by_side(): img.save(tmp, format="PNG"))
                    entry["img2img"].append({"image": str(path), "file": str(target), **cmp.to_json()})
            results.append(entry)
        write_json(out_dir / "gate.json", results)
    except (DifffeatError, ValueError) as exc:
        _fail(exc)
    out.print(table)
    console.print(f"details: {out_dir / 'gate.json'}")


@app.command()
def bench(
    what: str = typer.Argument("goca", help="goca: observer memory vs storing every head's map, and segment time vs a bare forward."),
    resolution: int = typer.Option(512, help="Input resolution (px) of the SD1.5-shaped tiny model."),
    repeats: int = typer.Option(3, help="Timing repeats (median reported)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write the figures as JSON here."),
    device: str = typer.Option("cpu", help="cpu or cuda (GPU memory is then the allocator's peak)."),
    dtype: Optional[str] = typer.Option(None, help="fp16, bf16 or fp32; default fp16 on CUDA, fp32 on the CPU."),
) -> None:
    """Speed/memory benchmarks, reported as ratios against a baseline measured in the same run."""
    from .bench import BENCHMARKS
    from .io import write_json

    if what not in BENCHMARKS:
        _fail(ValueError(f"unknown benchmark {what!r}; choose one of {', '.join(BENCHMARKS)}"))
    try:
        figures = BENCHMARKS[what](resolution=resolution, repeats=repeats, device=device, dtype=dtype)
    except ValueError as exc:
        _fail(exc)
    out.print_json(json.dumps(figures))
    if out_file:
        write_json(out_file, figures)


@app.command("make-tiny")
def make_tiny(
    family: str = typer.Argument(..., help="sd, sdxl, pixart, sd3 or flux."),
    out_dir: Path = typer.Argument(..., help="Folder to write the pipeline to."),
    seed: int = typer.Option(0, help="Weight seed."),
) -> None:
    """Save a tiny RANDOM-weight pipeline of FAMILY (offline), to try every command without a download."""
    from .testing import TINY_FAMILIES, save_tiny_pipeline

    if family not in TINY_FAMILIES:
        _fail(ValueError(f"unknown family {family!r}; choose one of {', '.join(TINY_FAMILIES)}"))
    save_tiny_pipeline(family, out_dir, seed=seed)
    console.print(f"saved a tiny random {family} pipeline to {out_dir} (random weights: for testing only)")


@app.command()
def demo(
    model: str = typer.Option("shapes", "--model", "-m", help=MODEL_HELP),
    port: int = typer.Option(7860, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 to expose it)."),
    concurrency: int = typer.Option(1, help="Requests processed at once (the queue holds the rest)."),
) -> None:
    """Start the Gradio demo (segment, features, content shift); needs the demo extra: `pip install "difffeat\\[demo]"`."""
    try:
        from .demo import launch
    except ImportError as exc:  # gradio missing
        _fail(ImportError(f"the demo needs gradio: pip install 'difffeat[demo]' ({exc})"))
    launch(model, port=port, host=host, concurrency=concurrency)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
