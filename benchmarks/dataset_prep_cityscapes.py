"""Data loading is never the bottleneck of ``eval --dataset``: per-image data preparation of Cityscapes-sized
images (2048x1024) in DataLoader workers, as a ratio against one full-size SD1.5 512-px UNet forward (random
weights, built on the CPU) measured in the same run. Target: <= 0.05x.

    flock /tmp/difffeat-heavy.lock python benchmarks/dataset_prep_cityscapes.py [--n 24] [--workers 2] \\
        [--out benchmarks/results/dataset_prep_cityscapes.json]

Data preparation = what eval's loader does per image in its workers (the Cityscapes reader: decode the
leftImg8bit PNG, decode and map the gtFine labelIds PNG, the captioner's class order) plus what the model's
input needs (squash to 512 x 512, as ``--resize square``) and the published caption of the image. The images
are written first (smooth random scenes + noise, so PNG decoding costs about what real photos cost); the
figure is the loader's wall time per image over ``--n`` images, worker start included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_cityscapes(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ids = [7, 8, 11, 17, 21, 23, 24, 26, 0, 4]
    for i in range(n):
        city = ["frankfurt", "lindau", "munster"][i % 3]
        stem = f"{city}_{i:06d}_000019"
        low = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((2048, 1024), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        lab = np.asarray(Image.fromarray(rng.choice(ids, (16, 32)).astype(np.uint8)).resize((2048, 1024), Image.NEAREST))
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
        Image.fromarray(lab).save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
    nouns = {f"{p.name}": {"caption": "Cars, road, (people, bicycles), buildings, traffic sign, vegetation, sky."}
             for p in (root / "leftImg8bit" / "val").rglob("*.png")}  # fmt: skip
    (root / "nouns.json").write_text(json.dumps(nouns))
    return root


class Prepared:
    """One eval item as the run needs it: the reader's item, its 512-px square input, its caption."""

    def __init__(self, data, source) -> None:
        self.data, self.source = data, source

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from difffeat.images import resize_to_multiple

        item = self.data[i]
        pixels = resize_to_multiple(item.image, 512, 8, True)
        prompt = self.source.prompt(item, self.data.classes)
        return i, pixels.size, item.gt.shape, prompt.caption


def data_prep_seconds(root: Path, workers: int) -> float:
    from torch.utils.data import DataLoader

    from difffeat.evaluate.benchmarks import BenchmarkCaptions, open_benchmark

    data = open_benchmark("cityscapes", root)
    source = BenchmarkCaptions(root / "nouns.json", "cityscapes")
    source.check(data)
    loader = DataLoader(Prepared(data, source), batch_size=1, num_workers=workers, collate_fn=lambda b: b[0],
                        prefetch_factor=4 if workers else None)  # fmt: skip
    start = time.perf_counter()
    n = sum(1 for _ in loader)
    return (time.perf_counter() - start) / n


def sd15_forward_seconds(repeats: int) -> float:
    import torch

    from difffeat import load
    from difffeat.architectures import build_pipeline
    from difffeat.devtools.bench_real import benchmark_image

    # SD1.5's full-size UNet and VAE with random weights; the text encoder cut to one layer (not timed)
    backbone = load(build_pipeline("sd15", dtype=torch.float32, text_layers=1), device="cpu", dtype=torch.float32)
    inputs = backbone.prepare([benchmark_image(512)], "a photo of car, road, person, background", 100, 0, 512, True)
    times = []
    with torch.no_grad():
        backbone.denoise(inputs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            backbone.denoise(inputs)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24, help="Cityscapes-sized images")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (eval's default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="SD1.5 forwards timed (median)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_cityscapes(Path(tmp), args.n)
        prep = data_prep_seconds(root, args.workers)
    forward = sd15_forward_seconds(args.repeats)
    result = {
        "data_prep_seconds_per_image": prep, "sd15_512_forward_seconds": forward, "ratio": prep / forward,
        "target_ratio": 0.05, "met": prep / forward <= 0.05, "n_images": args.n, "workers": args.workers,
        "image_size": [2048, 1024], "torch_threads": __import__("torch").get_num_threads(),
        "load_average": os.getloadavg(), "command": "python benchmarks/dataset_prep_cityscapes.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
