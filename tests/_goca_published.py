"""An independent transcription, for the tests, of what the published GOCA benchmark code (Darkbblue/goca
``src-main``: ``configs/config-dataset/*.py``, ``components/dataset.py``, ``components/caption_dataset.py``,
``captioner.py``, ``components/downstream_dispatch.py``) does to a dataset folder, written step by step as
those files do it (glob + sort pairing, per-pixel loops, Python sets), without difffeat's code. The class
and synonym lists are taken from ``configs/datasets/*.json`` (a separate test compares those with the
published files when a copy of the repository is at hand)."""

from __future__ import annotations

import glob
import json
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import scipy.io as sio
from PIL import Image

from difffeat.resources import data_dir


def _spec(name: str) -> dict:
    return json.loads((data_dir("configs") / "datasets" / f"{name}.json").read_text())


def samples(name: str, root: str) -> tuple[list[str], list[str]]:
    """(image paths, label paths) as the published dataset config lists them (limit applied)."""
    if name in ("voc", "context"):
        voc = os.path.join(root, "VOCdevkit/VOC2012")
        with open(os.path.join(voc, "ImageSets/Segmentation/train.txt")) as f:
            test = list(reversed([line.rstrip() for line in f.readlines()]))
        imgs = [os.path.join(voc, "JPEGImages", f"{d}.jpg") for d in test][:3000]
        if name == "voc":
            return imgs, [os.path.join(voc, "SegmentationClass", f"{d}.png") for d in test][:3000]
        labs = [os.path.join(root, "trainval", f"{d}.mat") for d in test][:3000]
        kept = [(s, lab) for s, lab in zip(imgs, labs) if os.path.exists(lab)]
        return [s for s, _ in kept], [lab for _, lab in kept]
    pattern = {
        "coco-object": ("images/val2017/*jpg", "annotations/panoptic_val2017/*png", 10000),
        "coco-stuff": ("val2017/*.jpg", "val2017/*.png", 10000),
        "cityscapes": ("leftImg8bit/val/**/*", "gtFine/val/**/*labelIds.png", 1000),
        "ade20k": ("ADEChallengeData2016/images/validation/*", "ADEChallengeData2016/annotations/validation/*", 3000),
    }[name]
    return (sorted(glob.glob(os.path.join(root, pattern[0])))[: pattern[2]],
            sorted(glob.glob(os.path.join(root, pattern[1])))[: pattern[2]])  # fmt: skip


def _encode(mask: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.zeros_like(mask)
    for k in mapping:
        out[mask == k] = mapping[k]
    return out


def label(name: str, root: str, path: str) -> np.ndarray:
    """The published main loop's ground truth of one label file."""
    spec = _spec(name)["labels"]
    if name == "voc":
        lab = np.array(Image.open(path))
        lab[lab > 20] = 0
        return lab
    if name == "ade20k":
        lab = np.array(Image.open(path))
        lab[lab > 150] = 0
        return lab
    if name == "cityscapes":
        mapping = {i: c for i, c in enumerate(spec["label_ids"])}
        mapping[-1] = 0
        return _encode(np.array(Image.open(path)), mapping)
    if name == "coco-stuff":
        mapping = {k + 1: v + 1 for k, v in enumerate(spec["fine_to_coarse"])}
        mapping[0] = 0
        mapping[255] = 0
        lab = _encode(np.array(Image.open(path)), mapping)
        lab[lab == 15] = 3
        lab[lab == 16] = 4
        return lab
    if name == "context":
        raw_to_59 = {c: i for i, c in enumerate([0] + spec["raw_ids"])}
        lab = sio.loadmat(path)["LabelMap"]
        for i in range(lab.shape[0]):
            for j in range(lab.shape[1]):
                lab[i][j] = raw_to_59[lab[i][j]] if lab[i][j] in raw_to_59 else 0
        return lab
    if name == "coco-object":
        id_to_id = {c: i + 1 for i, c in enumerate(spec["thing_category_ids"])}
        id_to_id.update({c: 0 for c in spec["stuff_category_ids"]})
        with open(os.path.join(root, "annotations/panoptic_val2017.json")) as f:
            annos = json.load(f)["annotations"]
        lab = np.asarray(Image.open(path), dtype=np.uint32)
        lab = lab[:, :, 0] + 256 * lab[:, :, 1] + 256 * 256 * lab[:, :, 2]
        for anno in annos:
            if anno["file_name"] == path.split("/")[-1]:
                break
        for seg in anno["segments_info"]:
            lab[lab == seg["id"]] = id_to_id[seg["category_id"]]
        return lab
    raise KeyError(name)


def caption_classes(name: str, image_path: str, gt: np.ndarray) -> list[int]:
    """The captioner's ``existent_objects_gt`` (caption_dataset.py)."""
    if name == "voc":
        xml_path = image_path.replace("JPEGImages", "Annotations").replace(".jpg", ".xml")
        objects = list(set([o.find("name").text for o in ET.parse(xml_path).findall("object")]))
        names = ["background"] + _spec("voc")["classes"]
        return [names.index(o) for o in objects]
    flat = gt.reshape(-1)
    found = set()
    for i in range(flat.shape[0]):
        found.add(flat[i].item())
    if 0 in found:
        found.remove(0)
    return list(found)


def _split(s: str) -> list[str]:
    result, buffer = [], ""
    for part in re.findall(r"\([^)]*\)|[^,]+", s):
        if part.startswith("(") and part.endswith(")"):
            result.append(part.strip())
        elif "(" in part:
            buffer = part.strip()
        elif ")" in part:
            buffer += f", {part.strip()}"
            result.append(buffer)
            buffer = ""
        elif len(buffer) > 0:
            buffer += f", {part.strip()}"
        else:
            result.append(part.strip())
    return result


def caption(nouns: str, synonyms: list[list[str]], present: list[int], add_background: bool, add_missing: bool):
    """captioner.py up to the entity-to-class alignment: ``(caption, {class: [entity prompts]}, [background
    entity prompts])``; ``synonyms[0]`` is background's (empty) list."""
    name_to_id = {idx: name for idx, name in enumerate(synonyms)}
    cap = nouns
    if cap[-1] == ".":
        cap = cap[:-1]
    if add_background:
        cap += ", background"
    cap = cap.lower()
    entities = list({e: None for e in _split(cap)}.keys())
    new = []
    for e in entities:
        if "(" in e:
            we_have = e.replace("(", "").replace(")", "").split(", ")
            results = []
            for object_idx, one in enumerate(we_have):
                for idx, name in name_to_id.items():
                    if one in name and idx in present:
                        results.append(object_idx)
                        break
            if len(results) < 2:
                new.append(e)
            else:
                for idx in results:
                    new.append(we_have[idx])
        else:
            new.append(e)
    entities = [{"prompt": e.replace("(", "").replace(")", ""), "aligned": None, "closure": "(" in e}
                for e in list({e: None for e in new}.keys())]  # fmt: skip

    def first_class(e):
        we_have = e["prompt"].split(", ") if e["closure"] else [e["prompt"]]
        results = []
        for one in we_have:
            for idx, name in name_to_id.items():
                if one in name and idx in present:
                    results.append(idx)
                    break
        return results[0] if results else None

    if add_missing:
        included = set()
        for e in entities:
            c = first_class(e)
            if c is not None:
                included.add(c)
        for c in set(present) - included:
            entities.append({"prompt": name_to_id[c][0], "aligned": None, "closure": False})
    text = ", ".join(e["prompt"] for e in entities)
    objects: dict[int, list[str]] = {}
    background = []
    for e in entities:
        c = first_class(e)
        if c is not None:
            objects[c] = objects.get(c, []) + [e["prompt"]]
        else:
            background.append(e["prompt"])
    return text, objects, background


def miou(labels: list[np.ndarray], preds: list[np.ndarray], class_count: int) -> float:
    """downstream_dispatch.quantitative_evaluation: per-class unions and intersections over the dataset,
    IoU = I / (1e-8 + U) for every class, averaged."""
    unions, inters = [0] * class_count, [0] * class_count
    for lab, pred in zip(labels, preds):
        for c in range(class_count):
            p, g = (pred == c).astype(int), (lab == c).astype(int)
            unions[c] += (p | g).sum()
            inters[c] += (p & g).sum()
    return float(np.array([inters[c] / (1e-8 + unions[c]) for c in range(class_count)]).mean())
