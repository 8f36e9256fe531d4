"""Train the shapes model from scratch: stage 1 the VAE, stage 2 the UNet jointly with a CLIP text encoder.

Usage::

    python -m difffeat.devtools.train_shapes --out runs/shapes                 # train (or continue with --resume)
    python -m difffeat.devtools.train_shapes --out runs/shapes --resume --export difffeat/weights/shapes

Every random choice of step ``k`` (batch indices, captions, noise, timesteps) comes from an RNG seeded with
``(seed, stage, k)``, so a resumed run repeats exactly the batches an uninterrupted run would have seen.
A checkpoint (models, EMA, optimizer, step, RNG state) is written atomically every ``ckpt_minutes`` and at the
end of each stage; losses go to ``<out>/log.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difffeat.io import write_json
from difffeat.devtools.attention_loss import LOSS_KINDS, install_recorders, localisation_loss, word_class_lookup
from difffeat.shapes.captions import random_prompt, vocabulary, vocabulary_file
from difffeat.shapes.models import (
    ModelConfig,
    build_schedulers,
    build_text_encoder,
    build_unet,
    build_vae,
    count_params,
)
from difffeat.shapes.world import sample
from difffeat.tokenizers import build_clip_tokenizer

__all__ = ["TrainConfig", "train", "export", "load_checkpoint", "make_tokenizer", "min_snr_weights", "posterior_latents"]

log = logging.getLogger("difffeat.devtools.train_shapes")
CKPT_NAME = "checkpoint.pt"
LATENT_KINDS = ("sample", "mean")


@dataclass
class TrainConfig:
    """Everything that determines a training run."""

    out: str = "runs/shapes"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    n_train: int = 20_000  # distinct `train`-split scenes (indices 0..n_train-1)
    # stage 1: VAE
    vae_steps: int = 700
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # stage 2: UNet + text encoder
    unet_steps: int = 3600
    unet_batch: int = 32
    unet_lr: float = 5e-4
    text_lr: float = 5e-4
    warmup: int = 200
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    # stage 3: decoder-only fine-tune (encoder frozen, so the UNet's latents stay valid)
    decoder_steps: int = 800
    decoder_batch: int = 16
    decoder_lr: float = 1e-3
    p_empty: float = 0.1
    # auxiliary cross-attention localisation loss (see difffeat.devtools.attention_loss); 0 disables it
    attn_loss_weight: float = 0.0
    attn_loss_kind: str = "mass"  # "mass", "match" or "match_pixel" (see localisation_loss)
    attn_loss_background: bool = False  # also supervise the word "background" with the pixels of no object
    attn_loss_max_t: int = 600  # only samples with t <= this take part (the scene is still visible)
    # Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    # Strategy"): per-sample weight min(SNR, gamma) / SNR for epsilon prediction, so the nearly-clean steps,
    # whose error is mostly unpredictable texture, stop dominating the gradient; None = plain MSE
    min_snr_gamma: float | None = None
    # what the UNet and the decoder fine-tune see of the VAE posterior: "sample" (mean + std * noise, as
    # Stable Diffusion trains) or "mean" (its mode, which is what difffeat's backbones encode images to; with
    # this small VAE's wide posterior (mean std about a quarter of mean |mu|), samples blur the decoder and
    # add noise the UNet cannot predict)
    latents: str = "sample"
    init_from: str | None = None  # UNet stage started from this run's weights (fresh optimizer and schedule)
    init_vae_only: bool = False  # with init_from: take only the VAE, latents and tokenizer; fresh UNet + text encoder
    # keep the text encoder at its (random) initialisation, as Stable Diffusion keeps CLIP frozen: trained
    # jointly from scratch, the encoder collapses the 8 class words onto ~1 direction (see the model card)
    freeze_text: bool = False
    # relearn cross-attention from the denoising loss alone over an already trained backbone (with init_from):
    # "qk" re-initialises the query and key projections of every cross-attention layer (attn2), "qkvo" also
    # its value projection and (zero-initialised) output projection; only those train, the rest of the UNet
    # and the text encoder stay frozen. The maps (and with "qkvo" what each head carries) are then emergent,
    # as in large models, instead of supervised (see the model card); None: off
    relearn_cross: str | None = None
    # wall-clock budget of the UNet stage in minutes (None: none): the stage ends at unet_steps or when its
    # cumulative time reaches this, whichever comes first, and the learning-rate schedule follows whichever
    # is further along, so a budget-bound run still decays to min_lr_frac (used for runs on a lent GPU)
    unet_minutes: float | None = None
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # build the next UNet batch in a background thread while the current step runs; None: on CUDA only
    # (each step draws from its own RNG, so the batches are the same either way)
    prefetch: bool | None = None
    # bookkeeping
    ckpt_minutes: float = 6.0
    log_every: int = 10
    threads: int = 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["model"] = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["model"].items()})
        return cls(**d)


# ------------------------------------------------------------------------------------------------ helpers
def make_tokenizer(cfg: ModelConfig, run: str | Path | None = None):  # noqa: ANN201 - CLIPTokenizer
    """The shapes tokenizer (every vocabulary word is one token), frozen per run in ``<run>/tokenizer``.

    A run builds its tokenizer once, saves it, and every later use (resume, export) loads that copy, so a run
    keeps the numbering its text encoder learnt even if the builder changes.
    """
    from transformers import CLIPTokenizer

    folder = Path(run) / "tokenizer" if run is not None else None
    if folder is not None and (folder / "tokenizer_config.json").exists():
        return CLIPTokenizer.from_pretrained(folder)
    tok = build_clip_tokenizer(vocabulary(), model_max_length=cfg.max_length)
    if folder is not None:
        tmp = folder.with_name("tokenizer.tmp")
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
        tok = CLIPTokenizer.from_pretrained(folder)
    return tok


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lr_factor(step: int, total: int, warmup: int, min_frac: float, time_progress: float = 0.0) -> float:
    """Linear warmup then cosine decay to ``min_frac``; ``time_progress`` (share of a wall-clock budget
    used) moves the decay on when it is further along than the step count."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_progress))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def _budget_spent(cfg: TrainConfig, elapsed_s: float) -> bool:
    """Whether the UNet stage has used its wall-clock budget (``cfg.unet_minutes``; never without one)."""
    return cfg.unet_minutes is not None and elapsed_s >= cfg.unet_minutes * 60


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for epsilon prediction: ``min(SNR, gamma) / SNR`` with ``SNR = a / (1 - a)``."""
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0 (got {gamma}); 5 is the usual choice, None disables the weighting")
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


def posterior_latents(mean: torch.Tensor, std: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """The VAE latent a training step uses: the posterior ``mean`` (``kind="mean"``) or a sample of it."""
    if kind not in LATENT_KINDS:
        raise ValueError(f"unknown latent kind {kind!r}; choose one of {', '.join(LATENT_KINDS)}")
    if kind == "mean":
        return mean
    return mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)


def _step_rng(seed: int, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stage, step]).generate_state(1)[0]))
    return np.random.default_rng([seed, stage, step]), g


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Dataset:
    """The first ``n`` train-split scenes held in memory: images uint8 [N, 64, 64, 3] plus caption metadata."""

    def __init__(self, n: int, image_size: int) -> None:
        t0 = time.time()
        self.images = np.empty((n, image_size, image_size, 3), np.uint8)
        self.masks = np.empty((n, image_size, image_size), np.uint8)  # 0 = background, else class index
        self.objects: list[list[tuple[str, str]]] = []
        self.backgrounds: list[tuple[str, str]] = []
        for i in range(n):
            s = sample("train", i, size=image_size)
            self.images[i] = np.asarray(s.image)
            self.masks[i] = s.mask
            self.objects.append([(inst.class_name, inst.colour) for inst in s.instances])
            self.backgrounds.append((s.background, s.background_colour))
        log.info("generated %d train scenes in %.1fs", n, time.time() - t0)

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, idx: np.ndarray) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1]."""
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    def class_masks(self, idx: np.ndarray, n_classes: int = 8, device: torch.device | str = "cpu") -> torch.Tensor:
        """[B, n_classes, H, W] float one-hot masks of the shape classes, built on ``device`` (the uint8 label
        maps travel, not the 9x larger one-hot floats)."""
        m = torch.from_numpy(self.masks[idx]).to(device).long()
        return F.one_hot(m, n_classes + 1)[..., 1:].permute(0, 3, 1, 2).float()

    def prompts(self, idx: np.ndarray, rng: np.random.Generator, p_empty: float) -> list[str]:
        return [random_prompt(self.objects[i], *self.backgrounds[i], rng, p_empty=p_empty) for i in idx]


class AdaptiveThreads:
    """Use ``max_threads`` torch threads while the machine is otherwise idle, one thread while others compute.

    On a small shared machine, two intra-op threads competing with another busy process run far slower
    than one (barrier waits); this re-checks the other processes' CPU load (Linux ``/proc/stat`` minus this
    process's own CPU time) every ``every`` calls. Thread count never changes results beyond float rounding.
    """

    def __init__(self, max_threads: int, every: int = 5) -> None:
        self.max_threads, self.every, self.calls = max_threads, every, 0
        self.last = self._sample()
        torch.set_num_threads(1 if self.last is not None else max_threads)  # start safe; go up once idle

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                vals = [float(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)
        return (sum(vals) - idle) / hz, time.monotonic(), time.process_time()

    def update(self) -> None:
        self.calls += 1
        if self.max_threads <= 1 or self.calls % self.every:
            return
        now = self._sample()
        if now is None or self.last is None:
            return
        busy, wall, mine = (now[0] - self.last[0]), (now[1] - self.last[1]), (now[2] - self.last[2])
        self.last = now
        others = max(0.0, busy - mine) / max(wall, 1e-6)  # cores used by other processes
        want = self.max_threads if others < 0.35 else 1
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
            log.info("others use %.2f cores -> %d torch thread(s)", others, want)


class StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread: no signal handling
            self._old = {}

    def _handle(self, signum: int, _frame: object) -> None:
        log.warning("signal %d: checkpointing and stopping after this step", signum)
        self.requested = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class EMA:
    """Exponential moving average of a module's parameters (with the usual warm-up of the decay)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        shadow, live = list(self.shadow.parameters()), [p.detach() for p in module.parameters()]
        if len(shadow) != len(live):
            raise ValueError("EMA: the module's parameters differ from the shadow's")
        torch._foreach_lerp_(shadow, live, 1 - d)  # one fused update instead of a kernel per tensor


def _log_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------- checkpoint
def load_checkpoint(out: str | Path) -> dict | None:
    path = Path(out) / CKPT_NAME
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])


# ------------------------------------------------------------------------------------------------- stages
@torch.no_grad()
def _encode_latents(vae: torch.nn.Module, data: Dataset, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training scene's latent, ``[N, C, h, w]`` each, on the CPU."""
    means, stds = [], []
    for i in range(0, len(data), 256):
        post = vae.encode(data.pixels(np.arange(i, min(i + 256, len(data)))).to(dev)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def _train_vae(cfg: TrainConfig, data: Dataset, ckpt: dict | None, run: Path, dev: torch.device) -> dict:
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.model).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start, elapsed = 0, 0.0
    if ckpt is not None and ckpt["stage"] == "vae":
        vae.load_state_dict(ckpt["vae"])
        opt.load_state_dict(ckpt["opt"])
        start, elapsed = ckpt["step"], ckpt["elapsed_s"]
        _restore_rng(ckpt["rng"])
        log.info("resuming VAE stage at step %d", start)
    log.info("VAE: %d params, %d steps x batch %d", count_params(vae), cfg.vae_steps, cfg.vae_batch)

    def save(step: int) -> None:
        _atomic_save(
            {"stage": "vae", "step": step, "vae": vae.state_dict(), "opt": opt.state_dict(), "rng": _rng_state(),
             "elapsed_s": elapsed, "config": cfg.to_dict()},
            run / CKPT_NAME,
        )  # fmt: skip

    last_save, t_prev = time.time(), time.time()
    threads = AdaptiveThreads(cfg.threads)
    vae.train()
    for step in range(start, cfg.vae_steps):
        threads.update()
        rng, g = _step_rng(cfg.seed, 1, step)
        x = data.pixels(rng.integers(len(data), size=cfg.vae_batch)).to(dev)  # [B, 3, 64, 64]
        for pg in opt.param_groups:
            pg["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, 50, cfg.min_lr_frac)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)  # [B, 4, 16, 16]
        rec = vae.decode(z).sample
        l1, l2, kl = (rec - x).abs().mean(), F.mse_loss(rec, x), post.kl().mean()
        loss = l1 + l2 + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        now = time.time()
        elapsed += now - t_prev
        t_prev = now
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            rec_ = {"stage": "vae", "step": step, "loss": loss.item(), "l1": l1.item(), "l2": l2.item(),
                    "kl": kl.item(), "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1)}  # fmt: skip
            _log_line(run / "log.jsonl", rec_)
            log.info("vae %s", rec_)
        if now - last_save > cfg.ckpt_minutes * 60:
            save(step + 1)
            last_save = time.time()

    # Latents of the whole training set (posterior mean and std) and the scaling factor 1/std(latents).
    vae.eval()
    mean, std = _encode_latents(vae, data, dev)  # [N, 4, 16, 16]
    scaling = float(1.0 / mean.std())
    log.info("VAE done; latent std %.4f -> scaling_factor %.4f", 1 / scaling, scaling)
    _log_line(run / "log.jsonl", {"stage": "vae_done", "scaling_factor": scaling, "elapsed_s": round(elapsed, 1)})
    state = {"stage": "unet", "step": 0, "vae": vae.state_dict(), "scaling_factor": scaling,
             "vae_elapsed_s": elapsed, "elapsed_s": 0.0, "config": cfg.to_dict()}  # fmt: skip
    _atomic_save({"mean": mean.half(), "std": std.half()}, run / "latents.pt")
    _atomic_save(state, run / CKPT_NAME)
    return state


RELEARN_KINDS = {"qk": ("to_q", "to_k"), "qkvo": ("to_q", "to_k", "to_v", "to_out.0")}


def cross_projections(unet: torch.nn.Module, kind: str) -> list[torch.nn.Linear]:
    """The projections that ``relearn_cross=kind`` re-learns in every cross-attention (``attn2``), in module order."""
    if kind not in RELEARN_KINDS:
        raise ValueError(f"unknown relearn kind {kind!r}; choose one of {', '.join(RELEARN_KINDS)}")
    ends = tuple(f".attn2.{p}" for p in RELEARN_KINDS[kind])
    return [mod for name, mod in unet.named_modules() if name.endswith(ends)]


def _reinit_cross(unet: torch.nn.Module, shadow: torch.nn.Module, kind: str) -> None:
    """Fresh projections for :func:`cross_projections`; output projections start at zero so the frozen backbone
    first sees no cross-attention at all instead of random noise. The EMA copy starts from the same values."""
    for (name, mod), twin in zip(
        [(n, m) for n, m in unet.named_modules() if any(m is q for q in cross_projections(unet, kind))],
        cross_projections(shadow, kind),
    ):
        if name.endswith(".to_out.0"):
            torch.nn.init.zeros_(mod.weight)
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)
        else:
            mod.reset_parameters()
        twin.load_state_dict(mod.state_dict())


def _train_unet(
    cfg: TrainConfig, data: Dataset, ckpt: dict, run: Path, dev: torch.device, stop_at: int | None = None
) -> dict:
    m = cfg.model
    tok = make_tokenizer(m, run)
    torch.manual_seed(cfg.seed + 1)
    unet = build_unet(m).to(dev)
    text = build_text_encoder(m, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id).to(dev)
    ddpm, _ = build_schedulers(m)
    freeze_text = cfg.freeze_text or cfg.relearn_cross is not None
    if cfg.relearn_cross is not None:
        unet.requires_grad_(False)
        for proj in cross_projections(unet, cfg.relearn_cross):
            proj.requires_grad_(True)
    if freeze_text:
        text.requires_grad_(False)
    params = [{"params": [q for q in unet.parameters() if q.requires_grad], "lr": cfg.unet_lr},
              {"params": [q for q in text.parameters() if q.requires_grad], "lr": cfg.text_lr}]  # fmt: skip
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text, cfg.ema_decay)
    start, elapsed = ckpt["step"], ckpt["elapsed_s"]
    if "unet" in ckpt:
        unet.load_state_dict(ckpt["unet"])
        text.load_state_dict(ckpt["text"])
        ema_unet.shadow.load_state_dict(ckpt["ema_unet"])
        ema_text.shadow.load_state_dict(ckpt["ema_text"])
        if cfg.relearn_cross is not None and "opt" not in ckpt:  # first step of a relearning run
            torch.manual_seed(cfg.seed + 2)
            _reinit_cross(unet, ema_unet.shadow, cfg.relearn_cross)
            log.info("cross-attention projections %s re-initialised; training only those", RELEARN_KINDS[cfg.relearn_cross])
        if "opt" in ckpt:  # absent right after --init-from: fresh optimizer and schedule
            opt.load_state_dict(ckpt["opt"])
            _restore_rng(ckpt["rng"])
        log.info("resuming UNet stage at step %d", start)
    lat = torch.load(run / "latents.pt")
    lat_mean, lat_std = lat["mean"], lat["std"]
    scaling = ckpt["scaling_factor"]
    alphas = ddpm.alphas_cumprod.to(dev)  # [T]
    log.info("UNet: %d params, text encoder %d params, %d steps x batch %d",
             count_params(unet), count_params(text), cfg.unet_steps, cfg.unet_batch)  # fmt: skip

    def save(step: int) -> None:
        state = dict(ckpt)
        state.update({"step": step, "unet": unet.state_dict(), "text": text.state_dict(),
                      "ema_unet": ema_unet.shadow.state_dict(), "ema_text": ema_text.shadow.state_dict(),
                      "opt": opt.state_dict(), "rng": _rng_state(), "elapsed_s": elapsed,
                      "config": cfg.to_dict()})  # fmt: skip
        _atomic_save(state, run / CKPT_NAME)
        ckpt.update(state)

    attn_store: dict[str, torch.Tensor] = {}
    if cfg.attn_loss_weight > 0:
        install_recorders(unet, attn_store)
        lookup = word_class_lookup(tok, "background" if cfg.attn_loss_background else None).to(dev)
    last_save, t_prev = time.time(), time.time()
    threads = AdaptiveThreads(cfg.threads)
    stop = StopFlag()
    unet.train()
    text.train(not freeze_text)
    end = cfg.unet_steps if stop_at is None else min(cfg.unet_steps, stop_at)
    budget_s = cfg.unet_minutes * 60 if cfg.unet_minutes is not None else None

    def make_batch(step: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything step ``step`` draws, from its own RNG (so batches do not depend on order or threads)."""
        rng, g = _step_rng(cfg.seed, 2, step)
        idx = rng.integers(len(data), size=cfg.unet_batch)
        ids = tok(data.prompts(idx, rng, cfg.p_empty), padding="max_length", max_length=m.max_length,
                  truncation=True, return_tensors="pt").input_ids  # [B, 77]  # fmt: skip
        mu, sd = lat_mean[idx].float(), lat_std[idx].float()
        z0 = posterior_latents(mu, sd, cfg.latents, g) * scaling  # [B, 4, 16, 16]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, m.train_timesteps, (len(idx),), generator=g)
        return idx, ids, z0, noise, t

    # on a GPU the next batch is built on the CPU while this step runs; on the CPU that would only compete
    prefetch = ThreadPoolExecutor(1) if (cfg.prefetch if cfg.prefetch is not None else dev.type == "cuda") else None
    pending = prefetch.submit(make_batch, start) if prefetch and start < end else None
    try:
        for step in range(start, end):
            if _budget_spent(cfg, elapsed):
                log.info("UNet stage: wall-clock budget of %.1f min used up at step %d", cfg.unet_minutes, step)
                end = step
                break
            threads.update()
            if pending is not None:
                batch = pending.result()
                pending = prefetch.submit(make_batch, step + 1) if step + 1 < end else None
            else:
                batch = make_batch(step)
            idx, ids, z0, noise, t = batch
            ids, z0, noise, t = ids.to(dev), z0.to(dev), noise.to(dev), t.to(dev)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            f = _lr_factor(step, cfg.unet_steps, cfg.warmup, cfg.min_lr_frac, elapsed / budget_s if budget_s else 0.0)
            opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = cfg.unet_lr * f, cfg.text_lr * f
            attn_store.clear()
            pred = unet(zt, t, encoder_hidden_states=text(ids)[0]).sample
            per_sample = F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))  # [B]
            mse = per_sample.mean()  # logged unweighted, comparable across runs
            loss, aux = mse, None
            if cfg.min_snr_gamma is not None:
                loss = (per_sample * min_snr_weights(a.flatten(), cfg.min_snr_gamma)).mean()
            if cfg.attn_loss_weight > 0:
                masks = data.class_masks(idx, device=dev)
                aux = localisation_loss(attn_store, ids, lookup, masks, t <= cfg.attn_loss_max_t, cfg.attn_loss_kind)
                loss = loss + cfg.attn_loss_weight * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            trained = [q for group in opt.param_groups for q in group["params"]]
            gnorm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            opt.step()
            ema_unet.update(unet, step)
            ema_text.update(text, step)
            now = time.time()
            elapsed += now - t_prev
            t_prev = now
            if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
                rec_ = {"stage": "unet", "step": step, "loss": mse.item(), "grad_norm": float(gnorm),
                        **({"attn_loss": aux.item()} if aux is not None else {}),
                        "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1)}  # fmt: skip
                _log_line(run / "log.jsonl", rec_)
                log.info("unet %s", rec_)
            if now - last_save > cfg.ckpt_minutes * 60:
                save(step + 1)
                last_save = time.time()
            if stop.requested:
                save(step + 1)
                stop.restore()
                raise SystemExit(f"stopped by signal after UNet step {step + 1}; continue with --resume")
    finally:
        if prefetch is not None:
            prefetch.shutdown(wait=True, cancel_futures=True)
    stop.restore()
    save(max(start, end))
    return ckpt


DECODER_NAME = "decoder.pt"


def finetune_decoder(cfg: TrainConfig, data: Dataset | None = None, resume: bool = True) -> dict:
    """Stage 3: train only the VAE decoder (+ post_quant_conv) on posterior samples of the frozen encoder.

    The encoder and hence every latent the UNet was trained on stay unchanged, so this stage may run before,
    during or after the UNet stage. State goes to ``<out>/decoder.pt`` (resumable); :func:`export` uses it.
    """
    run = Path(cfg.out)
    ckpt = load_checkpoint(run)
    if ckpt is None or ckpt["stage"] != "unet":
        raise RuntimeError(f"the VAE stage of {run} has not finished")
    dev = _device()
    data = data or Dataset(cfg.n_train, cfg.model.image_size)
    vae = build_vae(cfg.model).to(dev)
    vae.load_state_dict(ckpt["vae"])
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for prm in params:
        prm.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    start, elapsed = 0, 0.0
    state_path = run / DECODER_NAME
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        vae.decoder.load_state_dict(st["decoder"])
        vae.post_quant_conv.load_state_dict(st["post_quant_conv"])
        opt.load_state_dict(st["opt"])
        start, elapsed = st["step"], st["elapsed_s"]
        log.info("resuming decoder stage at step %d", start)

    def save(step: int) -> None:
        _atomic_save({"step": step, "decoder": vae.decoder.state_dict(),
                      "post_quant_conv": vae.post_quant_conv.state_dict(), "opt": opt.state_dict(),
                      "elapsed_s": elapsed, "steps_total": cfg.decoder_steps}, state_path)  # fmt: skip

    threads = AdaptiveThreads(cfg.threads)
    last_save, t_prev = time.time(), time.time()
    vae.encoder.eval()
    vae.decoder.train()
    for step in range(start, cfg.decoder_steps):
        threads.update()
        rng, g = _step_rng(cfg.seed, 3, step)
        x = data.pixels(rng.integers(len(data), size=cfg.decoder_batch)).to(dev)  # [B, 3, 64, 64]
        for pg in opt.param_groups:
            pg["lr"] = cfg.decoder_lr * _lr_factor(step, cfg.decoder_steps, 20, cfg.min_lr_frac)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = posterior_latents(post.mean, post.std, cfg.latents, g)
        rec = vae.decode(z).sample
        l1, l2 = (rec - x).abs().mean(), F.mse_loss(rec, x)
        loss = l1 + l2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        now = time.time()
        elapsed += now - t_prev
        t_prev = now
        if step % cfg.log_every == 0 or step == cfg.decoder_steps - 1:
            rec_ = {"stage": "decoder", "step": step, "loss": loss.item(), "l1": l1.item(), "l2": l2.item(),
                    "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1)}  # fmt: skip
            _log_line(run / "log.jsonl", rec_)
            log.info("decoder %s", rec_)
        if now - last_save > cfg.ckpt_minutes * 60 / 2:
            save(step + 1)
            last_save = time.time()
    save(max(start, cfg.decoder_steps))
    return {"step": max(start, cfg.decoder_steps), "elapsed_s": elapsed}


def run_from_pipeline(pipeline: str | Path, out: str | Path, cfg: TrainConfig) -> Path:
    """Turn an exported shapes pipeline folder into a finished UNet-stage run at ``out`` (for ``--init-from``).

    The pipeline's UNet and text encoder become both the weights and their EMA, its VAE (with whatever decoder
    it ships) the VAE; the latents of the ``cfg.n_train`` training scenes are recomputed with its encoder, and
    its tokenizer is kept as is, so token ids stay those the text encoder learnt. Returns ``out``.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipeline, out = Path(pipeline), Path(out)
    if load_checkpoint(out) is not None:
        return out  # made by an earlier call (the conversion is deterministic)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, torch_dtype=torch.float32, safety_checker=None)
    m = cfg.model
    tok = CLIPTokenizer.from_pretrained(pipeline / "tokenizer")
    unet, vae = build_unet(m), build_vae(m)
    text = build_text_encoder(m, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    for name, ours, theirs in (("unet", unet, pipe.unet), ("vae", vae, pipe.vae), ("text_encoder", text, pipe.text_encoder)):
        try:
            ours.load_state_dict(theirs.float().state_dict())
        except RuntimeError as err:
            first = str(err).strip().splitlines()[1:2] or [str(err)[:200]]
            raise ValueError(f"the {name} of {pipeline} does not have the architecture of this run's ModelConfig "
                             f"({first[0].strip()}); continue it with the ModelConfig it was trained with") from None
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer").exists():
        tok.save_pretrained(out / "tokenizer")
    dev = _device()
    mean, std = _encode_latents(vae.to(dev).eval(), Dataset(cfg.n_train, m.image_size), dev)
    vae.cpu()
    _atomic_save({"mean": mean.half(), "std": std.half()}, out / "latents.pt")
    src_cfg = dataclasses.replace(cfg, out=str(out), unet_steps=0, attn_loss_weight=0.0, init_from=None)
    state = {"stage": "unet", "step": 0, "vae": vae.state_dict(),
             "scaling_factor": float(pipe.vae.config.scaling_factor), "unet": unet.state_dict(),
             "text": text.state_dict(), "ema_unet": copy.deepcopy(unet.state_dict()),
             "ema_text": copy.deepcopy(text.state_dict()), "elapsed_s": 0.0, "vae_elapsed_s": 0.0,
             "config": src_cfg.to_dict(), "pipeline": str(pipeline)}  # fmt: skip
    _atomic_save(state, out / CKPT_NAME)
    return out


def init_from_run(source: str | Path, cfg: TrainConfig) -> dict:
    """Start ``cfg.out``'s UNet stage from the weights of another run's UNet-stage checkpoint.

    Copies the VAE (and its fine-tuned decoder), cached latents, tokenizer, UNet, text encoder and their EMA;
    the optimizer, step counter and learning-rate schedule start afresh. Used to continue a finished run with
    a new objective or schedule without repeating its VAE stage. Returns the new checkpoint.
    """
    import shutil

    src, run = Path(source), Path(cfg.out)
    if (run / CKPT_NAME).exists():
        raise FileExistsError(f"{run / CKPT_NAME} exists; pass --resume to continue it or choose another --out")
    if (src / "model_index.json").exists():  # an exported pipeline (e.g. the shipped weights): make it a run
        src = run_from_pipeline(src, run.with_name(run.name + ".source"), cfg)
    old = load_checkpoint(src)
    if old is None or old.get("stage") != "unet" or "unet" not in old:
        raise RuntimeError(f"{src} holds no UNet-stage checkpoint to start from")
    if TrainConfig.from_dict(old["config"]).model != cfg.model:
        raise ValueError(f"the architecture of {src} differs from this run's; both must use the same ModelConfig")
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "latents.pt", run / "latents.pt")
    if (src / DECODER_NAME).exists():
        shutil.copy2(src / DECODER_NAME, run / DECODER_NAME)
    if not (run / "tokenizer").exists():
        shutil.copytree(src / "tokenizer", run / "tokenizer")
    keep = ("vae", "scaling_factor") if cfg.init_vae_only else ("vae", "scaling_factor", "unet", "text", "ema_unet", "ema_text")
    state = {k: old[k] for k in keep}
    previous = old.get("init") or []
    state.update({"stage": "unet", "step": 0, "elapsed_s": 0.0, "vae_elapsed_s": old.get("vae_elapsed_s", 0.0),
                  "init": [*previous, {"run": str(src), "pipeline": old.get("pipeline"), "unet_steps": old["step"], "unet_batch": old["config"]["unet_batch"],
                                       "elapsed_s": old["elapsed_s"],
                                       "attn_loss_weight": old["config"].get("attn_loss_weight", 0.0),
                                       "attn_loss_kind": old["config"].get("attn_loss_kind", "mass"),
                                       "attn_loss_background": old["config"].get("attn_loss_background", False),
                                       "min_snr_gamma": old["config"].get("min_snr_gamma"),
                                       "latents": old["config"].get("latents", "sample")}],
                  "config": cfg.to_dict()})  # fmt: skip
    _atomic_save(state, run / CKPT_NAME)
    return state


def train(cfg: TrainConfig, resume: bool = False, stop_at: int | None = None) -> dict:
    """Run (or continue) both stages; returns the final checkpoint dict.

    ``stop_at`` ends this invocation after that many UNet steps (checkpoint saved), as an interruption would.
    """
    previous_threads = torch.get_num_threads()
    try:
        return _train(cfg, resume, stop_at)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: TrainConfig, resume: bool, stop_at: int | None) -> dict:
    if cfg.unet_minutes is not None and not cfg.unet_minutes > 0:
        raise ValueError(f"the UNet stage's wall-clock budget must be > 0 minutes (got {cfg.unet_minutes}); "
                         "leave it unset (no --minutes) for a run bounded by --steps alone")
    torch.set_num_threads(cfg.threads)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(run) if resume else None
    if ckpt is None and (run / CKPT_NAME).exists():
        raise FileExistsError(f"{run / CKPT_NAME} exists; pass --resume to continue it or choose another --out")
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    dev = _device()
    data = Dataset(cfg.n_train, cfg.model.image_size)
    if ckpt is None or ckpt["stage"] == "vae":
        ckpt = _train_vae(cfg, data, ckpt, run, dev)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ckpt["step"] < cfg.unet_steps:
        ckpt = _train_unet(cfg, data, ckpt, run, dev, stop_at=stop_at)
    unet_done = ckpt["step"] >= cfg.unet_steps or _budget_spent(cfg, ckpt["elapsed_s"])
    # A relearning run changes only cross-attention projections; its VAE (decoder included) is the source's.
    if cfg.relearn_cross is not None:
        log.info("relearning run: decoder fine-tune skipped (the VAE is the source's, unchanged)")
    elif cfg.decoder_steps > 0 and unet_done and (stop_at is None or stop_at >= cfg.unet_steps):
        finetune_decoder(cfg, data, resume=True)
    return ckpt


# -------------------------------------------------------------------------------------------------- export
def export(run: str | Path, target: str | Path, fp16: bool = True, use_ema: bool = True) -> dict:
    """Write the checkpoint in ``run`` as a diffusers StableDiffusionPipeline folder at ``target``.

    Returns a small report (parameter counts, fp16-vs-fp32 agreement, size on disk).
    """
    from diffusers import StableDiffusionPipeline

    ckpt = load_checkpoint(run)
    if ckpt is None or ckpt["stage"] != "unet" or "unet" not in ckpt:
        raise RuntimeError(f"no UNet-stage checkpoint in {run}; train first")
    cfg = TrainConfig.from_dict(ckpt["config"])
    m = cfg.model
    if not (Path(run) / "tokenizer" / "tokenizer_config.json").exists():
        raise RuntimeError(f"{run}/tokenizer is missing; the checkpoint cannot be exported without its tokenizer")
    tok = make_tokenizer(m, run)
    vae = build_vae(m)
    vae.load_state_dict(ckpt["vae"])
    report_decoder = None
    if (Path(run) / DECODER_NAME).exists():  # stage-3 decoder fine-tune (encoder unchanged)
        st = torch.load(Path(run) / DECODER_NAME, map_location="cpu", weights_only=False)
        vae.decoder.load_state_dict(st["decoder"])
        vae.post_quant_conv.load_state_dict(st["post_quant_conv"])
        report_decoder = {"step": st["step"], "elapsed_s": st["elapsed_s"]}
    vae.register_to_config(scaling_factor=ckpt["scaling_factor"])
    unet = build_unet(m)
    unet.load_state_dict(ckpt["ema_unet" if use_ema else "unet"])
    text = build_text_encoder(m, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    text.load_state_dict(ckpt["ema_text" if use_ema else "text"])
    _, ddim = build_schedulers(m)

    # fp16 check: the UNet+text noise prediction with fp16-rounded weights vs fp32 weights.
    report = {"step": ckpt["step"], "decoder_finetune": report_decoder, "init_from": ckpt.get("init"),
              "attn_loss_weight": cfg.attn_loss_weight, "attn_loss_kind": cfg.attn_loss_kind,
              "attn_loss_background": cfg.attn_loss_background, "min_snr_gamma": cfg.min_snr_gamma,
              "latents": cfg.latents,
              "train_elapsed_s": ckpt.get("vae_elapsed_s", 0) + ckpt["elapsed_s"],
              "params": {"unet": count_params(unet), "text_encoder": count_params(text), "vae": count_params(vae)}}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = tok(["a red circle and a blue star on a white background", "a photo of heart, cross"],
              padding="max_length", max_length=m.max_length, return_tensors="pt").input_ids  # fmt: skip
    zt = torch.randn(2, m.latent_channels, m.latent_size, m.latent_size, generator=g)
    t = torch.tensor([100, 600])
    with torch.no_grad():
        ref = unet(zt, t, text(ids)[0]).sample
        u16, t16 = copy.deepcopy(unet).half().float(), copy.deepcopy(text).half().float()
        low = u16(zt, t, t16(ids)[0]).sample
        x = torch.rand(1, 3, m.image_size, m.image_size, generator=g) * 2 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        rec16 = copy.deepcopy(vae).half().float()
        rec16 = rec16.decode(rec16.encode(x).latent_dist.mean).sample
    report["fp16_rel_err_unet"] = float((ref - low).norm() / ref.norm())
    report["fp16_max_abs_err_vae"] = float((rec - rec16).abs().max())
    # UNet and VAE weights go to disk in fp16 (diffusers loads them back as fp32 unless asked otherwise); the
    # text encoder stays fp32 (it is tiny, and transformers would keep fp16 on load, mixing dtypes on CPU).
    dtype = torch.float16 if fp16 else torch.float32
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype), text_encoder=text, tokenizer=tok, unet=unet.to(dtype), scheduler=ddim,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(target, safe_serialization=True)
    write_json(target / "vocabulary.json", vocabulary_file())  # the closed vocabulary, for the class-word check
    report["size_bytes"] = sum(p.stat().st_size for p in target.rglob("*") if p.is_file() and p.name != "README.md")
    (Path(run) / "export_report.json").write_text(json.dumps(report, indent=2))
    return report


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/shapes", help="run directory (checkpoint, log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--steps", type=int, help="UNet-stage steps (default from TrainConfig)")
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--batch", type=int, help="UNet-stage batch size")
    p.add_argument("--minutes", type=float,
                   help="wall-clock budget of the UNet stage: it ends at --steps or after this many minutes, "
                        "whichever comes first, with the learning-rate decay paced to finish by then")
    p.add_argument("--n-train", type=int)
    p.add_argument("--lr", type=float, help="UNet-stage peak learning rate (UNet and text encoder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", help="after training, write the pipeline to this folder")
    p.add_argument("--export-only", action="store_true", help="skip training; export the latest checkpoint")
    p.add_argument("--fp32", action="store_true", help="export fp32 weights instead of fp16")
    p.add_argument("--decoder-only", action="store_true",
                   help="run (or resume) only stage 3, the decoder fine-tune; may run beside the UNet stage")
    p.add_argument("--decoder-steps", type=int)
    p.add_argument("--attn-loss", type=float, help="weight of the auxiliary cross-attention localisation loss")
    p.add_argument("--attn-loss-kind", choices=LOSS_KINDS, help="mass: share on the class; match: KL to the mask; match_pixel: match + per-pixel class cross-entropy")
    p.add_argument("--attn-loss-background", action="store_true",
                   help="the localisation loss also teaches the word 'background' to attend to object-free pixels")
    p.add_argument("--min-snr-gamma", type=float, help="Min-SNR-gamma weighting of the denoising loss (e.g. 5)")
    p.add_argument("--latents", choices=LATENT_KINDS, help="train on posterior samples (default) or posterior means")
    p.add_argument("--init-vae-only", action="store_true",
                   help="with --init-from: reuse only its VAE, latents and tokenizer; UNet and text encoder start fresh")
    p.add_argument("--freeze-text", action="store_true", help="keep the text encoder at its initialisation (not trained)")
    p.add_argument("--relearn-cross", choices=tuple(RELEARN_KINDS),
                   help="with --init-from: re-initialise the cross-attention query/key (qk) or also value/output (qkvo) "
                        "projections and train only those, from the denoising loss (maps relearned without supervision)")
    p.add_argument("--init-from", help="start the UNet stage from this run's weights, or from an exported pipeline "
                                       "folder such as difffeat/weights/shapes (new optimizer and schedule)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = _parse(argv)
    if args.decoder_only:
        ck = load_checkpoint(args.out)
        if ck is None:
            raise SystemExit(f"no checkpoint in {args.out}")
        cfg = TrainConfig.from_dict(ck["config"])
        if args.decoder_steps is not None:
            cfg.decoder_steps = args.decoder_steps
        if args.latents is not None:
            cfg.latents = args.latents
        finetune_decoder(cfg, resume=True)
    elif not args.export_only:
        cfg = TrainConfig(out=args.out, seed=args.seed)
        if args.resume and (ck := load_checkpoint(args.out)) is not None:
            cfg = TrainConfig.from_dict(ck["config"])
        for name, val in (("unet_steps", args.steps), ("vae_steps", args.vae_steps), ("unet_batch", args.batch),
                          ("n_train", args.n_train), ("decoder_steps", args.decoder_steps),
                          ("unet_minutes", args.minutes),
                          ("min_snr_gamma", args.min_snr_gamma), ("latents", args.latents)):  # fmt: skip
            if val is not None:
                setattr(cfg, name, val)
        if args.lr is not None:
            cfg.unet_lr = cfg.text_lr = args.lr
        if args.attn_loss is not None:
            cfg.attn_loss_weight = args.attn_loss
        if args.attn_loss_kind is not None:
            cfg.attn_loss_kind = args.attn_loss_kind
        if args.attn_loss_background:
            cfg.attn_loss_background = True
        if args.freeze_text:
            cfg.freeze_text = True
        if args.relearn_cross is not None:
            if not args.init_from and not args.resume:
                raise SystemExit("--relearn-cross needs --init-from (the trained run or pipeline whose maps to relearn)")
            cfg.relearn_cross = args.relearn_cross
        if args.init_vae_only:
            if not args.init_from:
                raise SystemExit("--init-vae-only needs --init-from (the run or pipeline whose VAE to reuse)")
            cfg.init_vae_only = True
        resume = args.resume
        if args.init_from and not args.resume:
            cfg.init_from = args.init_from
            init_from_run(args.init_from, cfg)
            resume = True
        train(cfg, resume=resume)
    if args.export:
        report = export(args.out, args.export, fp16=not args.fp32)
        log.info("exported to %s: %s", args.export, report)


if __name__ == "__main__":
    main()
