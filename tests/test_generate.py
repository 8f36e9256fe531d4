"""``difffeat generate``: prompts -> images, label maps, overlays and a COCO json; resumable; ``--guidance cfg``
is the pipeline's own generation; bad input fails before the model loads."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from difffeat.cli import app
from difffeat.errors import InvalidPromptError
from difffeat.runs.commands import generate
from difffeat.runs.generate import prompt_classes, read_prompts
from difffeat.tracing import ClassNotInPromptWarning

runner = CliRunner()
PROMPTS = ["a photo of a cat and a dog", "a dog on a bed"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from difffeat.testing import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny-sd") / "sd")


def test_generate_writes_images_label_maps_and_a_coco_set_and_resumes(sd_folder, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "gen"
    args = dict(out_dir=out, model=str(sd_folder), classes="cat,dog,bed", guidance="cfg", steps=2, seed=3, device="cpu")
    with pytest.warns(ClassNotInPromptWarning):
        summary = generate(PROMPTS, **args)
    assert (summary.written, summary.skipped) == (2, 0)
    for ident in ("0000", "0001"):
        for suffix in (".png", "_labels.png", "_overlay.png", ".json"):
            assert (out / f"{ident}{suffix}").is_file()
    assert json.loads((out / "0000.json").read_text())["classes"] == {"background": 0, "cat": 1, "dog": 2}
    assert json.loads((out / "0001.json").read_text())["classes"] == {"background": 0, "dog": 1, "bed": 2}
    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog", "bed"]
    assert len(coco.getImgIds()) == 2 and coco.imgs[1]["caption"] == PROMPTS[0]
    for ann in coco.loadAnns(coco.getAnnIds()):  # each annotation is its class's pixels of the label map
        img = coco.imgs[ann["image_id"]]
        labels = np.asarray(Image.open(out / img["file_name"].replace(".png", "_labels.png")))
        meta = json.loads((out / img["file_name"].replace(".png", ".json")).read_text())
        name = coco.cats[ann["category_id"]]["name"]
        assert np.array_equal(coco.annToMask(ann), (labels == meta["classes"][name]).astype(np.uint8))
    # --guidance cfg is the pipeline's own generation (prompt i from seed + i)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    own = pipe(PROMPTS[1], num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator().manual_seed(3 + 1)).images[0]
    assert np.array_equal(np.asarray(Image.open(out / "0001.png")), np.asarray(own))
    # a restart skips finished prompts
    with pytest.warns(ClassNotInPromptWarning):
        again = generate(PROMPTS, **args)
    assert (again.written, again.skipped) == (0, 2)


def test_prompts_from_a_captions_csv(tmp_path):
    f = tmp_path / "captions.csv"
    f.write_text("id,text\n42,a cat on a bed\n7,\"a dog, a cat\"\n")
    assert read_prompts(None, f) == [("42", "a cat on a bed"), ("7", "a dog, a cat")]
    g = tmp_path / "prompts.txt"
    g.write_text("a cat\n\na dog\n")
    assert read_prompts(["a bed"], g) == [("0000", "a bed"), ("0001", "a cat"), ("0002", "a dog")]


def test_a_class_absent_from_a_prompt_warns_with_its_words():
    with pytest.warns(ClassNotInPromptWarning, match=r"does not name \['bed'\] \(its words: a, photo, of, a, cat, and, a, dog\)"):
        items = prompt_classes(list(enumerate(PROMPTS)), ["cat", "dog", "bed"])
    assert [it.classes for it in items] == [("cat", "dog"), ("dog", "bed")]
    with pytest.raises(InvalidPromptError, match="names none of the classes"):
        prompt_classes([("0", "a dog")], ["cat"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classes", "horse"], "names none of the classes ['horse'] (its words: a, photo, of, a, cat, and, a, dog)"),
        (["--steps", "3", "--trace-steps", "1,5"], "outside the schedule of --steps 3"),
        (["--steps", "20", "--trace-steps", "10-20"], "outside the schedule of --steps 20"),
        (["--trace-steps", "late"], "--trace-steps must be step indices or ranges"),
        (["--guidance", "scfg", "--guidance-scale", "1.0"], "guidance_scale > 1"),
        (["--guidance", "cfg", "--guidance-scale", "0.5"], "guidance_scale > 1"),
        (["--guidance", "pag"], "--guidance must be one of cfg, scfg-goca, scfg"),
        (["--steps", "0"], "--steps"),
        (["--aggregate", "mean"], "--aggregate must be one of maps, steps, got 'mean'"),
        (["--steps", "3", "--self-step", "3"], "--self-step 3 is outside the schedule of --steps 3 (0..2)"),
        (["--self-step", "-1"], "--self-step must be >= 0, got -1"),
        (["--aggregate", "steps", "--self-step", "1"], "--self-step chooses the self-attention step of --aggregate maps"),
        (["--steps", "20", "--trace-steps", "10-19", "--self-step", "5"], "--self-step 5 is not one of the traced steps"),
    ],
)
def test_bad_generate_input_exits_2_with_one_line_before_the_model_loads(tmp_path, extra, message):
    missing_model = str(tmp_path / "no-such-model")  # loading it would fail: the check must come first
    result = runner.invoke(app, ["generate", "-p", PROMPTS[0], "--out", str(tmp_path / "o"), "--model", missing_model, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


# --------------------------------------------------------------------------- one image in memory (the demo's call)
class _NoPipeline:
    """A backbone whose pipeline must not run: options are checked before any work."""

    name, native_resolution = "none", 64

    @property
    def pipeline(self):
        raise AssertionError("the pipeline was reached before the options were checked")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(guidance="scfg", guidance_scale=1.0), "guidance_scale > 1"),
        (dict(guidance="cfg", guidance_scale=0.5), "guidance_scale > 1"),
        (dict(guidance="pag"), "unknown guidance 'pag'"),
        (dict(steps=0), "steps must be between 1 and 1000"),
        (dict(seed=-1), "seed must be between"),
        (dict(steps=3, trace_steps=(1, 5)), "outside the schedule of 3 steps"),
        (dict(aggregate="mean"), "aggregate must be one of maps, steps, got 'mean'"),
        (dict(steps=3, self_step=3), "self_step 3 is outside the schedule of 3 steps (0..2)"),
        (dict(aggregate="steps", self_step=1), 'self_step chooses the self-attention step of aggregate="maps"'),
        (dict(steps=4, trace_steps=(2, 3), self_step=1), "self_step 1 is not one of the traced steps"),
    ],
)
def test_generate_image_checks_its_options_before_the_pipeline_runs(options, message):
    from difffeat.errors import InvalidOptionError
    from difffeat.runs import generate_image

    with pytest.raises(InvalidOptionError, match=re.escape(message)):
        generate_image(_NoPipeline(), PROMPTS[0], ["cat"], **options)


def test_generate_image_is_the_pipelines_own_generation_with_its_label_map(sd_folder):
    from diffusers import DiffusionPipeline

    import difffeat
    from difffeat.runs import generate_image

    backbone = difffeat.load(str(sd_folder), device="cpu")
    out = generate_image(backbone, PROMPTS[0], guidance="cfg", guidance_scale=7.5, steps=2, seed=5)
    pipe = DiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    own = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(out.image), np.asarray(own))
    # an open vocabulary: the default classes are the prompt's words but the fillers, in prompt order
    assert out.result.classes == ["photo", "cat", "dog"]
    assert out.result.labels.shape == (64, 64) and out.result.labels.max() <= len(out.result.classes)
    assert (out.seed, out.guidance, out.steps) == (5, "cfg", 2)


def test_the_default_classes_of_a_closed_vocabulary_are_the_prompts_class_words():
    import difffeat
    from difffeat.runs import prompt_class_words

    shapes = difffeat.load("shapes", device="cpu")
    assert prompt_class_words("two red Circles and a blue star on a striped green background", shapes) == ["circles", "star"]
    assert prompt_class_words("a green background", shapes) == []
    assert prompt_class_words("a circle and two circles", shapes) == ["circle"]  # each class once


def test_generate_image_without_a_known_class_word_names_the_prompts_words():
    import difffeat
    from difffeat.runs import generate_image

    shapes = difffeat.load("shapes", device="cpu")
    with pytest.raises(InvalidPromptError, match=r"names no class this model can segment \(its words: a, green, background\)"):
        generate_image(shapes, "a green background", steps=2)


# --------------------------------------------------------------------------- how the traced steps combine
def _direct_trace(folder, prompt, classes, steps, seed, **trace_kw):
    """``difffeat.trace`` around the pipeline's own call, as ``difffeat generate --guidance cfg`` runs it."""
    import difffeat

    pipe = difffeat.load(str(folder), device="cpu").pipeline
    pipe.set_progress_bar_config(disable=True)
    with difffeat.trace(pipe, prompt, classes, guidance=difffeat.SCFG(7.5, "cfg"), **trace_kw) as tc:
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=64, width=64,
                     generator=torch.Generator().manual_seed(seed)).images[0]
    return tc.result(0, image)


@pytest.mark.parametrize("aggregate, self_step", [("steps", None), ("maps", 0)])
def test_aggregate_and_self_step_reach_the_trace(sd_folder, tmp_path, aggregate, self_step):
    out = tmp_path / "gen"
    args = ["generate", "-p", PROMPTS[0], "--classes", "cat,dog", "--model", str(sd_folder), "--guidance", "cfg",
            "--steps", "3", "--seed", "3", "--heatmaps", "--device", "cpu", "--out", str(out), "--aggregate", aggregate]
    args += ["--self-step", str(self_step)] if self_step is not None else []
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    direct = _direct_trace(sd_folder, PROMPTS[0], ["cat", "dog"], 3, 3, aggregate=aggregate, self_step=self_step)
    default = _direct_trace(sd_folder, PROMPTS[0], ["cat", "dog"], 3, 3)
    assert not torch.equal(direct.class_maps, default.class_maps)  # the setting changes the maps ...
    # ... and the command's label maps, heat maps and layer weights are the direct trace's (same kernels, same data)
    assert np.array_equal(np.asarray(Image.open(out / "0000_labels.png")), direct.labels)
    for cls in ("cat", "dog"):
        heat = (direct.heatmap(cls) * 255).astype(np.uint8)
        assert np.array_equal(np.asarray(Image.open(out / f"0000_heat_{cls}.png")), heat)
    meta = json.loads((out / "0000.json").read_text())
    assert [layer["weight"] for layer in meta["layers"]] == direct.layer_weights
    assert meta["settings"]["aggregate"] == aggregate and meta["settings"].get("self_step") == self_step
    # the settings are in the manifest: a restart with another aggregation is refused, not mixed
    assert json.loads((out / "manifest.json").read_text())["settings"]["aggregate"] == aggregate
    other = "maps" if aggregate == "steps" else "steps"
    again = runner.invoke(app, [*args[: args.index("--aggregate")], "--aggregate", other])
    assert again.exit_code == 2 and f'settings.aggregate: "{aggregate}" -> "{other}"' in again.output


def test_the_command_line_and_the_demo_segment_the_same_default_class_words(tmp_path):
    import difffeat
    from difffeat.demo import LoadedModel, run_generation
    from difffeat.runs import prompt_class_words

    prompt = "a red circle and a blue star on a green background"
    result = runner.invoke(app, ["generate", "-p", prompt, "--guidance", "cfg", "--guidance-scale", "5", "--steps", "2",
                                 "--device", "cpu", "--out", str(tmp_path / "gen")])
    assert result.exit_code == 0, result.output
    cli_classes = [c for c in json.loads((tmp_path / "gen" / "0000.json").read_text())["classes"] if c != "background"]
    shapes = difffeat.load("shapes", device="cpu")
    demo = run_generation(LoadedModel(shapes), prompt, "", guidance="cfg", guidance_scale=5.0, steps=2)
    with difffeat.trace(shapes.pipeline, prompt) as tc:  # the tracing API's default too
        pass
    assert cli_classes == demo.generated.result.classes == tc.classes[0] == prompt_class_words(prompt, shapes)
    assert cli_classes == ["circle", "star"]  # the closed vocabulary's class words: no colours, no "background"
