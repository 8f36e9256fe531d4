"""Dataset-scale runs (difffeat.runs): N processes under `accelerate launch` give one process's results,
killed runs resume without duplicates or corrupt files, and a restart with other settings is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

FEATURES = "down_blocks.1.resnets.0,up_blocks.1.attentions.0"


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _free_port() -> int:
    """A TCP port nothing listens on now, chosen by the OS.

    The port used to be fixed per test process, and test_two_processes_match_one_process starts two launches
    at once: both rendezvous servers asked for the same port, and CI failed with EADDRINUSE when their starts
    overlapped. Each launch now gets its own port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(processes: int, *args: str) -> list[str]:
    """`difffeat ARGS` under `accelerate launch` with `processes` CPU processes (1: a plain run).

    accelerate's `--cpu` flag selects its single-process launcher, so CPU processes are started with
    `--multi_gpu`; difffeat joins them over gloo when no GPU is present."""
    if processes == 1:
        return [sys.executable, "-m", "difffeat.cli", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(_free_port()), "-m", "difffeat.cli", *args]


def _start(processes: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(processes, *args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny SD pipeline folder and a 10-image shapes COCO export."""
    from difffeat.shapes.coco import export_split
    from difffeat.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("scale")
    save_tiny_pipeline("sd", root / "model")
    export_split("test", 10, root / "coco")
    return root


def _reference_features(data: Path, out: Path, batch_size: int = 4) -> None:
    from difffeat import FeatureExtractor, load
    from difffeat.runs import ExtractJob, collect_images, run_extract

    fx = FeatureExtractor(load(data / "model", device="cpu", dtype="fp32"), FEATURES.split(","), batch_size=batch_size)
    refs = collect_images([data / "coco" / "images"])
    run_extract(fx, refs, ExtractJob(out, num_workers=0, progress=False, dataset={"sources": [str(data / "coco" / "images")]}))


def _assert_same_features(a: Path, b: Path) -> None:
    fa, fb = sorted(p.name for p in a.glob("*.safetensors")), sorted(p.name for p in b.glob("*.safetensors"))
    assert fa == fb and len(fa) == 10
    for name in fa:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].shape == y[k].shape and x[k].ndim == 3
            torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-4)
    assert not list(b.glob("*.part")) and not list(b.glob(".*.part"))


def test_two_processes_match_one_process(data, tmp_path):
    """2 CPU processes: the same feature files and exactly the same confusion matrix / mIoU as 1 process."""
    ann = str(data / "coco" / "annotations.json")
    ext = _start(2, "extract", str(data / "model"), str(data / "coco" / "images"), "--features", FEATURES,
                 "--out", str(tmp_path / "x2"), "--batch-size", "2", "--num-workers", "1")
    ev = _start(2, "eval", "--model", str(data / "model"), "--coco", ann, "--limit", "4", "--chunk-size", "1",
                "--num-workers", "1", "--out", str(tmp_path / "r2_run"))

    from difffeat import Segmenter, load
    from difffeat.evaluate import CocoDataset
    from difffeat.runs import evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes: float sums depend on the thread split
    try:
        _reference_features(data, tmp_path / "x1")
        seg = Segmenter(load(data / "model", device="cpu", dtype="fp32"))
        one = evaluate(seg, CocoDataset(ann, data / "coco" / "images"), limit=4)
    finally:
        torch.set_num_threads(threads)

    out = _finish(ext)
    assert "2 process(es)" in out
    _assert_same_features(tmp_path / "x1", tmp_path / "x2")
    summary = json.loads((tmp_path / "x2" / "extract_summary.json").read_text())
    assert summary["written"] == 10 and summary["skipped"] == 0 and summary["processes"] == 2
    manifest = json.loads((tmp_path / "x2" / "manifest.json").read_text())
    assert manifest["kind"] == "extract" and manifest["settings"]["features"] == FEATURES.split(",")
    assert {"difffeat", "torch", "diffusers"} <= set(manifest["versions"])

    _finish(ev)
    two = json.loads((tmp_path / "r2_run" / "report.json").read_text())
    assert two["processes"] == 2 and two["n_images"] == 4
    assert two["confusion_matrix"] == one.extra["confusion_matrix"]
    assert two["miou"] == one.miou
    assert len(list((tmp_path / "r2_run" / "parts").glob("part-*.npz"))) == 4


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_corrupt_files(data, tmp_path):
    out = tmp_path / "x"
    args = ("extract", str(data / "model"), str(data / "coco" / "images"), "--features", FEATURES, "--out", str(out),
            "--batch-size", "1", "--num-workers", "0")
    proc = _start(2, *args)
    deadline = time.time() + 240
    while len(list(out.glob("*.safetensors"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, mid-run
    proc.wait()
    done_before = len(list(out.glob("*.safetensors")))
    assert 3 <= done_before < 10, "the run finished (or never started) before it could be killed"

    _finish(_start(2, *args))
    summary = json.loads((out / "extract_summary.json").read_text())
    assert summary["skipped"] >= done_before - 2 and summary["written"] + summary["skipped"] == 10
    _reference_features(data, tmp_path / "ref")
    _assert_same_features(tmp_path / "ref", out)


def test_restart_with_different_settings_is_refused(data, tmp_path):
    from typer.testing import CliRunner

    from difffeat.cli import app

    imgs = [str(data / "coco" / "images" / f"test_00000{i}.png") for i in range(2)]
    base = ["extract", str(data / "model"), *imgs, "--features", FEATURES, "--out", str(tmp_path), "--num-workers", "0"]
    runner = CliRunner()
    assert runner.invoke(app, base).exit_code == 0
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.safetensors")}
    again = runner.invoke(app, base)  # same command: everything is skipped
    assert again.exit_code == 0 and "2 already done" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.safetensors")} == first

    bad = runner.invoke(app, base + ["--t", "300"])
    assert bad.exit_code == 2
    msg = " ".join(bad.output.split())
    assert "settings.t: 50 -> 300" in msg and "--out" in msg and "--overwrite" in msg
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.safetensors")} == first  # untouched

    ok = runner.invoke(app, base + ["--t", "300", "--overwrite"])
    assert ok.exit_code == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["settings"]["t"] == 300
    for p in tmp_path.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            assert f.metadata()["t"] == "300"


def test_eval_resume_skips_finished_chunks(data, tmp_path, monkeypatch):
    """A second run reuses the chunk files; a tampered (truncated) chunk is recomputed."""
    from difffeat import Segmenter, load
    from difffeat.evaluate import ShapesDataset
    from difffeat.runs import EvalJob, run_eval
    from difffeat.runs import evaluation as scale_eval

    seg = Segmenter(load(data / "model", device="cpu", dtype="fp32"))
    job = EvalJob(tmp_path, limit=2, chunk_size=1, num_workers=0, progress=False, dataset={"shapes": "val"})
    first = run_eval(seg, ShapesDataset("val", 2), job)
    calls = []
    real = scale_eval.segment_items
    monkeypatch.setattr(scale_eval, "segment_items", lambda *a: calls.append(len(a[1])) or real(*a))
    parts = sorted((tmp_path / "parts").glob("part-*.npz"))
    assert len(parts) == 2
    parts[1].write_bytes(parts[1].read_bytes()[:20])
    second = run_eval(seg, ShapesDataset("val", 2), job)
    assert len(calls) == 1
    assert second.extra["confusion_matrix"] == first.extra["confusion_matrix"]


def test_size_buckets_and_shards():
    from difffeat.runs.sources import SizeBucketSampler
    from difffeat.runs.processes import shard

    sizes = [(64, 32), (32, 64), (64, 32), (64, 32), (32, 64)]
    batches = list(SizeBucketSampler(sizes, 2))
    assert batches == [[0, 2], [1, 4], [3]] and len(SizeBucketSampler(sizes, 2)) == 3
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    parts = [shard(range(11), r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(11))


def test_truncated_feature_file_is_not_finished(tmp_path):
    from difffeat.io import save_features
    from difffeat.runs import feature_file_ok

    p = tmp_path / "a.safetensors"
    save_features(p, {"x": torch.ones(2, 3, 3)}, {"t": 50})
    assert feature_file_ok(p, ["x"], {"t": "50"})
    assert not feature_file_ok(p, ["x"], {"t": "60"}) and not feature_file_ok(p, ["y"], {})
    p.write_bytes(p.read_bytes()[:-4])
    assert not feature_file_ok(p, ["x"], {})


def _with_broken_images(data: Path, folder: Path) -> list[str]:
    """``folder``: 4 of the shapes images plus two files that are not images; returns the broken paths."""
    import shutil

    folder.mkdir()
    for p in sorted((data / "coco" / "images").glob("*.png"))[:4]:
        shutil.copy(p, folder / p.name)
    (folder / "broken_a.png").write_bytes(b"not a png")
    (folder / "broken_b.jpg").write_bytes(b"")
    return sorted(str(folder / n) for n in ("broken_a.png", "broken_b.jpg"))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_image_is_a_clear_error_or_skipped_and_listed(data, tmp_path, num_workers):
    """Without the option the run stops with the image's own error (not a DataLoader worker traceback);
    with it the others are written and the bad ones listed in unreadable.json."""
    from difffeat import FeatureExtractor, load
    from difffeat.errors import InvalidImageError
    from difffeat.runs import ExtractJob, collect_images, run_extract

    broken = _with_broken_images(data, tmp_path / "in")
    refs = collect_images([tmp_path / "in"])
    fx = FeatureExtractor(load(data / "model", device="cpu", dtype="fp32"), FEATURES.split(","), batch_size=2)
    with pytest.raises(InvalidImageError, match="broken_a.png.*--skip-unreadable") as err:
        run_extract(fx, refs, ExtractJob(tmp_path / "stop", num_workers=num_workers, progress=False))
    assert "Traceback" not in str(err.value) and "worker" not in str(err.value)
    summary = run_extract(fx, refs, ExtractJob(tmp_path / "skip", num_workers=num_workers, progress=False, skip_unreadable=True))
    assert (summary.written, summary.unreadable, summary.total) == (4, 2, 6)
    listed = json.loads((tmp_path / "skip" / "unreadable.json").read_text())
    assert [d["path"] for d in listed] == broken and all("broken" in d["error"] for d in listed)
    assert len(list((tmp_path / "skip").glob("*.safetensors"))) == 4


def test_two_processes_gather_the_unreadable_list(data, tmp_path):
    broken = _with_broken_images(data, tmp_path / "in")
    out = _finish(_start(2, "extract", str(data / "model"), str(tmp_path / "in"), "--features", FEATURES, "--out",
                         str(tmp_path / "x"), "--batch-size", "2", "--num-workers", "0", "--skip-unreadable"))
    assert "2 unreadable image(s) skipped" in out
    assert [d["path"] for d in json.loads((tmp_path / "x" / "unreadable.json").read_text())] == broken
    summary = json.loads((tmp_path / "x" / "extract_summary.json").read_text())
    assert (summary["written"], summary["unreadable"], summary["processes"]) == (4, 2, 2)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_eval_with_a_corrupt_image_stops_with_its_own_error(data, tmp_path, num_workers):
    import shutil

    from difffeat import Segmenter, load
    from difffeat.errors import InvalidImageError
    from difffeat.evaluate import CocoDataset
    from difffeat.runs import EvalJob, run_eval

    images = tmp_path / "images"
    shutil.copytree(data / "coco" / "images", images)
    ds = CocoDataset(data / "coco" / "annotations.json", images)
    (images / ds.coco.loadImgs(ds.ids[1])[0]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    seg = Segmenter(load(data / "model", device="cpu", dtype="fp32"))
    with pytest.raises(InvalidImageError, match="corrupt or not an image") as err:
        run_eval(seg, ds, EvalJob(tmp_path / "run", limit=3, chunk_size=1, num_workers=num_workers, progress=False))
    assert "Traceback" not in str(err.value)


def _segment_args(data: Path, out: Path) -> tuple[str, ...]:
    return ("segment", str(data / "coco" / "images"), "--classes", "circle,square,triangle", "--model", "shapes",
            "--out", str(out), "--num-workers", "0", "--device", "cpu", "--coco-results", str(out / "coco.json"))


def _segment_outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(folder.glob("*_labels.png"))}


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_killed_segment_run_resumes_without_missing_duplicated_or_partial_outputs(data, tmp_path, processes):
    """`segment` on a folder, killed mid-run (SIGKILL to the whole process group), then run again: every image
    has exactly its three outputs, equal to an uninterrupted run's, and nothing half-written is left."""
    out = tmp_path / "seg"
    proc = _start(processes, *_segment_args(data, out))
    deadline = time.time() + 240
    while len(list(out.glob("*.json"))) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # manifest.json + 3 images
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("test_*.json")))
    assert 3 <= done_before < 10, "the run finished (or never started) before it could be killed"

    second = _finish(_start(processes, *_segment_args(data, out)))
    assert f"({done_before} already done)" in second or processes > 1
    summary = json.loads((out / "segment_summary.json").read_text())
    assert summary["written"] + summary["skipped"] == 10 and summary["skipped"] >= done_before - processes

    ref = tmp_path / "ref"
    _finish(_start(1, *_segment_args(data, ref)))
    stems = sorted(p.stem for p in (data / "coco" / "images").glob("*.png"))
    for folder in (out, ref):
        assert sorted(p.name for p in folder.glob("test_*")) == sorted(
            f"{s}{suffix}" for s in stems for suffix in (".json", "_labels.png", "_overlay.png"))
        assert not list(folder.glob(".*.part")) and not list(folder.glob("*.part"))
    assert _segment_outputs(out) == _segment_outputs(ref)
    coco, coco_ref = (json.loads((f / "coco.json").read_text()) for f in (out, ref))
    assert coco == coco_ref and {e["image_id"] for e in coco} <= set(range(1, 11))


def test_segment_restart_with_other_settings_is_refused(data, tmp_path):
    from typer.testing import CliRunner

    from difffeat.cli import app

    img = str(data / "coco" / "images" / "test_000000.png")
    base = ["segment", img, "-c", "circle", "-o", str(tmp_path), "--num-workers", "0", "--device", "cpu"]
    runner = CliRunner()
    assert runner.invoke(app, base).exit_code == 0
    again = runner.invoke(app, base)
    assert again.exit_code == 0 and "(1 already done)" in again.output
    bad = runner.invoke(app, base + ["--tau", "0.3"])
    assert bad.exit_code == 2 and "settings.tau" in " ".join(bad.output.split()) and "--overwrite" in bad.output
