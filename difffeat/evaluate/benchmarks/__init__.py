"""The GOCA paper's six segmentation benchmarks, read as published (``difffeat eval --dataset NAME --root DIR``).

* :mod:`.spec` — the protocols as data (``configs/datasets/<name>.json``);
* :mod:`.readers` — one reader per benchmark, in the layout its official download unpacks to;
* :mod:`.labels` — the id maps and void handling;
* :mod:`.captions` — the published captions (synonyms, append-background / append-missing-class switches).
"""

from .captions import BenchmarkCaption, BenchmarkCaptions, benchmark_caption, caption_rules, split_noun_list
from .readers import READERS, BenchmarkDataset, BenchmarkItem, open_benchmark
from .spec import BENCHMARKS, BenchmarkSpec, benchmark_names, benchmark_spec

# open_benchmark and list_benchmarks are exported by the facade (difffeat.open_benchmark, difffeat.list_benchmarks)
__all__ = ["BENCHMARKS", "BenchmarkSpec", "benchmark_spec", "benchmark_names", "BenchmarkDataset", "BenchmarkItem",
           "READERS", "BenchmarkCaption", "BenchmarkCaptions", "benchmark_caption", "caption_rules", "split_noun_list"]


def list_benchmarks() -> list[dict]:
    """What ``difffeat datasets`` prints: per benchmark its title, official download page, expected folder
    layout under ``--root``, split and caption switches."""
    return [benchmark_spec(n).describe() for n in BENCHMARKS]
