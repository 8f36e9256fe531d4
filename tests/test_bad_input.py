"""Every bad input of the audit gets a clear, specific error: through the CLI (exit code 2, one line, no
traceback) and through the Python API (a DifffeatError subclass), raised before expensive work starts."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import difffeat
from difffeat import errors
from difffeat.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Small files every case can point at: an image, COCO variants, VOC variants, broken model folders."""
    root = tmp_path_factory.mktemp("bad")
    Image.new("RGB", (32, 24), (200, 40, 40)).save(root / "img.png")
    (root / "images").mkdir()
    Image.new("RGB", (32, 24)).save(root / "images" / "a.png")
    good = {"images": [{"id": 1, "file_name": "a.png", "height": 24, "width": 32}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 10, 0, 10, 10]],
                             "area": 50, "bbox": [0, 0, 10, 10], "iscrowd": 0}]}
    variants = {
        "no_categories": {k: v for k, v in good.items() if k != "categories"},
        "no_images": {k: v for k, v in good.items() if k != "images"},
        "no_height": {**good, "images": [{"id": 1, "file_name": "a.png", "width": 32}]},
        "unknown_category": {**good, "annotations": [{**good["annotations"][0], "category_id": 7}]},
        "top_list": [good],
        "duplicate_category_id": {**good, "categories": [{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}]},
    }
    for name, data in variants.items():
        (root / f"{name}.json").write_text(json.dumps(data))
    (root / "malformed.json").write_text('{"images": [')
    for name, label in {"wrong_size": Image.new("L", (16, 16)), "rgb": Image.new("RGB", (32, 24)),
                        "out_of_range": Image.fromarray(np.full((24, 32), 9, np.uint8))}.items():
        (root / f"voc_{name}" / "labels").mkdir(parents=True)
        (root / f"voc_{name}" / "images").mkdir()
        label.save(root / f"voc_{name}" / "labels" / "a.png")
        Image.new("RGB", (32, 24)).save(root / f"voc_{name}" / "images" / "a.png")
    (root / "voc_ok" / "labels").mkdir(parents=True)
    (root / "voc_ok" / "images").mkdir()
    Image.fromarray(np.ones((24, 32), np.uint8)).save(root / "voc_ok" / "labels" / "a.png")
    Image.new("RGB", (32, 24)).save(root / "voc_ok" / "images" / "a.png")
    (root / "captions_folder").mkdir()
    _bad_images(root / "bad_images")
    (root / "no_unet").mkdir()
    (root / "no_unet" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"]}))
    (root / "no_unet" / "vae").mkdir()
    (root / "random_index").mkdir()
    (root / "random_index" / "model_index.json").write_text(json.dumps({"hello": 1}))
    (root / "a_file").write_text("x")
    from difffeat.testing import save_single_file, save_tiny_pipeline

    save_single_file("sd", root / "tiny.safetensors", config=root / "tiny_config")
    save_tiny_pipeline("pixart", root / "pixart_config")
    (root / "garbage.safetensors").write_text("not a checkpoint")
    return root


IMG = "{root}/img.png"
#: broken image files, each in a folder of its own next to a good image (see _bad_images)
BAD_IMAGES = ("empty", "corrupt", "truncated_png", "truncated_jpeg")


def _bad_images(root: Path) -> None:
    """``root/<kind>/`` holds a good image and a bad one of each kind in BAD_IMAGES, as a COCO dataset."""
    import io

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    data = {}
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        rgb.save(buf, fmt)
        data[fmt] = buf.getvalue()
    bad = {"empty": ("png", b""), "corrupt": ("png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
           "truncated_png": ("png", data["PNG"][: len(data["PNG"]) // 2]),
           "truncated_jpeg": ("jpg", data["JPEG"][: len(data["JPEG"]) // 2])}
    for kind, (suffix, payload) in bad.items():
        folder = root / kind
        folder.mkdir(parents=True)
        rgb.save(folder / "a_good.png")
        (folder / f"b_bad.{suffix}").write_bytes(payload)
        names = ["a_good.png", f"b_bad.{suffix}"]
        coco = {"images": [{"id": i + 1, "file_name": n, "height": 24, "width": 32} for i, n in enumerate(names)],
                "categories": [{"id": 1, "name": "cat"}], "annotations": []}
        (folder / "coco.json").write_text(json.dumps(coco))



def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


#: id -> (CLI arguments, the DifffeatError subclass, words the message must contain)
CASES = {
    "tau-nan": (["segment", IMG, "-c", "cat", "-o", "{root}/o", "--tau", "nan"], errors.InvalidOptionError, "--tau"),
    "refine-order-negative": (["segment", IMG, "-c", "cat", "-o", "{root}/o", "--refine-order", "-2"], errors.InvalidOptionError, "--refine-order"),
    "resolution-huge": (["extract", "shapes", IMG, "-f", "x", "-o", "{root}/o", "--resolution", "100000"], errors.InvalidOptionError, "--resolution"),
    "resolution-negative": (["extract", "shapes", IMG, "-f", "x", "-o", "{root}/o", "--resolution", "-64"], errors.InvalidOptionError, "--resolution"),
    "resolution-odd": (["extract", "shapes", IMG, "-f", "x", "-o", "{root}/o", "--resolution", "257"], errors.InvalidOptionError, "multiple of 8"),
    "bench-resolution-7": (["bench", "--resolution", "7"], errors.InvalidOptionError, "--resolution"),
    "segment-batch-size-zero": (["segment", IMG, "-c", "cat", "-o", "{root}/o", "--batch-size", "0"], errors.InvalidOptionError, "--batch-size"),
    "segment-memory-unknown": (["segment", IMG, "-c", "cat", "-o", "{root}/o", "--memory", "bounded"], errors.InvalidOptionError, "--memory"),
    "eval-batch-size-over-chunk": (["eval", "--shapes-split", "test", "--batch-size", "16", "--chunk-size", "8", "--out", "{root}/e"], errors.InvalidOptionError, "--chunk-size 16"),
    "eval-n-negative": (["eval", "--shapes-split", "test", "--n", "-5", "--out", "{root}/e"], errors.InvalidOptionError, "--n"),
    "eval-n-zero": (["eval", "--shapes-split", "test", "--n", "0", "--out", "{root}/e"], errors.InvalidOptionError, "--n"),
    "out-is-a-file": (["segment", IMG, "-c", "cat", "-o", "{root}/a_file"], errors.OutputPathError, "existing file"),
    "out-unwritable": (["extract", "shapes", IMG, "-f", "x", "-o", "{root}/a_file/sub"], errors.OutputPathError, "cannot write"),
    "out-under-proc": (["segment", IMG, "-c", "cat", "-o", "/proc/difffeat_out"], errors.OutputPathError, "virtual file system"),
    "coco-results-unwritable": (["segment", IMG, "-c", "cat", "-o", "{root}/o2", "--coco-results", "/proc/x/r.json"], errors.OutputPathError, "--coco-results"),
    "coco-no-categories": (["eval", "--coco", "{root}/no_categories.json", "--images", "{root}/images", "--out", "{root}/e"], errors.DatasetError, "categories"),
    "coco-no-images": (["eval", "--coco", "{root}/no_images.json", "--images", "{root}/images", "--out", "{root}/e"], errors.DatasetError, "'images'"),
    "coco-no-height": (["eval", "--coco", "{root}/no_height.json", "--images", "{root}/images", "--out", "{root}/e"], errors.DatasetError, "images[0]"),
    "coco-unknown-category": (["eval", "--coco", "{root}/unknown_category.json", "--images", "{root}/images", "--out", "{root}/e"], errors.DatasetError, "category_id 7"),
    "coco-top-level-list": (["eval", "--coco", "{root}/top_list.json", "--images", "{root}/images", "--out", "{root}/e"], errors.DatasetError, "JSON list"),
    "coco-malformed-json": (["eval", "--coco", "{root}/malformed.json", "--images", "{root}/images", "--out", "{root}/e"], errors.DatasetError, "malformed.json"),
    "extract-coco-malformed-json": (["extract", "shapes", "--coco", "{root}/malformed.json", "-f", "x", "-o", "{root}/o"], errors.DatasetError, "malformed.json"),
    "voc-label-wrong-size": (["eval", "--voc-labels", "{root}/voc_wrong_size/labels", "--images", "{root}/voc_wrong_size/images", "--class-names", "cat", "--out", "{root}/e"], errors.DatasetError, "16x16"),
    "voc-label-rgb": (["eval", "--voc-labels", "{root}/voc_rgb/labels", "--images", "{root}/voc_rgb/images", "--class-names", "cat", "--out", "{root}/e"], errors.DatasetError, "single-channel"),
    "voc-label-out-of-range": (["eval", "--voc-labels", "{root}/voc_out_of_range/labels", "--images", "{root}/voc_out_of_range/images", "--class-names", "cat", "--out", "{root}/e"], errors.DatasetError, "[9]"),
    "shapes-split-unknown": (["eval", "--shapes-split", "foo", "--out", "{root}/e"], errors.InvalidOptionError, "foo"),
    "model-folder-without-unet": (["segment", IMG, "-c", "cat", "-o", "{root}/o", "-m", "{root}/no_unet"], errors.ModelNotFoundError, "unet/"),
    "model-random-index": (["segment", IMG, "-c", "cat", "-o", "{root}/o", "-m", "{root}/random_index"], errors.ModelNotFoundError, "_class_name"),
    "device-cuda-without-cuda": (["segment", IMG, "-c", "cat", "-o", "{root}/o", "--device", "cuda"], errors.DeviceError, "CUDA"),
    "lora-missing": (["gate", "shapes", IMG, "--technique", "lora:{root}/nope.safetensors", "--out", "{root}/g"], errors.DifffeatError, "LoRA file not found"),
    "demo-missing-model": (["demo", "--model", "{root}/nope"], errors.ModelNotFoundError, "does not exist"),
    "single-file-without-config": (["extract", "{root}/tiny.safetensors", IMG, "-f", "x", "-o", "{root}/o"], errors.ModelNotFoundError, "--model-config"),
    "single-file-config-unresolvable": (["segment", IMG, "-c", "cat", "-o", "{root}/o", "-m", "{root}/tiny.safetensors", "--model-config", "nobody/nothing"], errors.ModelNotFoundError, "--model-config"),
    "single-file-missing": (["eval", "-m", "{root}/nope.safetensors", "--model-config", "{root}/tiny_config", "--shapes-split", "test", "--out", "{root}/e"], errors.ModelNotFoundError, "does not exist"),
    "single-file-not-a-checkpoint": (["gate", "{root}/garbage.safetensors", IMG, "--model-config", "{root}/tiny_config", "--technique", "prompt:quality=natural", "--out", "{root}/g"], errors.ModelNotFoundError, "not a readable checkpoint"),
    "single-file-config-of-another-family": (["segment", IMG, "-c", "cat", "-o", "{root}/o", "-m", "{root}/tiny.safetensors", "--model-config", "{root}/pixart_config"], errors.ModelNotFoundError, "PixArtTransformer2DModel"),
    "model-file-not-a-checkpoint": (["extract", "{root}/a_file", IMG, "-f", "x", "-o", "{root}/o"], errors.ModelNotFoundError, "not a checkpoint"),
    "demo-model-config-without-single-file": (["demo", "--model", "shapes", "--model-config", "{root}/tiny_config"], errors.InvalidOptionError, "only for a single-file"),
    "make-tiny-onto-a-file": (["make-tiny", "sd", "{root}/a_file"], errors.OutputPathError, "existing file"),
    "make-single-file-onto-a-folder": (["make-single-file", "sd", "{root}/images", "{root}/cfg"], errors.OutputPathError, "is a folder"),
    "catalog-unknown-kind": (["catalog", "shapes", "--kind", "nonsense-kind"], errors.InvalidOptionError, "valid kinds: attended-k"),
    "catalog-kind-the-model-lacks": (["catalog", "shapes", "--kind", "cross-q,joint-q"], errors.InvalidOptionError, "no 'joint-q' activations; its kinds:"),
    "coco-duplicate-category-id": (["eval", "--coco", "{root}/duplicate_category_id.json", "--images", "{root}/images", "--out", "{root}/e"], errors.DatasetError, "share the id 1 ('cat', 'dog')"),
    "eval-duplicate-class-names": (["eval", "--voc-labels", "{root}/voc_ok/labels", "--images", "{root}/voc_ok/images", "--class-names", "cat,dog,Cat", "--out", "{root}/e"], errors.InvalidPromptError, "duplicate class names ['cat']"),
    "caption-file-is-a-folder": (["segment", IMG, "-c", "cat", "-o", "{root}/o", "--caption-file", "{root}/captions_folder"], errors.LabelFileError, "is a folder"),
    "label-file-is-a-folder": (["eval", "--shapes-split", "test", "--label-file", "{root}/captions_folder", "--out", "{root}/e"], errors.LabelFileError, "is a folder"),
    **{f"segment-{kind}-image": (["segment", f"{{root}}/bad_images/{kind}", "-c", "cat", "-o", "{root}/o"], errors.InvalidImageError, "b_bad.")
       for kind in BAD_IMAGES},
    "extract-truncated-jpeg": (["extract", "shapes", "{root}/bad_images/truncated_jpeg", "-f", "down_blocks.0.resnets.0", "-o", "{root}/o"], errors.InvalidImageError, "b_bad.jpg"),
    "eval-corrupt-image": (["eval", "--coco", "{root}/bad_images/corrupt/coco.json", "--images", "{root}/bad_images/corrupt", "--out", "{root}/e"], errors.InvalidImageError, "b_bad.png"),
    "model-config-without-single-file": (["extract", "shapes", IMG, "-f", "x", "-o", "{root}/o", "--model-config", "{root}/tiny_config"], errors.InvalidOptionError, "only for single-file"),
}


def _fill(args, root):
    return [a.format(root=root) for a in args]


@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_input_is_one_line_exit_2(case, world):
    args, _, words = CASES[case]
    if case == "device-cuda-without-cuda" and _cuda_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, _fill(args, world))
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert "Traceback" not in out and out.startswith("error:"), out
    assert len(out.splitlines()) == 1, out
    assert words in out, out


def _api(case: str, root: Path):
    """The same bad input through the Python API."""
    from difffeat.runs import commands

    img = str(root / "img.png")
    calls = {
        "tau-nan": lambda: difffeat.SegmentSettings(tau=float("nan")),
        "refine-order-negative": lambda: difffeat.SegmentSettings(refine_order=-2),
        "resolution-huge": lambda: difffeat.FeatureExtractor("shapes", ["down_blocks.0.resnets.0"], resolution=100000),
        "resolution-negative": lambda: difffeat.FeatureExtractor("shapes", ["down_blocks.0.resnets.0"], resolution=-64),
        "resolution-odd": lambda: difffeat.FeatureExtractor("shapes", ["down_blocks.0.resnets.0"], resolution=257),
        "bench-resolution-7": lambda: __import__("difffeat.devtools.bench").devtools.bench.run_benchmark(resolution=7),
        "segment-batch-size-zero": lambda: commands.segment([img], "cat", out_dir=root / "o", batch_size=0),
        "segment-memory-unknown": lambda: commands.segment([img], "cat", out_dir=root / "o", memory="bounded"),
        "eval-batch-size-over-chunk": lambda: commands.evaluate_dataset(shapes_split="test", batch_size=16, chunk_size=8, out_dir=root / "e"),
        "eval-n-negative": lambda: difffeat.evaluate.ShapesDataset("test", -5),
        "eval-n-zero": lambda: difffeat.evaluate.ShapesDataset("test", 0),
        "out-is-a-file": lambda: commands.segment([img], "cat", out_dir=root / "a_file"),
        "out-unwritable": lambda: commands.extract("shapes", [img], features="x", out_dir=root / "a_file" / "sub"),
        "out-under-proc": lambda: commands.segment([img], "cat", out_dir="/proc/difffeat_out"),
        "coco-results-unwritable": lambda: commands.segment([img], "cat", out_dir=root / "o2", coco_results="/proc/x/r.json"),
        "extract-coco-malformed-json": lambda: difffeat.runs.coco_images(root / "malformed.json", root / "images"),
        "shapes-split-unknown": lambda: difffeat.evaluate.ShapesDataset("foo", 3),
        "model-folder-without-unet": lambda: difffeat.load(root / "no_unet"),
        "model-random-index": lambda: difffeat.load(root / "random_index"),
        "device-cuda-without-cuda": lambda: difffeat.load("shapes", device="cuda"),
        "lora-missing": lambda: difffeat.shift.parse_technique(f"lora:{root}/nope.safetensors"),
        "demo-missing-model": lambda: __import__("difffeat.serve").serve.serve(str(root / "nope"), port=_free_port()),
        "single-file-without-config": lambda: difffeat.load(root / "tiny.safetensors", device="cpu"),
        "single-file-config-unresolvable": lambda: difffeat.load(root / "tiny.safetensors", config="nobody/nothing", device="cpu"),
        "single-file-missing": lambda: difffeat.load(root / "nope.safetensors", config=root / "tiny_config", device="cpu"),
        "single-file-not-a-checkpoint": lambda: difffeat.load(root / "garbage.safetensors", config=root / "tiny_config", device="cpu"),
        "single-file-config-of-another-family": lambda: difffeat.load(root / "tiny.safetensors", config=root / "pixart_config", device="cpu"),
        "model-file-not-a-checkpoint": lambda: difffeat.load(root / "a_file", device="cpu"),
        "demo-model-config-without-single-file": lambda: __import__("difffeat.serve").serve.serve("shapes", port=_free_port(), model_config=str(root / "tiny_config")),
        "model-config-without-single-file": lambda: difffeat.load("shapes", config=root / "tiny_config", device="cpu"),
        "make-tiny-onto-a-file": lambda: difffeat.testing.save_tiny_pipeline("sd", root / "a_file"),
        "make-single-file-onto-a-folder": lambda: difffeat.testing.save_single_file("sd", root / "images", config=root / "cfg"),
        "catalog-unknown-kind": lambda: difffeat.list_activations("shapes").select("nonsense-kind"),
        "catalog-kind-the-model-lacks": lambda: difffeat.list_activations("shapes").select(["cross-q", "joint-q"]),
        "coco-duplicate-category-id": lambda: difffeat.evaluate.CocoDataset(root / "duplicate_category_id.json", root / "images"),
        "eval-duplicate-class-names": lambda: difffeat.evaluate.VocDataset(root / "voc_ok" / "images", root / "voc_ok" / "labels", ["cat", "dog", "Cat"]),
        "caption-file-is-a-folder": lambda: commands.segment([img], "cat", out_dir=root / "o", caption_file=root / "captions_folder"),
        "label-file-is-a-folder": lambda: commands.evaluate_dataset(shapes_split="test", label_file=root / "captions_folder", out_dir=root / "e"),
        **{f"segment-{kind}-image": (lambda kind=kind: commands.segment([root / "bad_images" / kind], "cat", out_dir=root / "o"))
           for kind in BAD_IMAGES},
        "extract-truncated-jpeg": lambda: commands.extract("shapes", [root / "bad_images" / "truncated_jpeg"], features="down_blocks.0.resnets.0", out_dir=root / "o"),
        "eval-corrupt-image": lambda: commands.evaluate_dataset(coco=root / "bad_images" / "corrupt" / "coco.json", images=root / "bad_images" / "corrupt", out_dir=root / "e"),
    }
    if case.startswith("coco-") and case not in calls:
        name = {"coco-no-categories": "no_categories", "coco-no-images": "no_images", "coco-no-height": "no_height",
                "coco-duplicate-category-id": "duplicate_category_id",
                "coco-unknown-category": "unknown_category", "coco-top-level-list": "top_list",
                "coco-malformed-json": "malformed"}[case]
        return lambda: difffeat.evaluate.CocoDataset(root / f"{name}.json", root / "images")
    if case.startswith("voc-"):
        folder = root / ("voc_" + case[len("voc-label-"):].replace("-", "_"))
        return lambda: difffeat.evaluate.VocDataset(folder / "images", folder / "labels", ["cat"])
    return calls[case]


@pytest.mark.parametrize("case", list(CASES))
def test_api_bad_input_raises_a_difffeat_error(case, world):
    _, kind, words = CASES[case]
    if case == "device-cuda-without-cuda" and _cuda_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(kind) as err:
        _api(case, world)()
    assert isinstance(err.value, errors.DifffeatError)
    assert words.lstrip("-").replace("-", "_") in str(err.value).replace("-", "_"), str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_on_a_port_in_use_fails_at_start():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["demo", "--port", str(port)])
    assert result.exit_code == 2 and "in use" in result.output and "Traceback" not in result.output


def test_demo_without_gradio_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 2 and "pip install 'difffeat[demo]'" in result.output


def test_images_between_the_bomb_limit_and_twice_it_are_read_and_larger_ones_named(tmp_path, monkeypatch):
    """PIL warns between MAX_IMAGE_PIXELS and twice it: such images used to be called corrupt."""
    from difffeat import images

    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "big.png")  # 1600 px
    Image.new("RGB", (50, 50)).save(tmp_path / "huge.png")  # 2500 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert images.to_rgb(tmp_path / "big.png").size == (40, 40)
    with pytest.raises(errors.InvalidImageError, match="too large to decode.*megapixels"):
        images.to_rgb(tmp_path / "huge.png")


@pytest.mark.parametrize("args", [["--help"], ["segment", "--help"], ["eval", "--help"],
                                  ["segment", "x.png", "-c", "cat", "-o", "{tmp}/o", "--tau", "nan"],
                                  ["eval", "--shapes-split", "test", "--n", "0", "--out", "{tmp}/e"],
                                  ["extract", "m", "x.png", "-f", "a", "-o", "{tmp}/o", "--resolution", "7"]])
def test_help_and_argument_errors_import_neither_torch_nor_diffusers(args, tmp_path):
    """What makes `--help` and argument errors answer at once (benchmarks/startup.py times it): the checks
    run before any heavy import, so no model can load before them either."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from difffeat.cli import app; "
            f"r = CliRunner().invoke(app, {[a.format(tmp=tmp_path) for a in args]!r}); "
            "print(r.exit_code, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.split(maxsplit=1) == [("0" if args[-1] == "--help" else "2"), "[]\n"], out


@pytest.mark.parametrize("command", ["segment", "extract", "eval"])
@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_a_bad_image_stops_the_run_before_the_model_loads_and_writes_nothing(command, kind, world, tmp_path, monkeypatch):
    """Every input image is opened and verified first: a missing model load (patched to fail) proves the order,
    and the output folder stays empty (no manifest.json of a run that never ran)."""
    import difffeat.backbones

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr(difffeat.backbones, "load", no_load)
    folder, out = world / "bad_images" / kind, tmp_path / "out"
    args = {"segment": ["segment", str(folder), "-c", "cat", "-o", str(out)],
            "extract": ["extract", "shapes", str(folder), "-f", "down_blocks.0.resnets.0", "-o", str(out)],
            "eval": ["eval", "--coco", str(folder / "coco.json"), "--images", str(folder), "--out", str(out)]}[command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "b_bad." in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() or not list(out.iterdir())


def test_skip_unreadable_still_skips_bad_images_instead_of_refusing_them(world, tmp_path):
    from difffeat.runs import commands

    summary, _ = commands.segment([world / "bad_images" / "truncated_jpeg"], "square", out_dir=tmp_path, num_workers=0,
                                  skip_unreadable=True)
    assert (summary.written, summary.unreadable) == (1, 1)
    assert [d["path"] for d in json.loads((tmp_path / "unreadable.json").read_text())] == [str(world / "bad_images" / "truncated_jpeg" / "b_bad.jpg")]


def test_load_of_something_that_is_no_model_names_what_it_takes():
    for bad in (123, 1.5, ["shapes"], None):
        with pytest.raises(errors.InvalidOptionError, match="model must be 'shapes', a hub id"):
            difffeat.load(bad)


def test_an_empty_feature_list_is_refused_before_the_model_loads(monkeypatch):
    import difffeat.features

    monkeypatch.setattr(difffeat.features, "load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(errors.InvalidOptionError, match="empty feature list"):
        difffeat.FeatureExtractor("shapes", features=[])
    with pytest.raises(errors.InvalidOptionError, match="batch_size"):
        difffeat.FeatureExtractor("shapes", ["down_blocks.0.resnets.0"], batch_size=0)


@pytest.mark.parametrize("bad", [{}, [], None, {"a": "not a tensor"}])
def test_upsample_concat_of_nothing_usable_is_a_difffeat_error(bad):
    with pytest.raises(errors.InvalidOptionError, match="upsample_concat needs"):
        difffeat.upsample_concat(bad)


@pytest.fixture(scope="module")
def shapes_fx():
    return difffeat.FeatureExtractor("shapes", ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.q"], t=100)


def test_prompts_none_means_no_prompt_as_when_left_out(shapes_fx):
    """``fx(images, prompts=None)`` is what a user writes for "no prompt": the default (empty) prompt, for all
    images or as one entry of a list (same inputs, same batch size, same kernels: exactly equal)."""
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    name = shapes_fx.names[0]
    default = shapes_fx([image, image])[name]
    assert torch_equal(shapes_fx([image, image], prompts=None)[name], default)
    assert torch_equal(shapes_fx([image, image], prompts=[None, ""])[name], default)
    assert torch_equal(shapes_fx.extract_batch([image], None)[name], shapes_fx.extract_batch([image], [""])[name])


@pytest.mark.parametrize("bad", [123, [1, 2], {"a": 1}])
def test_prompts_of_another_type_are_refused(shapes_fx, bad):
    with pytest.raises(errors.InvalidPromptError, match="prompts must be"):
        shapes_fx([Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64))], prompts=bad)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
