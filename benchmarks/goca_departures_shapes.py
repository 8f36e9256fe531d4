"""Each departure of difffeat's GOCA from the published code (Darkbblue/goca), published vs difffeat's variant,
on the embedded shapes model (oracle image labels).

    python benchmarks/goca_departures_shapes.py --model shapes --n-val 100 --n-test 300 \
        --out benchmarks/results/goca_departures_shapes.json

Every row is GOCA (heads, layers, rescaling) with the model's own config for everything else (t, refinement
order, blur; ``configs/goca/shapes.yaml``) and the published value of every departure setting except the one
it names. tau is chosen per row on ``val`` (grid -0.4..1.0, step 0.05); rows are scored on ``test``.
Departures and how each is exercised on this model:

1. ``self_map_resize``: ``plain`` (published) vs ``mass-preserving``.
2. ``ref_channels``: ``first`` (published) vs ``all``.
3. ``pseudo_grid``: ``reference`` (published) vs ``map``. With the default reference (a block at the largest
   grid) both are the same computation, so these rows use the SD1.5-analogous reference position (second-to-
   last up level, repeat 1: ``up_blocks.1.attentions.1``, an 8x8 grid below the 16x16 map grid).
4. ``refine_blocks``: the published SD1.5 list (last up level repeats 0 and 1, first down level's last
   attention) maps on this model to every block at the largest grid, i.e. to difffeat's variant: no row.
5. ``entity_merge``: ``before-refine`` (published) vs ``after-refine``; identical with one background entity,
   so these rows add the caption's background colour word as a second entity (the published pipeline makes
   every caption noun that is not a class a background entity).

Per image: three forwards (reference at the default block; at the 8x8 block; with two entities), each
decided under its rows. The last row sets every departure to difffeat's variant.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import difffeat
from difffeat.evaluate import ShapesDataset, TauSweep
from difffeat.io import write_json

PUBLISHED = dict(self_map_resize="plain", ref_channels="first", pseudo_grid="reference", entity_merge="before-refine")
VARIANT = dict(self_map_resize="mass-preserving", ref_channels="all", pseudo_grid="map", entity_merge="after-refine")
REF_8X8 = "up_blocks.1.attentions.1.transformer_blocks.0"
TAUS = tuple(float(x) for x in np.round(np.linspace(-0.4, 1.0, 29), 3))

#: row -> (observation, setting changes from PUBLISHED)
ROWS = {
    "published (all five)": ("default", {}),
    "self_map_resize=mass-preserving": ("default", {"self_map_resize": "mass-preserving"}),
    "ref_channels=all": ("default", {"ref_channels": "all"}),
    "published, reference 8x8": ("ref8", {}),
    "pseudo_grid=map, reference 8x8": ("ref8", {"pseudo_grid": "map"}),
    "published, two entities": ("two_entities", {}),
    "entity_merge=after-refine, two entities": ("two_entities", {"entity_merge": "after-refine"}),
    "difffeat variants (all)": ("default", VARIANT),
}
#: departure -> (setting, published row, variant row)
DEPARTURES = {
    "1 self-map resize row mass": ("self_map_resize", "published (all five)", "self_map_resize=mass-preserving"),
    "2 reference feature channels": ("ref_channels", "published (all five)", "ref_channels=all"),
    "3 grid of the pseudo self-attention P": ("pseudo_grid", "published, reference 8x8", "pseudo_grid=map, reference 8x8"),
    "5 background entities merge": ("entity_merge", "published, two entities", "entity_merge=after-refine, two entities"),
}
OBSERVERS = {"default": {}, "ref8": {"ref_block": REF_8X8}, "two_entities": {}}


def run_split(backbone, data, split, sweep, segs, observers):
    for i in range(len(data)):
        item = data[i]
        labels = item.present()
        names = [data.classes[l - 1] for l in labels]
        colour = data.world.sample(data.split, data.start + i).background_colour
        obs = {}
        with backbone.reusing_latents():  # one VAE encode for every observer
            for key, seg in observers.items():
                if labels:
                    entities = [colour] if key == "two_entities" else None
                    obs[key] = seg.observe(item.image, names, entities=entities, everything=True)
        for row, (key, _) in ROWS.items():
            sweep.update(split, row, segs[row].decide(obs[key]) if labels else None, labels, item.gt)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--out", default="benchmarks/results/goca_departures_shapes.json")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    start = time.perf_counter()
    backbone = difffeat.load(args.model, device=args.device, dtype="fp32")
    base = difffeat.Segmenter(backbone, method="goca", **PUBLISHED).settings
    observers = {k: difffeat.Segmenter(backbone, settings=base.update(**v)) for k, v in OBSERVERS.items()}
    segs = {row: difffeat.Segmenter(backbone, settings=base.update(**OBSERVERS[key], **changes)) for row, (key, changes) in ROWS.items()}
    val, test = ShapesDataset("val", args.n_val), ShapesDataset("test", args.n_test)
    sweep = TauSweep(len(val.classes) + 1, TAUS)
    run_split(backbone, val, "val", sweep, segs, observers)
    print(f"val done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    run_split(backbone, test, "test", sweep, segs, observers)
    rows = {r["row"]: {k: v for k, v in r.items() if k != "row"} for r in sweep.rows()}
    departures = {}
    for name, (setting, pub, var) in DEPARTURES.items():
        departures[name] = {
            "setting": setting, "published": PUBLISHED[setting], "variant": VARIANT[setting],
            "published_row": pub, "variant_row": var,
            "test_miou_published": rows[pub]["miou"], "test_miou_variant": rows[var]["miou"],
            "test_delta_variant_minus_published": rows[var]["miou"] - rows[pub]["miou"],
            "val_miou_published": rows[pub]["tune_miou"], "val_miou_variant": rows[var]["tune_miou"],
            "val_prefers": VARIANT[setting] if rows[var]["tune_miou"] > rows[pub]["tune_miou"] else PUBLISHED[setting],
        }  # fmt: skip
    report = {
        "model": args.model, "setting": "oracle image labels", "split": "test", "n_test": args.n_test,
        "tuning": {"split": "val", "n_val": args.n_val, "tau_grid": list(TAUS)},
        "settings": {k: v for k, v in base.to_dict().items() if k not in ("tau",)},
        "rows": rows, "departures": departures,
        "departure_4": "refine_blocks: the published SD1.5 list's analogue on this model is every block at the largest grid "
                       "(difffeat's variant), so both are the same computation here",
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    write_json(args.out, report)
    print(f"| row | mIoU (test, n={args.n_test}) | val mIoU | tau (val) |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {100 * row['miou']:.1f} | {100 * row['tune_miou']:.1f} | {row['tau']:+.2f} |")
    print(f"{report['seconds']} s")


if __name__ == "__main__":
    main()
