"""The demo's ``/segment`` endpoint through ``gradio_client``: results, readable errors, queue under load.

The server runs in this process (gradio's own thread) on the trained shapes model when it is installed,
else on a tiny random SD pipeline saved to a temp folder.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import difffeat
from PIL import Image

pytest.importorskip("gradio", reason="the demo needs gradio (pip install 'difffeat[demo]')")
pytest.importorskip("gradio_client", reason="gradio_client is not installed")

from gradio_client import Client, handle_file  # noqa: E402

from difffeat.demo import ActivityMeter, bundled_examples, launch  # noqa: E402
from difffeat.resources import package_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES_INSTALLED = (package_dir() / "weights" / "shapes" / "model_index.json").is_file()
CONCURRENCY = 2


def _load_bench():
    spec = importlib.util.spec_from_file_location("demo_load", ROOT / "benchmarks" / "demo_load.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["demo_load"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(demo, url, model) of a demo served on a free port with queue limit CONCURRENCY."""
    if SHAPES_INSTALLED:
        model = "shapes"
    else:
        from difffeat.testing import save_tiny_pipeline

        model = str(save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny-sd")))
    demo = launch(model, port=bench.free_port(), concurrency=CONCURRENCY, block=False, preload=True, meter=ActivityMeter())
    yield demo, demo.local_url, model
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def _example():
    image, classes = bundled_examples()[0]
    return image, classes


def _segment(client, model, image, classes, fast=True):
    return client.predict(*bench.segment_args(image, classes, model, fast=fast), api_name="/segment")


def test_segment_endpoint_returns_label_png_of_image_size(server, client):
    """Full GOCA segmentation; the request right after a failed one (the server keeps serving)."""
    _, _, model = server
    image, classes = _example()
    with pytest.raises(Exception):
        _segment(client, model, image, "")
    overlay, labels, legend, heat, label_file, status, message = _segment(client, model, image, classes, fast=False)
    size = Image.open(image).size
    n = len(classes.split(","))
    lab = Image.open(label_file)
    assert lab.mode == "P" and lab.size == size  # the download keeps the image size
    values = np.asarray(lab)
    assert values.max() <= n  # 0 = background, 1..n = classes
    k = Image.open(overlay).size[0] // size[0]  # the pictures are shown enlarged by an integer factor
    assert k > 1 and Image.open(overlay).size == Image.open(labels).size == (size[0] * k, size[1] * k)
    shown = np.asarray(Image.open(labels).convert("RGB"))[::k, ::k]
    assert np.array_equal(shown, np.asarray(lab.convert("RGB")))  # nearest: the view is the label map, pixel for pixel
    assert Path(label_file).name == f"{Path(image).stem}-labels.png"  # named after the input, not labels-7edk3yfh.png
    assert f"segmented {size[0]}x{size[1]} px" in message
    assert len(heat) == n and [h["caption"] for h in heat] == [c.strip() for c in classes.split(",")]
    for cls in ["background", *[c.strip() for c in classes.split(",")]]:
        assert f'data-class="{cls}"' in legend
    assert ("random weights, for testing" in status) == (not SHAPES_INSTALLED and model == "shapes")


def test_blank_t_and_tau_are_the_model_defaults(server, client):
    """Blank boxes (what the page sends whether or not *Advanced* was opened) = the model's defaults."""
    demo, _, model = server
    from difffeat.segment.settings import settings_for

    backbone = demo.difffeat_cache.get(model).backbone
    defaults = settings_for(str(backbone.name), backbone.family)
    image, classes = _example()
    args = list(bench.segment_args(image, classes, model, fast=True))
    blank = client.predict(*args[:3], "", *args[4:7], "", api_name="/segment")
    args[3], args[7] = str(defaults.t), str(defaults.tau)
    explicit = client.predict(*args, api_name="/segment")
    assert blank[2] == explicit[2]  # legend with pixel counts
    assert np.array_equal(np.asarray(Image.open(blank[4])), np.asarray(Image.open(explicit[4])))
    assert f"t={defaults.t}," in blank[6]


def test_an_unknown_class_word_is_left_out_and_the_known_classes_segment_as_without_it(server, client):
    """On example 0001 an unknown word segmented anyway took the diamond's IoU from 0.886 to 0.114; left out,
    the known classes get exactly the labels they get alone (the same prompt through the same kernels)."""
    if not SHAPES_INSTALLED:
        pytest.skip("the random fallback model has an open vocabulary: only tokenizer-unknown words are left out")
    _, _, model = server
    image = str(package_dir() / "examples" / "shapes_test_0001.png")
    alone = _segment(client, model, image, "square, ring, diamond")
    banana = _segment(client, model, image, "square, ring, banana, diamond")
    assert np.array_equal(np.asarray(Image.open(alone[4])), np.asarray(Image.open(banana[4])))
    assert 'data-class="banana"' not in banana[2] and len(banana[3]) == 3
    assert "left out: 'banana' is not a word this model knows" in banana[6]
    with pytest.raises(Exception) as info:
        _segment(client, model, image, "banana, kiwi")
    assert "no class left to segment: 'banana', 'kiwi'" in str(info.value)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"classes": ""}, "empty class list"),
        ({"classes": " , "}, "empty class list"),
        ({"t": "abc"}, "timestep t must be a number"),
        ({"t": "2.5"}, "timestep t must be a whole number"),
        ({"t": "1000"}, "outside [0, 999]"),
        ({"classes": "star, Star"}, "duplicate class names"),
        ({"image": "not-an-image"}, "cannot read image file"),
    ],
)
def test_bad_input_gives_readable_error_and_server_keeps_serving(server, client, tmp_path, bad, message):
    _, _, model = server
    image, classes = _example()
    if bad.get("image") == "not-an-image":
        fake = tmp_path / "fake.png"
        fake.write_text("this is not a PNG")
        image = str(fake)
    args = list(bench.segment_args(image, bad.get("classes", classes), model, fast=True))
    args[3] = bad.get("t")
    with pytest.raises(Exception) as info:
        client.predict(*args, api_name="/segment")
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)
    assert "/tmp/" not in str(info.value) and "numpy" not in str(info.value)  # no server paths, no API types
    if bad.get("classes") == "":
        assert "--classes" not in str(info.value)  # a CLI flag means nothing on the page


def test_unknown_model_is_a_readable_error(client):
    image, classes = _example()
    with pytest.raises(Exception) as info:
        _segment(client, "/no/such/folder", image, classes)
    assert "no/such/folder" in str(info.value) and "Traceback" not in str(info.value)


@pytest.mark.slow
def test_load_20_concurrent_requests_respect_queue_limit(server, tmp_path):
    demo, url, model = server
    image, classes = _example()
    demo.difffeat_meter.peak = 0
    report = bench.run_load(url, bench.segment_args(image, classes, model, fast=True), requests=20)
    report.update(concurrency_limit=CONCURRENCY, peak_in_flight=demo.difffeat_meter.peak, model=model,
                  fallback=not SHAPES_INSTALLED, source="tests/test_demo_client.py", fast=True)
    print(f"\ndemo load: 20 requests, p50 {report['p50_s']} s, p95 {report['p95_s']} s, wall {report['wall_s']} s, "
          f"peak in flight {report['peak_in_flight']} (limit {CONCURRENCY})")
    # the committed benchmarks/results/demo_load.json comes from running benchmarks/demo_load.py by hand
    (tmp_path / "demo_load.json").write_text(json.dumps(report, indent=2) + "\n")
    assert report["succeeded"] == 20, report["errors"]
    assert 1 <= demo.difffeat_meter.peak <= CONCURRENCY


def test_features_endpoint_returns_pca_picture_and_safetensors(server, client):
    from safetensors.torch import load_file

    demo, _, model = server
    backbone = demo.difffeat_cache.get(model).backbone
    name = next(a.name for a in difffeat.list_activations(backbone) if a.kind == "resnet-out")
    image, _ = _example()
    pic, tensor_file, info, _ = client.predict(handle_file(image), model, name, "", None, api_name="/features")
    w, h = Image.open(image).size
    k = Image.open(pic).size[0] // w
    assert k >= 1 and Image.open(pic).size == (w * k, h * k)
    tensors = load_file(tensor_file)
    assert list(tensors) == [name] and tensors[name].shape == tuple(difffeat.list_activations(backbone)[name].shape)
    assert f"at t={backbone.default_feature_t} (the model's default)" in info
    assert Path(tensor_file).name == f"{Path(image).stem}-features.safetensors"


def test_features_endpoint_extracts_a_whole_preset(server, client):
    """``preset:NAME`` entries: every activation of the preset in the file, PCA of their concatenation."""
    from safetensors.torch import load_file

    from difffeat.demo import preset_choices

    if not SHAPES_INSTALLED:
        pytest.skip("the random fallback model matches no preset")
    demo, _, model = server
    backbone = demo.difffeat_cache.get(model).backbone
    choices = preset_choices(backbone)  # the shipped model's presets, not those of other architectures
    assert {"preset:shapes-practical", "preset:shapes-legacy"} <= set(choices) and "preset:sd15-practical" not in choices
    assert choices[0] == "preset:shapes-practical"  # the recommended preset comes first (the default)
    choice = choices[0]
    from difffeat.presets import load_preset

    names = [difffeat.list_activations(backbone)[f].name for f in load_preset(choice.split(":", 1)[1]).features]
    image, _ = _example()
    pic, tensor_file, info, _ = client.predict(handle_file(image), model, choice, "", None, api_name="/features")
    tensors = load_file(tensor_file)
    assert sorted(tensors) == sorted(names) and choice in info
    for n in names:
        assert tensors[n].shape == tuple(difffeat.list_activations(backbone)[n].shape)


@pytest.mark.slow
def test_gate_endpoint_compares_img2img(server, client):
    _, _, model = server
    image, _ = _example()
    panels, verdict, status = client.predict(handle_file(image), model, "a photo of shapes", "prompt:quality=natural", 0.75, 2,
                                             api_name="/gate")
    assert [p["caption"].split(" (")[0] for p in panels] == ["input", "without the technique", "with the technique"]
    assert all(min(Image.open(p["image"]).size) >= 256 for p in panels)  # readable, not 64 px
    assert re.search(r"The technique (helps|does not help) here", verdict) and verdict.count("<tr>") == 3
    assert not re.search(r"\d\.\d{4,}", verdict)  # rounded for reading
    assert "family" in status
    with pytest.raises(Exception) as info:
        client.predict(handle_file(image), model, "x", "bogus:1", 0.75, 2, api_name="/gate")
    assert "unknown technique" in str(info.value)


# --------------------------------------------------------------------------- helpers (no server)
def test_demo_serves_the_shipped_shapes_model_never_a_random_one():
    from difffeat.demo import FALLBACK_NOTE, ModelCache

    assert SHAPES_INSTALLED, "the shapes weights ship with the package"
    for fallback in (True, False):
        cache = ModelCache(fallback=fallback, device="cpu")
        loaded = cache.get("shapes")
        assert not loaded.is_fallback and FALLBACK_NOTE not in cache.describe("shapes")
        assert cache.get("shapes") is loaded  # cached


def test_pca_rgb_recovers_a_planted_component_and_upsamples_nearest():
    import torch

    from difffeat.demo import pca_rgb

    h = w = 8
    ramp = torch.linspace(-1, 1, w).repeat(h, 1)  # varies along x only
    feature = torch.stack([3 * ramp, -3 * ramp, 0.01 * torch.randn(h, w), 0.01 * torch.randn(h, w)])
    pic = np.asarray(pca_rgb(feature, (32, 32)))
    assert pic.shape == (32, 32, 3)
    first = pic[..., 0].astype(int)
    assert {first.min(), first.max()} == {0, 255}  # min-max per channel
    assert (np.abs(np.diff(first, axis=0)) == 0).all()  # the main component follows the x ramp only
    assert (pic[:4, :4] == pic[0, 0]).all()  # nearest: 4x4 blocks of one feature pixel


def test_catalog_rows_filter_by_kind_and_resolution(server):
    from difffeat.demo import catalog_rows

    demo, _, model = server
    backbone = demo.difffeat_cache.get(model).backbone  # already loaded by the server
    rows = catalog_rows(backbone)
    assert len(rows) == len(difffeat.list_activations(backbone))
    picked = catalog_rows(backbone, kinds=["resnet-out"], resolution=rows[1][3])
    assert picked and all(r[1] == "resnet-out" and r[3] == rows[1][3] for r in picked)
    assert all(r[3] == "map" for r in catalog_rows(backbone, kinds=["cross-map"]))


def test_label_colours_avoid_the_image_colours():
    """Example 0001's square is the yellow of the fixed palette's third colour: the colours picked for it are
    the candidates farthest from its own colours, so no label colour is one of the image's colours."""
    from difffeat.segment.outputs import CLASS_COLORS, label_colors, palette

    image = Image.open(package_dir() / "examples" / "shapes_test_0001.png").convert("RGB")
    own = np.unique(np.asarray(image).reshape(-1, 3), axis=0)
    fixed = palette()[1:4]
    assert any((np.abs(own.astype(int) - c).sum(1) < 40).any() for c in fixed)  # the old fixed colours clash
    colors = label_colors(image, 3)
    assert colors.shape == (4, 3) and (colors[0] == 0).all() and len({tuple(c) for c in colors[1:]}) == 3
    nearest = [np.sqrt(((own.astype(float) - c) ** 2).sum(1)).min() for c in colors[1:].astype(float)]
    best = sorted((np.sqrt(((own.astype(float) - np.array(c, float)) ** 2).sum(1)).min() for c in CLASS_COLORS), reverse=True)
    assert min(nearest) > 60 and nearest[0] == best[0]  # the first class gets the colour farthest from the image


def test_the_known_failure_example_is_not_among_the_normal_examples():
    from difffeat.demo import bundled_examples, known_failure

    normal, failing = bundled_examples(), bundled_examples(failures=True)
    assert [Path(p).name for p, _ in failing] == ["shapes_test_0009.png"]
    assert "shapes_test_0009.png" not in [Path(p).name for p, _ in normal] and len(normal) == 5
    assert "swaps the square and the star" in known_failure(failing[0][0])


def test_catalog_table_names_wrap_at_dots_and_a_clicked_cell_gives_the_exact_name():
    from difffeat.demo import catalog_name, catalog_view_rows

    rows = [["down_blocks.0.attentions.0.transformer_blocks.0.attn1.q", "self-q", "4x16x16", "16x16", ""]]
    shown = catalog_view_rows(rows)
    assert shown[0][0] == "down_blocks.<wbr>0.<wbr>attentions.<wbr>0.<wbr>transformer_blocks.<wbr>0.<wbr>attn1.<wbr>q"
    assert shown[0][1:] == rows[0][1:] and catalog_name(shown[0][0]) == rows[0][0]


def test_gate_verdict_explains_technique_helps_and_the_table_rounds():
    from PIL import Image as PILImage

    from difffeat.shift.gate import Img2ImgComparison

    img = PILImage.new("RGB", (8, 8))
    helps = Img2ImgComparison(img, img, img, 12.3456, 14.5678, 0.2, 0.1)
    assert helps.technique_helps and helps.verdict().startswith("The technique helps here")
    assert "PSNR +2.22 dB" in helps.verdict() and "the edge IoU (-0.100) disagrees" in helps.verdict()
    assert helps.table()[0][1:] == ("12.35", "14.57", "with") and helps.table()[1][1:] == ("0.200", "0.100", "without")
    hurts = Img2ImgComparison(img, img, img, 14.0, 13.0, 0.2, 0.1)
    assert not hurts.technique_helps and hurts.verdict().startswith("The technique does not help here")


# --------------------------------------------------------------------------- Generate
GEN_PROMPT = "a red circle and a blue star on a striped green background"


def _generate(client, model, prompt=GEN_PROMPT, classes="", guidance="cfg", scale=5.0, steps=4, seed=3):
    return client.predict(prompt, classes, model, guidance, scale, steps, seed, api_name="/generate")


def test_generate_endpoint_returns_the_pipelines_image_its_label_map_and_named_downloads(server, client):
    """``cfg`` is the pipeline's own generation (same seed), segmented into the prompt's class words by
    default; the label PNG is the image's size, the view is it enlarged (nearest), the downloads are named
    after the prompt, seed and guidance."""
    import torch

    demo, _, model = server
    image_view, overlay, labels_view, legend, heat, files, status, message = _generate(client, model)
    backbone = demo.difffeat_cache.get(model).backbone
    from difffeat.runs import prompt_class_words

    words = prompt_class_words(GEN_PROMPT, backbone)
    if SHAPES_INSTALLED:
        assert words == ["circle", "star"]
    names = [Path(f).name for f in files]
    stem = "a-red-circle-and-a-blue_seed3_cfg"  # the prompt's first six words, the seed, the guidance
    assert names == [f"{stem}.png", f"{stem}_labels.png", f"{stem}_overlay.png", f"{stem}.json"]
    pipe = backbone.pipeline
    size = backbone.native_resolution
    own = pipe(GEN_PROMPT, num_inference_steps=4, guidance_scale=5.0, height=size, width=size,
               generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(Image.open(files[0]).convert("RGB")), np.asarray(own))  # tracing changed nothing
    lab = Image.open(files[1])
    assert lab.mode == "P" and lab.size == own.size and np.asarray(lab).max() <= len(words)
    k = Image.open(image_view).size[0] // own.size[0]
    assert k > 1 and Image.open(labels_view).size == Image.open(overlay).size == (own.size[0] * k, own.size[1] * k)
    shown = np.asarray(Image.open(labels_view).convert("RGB"))[::k, ::k]
    assert np.array_equal(shown, np.asarray(lab.convert("RGB")))
    meta = json.loads(Path(files[3]).read_text())
    assert (meta["prompt"], meta["seed"], meta["guidance"], meta["steps"]) == (GEN_PROMPT, 3, "cfg", 4)
    assert list(meta["classes"]) == ["background", *words]
    assert [h["caption"] for h in heat] == words
    for cls in ["background", *words]:
        assert f'data-class="{cls}"' in legend
    assert f"generated {own.size[0]}x{own.size[1]} px: 4 steps, cfg at guidance scale 5, seed 3" in message
    assert "family" in status


def test_generate_warns_about_a_class_word_the_prompt_lacks_naming_its_words(server, client):
    _, _, model = server
    *_, message = _generate(client, model, classes="circle, square", steps=2)
    assert "class 'square' is not a word of the prompt" in message
    assert "its words: a, red, circle, and, a, blue, star, on, a, striped, green, background" in message
    assert "segmented into circle;" in message  # the known class stays


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(guidance="scfg-goca", scale=1.0), "use a guidance_scale > 1"),
        (dict(guidance="scfg", scale=0.5), "use a guidance_scale > 1"),
        (dict(classes="square, cross"), "none of the classes ['square', 'cross'] occurs in the prompt"),
        (dict(prompt="  "), "empty prompt"),
        (dict(seed=-1), "seed must be between 0 and"),
    ],
)
def test_bad_generate_input_is_a_readable_error(server, client, bad, message):
    _, _, model = server
    with pytest.raises(Exception) as info:
        _generate(client, model, **{"steps": 2, **bad})
    assert message in str(info.value) and "Traceback" not in str(info.value)
