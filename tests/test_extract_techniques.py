"""`--technique` / `--timesteps` / `--ensemble-size` on the extraction paths: the CLI's files equal the Python
API's features, variants concatenate as the content-shift reference combines them, the published multi-step
start, and bad techniques fail before any model loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import difffeat
from difffeat.cli import app
from difffeat.shift import ControlNet, Prompt
from difffeat.shift.combined import CombinedExtractor, parse_variants
from difffeat.testing import tiny_controlnet

from _helpers import backbone_for, random_image

runner = CliRunner()
PRESET = "shapes-practical"


@pytest.fixture(scope="module")
def shapes():
    return difffeat.load("shapes", device="cpu")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from difffeat.shapes import world

    d = tmp_path_factory.mktemp("imgs")
    for i in range(2):
        world.sample("test", i).image.save(d / f"im{i}.png")
    return d


def _extract(args, out):
    res = runner.invoke(app, ["extract", "shapes", *args, "--preset", PRESET, "--out", str(out), "--device", "cpu",
                              "--num-workers", "0", "--batch-size", "1"])
    assert res.exit_code == 0, res.output
    return load_file(str(out / "im0.safetensors"))


def test_a_technique_on_the_cli_equals_the_python_extractor_with_it(shapes, image_dir, tmp_path):
    got = _extract([str(image_dir), "--technique", "prompt:quality=natural", "--prompt", "shapes"], tmp_path / "a")
    want = difffeat.FeatureExtractor(shapes, preset=PRESET, techniques=[Prompt(quality="natural")])(
        str(image_dir / "im0.png"), "shapes")
    plain = difffeat.FeatureExtractor(shapes, preset=PRESET)(str(image_dir / "im0.png"), "shapes")
    for n, v in want.items():
        torch.testing.assert_close(got[n], v[0], atol=1e-6, rtol=0)
    assert any(not torch.allclose(want[n], plain[n]) for n in want)  # the technique does change the features


def test_repeated_techniques_concatenate_each_variants_features(shapes, image_dir, tmp_path):
    got = _extract([str(image_dir), "--technique", "prompt:quality=natural", "--technique", "prompt:template=a photo of {}",
                    "--prompt", "shapes"], tmp_path / "b")
    im = str(image_dir / "im0.png")
    a = difffeat.FeatureExtractor(shapes, preset=PRESET, techniques=[Prompt(quality="natural")])(im, "shapes")
    b = difffeat.FeatureExtractor(shapes, preset=PRESET, techniques=[Prompt(template="a photo of {}")])(im, "shapes")
    for n in a:
        torch.testing.assert_close(got[n], torch.cat([a[n], b[n]], 1)[0], atol=1e-6, rtol=0)


def test_several_timesteps_concatenate_and_seeds_average(shapes, image_dir, tmp_path):
    got = _extract([str(image_dir), "--timesteps", "50,200", "--ensemble-size", "2"], tmp_path / "c")
    im = str(image_dir / "im0.png")
    parts = []
    for t in (50, 200):
        runs = [difffeat.FeatureExtractor(shapes, preset=PRESET, t=t, seed=s)(im) for s in (0, 1)]
        parts.append({n: (runs[0][n] + runs[1][n]) / 2 for n in runs[0]})
    for n in parts[0]:
        torch.testing.assert_close(got[n], torch.cat([parts[0][n], parts[1][n]], 1)[0], atol=1e-5, rtol=1e-5)
    meta = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert "timesteps" in json.dumps(meta)


def test_plus_applies_techniques_together_in_one_forward(shapes):
    im = random_image(64, 64)
    v = parse_variants(["prompt:quality=natural+prompt:template=a photo of {}"])
    assert len(v) == 1 and len(next(iter(v.values()))) == 2
    got = CombinedExtractor(shapes, preset=PRESET, variants=v)(im, "x")
    want = difffeat.FeatureExtractor(shapes, preset=PRESET, techniques=next(iter(v.values())))(im, "x")
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=0, rtol=0)


def test_published_start_is_eleven_one_step_ddim_steps_from_t_plus_11_on_sd(tiny_pipes):
    name = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.q"
    backbone = backbone_for(tiny_pipes, "sd")
    net, im = tiny_controlnet(), random_image(64, 64)
    fx = difffeat.FeatureExtractor(backbone, [name], t=50, early_exit=False, techniques=[ControlNet(net, start="published")])
    calls = []
    handle = backbone.denoiser.register_forward_hook(lambda *a: calls.append(1))
    try:
        published = fx(im, "a cat")
    finally:
        handle.remove()
    assert len(calls) == 11 + 1  # 61 -> 50 in one-timestep steps, then the extraction forward
    explicit = difffeat.FeatureExtractor(backbone, [name], t=50, early_exit=False,
                                         techniques=[ControlNet(net, start_t=61, steps=11)])(im, "a cat")
    torch.testing.assert_close(published[name], explicit[name], atol=0, rtol=0)


def test_an_unknown_technique_fails_before_the_model_loads(image_dir, tmp_path):
    for cmd in (["extract", "no/such-model", str(image_dir)], ["probe", "no/such-model", "--ddpm", str(tmp_path)]):
        res = runner.invoke(app, [*cmd, "--preset", PRESET, "--technique", "ipadapter:x", "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and "unknown technique 'ipadapter'" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1


def test_a_lora_of_another_family_fails_before_the_model_loads(image_dir, tmp_path):
    lora = tmp_path / "sdxl_lora.safetensors"  # an SDXL-shaped LoRA: cross-attention keys take 2048-wide text
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 2048),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(640, 4)}, str(lora))
    res = runner.invoke(app, ["extract", "shapes", str(image_dir), "--preset", PRESET, "--technique", f"lora:{lora}",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "2048" in res.output and "SDXL" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    flux = tmp_path / "flux_lora.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, 64)}, str(flux))
    res = runner.invoke(app, ["extract", "shapes", str(image_dir), "--preset", PRESET, "--technique", f"lora:{flux}",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "transformer model" in res.output
