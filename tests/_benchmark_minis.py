"""Miniature copies of the six GOCA benchmarks in the layout their official downloads unpack to, written by
the tests (a few small images, labels with void pixels and ids outside the evaluated classes, nested
folders, ``.mat`` files, RGB-encoded panoptic ids), plus per-image GPT-style noun lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 12, 16


def _image(path: Path, seed: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path, fmt)


def _png(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.astype(np.uint8))
    if mode == "P":  # a palette image whose indices are the ids (VOC's SegmentationClass style)
        img.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, (i * 13) % 256)])
    img.save(path)


def _blocks(values: list[int], seed: int) -> np.ndarray:
    """A label map of vertical bands of ``values`` with a random sprinkle of the same values."""
    rng = np.random.default_rng(seed)
    lab = np.array_split(np.arange(W), len(values))
    out = np.zeros((H, W), np.int64)
    for v, cols in zip(values, lab):
        out[:, cols] = v
    noise = rng.random((H, W)) < 0.15
    out[noise] = rng.choice(values, size=int(noise.sum()))
    return out


def _captions(path: Path, entries: dict[str, str]) -> Path:
    path.write_text(json.dumps({k: {"caption": v} for k, v in entries.items()}))
    return path


def write_voc(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    ids = ["2008_000002", "2008_000003", "2009_000010"]
    labels = {ids[0]: [0, 15, 255, 3], ids[1]: [0, 7, 7, 255, 14], ids[2]: [0, 11, 20, 9]}
    objects = {ids[0]: ["person", "bird", "person"], ids[1]: ["car", "motorbike", "person"], ids[2]: ["diningtable", "tvmonitor", "chair"]}
    for k, i in enumerate(ids + ["2010_000001"]):  # an image outside the split
        _image(base / "JPEGImages" / f"{i}.jpg", k)
    for k, i in enumerate(ids):
        _png(base / "SegmentationClass" / f"{i}.png", _blocks(labels[i], k), "P")
        xml = "".join(f"<object><name>{n}</name><pose>Left</pose></object>" for n in objects[i])
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{i}.xml").write_text(f"<annotation><filename>{i}.jpg</filename>{xml}</annotation>")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2010_000001\n")
    _captions(root / "voc_nouns.json", {
        f"{ids[0]}.jpg": "Man, (bird, feathers), sky, Man.",
        f"{ids[1]}.jpg": "(person, motorcycle), road, vehicle, trees",
        f"{ids[2]}.jpg": "Table, (chair, cushion), television, wall.",
    })  # fmt: skip
    return root


def write_context(root: Path) -> Path:
    import scipy.io

    voc = root / "VOCdevkit" / "VOC2012"
    ids = ["2008_000002", "2008_000008", "2008_000015", "2008_000019"]
    raws = {ids[0]: [0, 2, 259, 284, 1], ids[1]: [0, 19, 458, 400], ids[3]: [415, 2, 115, 33]}  # 1, 400: not in the 59
    for k, i in enumerate(ids):
        _image(voc / "JPEGImages" / f"{i}.jpg", 10 + k)
    for k, (i, vals) in enumerate(raws.items()):  # ids[2] has no Context label: outside the subset
        (root / "trainval").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "trainval" / f"{i}.mat", {"LabelMap": _blocks(vals, 20 + k).astype(np.uint16)})
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    _captions(root / "context_nouns.json", {
        f"{ids[0]}.jpg": "aeroplane, (person, clothes), sky, tree.",
        f"{ids[1]}.jpg": "wall, floor, window",
        f"{ids[3]}.jpg": "(sky, aeroplane), grass, bird",
    })  # fmt: skip
    return root


def write_coco_object(root: Path) -> Path:
    names = ["000000000139.jpg", "000000000285.jpg", "000000000632.jpg"]
    # (segment id, category id, iscrowd): things 1 person, 18 dog, 3 car, 62 chair; stuff 184 tree, 187 sky
    segs = {
        names[0]: [(5000001, 1, 0), (300, 187, 0), (70000, 18, 1)],
        names[1]: [(2, 3, 0), (4600000, 184, 0)],
        names[2]: [(12345, 62, 0), (66051, 1, 0), (123456, 187, 0)],
    }
    anns = []
    for k, name in enumerate(names):
        _image(root / "images" / "val2017" / name, 30 + k)
        ids = _blocks([0] + [s[0] for s in segs[name]], 40 + k)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1)
        png = name.replace(".jpg", ".png")
        _png(root / "annotations" / "panoptic_val2017" / png, rgb)
        anns.append({"image_id": int(name[:-4]), "file_name": png, "segments_info": [
            {"id": i, "category_id": c, "iscrowd": crowd, "area": 1, "bbox": [0, 0, 1, 1]} for i, c, crowd in segs[name]]})
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps({"annotations": anns, "categories": []}))
    _captions(root / "coco_object_nouns.json", {
        names[0]: "(persons, clothes), dog, sky.",
        names[1]: "car, trees, road",
        names[2]: "(chair, person), table, lamp.",
    })  # fmt: skip
    return root


def write_coco_stuff(root: Path) -> Path:
    names = ["000000000139", "000000000285", "000000000724"]
    # stuffthingmaps values: fine index; 255 unlabelled; 0 = person (read as background, as published)
    vals = {names[0]: [0, 1, 255, 52, 140], names[1]: [119, 156, 61, 105], names[2]: [255, 168, 181, 7]}
    for k, n in enumerate(names):
        _image(root / "val2017" / f"{n}.jpg", 50 + k)
        _png(root / "val2017" / f"{n}.png", _blocks(vals[n], 60 + k))
    _captions(root / "coco_stuff_nouns.json", {
        f"{names[0]}.jpg": "(person, vehicle), food, (outdoor, ground), sky.",
        f"{names[1]}.jpg": "(furniture, food), wall, walls, plants",
        f"{names[2]}.jpg": "building, (sky, water), vehicles.",
    })  # fmt: skip
    return root


def write_cityscapes(root: Path) -> Path:
    frames = [("frankfurt", "frankfurt_000000_000294"), ("frankfurt", "frankfurt_000001_007973"), ("munster", "munster_000000_000019")]
    vals = [[7, 8, 26, 0, 1], [11, 21, 23, 24, 33, 4], [7, 26, 27, 28, 17, 3]]  # 0, 1, 3, 4: not evaluated
    for k, ((city, stem), v) in enumerate(zip(frames, vals)):
        _image(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", 70 + k)
        lab = _blocks(v, 80 + k)
        _png(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", lab)
        _png(root / "gtFine" / "val" / city / f"{stem}_gtFine_instanceIds.png", lab)  # the other gtFine files
        _png(root / "gtFine" / "val" / city / f"{stem}_gtFine_color.png", np.stack([lab] * 3, -1))
    _captions(root / "city_nouns.json", {
        f"{frames[0][1]}_leftImg8bit.png": "Cars, road, pedestrian, buildings, sky.",
        f"{frames[1][1]}_leftImg8bit.png": "(people, bicycles), building, traffic light, truck",
        f"{frames[2][1]}_leftImg8bit.png": "road, car, truck, bus, pole.",
    })  # fmt: skip
    return root


def write_ade20k(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    names = ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    vals = {names[0]: [0, 1, 4, 6, 15], names[1]: [0, 3, 5, 13, 150], names[2]: [0, 2, 21, 7, 13]}
    for k, n in enumerate(names):
        _image(base / "images" / "validation" / f"{n}.jpg", 90 + k)
        _png(base / "annotations" / "validation" / f"{n}.png", _blocks(vals[n], 100 + k))
    _captions(root / "ade_nouns.json", {
        f"{names[0]}.jpg": "(bed, bedding), walls, floor, ceiling, door.",
        f"{names[1]}.jpg": "(person, clothes), sky, trees, flag",
        f"{names[2]}.jpg": "edifice, car, road, man.",
    })  # fmt: skip
    return root


WRITERS = {"voc": write_voc, "context": write_context, "coco-object": write_coco_object, "coco-stuff": write_coco_stuff,
           "cityscapes": write_cityscapes, "ade20k": write_ade20k}  # fmt: skip
NOUNS = {"voc": "voc_nouns.json", "context": "context_nouns.json", "coco-object": "coco_object_nouns.json",
         "coco-stuff": "coco_stuff_nouns.json", "cityscapes": "city_nouns.json", "ade20k": "ade_nouns.json"}  # fmt: skip


def write(name: str, root: Path) -> tuple[Path, Path]:
    """The miniature of benchmark ``name`` under ``root`` and its noun-list file."""
    root.mkdir(parents=True, exist_ok=True)
    WRITERS[name](root)
    return root, root / NOUNS[name]
