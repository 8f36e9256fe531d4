"""The shapes trainer: a toy config trains, checkpoints, resumes exactly and exports a loadable pipeline."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from difffeat.shapes.models import ModelConfig
from difffeat.devtools.train_shapes import TrainConfig, export, load_checkpoint, min_snr_weights, posterior_latents, train


def _tiny(out: Path, unet_steps: int = 4) -> TrainConfig:
    model = ModelConfig(vae_channels=(8, 16, 16), unet_channels=(16, 32, 32), norm_groups=8, text_hidden=32,
                        text_intermediate=64)  # fmt: skip
    return TrainConfig(out=str(out), model=model, n_train=24, vae_steps=2, vae_batch=4, unet_steps=unet_steps,
                       unet_batch=4, warmup=2, log_every=1, threads=1, decoder_steps=2)  # fmt: skip


def test_train_checkpoint_resume_matches_uninterrupted(tmp_path: Path) -> None:
    full = train(_tiny(tmp_path / "a"))
    assert full["step"] == 4 and full["stage"] == "unet"
    assert (tmp_path / "a" / "checkpoint.pt").exists()
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} >= {"vae", "vae_done", "unet"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)

    # A run freezes its tokenizer in <run>/tokenizer (token numbering of a fresh build may differ); share it.
    shutil.copytree(tmp_path / "a" / "tokenizer", tmp_path / "b" / "tokenizer")
    cfg_b = _tiny(tmp_path / "b")
    part = train(cfg_b, stop_at=2)
    assert part["step"] == 2 and load_checkpoint(tmp_path / "b")["step"] == 2
    resumed = train(cfg_b, resume=True)
    assert resumed["step"] == 4
    steps_b = [r["step"] for r in map(json.loads, (tmp_path / "b" / "log.jsonl").read_text().splitlines())
               if r["stage"] == "unet"]  # fmt: skip
    assert steps_b == [0, 1, 2, 3]  # resumed at the saved step, nothing repeated or skipped
    for key in ("unet", "ema_unet", "text"):
        for name, val in full[key].items():
            torch.testing.assert_close(resumed[key][name], val, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")


def test_refuses_to_overwrite_without_resume(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, unet_steps=1)
    train(cfg)
    with pytest.raises(FileExistsError):
        train(cfg)


def test_export_is_a_loadable_pipeline(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    train(_tiny(tmp_path / "run", unet_steps=1))
    report = export(tmp_path / "run", tmp_path / "pipe")
    assert report["fp16_rel_err_unet"] < 0.05
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.float32)
    assert pipe.vae.config.scaling_factor == pytest.approx(load_checkpoint(tmp_path / "run")["scaling_factor"])
    assert pipe.scheduler.config.num_train_timesteps == 1000
    img = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_init_from_an_exported_pipeline_continues_its_weights(tmp_path: Path) -> None:
    from difffeat.devtools.train_shapes import init_from_run

    first = train(_tiny(tmp_path / "run", unet_steps=1))
    export(tmp_path / "run", tmp_path / "pipe", fp16=False)
    cfg = _tiny(tmp_path / "next", unet_steps=2)
    state = init_from_run(tmp_path / "pipe", cfg)
    assert state["step"] == 0 and state["init"][-1]["pipeline"] == str(tmp_path / "pipe")
    # the continuation starts from the pipeline's (EMA) weights, with its VAE, scaling and tokenizer
    for key, src in (("unet", "ema_unet"), ("ema_unet", "ema_unet"), ("text", "ema_text"), ("vae", "vae")):
        for name, val in first[src].items():
            if key == "vae" and name.startswith(("decoder.", "post_quant_conv.")):
                continue  # the exported decoder is the stage-3 fine-tune
            torch.testing.assert_close(state[key][name], val, msg=f"{key}.{name}")
    assert state["scaling_factor"] == pytest.approx(first["scaling_factor"])
    assert (tmp_path / "next" / "tokenizer" / "tokenizer_config.json").exists()
    old_lat = torch.load(tmp_path / "run" / "latents.pt")
    new_lat = torch.load(tmp_path / "next" / "latents.pt")
    torch.testing.assert_close(new_lat["mean"].float(), old_lat["mean"].float(), atol=2e-3, rtol=1e-2)
    done = train(cfg, resume=True)
    assert done["step"] == 2
    assert any(not torch.equal(done["unet"][k], state["unet"][k]) for k in state["unet"])


def test_frozen_text_encoder_stays_at_its_initialisation_and_vae_only_init_starts_fresh(tmp_path: Path) -> None:
    from difffeat.devtools.train_shapes import init_from_run

    source = train(_tiny(tmp_path / "src", unet_steps=2))
    cfg = _tiny(tmp_path / "frozen", unet_steps=3)
    cfg.freeze_text, cfg.init_vae_only = True, True
    state = init_from_run(tmp_path / "src", cfg)
    assert "unet" not in state and "text" not in state  # only the VAE (and latents, tokenizer) came along
    done = train(cfg, resume=True)
    assert done["step"] == 3
    from difffeat.shapes.models import build_text_encoder, build_unet
    from difffeat.devtools.train_shapes import make_tokenizer

    # the trainer's initialisation: seed + 1, UNet first, then the text encoder
    tok = make_tokenizer(cfg.model, tmp_path / "frozen")
    torch.manual_seed(cfg.seed + 1)
    init_unet = build_unet(cfg.model)
    init_text = build_text_encoder(cfg.model, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    for name, val in init_text.state_dict().items():
        torch.testing.assert_close(done["text"][name], val, msg=name)  # frozen: not one step moved it
        torch.testing.assert_close(done["ema_text"][name], val, msg=name)
    moved = [k for k, v in init_unet.state_dict().items() if not torch.equal(done["unet"][k], v)]
    assert moved  # the UNet trained from its fresh initialisation ...
    assert any(not torch.equal(done["unet"][k], source["unet"][k]) for k in moved)  # ... not from the source's
    for name, val in source["vae"].items():
        torch.testing.assert_close(done["vae"][name], val, msg=name)


def test_init_from_a_pipeline_of_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    from difffeat.devtools.train_shapes import init_from_run, main

    train(_tiny(tmp_path / "run", unet_steps=1))
    export(tmp_path / "run", tmp_path / "pipe", fp16=False)
    other = _tiny(tmp_path / "wider")
    other.model = ModelConfig(vae_channels=(8, 16, 16), unet_channels=(16, 64, 64), norm_groups=8, text_hidden=32,
                              text_intermediate=64)  # fmt: skip
    with pytest.raises(ValueError, match="does not have the architecture"):
        init_from_run(tmp_path / "pipe", other)
    with pytest.raises(SystemExit, match="--init-vae-only needs --init-from"):
        main(["--out", str(tmp_path / "x"), "--init-vae-only"])


def test_min_snr_weights_follow_the_formula_and_change_training(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    a = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    w = min_snr_weights(a, 5.0)
    for t in (0, 10, 100, 400, 999):
        snr = float(a[t] / (1 - a[t]))
        assert float(w[t]) == pytest.approx(1.0 if snr <= 5.0 else 5.0 / snr, rel=1e-5)
    assert float(w[0]) < 0.01 and float(w[999]) == 1.0 and bool((w[1:] >= w[:-1]).all())  # rises with noise
    with pytest.raises(ValueError, match="gamma must be > 0"):
        min_snr_weights(a, 0.0)
    # the weighting reaches the update: same seed and data, different weights after two steps
    plain = train(_tiny(tmp_path / "plain", unet_steps=2))
    shutil.copytree(tmp_path / "plain" / "tokenizer", tmp_path / "snr" / "tokenizer")
    weighted_cfg = _tiny(tmp_path / "snr", unet_steps=2)
    weighted_cfg.min_snr_gamma = 5.0
    weighted = train(weighted_cfg)
    assert not torch.allclose(weighted["unet"]["conv_out.weight"], plain["unet"]["conv_out.weight"])


def test_posterior_latents_mean_or_sample() -> None:
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(64, 4, 16, 16, generator=g), torch.full((64, 4, 16, 16), 0.3)
    assert torch.equal(posterior_latents(mean, std, "mean", g), mean)
    drawn = posterior_latents(mean, std, "sample", g)
    assert float((drawn - mean).std()) == pytest.approx(0.3, rel=0.03)
    with pytest.raises(ValueError, match="unknown latent kind"):
        posterior_latents(mean, std, "mode", g)


def test_wall_clock_budget_ends_the_unet_stage_and_paces_the_decay(tmp_path: Path) -> None:
    from difffeat.devtools.train_shapes import _lr_factor

    # the schedule follows whichever of step count and time used is further along
    assert _lr_factor(10, 1000, 2, 0.1) > 0.99
    assert _lr_factor(10, 1000, 2, 0.1, time_progress=1.0) == pytest.approx(0.1)
    assert _lr_factor(10, 1000, 2, 0.1, time_progress=0.5) == pytest.approx(0.55)
    assert _lr_factor(1000, 1000, 2, 0.1, time_progress=0.2) == pytest.approx(0.1)

    cfg = _tiny(tmp_path / "run", unet_steps=50)
    cfg.unet_minutes = 1e-7  # used up by the first step
    done = train(cfg)
    assert done["step"] == 1 and done["stage"] == "unet"
    assert (tmp_path / "run" / "decoder.pt").exists()  # the stage counts as finished: the decoder stage ran
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
             if r["stage"] == "unet"]  # fmt: skip
    assert steps == [0]
    again = train(cfg, resume=True)  # resuming a run whose budget is spent trains no further
    assert again["step"] == 1

    with pytest.raises(ValueError, match="budget must be > 0 minutes"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "other"), unet_minutes=0.0))
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_ema_update_is_the_lerp_of_every_parameter() -> None:
    from difffeat.devtools.train_shapes import EMA

    live = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = EMA(live, decay=0.9)
    before = [p.clone() for p in ema.shadow.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    ema.update(live, step=1000)  # decay capped at 0.9
    for old, new, p in zip(before, ema.shadow.parameters(), live.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * p)


def test_prefetching_batches_trains_exactly_like_building_them_in_step(tmp_path: Path) -> None:
    plain = _tiny(tmp_path / "plain", unet_steps=3)
    plain.prefetch, plain.attn_loss_weight = False, 0.1  # the attention loss also uses the batch's masks
    a = train(plain)
    shutil.copytree(tmp_path / "plain" / "tokenizer", tmp_path / "pre" / "tokenizer")
    pre = _tiny(tmp_path / "pre", unet_steps=3)
    pre.prefetch, pre.attn_loss_weight = True, 0.1
    b = train(pre)
    for name, val in a["unet"].items():
        torch.testing.assert_close(b["unet"][name], val, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", ["qk", "qkvo"])
def test_relearning_cross_attention_resets_and_trains_only_those_projections(tmp_path: Path, kind: str) -> None:
    from difffeat.shapes.models import build_unet
    from difffeat.devtools.train_shapes import RELEARN_KINDS, cross_projections, init_from_run

    source = train(_tiny(tmp_path / "src", unet_steps=2))
    cfg = _tiny(tmp_path / "relearn", unet_steps=3)
    cfg.relearn_cross = kind
    init_from_run(tmp_path / "src", cfg)
    done = train(cfg, resume=True)

    unet = build_unet(cfg.model)
    projections = cross_projections(unet, kind)
    relearned = {f"{n}.{p}" for n, mod in unet.named_modules() if any(mod is q for q in projections) for p in ("weight", "bias")}
    relearned &= set(done["unet"])
    n_cross = sum(n.endswith("attn2") for n, _ in unet.named_modules())
    assert len({k.rsplit(".", 1)[0] for k in relearned}) == len(RELEARN_KINDS[kind]) * n_cross
    assert all(any(f".attn2.{p}." in k for p in RELEARN_KINDS[kind]) for k in relearned)
    for name, val in source["unet"].items():
        if name in relearned:  # re-initialised and trained: far from the source's projections
            assert not torch.allclose(done["unet"][name], val, atol=1e-3), name
            # the EMA of a re-initialised projection starts from its new value, not from the source's
            assert not torch.allclose(done["ema_unet"][name], source["ema_unet"][name], atol=1e-3), name
        else:  # everything else frozen, to the bit
            assert torch.equal(done["unet"][name], val), name
    for name, val in source["text"].items():
        assert torch.equal(done["text"][name], val), name
    # the VAE is the source's: its fine-tuned decoder is carried over unchanged and no decoder stage runs
    assert (tmp_path / "relearn" / "decoder.pt").read_bytes() == (tmp_path / "src" / "decoder.pt").read_bytes()
    stages = {json.loads(line)["stage"] for line in (tmp_path / "relearn" / "log.jsonl").read_text().splitlines()}
    assert "decoder" not in stages


def test_relearning_without_a_source_is_a_clear_error(tmp_path: Path) -> None:
    from difffeat.devtools.train_shapes import cross_projections, main

    with pytest.raises(SystemExit, match="--relearn-cross needs --init-from"):
        main(["--out", str(tmp_path / "r"), "--relearn-cross", "qk"])
    with pytest.raises(ValueError, match="unknown relearn kind 'v'; choose one of qk, qkvo"):
        cross_projections(torch.nn.Module(), "v")
