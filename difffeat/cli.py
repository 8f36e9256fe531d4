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
console = Console(stderr=True)
out = Console()

MODEL_HELP = "Hub id, local diffusers folder, or 'shapes' (the embedded model, no download)."


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _split(csv: Optional[str]) -> list[str]:
    return [s.strip() for s in csv.split(",") if s.strip()] if csv else []


@app.command()
def catalog(
    model: str = typer.Argument("shapes", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {name, kind, shape, flags, ...}."),
    kind: Optional[str] = typer.Option(None, help="Only these kinds (comma-separated), e.g. cross-q,resnet-out."),
    candidates: bool = typer.Option(False, help="Only the paper's filtered candidates (no noisy kinds/stages, no maps)."),
    resolution: Optional[int] = typer.Option(None, help="Probe resolution for shapes (default: native)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ..."),
) -> None:
    """List every capturable activation of MODEL with kind, shape and property flags."""
    from . import list_activations, load

    try:
        cat = list_activations(load(model, device=device), probe_resolution=resolution)
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
    images: list[Path] = typer.Argument(..., help="Image files."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Comma-separated activation names."),
    preset: Optional[str] = typer.Option(None, help="A feature preset (see `difffeat presets`)."),
    t: Optional[int] = typer.Option(None, "--t", help="Timestep on the 1000-step scale (default: preset's or 50)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder: <stem>.safetensors per image."),
    prompt: str = typer.Option("", help="Prompt used for every image."),
    resolution: Optional[int] = typer.Option(None, help="Long side in px (default: preset's or native)."),
    square: bool = typer.Option(False, help="Resize to a square instead of keeping the aspect ratio."),
    seed: int = typer.Option(0, help="Noise seed."),
    batch_size: int = typer.Option(8, help="Images per forward."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ..."),
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16, bf16 (default: fp16 on CUDA, fp32 on CPU)."),
) -> None:
    """Extract features of IMAGES and write OUT/<stem>.safetensors ([C, H, W] per feature name)."""
    from . import FeatureExtractor, load

    try:
        names = _split(features)
        if not names and not preset:
            raise ValueError("name the features with --features a,b or pick --preset (see `difffeat presets`)")
        backbone = load(model, device=device, dtype=dtype)
        fx = FeatureExtractor(backbone, names or None, preset=preset, t=t, resolution=resolution, square=square, seed=seed, batch_size=batch_size)
        written = fx.extract_to_dir(images, out_dir, prompts=prompt, progress=True)
    except (DifffeatError, ValueError) as exc:
        _fail(exc)
    console.print(f"wrote {len(written)} feature files to {out_dir} ({', '.join(fx.names)})")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
