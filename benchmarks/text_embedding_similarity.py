"""How far apart a shapes text encoder keeps the 8 class words (the model card's "centred cosine" figures).

    python benchmarks/text_embedding_similarity.py --model difffeat/weights/shapes [--model OTHER ...] [--random]

For each model: the text encoder's output at the class word of "a photo of <class>" for the 8 classes, minus
their mean, L2-normalised; the cosine matrix of those 8 vectors; mean |cosine| over the 28 pairs, its min/max,
and the closest pairs. ``--random`` adds a freshly initialised encoder of the shapes architecture (seed 0).
Words a segmenter must tell apart but whose vectors nearly coincide are the classes it will confuse.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from difffeat.shapes.models import ModelConfig, build_text_encoder
from difffeat.shapes.world import SHAPE_CLASSES


@torch.no_grad()
def class_word_cosines(tokenizer, encoder) -> torch.Tensor:  # noqa: ANN001 - CLIP tokenizer / text model
    """[8, 8] cosine matrix of the centred class-word embeddings."""
    rows = []
    for cls in SHAPE_CLASSES:
        ids = tokenizer(f"a photo of {cls}", return_tensors="pt").input_ids
        word = tokenizer(cls, add_special_tokens=False).input_ids
        if len(word) != 1:
            raise ValueError(f"{cls!r} is not one token for this tokenizer")
        pos = ids[0].tolist().index(word[0])
        rows.append(encoder(ids).last_hidden_state[0, pos])
    e = torch.stack(rows)
    e = torch.nn.functional.normalize(e - e.mean(0), dim=-1)
    return e @ e.T


def summary(cos: torch.Tensor) -> dict:
    pairs = {f"{SHAPE_CLASSES[i]}-{SHAPE_CLASSES[j]}": float(cos[i, j]) for i, j in itertools.combinations(range(8), 2)}
    vals = torch.tensor(list(pairs.values()))
    closest = sorted(pairs.items(), key=lambda kv: -kv[1])[:4]
    return {"mean_abs_cosine": float(vals.abs().mean()), "min": float(vals.min()), "max": float(vals.max()),
            "closest_pairs": {k: round(v, 3) for k, v in closest}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="shapes pipeline folder (repeatable)")
    p.add_argument("--random", action="store_true", help="also a randomly initialised encoder (seed 0)")
    args = p.parse_args(argv)
    models = args.model or ["difffeat/weights/shapes"]
    out = {}
    for folder in models:
        tok = CLIPTokenizer.from_pretrained(f"{folder}/tokenizer")
        enc = CLIPTextModel.from_pretrained(f"{folder}/text_encoder").eval()
        out[folder] = summary(class_word_cosines(tok, enc))
    if args.random:
        tok = CLIPTokenizer.from_pretrained(f"{models[0]}/tokenizer")
        torch.manual_seed(0)
        enc = build_text_encoder(ModelConfig(), len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id).eval()
        out["random init"] = summary(class_word_cosines(tok, enc))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
