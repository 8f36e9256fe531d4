"""Content-shift techniques and GATE scores on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difffeat
from difffeat.errors import DifffeatError
from difffeat.shift import ControlNet, Lora, Prompt, extract_variants, gate_img2img, gate_scores, laplacian_score, parse_technique
from difffeat.testing import tiny_controlnet, tiny_pipeline

from _helpers import backbone_for, random_image

NAME = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.q"
MAP = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.map"


@pytest.fixture
def fx(tiny_pipes):
    return difffeat.FeatureExtractor(backbone_for(tiny_pipes, "sd"), [NAME, MAP])


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A random-weight LoRA for the tiny SD UNet, saved with diffusers' LoRA format (peft)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = tiny_pipeline("sd")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    path = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(pipe.unet), safe_serialization=True)
    return path


def test_prompt_technique_changes_features_but_keeps_a_fixed_map_prompt(fx):
    image = random_image(64, 64)
    fx.map_prompt = "a photo of a cat"
    plain = fx(image, "a cat")
    fx.techniques = [Prompt(template="a photo of {}", quality="natural")]
    treated = fx(image, "a cat")
    assert not torch.allclose(plain[NAME], treated[NAME])
    torch.testing.assert_close(plain[MAP], treated[MAP])


def test_prompt_template_and_quality_words():
    p = Prompt(template="a photo of {}", quality="natural")
    assert p.prompts(["a cat"]) == ["a photo of a cat, high quality, best quality, highly realistic"]
    assert Prompt(captions=["x", "y"]).prompts(["a", "b"]) == ["x", "y"]


@pytest.mark.numeric
def test_controlnet_changes_features_and_scale_zero_does_not(fx):
    image = random_image(64, 64)
    plain = fx(image, "a cat")[NAME]
    net = tiny_controlnet()
    fx.techniques = [ControlNet(net, scale=0.0)]
    torch.testing.assert_close(fx(image, "a cat")[NAME], plain, atol=1e-6, rtol=0)
    fx.techniques = [ControlNet(net, scale=1.0)]
    assert not torch.allclose(fx(image, "a cat")[NAME], plain, atol=1e-4)


def test_multi_step_start_runs_the_expected_number_of_denoiser_calls(fx):
    calls = []
    handle = fx.backbone.denoiser.register_forward_hook(lambda *a: calls.append(1))
    try:
        fx.early_exit = False
        fx.techniques = [ControlNet(tiny_controlnet(), start_t=80, steps=3)]
        fx(random_image(64, 64), "a cat")
    finally:
        handle.remove()
    assert len(calls) == 3 + 1  # three DDIM steps from t=80 to t=50, then the extraction forward


def test_multi_step_start_rejects_uneven_steps(fx):
    fx.techniques = [ControlNet(tiny_controlnet(), start_t=61, steps=2)]
    with pytest.raises(DifffeatError, match="multiple of steps"):
        fx(random_image(64, 64), "a cat")


@pytest.mark.numeric
def test_lora_changes_features_and_scale_zero_reproduces_plain(fx, lora_dir):
    image = random_image(64, 64)
    plain = fx(image, "a cat")[NAME]
    fx.techniques = [Lora(lora_dir, scale=1.0)]
    assert not torch.allclose(fx(image, "a cat")[NAME], plain, atol=1e-4)
    fx.techniques = [Lora(lora_dir, scale=0.0)]
    torch.testing.assert_close(fx(image, "a cat")[NAME], plain, atol=1e-5, rtol=1e-5)
    fx.techniques = []
    torch.testing.assert_close(fx(image, "a cat")[NAME], plain)  # the adapter is gone afterwards
    assert not any("lora" in n or "base_layer" in n for n, _ in fx.backbone.denoiser.named_modules())


def test_lora_for_another_model_is_a_clear_error(tiny_pipes, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    other = tiny_pipeline("sdxl")
    other.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(other.unet), safe_serialization=True)
    fx = difffeat.FeatureExtractor(backbone_for(tiny_pipes, "sd"), [NAME], techniques=[Lora(tmp_path)])
    with pytest.raises(DifffeatError, match="could not load LoRA"):
        fx(random_image(64, 64), "a cat")
    fx.techniques = []
    fx(random_image(64, 64), "a cat")  # the model still works


def test_controlnet_for_another_family_is_a_clear_error(tiny_pipes):
    fx = difffeat.FeatureExtractor(backbone_for(tiny_pipes, "sdxl"), ["up_blocks.0.attentions.0.transformer_blocks.0.attn2.q"],
                                   techniques=[ControlNet(tiny_controlnet())])
    with pytest.raises(DifffeatError, match="different model family"):
        fx(random_image(64, 64), "a cat")


def test_unknown_technique_is_a_clear_error():
    with pytest.raises(DifffeatError, match="unknown technique"):
        parse_technique("ipadapter:foo")
    t = parse_technique("controlnet:some/model,scale=0.5,start_t=60,steps=2")
    assert isinstance(t, ControlNet) and t.scale == 0.5 and t.start_t == 60


def test_variants_concat_and_mean(fx):
    image = random_image(64, 64)
    net = tiny_controlnet()
    sep = extract_variants(fx, [image], "a cat", {"plain": [], "cn": [ControlNet(net)]})
    cat = extract_variants(fx, [image], "a cat", {"plain": [], "cn": [ControlNet(net)]}, combine="concat")
    mean = extract_variants(fx, [image], "a cat", {"plain": [], "cn": [ControlNet(net)]}, combine="mean")
    torch.testing.assert_close(cat[NAME], torch.cat([sep[f"plain/{NAME}"], sep[f"cn/{NAME}"]], dim=1))
    torch.testing.assert_close(mean[NAME], (sep[f"plain/{NAME}"] + sep[f"cn/{NAME}"]) / 2)


def test_laplacian_score_is_one_for_identical_and_zero_for_the_anchor():
    ref, anchor = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    torch.testing.assert_close(laplacian_score(ref, anchor, ref), torch.ones(2))
    torch.testing.assert_close(laplacian_score(ref, anchor, anchor), torch.zeros(2))
    # a slightly perturbed reference scores below 1 but well above the anchor
    s = laplacian_score(ref, anchor, ref + 0.05 * anchor)
    assert ((s > 0.5) & (s < 1)).all()


def _lap_norm_loops(f: np.ndarray) -> np.ndarray:
    """||Lap(F)_ij|| over channels with replicate padding, written out pixel by pixel: [C, H, W] -> [H, W]."""
    c, h, w = f.shape
    out = np.zeros((h, w))
    at = lambda y, x: f[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]  # noqa: E731
    for y in range(h):
        for x in range(w):
            lap = at(y - 1, x) + at(y + 1, x) + at(y, x - 1) + at(y, x + 1) - 4 * at(y, x)
            out[y, x] = np.sqrt((lap.astype(np.float64) ** 2).sum())
    return out


@pytest.mark.numeric
@pytest.mark.parametrize("reference", ["plain", "treated"])
def test_gate_scores_equal_the_formula_computed_by_hand(fx, reference):
    images, technique = [random_image(64, 64, seed=3)], Prompt(quality="natural")
    scores = gate_scores(fx, images, "a cat", [technique], reference=reference)
    assert set(scores) == {NAME, MAP}
    t = fx.t
    anchor = fx(images, "a cat")[NAME][0].numpy()
    fx.t = 0
    plain_ref = fx(images, "a cat")[NAME][0].numpy()
    fx.techniques = [technique]
    treated_ref = fx(images, "a cat")[NAME][0].numpy()
    fx.t = t
    treated = fx(images, "a cat")[NAME][0].numpy()
    fx.techniques = []
    diff = lambda a, b: np.abs(_lap_norm_loops(a) - _lap_norm_loops(b)).sum()  # noqa: E731
    own_ref = plain_ref if reference == "plain" else treated_ref
    expected = (diff(plain_ref, anchor) - diff(own_ref, treated)) / diff(plain_ref, anchor)
    assert scores[NAME] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert fx.t == t and fx.techniques == []  # gate_scores leaves the extractor as it was


def test_gate_score_of_a_technique_that_changes_nothing_is_zero(fx):
    same = Prompt(template="{}")  # the prompt unchanged: treated == anchor
    for reference in ("plain", "treated"):
        scores = gate_scores(fx, [random_image(64, 64)], "a cat", [same], reference=reference)
        assert all(v == pytest.approx(0.0, abs=1e-5) for v in scores.values()), (reference, scores)
    with pytest.raises(DifffeatError, match="unknown GATE reference"):
        gate_scores(fx, [random_image(64, 64)], "a cat", [same], reference="clean")


def test_img2img_comparison_returns_side_by_side_and_similarities(tiny_pipes):
    result = gate_img2img(backbone_for(tiny_pipes, "sd"), random_image(64, 64), "a cat", ControlNet(tiny_controlnet()), steps=2)
    assert result.side_by_side().size == (3 * 64, 64)
    assert set(result.to_json()) >= {"psnr_reference", "psnr_treated", "technique_helps"}


def test_per_image_captions_stay_with_their_images_across_batches(tiny_pipes):
    """Prompt(captions=...) covers the whole image list; the extractor cuts it into batches (here 2+2+1) and
    per-size groups, and every image must still get its own caption."""
    backbone = backbone_for(tiny_pipes, "sd")
    images = [random_image(64, 64, seed=i) for i in range(5)]
    captions = ["a cat", "a dog on grass", "a red car", "two birds", "a house at night"]
    fx = difffeat.FeatureExtractor(backbone, [NAME], batch_size=2, techniques=[Prompt(captions=captions)])
    batched = fx(images, "ignored")[NAME]
    items = {it.index: it for it in fx.iter_items(images, "ignored")}
    plain = difffeat.FeatureExtractor(backbone, [NAME], batch_size=1)
    for i, (image, caption) in enumerate(zip(images, captions)):
        direct = plain([image], caption)[NAME][0]
        torch.testing.assert_close(batched[i], direct, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(items[i].features[NAME], direct, rtol=1e-4, atol=1e-5)
        assert items[i].prompt == caption


# ---------------------------------------------------------------- issue 17: fixes found against the reference
def test_canny_runs_on_the_rgb_image_so_equal_grey_edges_survive():
    """The reference runs OpenCV's Canny on the RGB array; on greyscale the shapes example's edges (colours of
    equal grey level) vanish."""
    import cv2
    from PIL import Image

    from difffeat.resources import package_dir
    from difffeat.shift import canny_edges

    image = Image.open(package_dir() / "examples" / "shapes_test_0001.png").convert("RGB").resize((512, 512))
    edges = np.asarray(canny_edges(image))
    assert edges.shape == (512, 512, 3) and (edges[..., 0] == edges[..., 2]).all()
    rgb_edges = int((edges[..., 0] > 0).sum())
    grey = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    assert int((cv2.Canny(grey, 100, 200) > 0).sum()) == 0  # what greyscale Canny finds
    assert rgb_edges == int((cv2.Canny(np.asarray(image), 100, 200) > 0).sum())
    assert 2000 < rgb_edges < 2400  # the reference finds 2,176 on this image


def _sd_alphas_cumprod(config) -> np.ndarray:
    """Independent: the scaled-linear beta schedule of the config, as DDPM defines it."""
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"], dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_multi_step_start_reads_the_output_with_the_models_prediction_type(tiny_pipes, prediction_type):
    from diffusers import DDIMScheduler

    backbone = backbone_for(tiny_pipes, "sd")
    pipe = backbone.pipeline
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config, prediction_type=prediction_type)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    seen = []
    pre = backbone.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(("in", kw["sample"].detach().clone())), with_kwargs=True)
    post = backbone.denoiser.register_forward_hook(lambda m, a, kw, out: seen.append(("out", out[0].detach().clone())), with_kwargs=True)
    try:
        fx = difffeat.FeatureExtractor(backbone, [NAME], techniques=[ControlNet(tiny_controlnet(), start_t=60, steps=1)], t=50)
        fx.early_exit = False
        fx(random_image(64, 64), "a cat")
    finally:
        pre.remove(), post.remove()
        pipe.scheduler = original
    (_, x_t), (_, model_out), (_, x_prev) = seen[0], seen[1], seen[2]
    ac = _sd_alphas_cumprod(dict(original.config))
    a_t, a_prev = float(ac[60]), float(ac[50])
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0
        x0 = a_t**0.5 * x_t - (1 - a_t) ** 0.5 * model_out
        eps = a_t**0.5 * model_out + (1 - a_t) ** 0.5 * x_t
    else:
        eps = model_out
        x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    expected = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    torch.testing.assert_close(x_prev, expected, atol=1e-4, rtol=1e-4)
    if prediction_type == "v_prediction":  # reading v as epsilon (the old code) gives something else
        wrong = a_prev**0.5 * (x_t - (1 - a_t) ** 0.5 * model_out) / a_t**0.5 + (1 - a_prev) ** 0.5 * model_out
        assert not torch.allclose(x_prev, wrong, atol=1e-3)


def test_multi_step_stride_that_is_no_ddim_step_is_a_clear_error(fx):
    fx.techniques = [ControlNet(tiny_controlnet(), start_t=350, steps=1)]  # stride 300: DDIM would step 333
    with pytest.raises(DifffeatError, match="not a DDIM step size"):
        fx(random_image(64, 64), "a cat")


def test_reference_quality_words_and_task_prompts():
    from difffeat.shift import QUALITY_WORDS, TASK_PROMPTS

    assert "masterpiece" in QUALITY_WORDS["label-scarce"] and QUALITY_WORDS["correspondence"].endswith("masterpiece, high resolution")
    assert Prompt(quality="label-scarce").prompts(["a horse"]) == ["a horse, high quality, best quality, highly realistic, masterpiece"]
    assert Prompt(task="ade20k").prompts(["x", "y"]) == [TASK_PROMPTS["ade20k"]] * 2
    assert parse_technique("prompt:task=horse21").prompts(["?"]) == [TASK_PROMPTS["horse21"]]
    with pytest.raises(DifffeatError, match="unknown prompt task 'voc'.*ade20k"):
        Prompt(task="voc")
