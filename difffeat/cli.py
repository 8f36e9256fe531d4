"""The ``difffeat`` command line: a thin shell over the Python API.

Each command parses its options and makes one library call; every check of the input lives in the library
(and runs before a model loads). Nothing heavy is imported until a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="difffeat",
    help="Diffusion models as feature extractors and training-free segmenters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = ("Hub id, local diffusers folder, 'shapes' (the embedded model, no download), or a single-file checkpoint "
              "(file.safetensors / .ckpt in the original layout; then --model-config).")
MODEL_CONFIG_HELP = (
    "For a single-file checkpoint (MODEL = file.safetensors / .ckpt in the original key layout): a hub id or local "
    "diffusers folder of the same architecture (offline: a local folder or a cached id). Not the GOCA --config."
)
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: the process's accelerate device)."
DTYPE_HELP = "fp32, fp16, bf16 (default: fp16 on CUDA, fp32 on CPU)."
POSTPROCESS_HELP = "Refine the decision at image resolution: none | pamr | crf (dense CRF: pip install 'difffeat[crf]')."
CAPTION_HELP = ("Per-image noun lists, JSON {image: \"cat, (person, clothes), grass\"}, made into captions as the "
                "published GOCA pipeline (nouns that are not classes become background entities).")


def _consoles():
    from rich.console import Console

    # piped output is not wrapped at 80 columns
    return Console(stderr=True, soft_wrap=True), Console(soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)


def _fail(exc: Exception) -> None:
    from rich.markup import escape

    err, _ = _consoles()
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(code=2)


def _call(fn, *args, **kwargs):
    """Run one library call; a DifffeatError (or a ValueError from a check) is one line and exit code 2."""
    from .errors import DifffeatError

    try:
        return fn(*args, **kwargs)
    except (DifffeatError, ValueError) as exc:
        _fail(exc)


def _table(title: str, columns: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


@app.command()
def catalog(
    model: str = typer.Argument("shapes", help=MODEL_HELP),
    model_config: Optional[str] = typer.Option(None, "--model-config", help=MODEL_CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {name, kind, shape, flags, ...}."),
    kind: Optional[str] = typer.Option(None, help="Only these kinds (comma-separated), e.g. cross-q,resnet-out."),
    candidates: bool = typer.Option(False, help="Only the paper's filtered candidates (no noisy kinds/stages, no maps)."),
    resolution: Optional[int] = typer.Option(None, help="Probe resolution in px (default: the model's native one)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """List every capturable activation of MODEL with kind, shape and property flags."""
    from . import list_activations
    from .hookpoints import check_kinds

    _call(check_kinds, kind)  # a kind no family has: before the model loads
    cat = _call(list_activations, model, probe_resolution=resolution, device=device, config=model_config)
    items = _call(cat.select, kind, candidates)
    _, out = _consoles()
    if as_json:
        out.print_json(json.dumps([a.to_dict() for a in items]))
        return
    out.print(_table(f"{model}: {len(items)} activations (shapes at {cat.probe_size[1]}x{cat.probe_size[0]} px)",
                     ["name", "kind", "shape", "flags"],
                     [[a.name, a.kind, "x".join(map(str, a.shape or ())), ",".join(a.flags)] for a in items]))


@app.command()
def families() -> None:
    """Print the supported model families as the README's Markdown table (generated from the registry)."""
    from .families import families_markdown

    print(families_markdown(), end="")


@app.command()
def presets() -> None:
    """List the feature presets in configs/features."""
    from .presets import preset_rows

    _, out = _consoles()
    out.print(_table("feature presets", ["preset", "family", "t", "resolution", "validated", "features"], preset_rows()))


@app.command()
def extract(
    model: str = typer.Argument(..., help=MODEL_HELP),
    images: Optional[list[Path]] = typer.Argument(None, help="Image files, folders or quoted glob patterns ('data/**/*.jpg')."),
    model_config: Optional[str] = typer.Option(None, "--model-config", help=MODEL_CONFIG_HELP),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Comma-separated activation names."),
    preset: Optional[str] = typer.Option(None, help="A feature preset (see `difffeat presets`)."),
    t: Optional[int] = typer.Option(None, "--t", help="Timestep on the 1000-step scale, 0-999 (default: preset's or 50)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder: <stem>.safetensors per image, manifest.json."),
    coco: Optional[Path] = typer.Option(None, help="Extract the images of this COCO annotation JSON."),
    coco_images: Optional[Path] = typer.Option(None, help="Image folder of --coco (default: <ann dir>/images)."),
    voc: Optional[Path] = typer.Option(None, help="Extract a VOC folder (its JPEGImages/)."),
    voc_split: Optional[str] = typer.Option(None, help="Only the images of ImageSets/Segmentation/<split>.txt."),
    prompt: str = typer.Option("", help="Prompt used for every image."),
    resolution: Optional[int] = typer.Option(None, help="Long side in px, a multiple of 8 in 64-4096 (default: preset's or native)."),
    square: bool = typer.Option(False, help="Resize to a square instead of keeping the aspect ratio."),
    seed: int = typer.Option(0, help="Noise seed."),
    batch_size: int = typer.Option(8, help="Images per forward (images of one size share a batch)."),
    num_workers: int = typer.Option(2, help="DataLoader workers decoding/resizing ahead of the model (0 = inline)."),
    overwrite: bool = typer.Option(False, help="Recompute every image, replacing outputs of other settings."),
    skip_unreadable: bool = typer.Option(False, help="Skip images that cannot be read and list them in OUT/unreadable.json (default: stop at the first)."),
    technique: Optional[list[str]] = typer.Option(None, "--technique", help="Content-shift suppression (repeatable; each is one variant, their features concatenated as the reference combines them; '+' applies several in one forward): prompt:quality=natural | prompt:task=horse21 | controlnet:ID[,start=published | ,start_t=61,steps=11] | lora:FILE[,scale=1]."),
    timesteps: Optional[str] = typer.Option(None, help="Several timesteps, comma-separated (features concatenated), instead of --t."),
    ensemble_size: int = typer.Option(1, help="Average the features over this many noise seeds (--seed onwards)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
) -> None:
    """Extract features of IMAGES (or --coco / --voc) and write OUT/<stem>.safetensors ([C, H, W] per name).

    Runs unchanged under `accelerate launch --multi_gpu --num_processes N` (one shard per process); a restart
    with the same command skips finished images.
    """
    from .runs.commands import extract as run

    summary, names = _call(run, model, images, out_dir=out_dir, features=features, preset=preset, t=t, coco=coco,
                           coco_images_dir=coco_images, voc=voc, voc_split=voc_split, prompt=prompt,
                           resolution=resolution, square=square, seed=seed, batch_size=batch_size,
                           num_workers=num_workers, overwrite=overwrite, skip_unreadable=skip_unreadable,
                           device=device, dtype=dtype, model_config=model_config, techniques=technique,
                           timesteps=timesteps, ensemble_size=ensemble_size)
    if summary.main_process:
        err, _ = _consoles()
        err.print(f"wrote {summary.written} feature files to {out_dir} ({', '.join(names)}); {summary.skipped} already "
                  f"done; {summary.processes} process(es), {summary.seconds:.1f} s")
        if summary.unreadable:
            err.print(f"[yellow]{summary.unreadable} unreadable image(s) skipped, listed in {out_dir / 'unreadable.json'}[/yellow]")


@app.command()
def segment(
    images: list[Path] = typer.Argument(..., help="Image files, folders or quoted glob patterns."),
    classes: str = typer.Option(..., "--classes", "-c", help="Comma-separated class names, e.g. cat,dog,grass."),
    model: str = typer.Option("shapes", "--model", "-m", help=MODEL_HELP),
    model_config: Optional[str] = typer.Option(None, "--model-config", help=MODEL_CONFIG_HELP),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    method: Optional[str] = typer.Option(None, help="goca or vanilla (then --heads/--layers/--rescale override); default: the config's (GOCA in every shipped default config)."),
    config: str = typer.Option("default", "--config", help="Segmentation config: default (configs/goca/<model or family>.yaml) | goca-reference (the published pipeline of the model's family)."),
    heads: Optional[str] = typer.Option(None, help="Head aggregation: goca | mean."),
    layers: Optional[str] = typer.Option(None, help="Layer aggregation: goca | uniform."),
    rescale: Optional[str] = typer.Option(None, help="Per-pixel rescaling: goca | none."),
    tau: Optional[float] = typer.Option(None, help="Background offset in [-1, 1] (default: the model's config)."),
    t: Optional[int] = typer.Option(None, "--t", help="Timestep 0-999 (default: the model's config)."),
    refine_order: Optional[int] = typer.Option(None, help="Self-attention propagation order, 0-8 (0 = off)."),
    postprocess: Optional[str] = typer.Option(None, help=POSTPROCESS_HELP),
    label_file: Optional[Path] = typer.Option(None, help="Per-image classes: JSON {image file name or stem: [class, ...]} (classes among --classes)."),
    caption_file: Optional[Path] = typer.Option(None, help=CAPTION_HELP),
    resize: Optional[str] = typer.Option(None, help="square (squash to the model's square input, as the published GOCA pipeline) | keep (aspect ratio kept); default: the config's (keep; goca-reference: square)."),
    memory: Optional[str] = typer.Option(None, help="auto | one-pass | two-pass: how GOCA holds the self maps of the blocks before the reference feature; two-pass (a partial extra forward first) keeps ~1 GiB instead of 13.9 GiB for SDXL at 2048 px; auto (default) takes it when one pass would keep over 2 GiB. Labels are the same."),
    heatmaps: bool = typer.Option(False, help="Also write <stem>_heat_<class>.png per class."),
    coco_results: Optional[Path] = typer.Option(None, help="Also write COCO results JSON (RLE) here."),
    num_workers: int = typer.Option(2, help="DataLoader workers decoding images ahead of the model (0 = inline)."),
    batch_size: int = typer.Option(1, help="Images per forward, 1-4096 (consecutive images of one size share it; each keeps its own classes and caption; outputs equal batch 1's)."),
    overwrite: bool = typer.Option(False, help="Recompute every image, replacing outputs of other settings."),
    skip_unreadable: bool = typer.Option(False, help="Skip unreadable images and list them in OUT/unreadable.json."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
) -> None:
    """Segment IMAGES into CLASSES: OUT/<stem>_labels.png (0 = background, i = i-th class), _overlay.png, .json.

    Runs unchanged under `accelerate launch`; a restart with the same command skips finished images.
    """
    from .runs.commands import segment as run

    summary, names = _call(run, images, classes, out_dir=out_dir, model=model, method=method, config=config,
                           heatmaps=heatmaps, label_file=label_file, caption_file=caption_file,
                           coco_results=coco_results, num_workers=num_workers, batch_size=batch_size, overwrite=overwrite,
                           skip_unreadable=skip_unreadable, device=device, dtype=dtype, heads=heads, layers=layers,
                           rescale=rescale, tau=tau, t=t, refine_order=refine_order, postprocess=postprocess,
                           model_config=model_config, resize=resize, memory=memory)
    if summary.main_process:
        err, _ = _consoles()
        err.print(f"segmented {summary.written} image(s) into {names} -> {out_dir} ({summary.skipped} already done)")


@app.command()
def generate(
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable); ids 0000, 0001, ..."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="Prompts file: .txt (one per line) or .csv with a header (caption/text/prompt column; id/image_id column), e.g. MS-COCO 30k captions."),
    classes: Optional[str] = typer.Option(None, "--classes", "-c", help="Comma-separated words to segment in each prompt (absent ones warn); default: the prompt's words the model can segment (a closed vocabulary's class words, e.g. circle,star on shapes; else every non-filler word), as the demo."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    model: str = typer.Option("shapes", "--model", "-m", help=MODEL_HELP),
    model_config: Optional[str] = typer.Option(None, "--model-config", help=MODEL_CONFIG_HELP),
    guidance: str = typer.Option("scfg-goca", help="cfg (plain classifier-free guidance) | scfg-goca (S-CFG with GOCA masks) | scfg (S-CFG with its own masks)."),
    guidance_scale: float = typer.Option(7.5, help="Guidance scale w (> 1)."),
    steps: int = typer.Option(20, help="Denoising steps, 1-1000."),
    trace_steps: Optional[str] = typer.Option(None, help="Steps whose maps are averaged for the label maps, e.g. 0,5,10 or 10-19 (default: every step)."),
    aggregate: str = typer.Option("maps", help="How the traced steps combine: maps (GOCA's decision once on the step-mean cross maps, self maps at one step) | steps (GOCA's decision at every traced step, class scores averaged; slower)."),
    self_step: Optional[int] = typer.Option(None, help="With --aggregate maps: the traced step whose self-attention maps give the layer weights and refinement (default: the step whose timestep is nearest the config's t)."),
    seed: int = typer.Option(0, help="Prompt i is generated from seed + i."),
    resolution: Optional[int] = typer.Option(None, help="Image side in px (default: the model's native resolution)."),
    tau: Optional[float] = typer.Option(None, help="Background offset in [-1, 1] of the label maps (default: the model's config)."),
    refine_order: Optional[int] = typer.Option(None, help="Self-attention propagation order, 0-8 (0 = off)."),
    heatmaps: bool = typer.Option(False, help="Also write <id>_heat_<class>.png per class."),
    overwrite: bool = typer.Option(False, help="Regenerate every prompt, replacing outputs of other settings."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
) -> None:
    """Generate an image per prompt with its GOCA label map: OUT/<id>.png, <id>_labels.png, <id>_overlay.png,
    <id>.json, and OUT/coco.json (the generated set as COCO instances).

    Runs unchanged under `accelerate launch`; a restart with the same command skips finished prompts.
    """
    from .runs.commands import generate as run

    summary = _call(run, prompt, out_dir=out_dir, prompts_file=prompts_file, classes=classes, model=model,
                    guidance=guidance, guidance_scale=guidance_scale, steps=steps, trace_steps=trace_steps, seed=seed,
                    resolution=resolution, aggregate=aggregate, self_step=self_step, heatmaps=heatmaps, overwrite=overwrite,
                    device=device, dtype=dtype, model_config=model_config, tau=tau, refine_order=refine_order)
    if summary.main_process:
        err, _ = _consoles()
        err.print(f"generated {summary.written} image(s) with label maps -> {out_dir} ({summary.skipped} already done)")


@app.command("eval")
def evaluate_cmd(
    model: str = typer.Option("shapes", "--model", "-m", help=MODEL_HELP),
    model_config: Optional[str] = typer.Option(None, "--model-config", help=MODEL_CONFIG_HELP),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="A GOCA benchmark read as published: voc | context | coco-object | coco-stuff | cityscapes | ade20k (with --root; `difffeat datasets` shows the layouts)."),
    root: Optional[Path] = typer.Option(None, "--root", help="With --dataset: the folder its official download unpacks to."),
    coco: Optional[Path] = typer.Option(None, help="COCO instances annotation JSON."),
    images: Optional[Path] = typer.Option(None, help="Image folder (COCO or VOC-style)."),
    voc_labels: Optional[Path] = typer.Option(None, help="VOC-style label PNG folder (with --images, --class-names)."),
    class_names: Optional[str] = typer.Option(None, help="VOC-style class names, comma-separated (label i = i-th)."),
    shapes_split: Optional[str] = typer.Option(None, help="Evaluate on generated shapes: train | val | test."),
    n: int = typer.Option(300, help="Number of generated shapes images (>= 1)."),
    setting: str = typer.Option("oracle", help="oracle (prompt = classes present, as in the papers) | all."),
    label_file: Optional[Path] = typer.Option(None, help="Per-image classes instead of --setting: JSON {image file name or id: [class, ...]}."),
    caption_file: Optional[Path] = typer.Option(None, help=CAPTION_HELP + " Classes from --setting or --label-file."),
    void: str = typer.Option("ignore", help="255 (VOC boundary / crowd) pixels: ignore (difffeat) | background (published GOCA). --dataset runs use the benchmark's published void handling."),
    append_background: Optional[bool] = typer.Option(None, "--append-background/--no-append-background", help="--dataset with --caption-file: append ', background' to each caption (default: the benchmark's published switch)."),
    append_missing_class: Optional[bool] = typer.Option(None, "--append-missing-class/--no-append-missing-class", help="--dataset with --caption-file: append the ground-truth classes the noun list misses (default: the benchmark's published switch)."),
    miou_average: Optional[str] = typer.Option(None, help="published (every class, an absent one counted as IoU 0; default for --dataset) | present (classes in ground truth or prediction; default otherwise)."),
    resize: Optional[str] = typer.Option(None, help="square (squash to the model's square input, as the published GOCA pipeline) | keep (aspect ratio kept); default: the config's (keep; goca-reference: square)."),

    tau_grid: bool = typer.Option(False, help="Also report mIoU at each tau of the published grid -0.4..0.4 ON THE EVALUATED SPLIT (as the published code prints it; optimistic)."),
    postprocess: Optional[str] = typer.Option(None, help=POSTPROCESS_HELP),
    method: str = typer.Option("goca", help="goca or vanilla."),
    config: str = typer.Option("default", "--config", help="Segmentation config: default (configs/goca/<model or family>.yaml) | goca-reference (the published pipeline of the model's family)."),
    heads: Optional[str] = typer.Option(None, help="Head aggregation: goca | mean (default: --method's)."),
    layers: Optional[str] = typer.Option(None, help="Layer aggregation: goca | uniform (default: --method's)."),
    rescale: Optional[str] = typer.Option(None, help="Per-pixel rescaling: goca | none (default: --method's)."),
    tau: Optional[float] = typer.Option(None, help="Fixed background offset in [-1, 1] (default: the model's config)."),
    tune_shapes_split: Optional[str] = typer.Option(None, help="Choose tau on this generated split first (e.g. val)."),
    tune_n: int = typer.Option(100, help="Images used to choose tau."),
    t: Optional[int] = typer.Option(None, "--t", help="Timestep 0-999 (default: the model's config)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N images."),
    run_dir: Path = typer.Option(Path("eval_out"), "--out", help="Run folder: manifest, per-chunk confusion counts for resuming, and report.json."),
    report: Optional[Path] = typer.Option(None, help="Where to write the JSON report (default: OUT/report.json)."),
    chunk_size: int = typer.Option(8, help="Images per resumable chunk."),
    batch_size: int = typer.Option(1, help="Images per forward, 1 to --chunk-size (images of one size share it; the report equals batch 1's)."),
    num_workers: int = typer.Option(2, help="DataLoader workers preparing images ahead of the model (0 = inline)."),
    overwrite: bool = typer.Option(False, help="Recompute everything in --out, replacing results of other settings."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
) -> None:
    """Evaluate segmentation mIoU on a dataset and write a JSON report with per-class IoU.

    Runs unchanged under `accelerate launch --multi_gpu --num_processes N` (the confusion matrices are summed
    across processes; the result equals one process's); a restart with the same command resumes.
    """
    from .runs.commands import evaluate_dataset

    res = _call(evaluate_dataset, model, coco=coco, images=images, voc_labels=voc_labels, class_names=class_names,
                shapes_split=shapes_split, n=n, setting=setting, method=method, config=config, tune_shapes_split=tune_shapes_split,
                label_file=label_file, caption_file=caption_file, void=void, tau_grid=tau_grid, postprocess=postprocess,
                tune_n=tune_n, limit=limit, out_dir=run_dir, report=report, chunk_size=chunk_size, batch_size=batch_size,
                num_workers=num_workers, overwrite=overwrite, device=device, dtype=dtype, heads=heads, layers=layers,
                rescale=rescale, tau=tau, t=t, model_config=model_config, dataset=dataset, root=root,
                append_background=append_background, append_missing_class=append_missing_class,
                miou_average=miou_average, resize=resize)
    if res.main_process:
        err, out = _consoles()
        bench = res.report.extra.get("benchmark")
        if bench:
            rules = bench["caption_rules"]
            caps = ("oracle classes, no captions" if rules.get("captions", True) is None else
                    f"captions: append background {'on' if rules['append_background'] else 'off'}, append missing classes "
                    f"{'on' if rules['append_missing_class'] else 'off'}")
            out.print(f"{bench['dataset']}: split {bench['split']}; {res.report.n_images} images; {caps}; "
                      f"mIoU average {bench['miou_average']}; resize {bench['resize']}")
        out.print(f"mIoU {res.report.miou:.4f} ({res.report.setting}: {res.report.n_images} images, method {res.method}, tau {res.tau})")
        grid = res.report.extra.get("evaluated_split_tau_grid")
        if grid:
            out.print(f"published-style (tau chosen ON THE EVALUATED SPLIT, optimistic): best mIoU "
                      f"{grid['best_miou_on_evaluated_split']:.4f} at tau {grid['best_tau_on_evaluated_split']:+.2f}; every tau in the report")
        err.print(f"report: {res.report_path}")


@app.command()
def gate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Argument(..., help="Image files."),
    model_config: Optional[str] = typer.Option(None, "--model-config", help=MODEL_CONFIG_HELP),
    technique: list[str] = typer.Option(..., "--technique", help="prompt:quality=natural | prompt:template=a photo of {} | controlnet:ID[,scale=1,start_t=60,steps=2] | lora:PATH[,scale=1] (repeatable)."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Activations to score (default: the first cross-attention query among the catalog's candidates; joint-q on MMDiTs)."),
    prompt: str = typer.Option("", help="Base prompt."),
    t: int = typer.Option(50, "--t", help="Extraction timestep, 0-999."),
    out_dir: Path = typer.Option(Path("gate_out"), "--out", "-o", help="Where the img2img comparisons and gate.json go."),
    img2img: bool = typer.Option(True, help="Also run the img2img comparison per image and technique."),
    strength: float = typer.Option(0.75, help="img2img strength, 0-1."),
    steps: int = typer.Option(20, help="img2img steps."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
) -> None:
    """Score content-shift suppression techniques (GATE): Laplacian score per activation, img2img comparisons."""
    from .shift import run_gate

    rep = _call(run_gate, model, images, technique, features=features, prompt=prompt, t=t, out_dir=out_dir,
                img2img=img2img, strength=strength, steps=steps, device=device, dtype=dtype, model_config=model_config)
    err, out = _consoles()
    out.print(_table(f"GATE Laplacian score (1 = no shift, <= 0 = no better than plain) at t={rep.t}",
                     ["technique", *rep.features],
                     [[r["technique"], *[f"{r['scores'][n]:.3f}" for n in rep.features]] for r in rep.rows]))
    err.print(f"details: {rep.json_path}")


@app.command()
def bench(
    what: str = typer.Argument("goca", help="goca: observer memory vs storing every head's map, and segment time vs a bare forward; goca-memory: GOCA's maps in one pass vs two on an SDXL-shaped model (extra peak RSS, maps kept)."),
    resolution: int = typer.Option(512, help="Input resolution (px, a multiple of 8 in 64-4096) of the SD1.5-shaped tiny model."),
    repeats: int = typer.Option(3, help="Timing repeats (median reported)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write the figures as JSON here."),
    device: str = typer.Option("cpu", help="cpu or cuda (GPU memory is then the allocator's peak)."),
    dtype: Optional[str] = typer.Option(None, help="fp16, bf16 or fp32; default fp16 on CUDA, fp32 on the CPU."),
    arch: str = typer.Option("tiny", help="tiny (the quick SD1.5-shaped model) or a real-size architecture with random weights: sd15, sd21, sdxl, pixart (pixart-sigma), sd3, sd35-medium, sana (sana-1600m), lumina2 (lumina-image-2), flux (suites goca, features, early-exit, throughput, vae, accounting)."),
    text_layers: Optional[int] = typer.Option(None, help="With --arch: cap on text-encoder depth (the denoiser and VAE are unchanged)."),
) -> None:
    """Speed/memory benchmarks, reported as ratios against a baseline measured in the same run."""
    from .devtools.bench import run_benchmark

    figures = _call(run_benchmark, what, resolution=resolution, repeats=repeats, device=device, dtype=dtype, out_file=out_file,
                    arch=arch, text_layers=text_layers)
    _consoles()[1].print_json(json.dumps(figures))


@app.command("make-tiny")
def make_tiny(
    family: str = typer.Argument(..., help="sd, sdxl, pixart, sd3 or flux."),
    out_dir: Path = typer.Argument(..., help="Folder to write the pipeline to."),
    seed: int = typer.Option(0, help="Weight seed."),
) -> None:
    """Save a tiny RANDOM-weight pipeline of FAMILY (offline), to try every command without a download."""
    from .testing import save_tiny_pipeline

    _call(save_tiny_pipeline, family, out_dir, seed=seed)
    _consoles()[0].print(f"saved a tiny random {family} pipeline to {out_dir} (random weights: for testing only)")


@app.command("make-single-file")
def make_single_file(
    layout: str = typer.Argument(..., help="sd, sd2, sdxl, sd3, sd35 or flux (flux: the smallest width diffusers converts, ~1 GB)."),
    file: Path = typer.Argument(..., help="The .safetensors file to write (original, non-diffusers key layout)."),
    config_dir: Path = typer.Argument(..., help="Folder for the matching config (what --model-config needs besides the file)."),
    seed: int = typer.Option(0, help="Weight seed."),
    denoiser_only: bool = typer.Option(False, help="Write the denoiser alone (as FLUX.1 / SD3.5 releases ship it)."),
) -> None:
    """Write a tiny RANDOM-weight single-file checkpoint of LAYOUT and its config folder (offline), to try
    `--model FILE --model-config CONFIG_DIR` without a download."""
    from .testing import save_single_file

    _call(save_single_file, layout, file, seed=seed, config=config_dir, denoiser_only=denoiser_only)
    _consoles()[0].print(f"saved a tiny random {layout} single-file checkpoint to {file} and its config to {config_dir} "
                         "(random weights: for testing only)")


@app.command()
def datasets(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """The GOCA benchmarks `eval --dataset` reads: expected folder layout under --root, official download page, split."""
    from .evaluate.benchmarks import list_benchmarks

    rows = _call(list_benchmarks)
    _, out = _consoles()
    if as_json:
        out.print_json(json.dumps(rows))
        return
    for r in rows:
        cap = r["caption"]
        out.print(f"[bold]{r['name']}[/bold]  {r['title']}\n  download: {r['download']} ({r['archive']})\n"
                  f"  layout under --root: {'; '.join(r['layout'])}\n  split: {r['split']}\n  void: {r['void']}\n"
                  f"  captions: append background {'on' if cap['append_background'] else 'off'}, append missing classes "
                  f"{'on' if cap['append_missing_class'] else 'off'}", highlight=False)


@app.command()
def demo(
    model: str = typer.Option("shapes", "--model", "-m", help=MODEL_HELP),
    port: int = typer.Option(7860, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 to expose it)."),
    concurrency: int = typer.Option(1, help="Requests processed at once (the queue holds the rest)."),
    model_config: Optional[str] = typer.Option(None, "--model-config", help=MODEL_CONFIG_HELP),
) -> None:
    """Start the Gradio demo (segment, features, content shift); needs the demo extra: `pip install "difffeat\\[demo]"`."""
    from .serve import serve

    _call(serve, model, port=port, host=host, concurrency=concurrency, model_config=model_config)


@app.command()
def probe(
    model: str = typer.Argument("shapes", help=MODEL_HELP),
    out_dir: Path = typer.Option(Path("probe_out"), "--out", "-o", help="Run folder: features/ cache, classifier.safetensors (split 1's ensemble), report.json."),
    ddpm: Optional[Path] = typer.Option(None, help="A ddpm-segmentation dataset (ROOT/real/train|test with <stem>.npy labels), e.g. horse_21."),
    images: Optional[Path] = typer.Option(None, help="Folder of images (with --labels)."),
    labels: Optional[Path] = typer.Option(None, help="Folder of <stem>.png label maps (class index per pixel, 255 = ignore)."),
    num_classes: Optional[int] = typer.Option(None, help="Number of classes (labels 0..N-1); default for ddpm datasets: theirs."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Comma-separated activation names."),
    preset: Optional[str] = typer.Option(None, help="A feature preset (see `difffeat presets`)."),
    t: Optional[int] = typer.Option(None, "--t", help="Timestep 0-999 (default: the preset's or 50)."),
    resolution: Optional[int] = typer.Option(None, help="Model input long side in px (default: the preset's or native)."),
    prompt: str = typer.Option("", help="Prompt for every image (the reference: 'a horse, high quality, ...' for Horse-21)."),
    train_count: Optional[int] = typer.Option(None, help="Labelled training images per split (default: the dataset's train part)."),
    test_count: Optional[int] = typer.Option(None, help="At most this many test images per split."),
    splits: int = typer.Option(5, help="Random re-splits of train + test averaged (the paper: 5)."),
    models: int = typer.Option(10, help="MLPs in the voting ensemble (the paper: 10)."),
    epochs: int = typer.Option(100, help="Maximum epochs per MLP (early stopping as published)."),
    batch_size: int = typer.Option(64, help="Pixels per training batch (the paper: 64)."),
    label_size: Optional[int] = typer.Option(None, help="Long side of the grid labels and upsampled features are compared on (default: 256 as the paper; 64 with --rank)."),
    pool: int = typer.Option(16, help="Training images whose pixels are shuffled together (RAM holds their native features)."),
    void: str = typer.Option("ignore", help="255 pixels at test time: ignore | reference (counted as the published code does)."),
    technique: Optional[list[str]] = typer.Option(None, "--technique", help="Content-shift suppression (repeatable; each is one variant, their features concatenated as the reference combines them; '+' applies several in one forward): prompt:quality=natural | prompt:task=horse21 | controlnet:ID[,start=published | ,start_t=61,steps=11] | lora:FILE[,scale=1]."),
    timesteps: Optional[str] = typer.Option(None, help="Several timesteps, comma-separated (features concatenated), instead of --t."),
    ensemble_size: int = typer.Option(1, help="Average the features over this many noise seeds (--seed onwards)."),
    rank: bool = typer.Option(False, "--rank", help="Instead: rank every candidate activation (or --kinds / --blocks) by a fast linear probe on these images."),
    kinds: Optional[str] = typer.Option(None, help="--rank: only these kinds (comma-separated, e.g. cross-q,vit-out)."),
    blocks: Optional[str] = typer.Option(None, help="--rank: only activations under these blocks (comma-separated, e.g. up_blocks.1)."),
    all_kinds: bool = typer.Option(False, help="--rank: every activation but the attention maps, also the kinds the paper finds noisy."),
    pixels_per_image: int = typer.Option(256, help="--rank: labelled pixels sampled per image."),
    save_preset: Optional[Path] = typer.Option(None, help="--rank: write the --top activations as a preset file (--preset FILE.yaml reads it)."),
    top: int = typer.Option(3, help="--rank: activations in the saved preset."),
    seed: int = typer.Option(0, help="Seed of the splits, classifiers and noise."),
    overwrite: bool = typer.Option(False, help="Recompute cached features made with other settings."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    model_config: Optional[str] = typer.Option(None, "--model-config", help=MODEL_CONFIG_HELP),
) -> None:
    """Label-scarce segmentation (the activation paper's protocol): pixel-MLP ensemble on frozen features,
    mIoU mean and spread over random splits; the classifier is saved for `difffeat probe-predict`."""
    if rank:
        from .runs.downstream import rank as run_rank

        rows, path = _call(run_rank, model, ddpm=ddpm, images=images, labels=labels, num_classes=num_classes, kinds=kinds,
                           blocks=blocks, t=t, resolution=resolution, prompt=prompt, seed=seed, train_count=train_count,
                           test_count=test_count, pixels_per_image=pixels_per_image,
                           label_size=label_size, save_preset=save_preset, top=top, all_kinds=all_kinds,
                           device=device, dtype=dtype, model_config=model_config)
        err, out = _consoles()
        out.print(_table(f"{len(rows)} activations ranked by linear-probe mIoU", ["rank", "activation", "kind", "shape", "mIoU", "pixel acc", "MB/image"],
                         [[str(i + 1), r.name, r.kind, "x".join(map(str, r.shape)), f"{r.miou:.4f}", f"{r.pixel_accuracy:.4f}", f"{r.megabytes:.3f}"] for i, r in enumerate(rows)]))
        if path:
            err.print(f"preset: {path} (use --preset {path})")
        return
    from .runs.downstream import probe as run

    rep = _call(run, model, out_dir=out_dir, ddpm=ddpm, images=images, labels=labels, num_classes=num_classes,
                features=features, preset=preset, t=t, resolution=resolution, prompt=prompt, seed=seed,
                train_count=train_count, test_count=test_count, splits=splits, models=models, epochs=epochs,
                batch_size=batch_size, label_size=label_size, pool=pool, void=void, overwrite=overwrite,
                device=device, dtype=dtype, model_config=model_config, techniques=technique, timesteps=timesteps,
                ensemble_size=ensemble_size)
    err, out = _consoles()
    out.print(f"mIoU {rep.miou_mean:.4f} +- {rep.miou_std:.4f} over {len(rep.miou_per_split)} split(s) "
              f"({rep.n_train} train / {rep.n_test} test images, {rep.num_classes} classes)")
    err.print(f"report: {out_dir / 'report.json'}; classifier: {rep.classifier}")


@app.command("probe-predict")
def probe_predict(
    classifier: Path = typer.Argument(..., help="classifier.safetensors written by `difffeat probe`."),
    images: list[Path] = typer.Argument(..., help="Image files, folders or quoted glob patterns."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder: <stem>_labels.png per image."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Where to load the model from (default: the one the classifier was trained on)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    model_config: Optional[str] = typer.Option(None, "--model-config", help=MODEL_CONFIG_HELP),
) -> None:
    """Segment IMAGES with a pixel classifier trained by `difffeat probe` (same features, same settings)."""
    from .runs.downstream import probe_predict as run

    written = _call(run, classifier, images, out_dir=out_dir, model=model, device=device, dtype=dtype, model_config=model_config)
    _consoles()[0].print(f"wrote {len(written)} label map(s) to {out_dir}")


@app.command()
def correspond(
    model: str = typer.Argument("shapes", help=MODEL_HELP),
    out_dir: Path = typer.Option(Path("correspond_out"), "--out", "-o", help="Run folder: features/ cache, predictions.json, report.json."),
    spair: Optional[Path] = typer.Option(None, help="An SPair-71k folder (PairAnnotation/<split>/*.json, JPEGImages/<category>/)."),
    pairs: Optional[Path] = typer.Option(None, help="Or a pair-list JSON (source_path, target_path, source_points, target_points, category, target_bounding_box)."),
    images: Optional[Path] = typer.Option(None, help="Image folder the --pairs paths are relative to."),
    split: str = typer.Option("test", help="SPair-71k split: trn | val | test."),
    categories: Optional[str] = typer.Option(None, help="Only these SPair-71k categories (comma-separated)."),
    limit: Optional[int] = typer.Option(None, help="At most N pairs (per category for SPair-71k)."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Comma-separated activation names."),
    preset: Optional[str] = typer.Option(None, help="A feature preset (see `difffeat presets`)."),
    t: Optional[int] = typer.Option(None, "--t", help="Timestep 0-999 (default: the preset's or 50)."),
    resolution: Optional[int] = typer.Option(None, help="Model input side in px (default: the preset's or native)."),
    square: bool = typer.Option(True, help="Resize images to a square (as the reference) or keep the aspect ratio."),
    prompt: str = typer.Option("", help="Prompt for every image."),
    technique: Optional[list[str]] = typer.Option(None, "--technique", help="Content-shift suppression (repeatable; each is one variant, their features concatenated as the reference combines them; '+' applies several in one forward): prompt:quality=natural | prompt:task=horse21 | controlnet:ID[,start=published | ,start_t=61,steps=11] | lora:FILE[,scale=1]."),
    timesteps: Optional[str] = typer.Option(None, help="Several timesteps, comma-separated (features concatenated), instead of --t."),
    seed: int = typer.Option(0, help="Noise seed (the first of --ensemble-size seeds)."),
    ensemble_size: int = typer.Option(1, help="Average each image's features over this many noise seeds (DIFT's ensemble_size)."),
    alpha: float = typer.Option(0.1, help="PCK threshold as a fraction of the image's / box's longer side."),
    load_size: int = typer.Option(512, help="Side of the square grid features are upsampled to and matched on (the reference: 512)."),
    overwrite: bool = typer.Option(False, help="Recompute cached features made with other settings."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    model_config: Optional[str] = typer.Option(None, "--model-config", help=MODEL_CONFIG_HELP),
) -> None:
    """Zero-shot semantic correspondence (nearest neighbour on features, DIFT's method): PCK@alpha per image
    and per bounding box, overall and per category."""
    from .runs.downstream import correspond as run

    rep = _call(run, model, out_dir=out_dir, spair=spair, pairs_file=pairs, images=images, split=split,
                categories=categories, limit=limit, features=features, preset=preset, t=t, resolution=resolution,
                square=square, prompt=prompt, seed=seed, ensemble_size=ensemble_size, alpha=alpha, load_size=load_size,
                overwrite=overwrite, device=device, dtype=dtype, model_config=model_config, techniques=technique,
                timesteps=timesteps)
    err, out = _consoles()
    s = rep.scores
    out.print(_table(f"PCK@{s['alpha']:g} ({s['pairs']} pairs, {s['keypoints']} keypoints)", ["category", "pairs", "PCK img", "PCK bbox"],
                     [[c, str(v["pairs"]), f"{v['pck_img']:.4f}", f"{v['pck_bbox']:.4f}"] for c, v in s["per_category"].items()]
                     + [["all", str(s["pairs"]), f"{s['pck_img']:.4f}", f"{s['pck_bbox']:.4f}"]]))
    err.print(f"report: {out_dir / 'report.json'}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
