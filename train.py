"""Train or fine-tune the U-Net of a latent diffusion model on a folder of captioned images. The VAE and the text
encoder stay frozen (unless --train-text-encoder) and the U-Net learns ldm.diffusion_loss:
    loss = || target - unet(z_t, t, c) ||^2,  z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps,  z0 = scale_factor * E(x)
with target = eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) z0 for v-prediction models.

    python train.py --data my_images/ --ckpt v1-5-pruned-emaonly.safetensors --out runs/cats
    python train.py --out runs/cats --resume          # after a crash or Ctrl-C
    torchrun --nproc_per_node 8 train.py --data my_images/ --ckpt ... --out runs/big
    python train.py --data my_images/ --vae runs/vae/final.safetensors --config tiny --out runs/ldm
    python train.py --data my_images/ --ckpt v1-5-pruned-emaonly.safetensors --lora-rank 16 --out runs/lora

The autoencoder (the first stage, whose latents the U-Net learns) trains with train_vae.py. Resume, determinism,
DDP and signals: see runs.py.
"""

import argparse
import sys

from cli import STOPPED_TRAINING, HelpFormatter, Parser, UserError, add_run_flags, parse_run_args, run

# Defaults by model size ("tiny": CPU-sized, learns in a few dozen steps; "sd": SD 1.x/2.x-sized fine-tuning).
DEFAULTS = {
    "tiny": dict(lr=1e-3, batch_size=8, warmup_steps=10, ema_decay=0.999, steps=2000, save_every=500,
                 sample_every=250, val_every=100, grad_clip=1.0),
    "sd": dict(lr=1e-5, batch_size=4, warmup_steps=500, ema_decay=0.9999, steps=20000, save_every=1000,
               sample_every=1000, val_every=500, grad_clip=1.0),
}
SCRATCH_SD_LR = 1e-4  # from-scratch SD-sized runs (LDM's text-to-image rate) rather than fine-tuning's 1e-5
CONFIGS = ("tiny", "small", "sd1", "sd2", "sdxl", "sdxl-refiner", "tiny-sdxl", "tiny-sdxl-refiner")  # ldm.PRESETS


def make_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_run_flags(p, dict(resolution="the model's", batch_size="8 tiny, 4 SD", steps="2000 tiny, 20000 SD",
                          lr="1e-3 tiny, 1e-5 SD fine-tune, 1e-4 SD from scratch", warmup_steps="10 tiny, 500 SD",
                          grad_clip="1", precision="bf16 on a GPU, fp32 on the CPU", save_every="500 tiny, 1000 SD",
                          sample_every="250 tiny, 1000 SD", val_every="100 tiny, 500 SD"))
    a = p.add_argument
    a("--config", choices=CONFIGS, help="model preset when training from scratch (default: tiny)")
    a("--vae", help="autoencoder file, e.g. from train_vae.py (default: --ckpt's, or for --config the preset's, "
                    "randomly initialised)")
    a("--prediction-type", choices=["eps", "v"], help="override the model's prediction type")
    a("--train-text-encoder", action="store_true", help="train the text encoder too (else frozen)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--grad-checkpointing", action="store_true", help="recompute U-Net activations in backward (less memory)")
    a("--channels-last", action="store_true", help="U-Net weights and activations in NHWC layout (the layout "
      "tensor-core convolutions use; see bench.py)")
    a("--compile", action="store_true", help="torch.compile the U-Net's ResBlocks and transformer blocks one by "
      "one (blocks of one shape share their compiled code): faster GPU steps after a few minutes of compiling")
    a("--ema-decay", type=float, help="EMA of the U-Net (0: off; default 0.999 tiny, 0.9999 SD)")
    a("--cache-latents", action="store_true", help="encode every image (and frozen-encoder caption) once")
    a("--uncond-prob", type=float, default=0.1, help="caption dropout probability (for classifier-free guidance)")
    a("--snr-gamma", type=float, help="min-SNR loss weighting with this gamma (e.g. 5)")
    a("--noise-offset", type=float, default=0.0, help="add this times per-channel constant noise")
    a("--sample-prompts", nargs="+", help="prompts of the sample grid (default: 4 captions from the data)")
    a("--sample-steps", type=int, default=25, help="DDIM steps of the sample grid")
    a("--sample-cfg", type=float, default=5.0, help="guidance scale of the sample grid")
    a("--export-weights", choices=["ema", "raw"], default="ema", help="U-Net weights in final.safetensors")
    a("--lora-rank", type=int, help="train a LoRA of this rank on the frozen --ckpt model instead of the whole U-Net; "
      "written to OUT/lora.safetensors (kohya format)")
    a("--lora-alpha", type=float, help="LoRA alpha: updates are scaled by alpha / rank (default: the rank)")
    a("--lora-targets", choices=["attn", "attn+ff", "all"], default="attn+ff", help="U-Net modules the LoRA covers: "
      "attention projections; + the rest of each transformer (proj_in/out, feed-forward); + every ResBlock and "
      "sampler convolution (LoCon)")
    a("--lora-text-encoder", action="store_true", help="a LoRA on the SD 1.x text encoder too")
    return p


if __name__ == "__main__":
    parse_run_args(make_parser)  # --help and usage errors answer at once, before torch's seconds-long import

import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
from PIL import PngImagePlugin
from tqdm import tqdm

import data
import ldm
import lora as lora_lib
import runs
import unet as unet_lib
import vae as vae_lib
from checkpoint import CheckpointError

# -----------------------------------------------------------------------------------------------------------------
# Set-up: the model, what trains, the caches


def build_model(args) -> ldm.LatentDiffusion:
    """The model to train, in float32 on the CPU: a checkpoint's (fine-tuning) or a preset's with fresh weights,
    either with --vae's autoencoder (and so its latent scale factor) in place of its own."""
    vae = vae_lib.load_autoencoder(args.vae, device="cpu", dtype=torch.float32) if args.vae else None
    if args.ckpt:
        model = ldm.load_model(args.ckpt, device="cpu", dtype=torch.float32, prediction_type=args.prediction_type)
    else:
        torch.manual_seed(args.seed)  # from-scratch weights are a function of the seed (resume rebuilds them)
        cfg = dict(ldm.PRESETS[args.config or "tiny"])
        if vae is not None:  # the U-Net's input and output follow the autoencoder's latent channels
            unet_cfg = unet_lib.PRESETS[cfg["unet"]]
            cfg.update(vae=asdict(vae.cfg), unet=asdict(replace(unet_cfg, in_channels=vae.cfg.embed_dim,
                                                                out_channels=vae.cfg.embed_dim)))
        model = ldm.build_model(cfg, prediction_type=args.prediction_type)
    if vae is not None:
        model.vae = vae
    return model


class Denoiser(nn.Module):
    """What DDP wraps: the U-Net, plus the text encoder when it is trained and a LoRA network (its modules run from
    hooks on the U-Net and text encoder; held here so that DDP syncs their gradients too)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module = None, network: nn.Module = None):
        super().__init__()
        self.unet, self.text_encoder, self.network = unet, text_encoder, network

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, y: torch.Tensor = None) -> torch.Tensor:
        context = self.text_encoder(cond) if self.text_encoder is not None else cond  # cond: tokens or context
        return self.unet(z_t, t, context, y)


@dataclass
class Training:
    """What set-up builds and the loop reads: the run, the model and what trains, the caches."""
    run: runs.Run
    model: ldm.LatentDiffusion
    denoiser: nn.Module  # Denoiser, DDP-wrapped on several ranks
    optimizer: torch.optim.Optimizer
    trained: list[nn.Parameter]  # the U-Net's parameters, or the LoRA network's
    network: lora_lib.LoRANetwork | None
    ema: list[torch.Tensor] | None  # EMA of `trained`, in their order
    prompts: list[str]  # of the sample grid
    ema_updates: int = 0
    latent_cache: tuple = None  # posterior (mean, std) [N, views, C, h, w] of every training image
    cache_source: torch.Tensor = None  # the item each cached latent was encoded from
    size_cache: torch.Tensor = None  # [N, views, 4]: each cached latent's data.load_image_sizes geometry
    text_cache: tuple = None  # (context, SDXL's pooled vector or None) of every distinct caption (frozen encoder)
    caption_id: dict = None
    val_cache: tuple = None

    @property
    def args(self) -> argparse.Namespace:
        return self.run.args


def setup(args: argparse.Namespace, explicit: set[str] = frozenset()) -> Training:
    run = runs.Run(args, explicit)
    if run.state is not None and "unet" not in run.state and "lora" not in run.state:
        raise UserError(f"{run.out} holds an autoencoder run; continue it with train_vae.py --out {run.out} "
                         "--resume")
    args = run.args
    if args.cache_latents and args.random_crop:
        raise UserError("--random-crop needs the images at every step; drop it or --cache-latents")
    model = build_model(args)
    if ldm.is_sdxl(model) and args.train_text_encoder:
        raise UserError("--train-text-encoder is for SD 1.x / 2.x models; an SDXL run trains its U-Net only (drop "
                        "the flag)")
    check_lora_args(args, model)
    kind = "tiny" if model.unet.cfg.model_channels < 320 else "sd"
    defaults = dict(DEFAULTS[kind], lr=SCRATCH_SD_LR if kind == "sd" and not args.ckpt else DEFAULTS[kind]["lr"])
    if args.lora_rank:  # LoRA's usual settings: a larger rate, no EMA (sd-scripts' defaults)
        defaults.update(lr=1e-4 if kind == "sd" else defaults["lr"], ema_decay=0.0)
    run.fill(defaults)
    args.resolution = args.resolution or model.resolution
    run.begin(model.downsample_factor)
    if not args.ckpt and not args.vae:
        run.print("warning: no --vae: the U-Net learns the latents of a randomly initialised, untrained autoencoder, "
                  "which hold no picture, so its samples will stay noise. Train one first (python train_vae.py "
                  "--data DIR --out runs/vae) and pass --vae runs/vae/final.safetensors")
    if not run.has_captions:
        run.print("no captions found (.txt or metadata.jsonl): training unconditionally with empty prompts")
    model.to(run.device)
    model.vae.eval().requires_grad_(False)
    model.text_encoder.train(args.train_text_encoder).requires_grad_(args.train_text_encoder)
    model.unet.train().requires_grad_(not args.lora_rank)
    model.unet.cfg = replace(model.unet.cfg, use_checkpoint=args.grad_checkpointing)
    network = None
    if args.lora_rank:
        network = lora_lib.LoRANetwork(model, args.lora_rank, args.lora_alpha, args.lora_targets,
                                       args.lora_text_encoder, args.seed).train()
        if run.device.type == "cuda" and run.amp_dtype is not None:  # the frozen base in half precision: autocast
            model.unet.to(run.amp_dtype)  # computes in it anyway, and the weights take half the memory
            model.text_encoder.to(run.amp_dtype)
    if args.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if args.compile:  # block by block: identical blocks share compiled code; names and state dict stay the same
        unet_lib.compile_blocks(model.unet)
    denoiser = Denoiser(model.unet, model.text_encoder if text_trains(args) else None, network)
    if run.world > 1:
        denoiser = nn.parallel.DistributedDataParallel(
            denoiser, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    trained = list(network.parameters() if network is not None else model.unet.parameters())
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay, fused=run.device.type == "cuda")
    prompts = args.sample_prompts or list(dict.fromkeys(
        run.items[i * len(run.items) // 4][1] for i in range(min(4, len(run.items)))))
    t = Training(run, model, denoiser, optimizer, trained, network,
                 [p.detach().clone() for p in trained] if args.ema_decay else None, prompts)
    if args.cache_latents:
        build_caches(t)
    what = f"{sum(p.numel() for p in trained) / 1e6:.2f}M LoRA parameters (rank {args.lora_rank}, " \
           f"{len(network.loras)} modules)" if network is not None else \
           f"{sum(p.numel() for p in trained) / 1e6:.1f}M U-Net parameters"
    run.announce(f"{what}, prediction {model.prediction_type}")
    if run.state is not None:
        load_state(t, run.state)
    return t


def text_trains(args) -> bool:
    """Whether captions go through a trained text encoder (or its LoRA) at every step, so none is cached."""
    return args.train_text_encoder or args.lora_text_encoder


def check_lora_args(args, model: ldm.LatentDiffusion):
    """--lora-* flags: a LoRA adapts a given model (--ckpt); its text-encoder part is for SD 1.x's CLIP."""
    lora_flags = [f for f in ("lora_alpha", "lora_text_encoder") if getattr(args, f)]
    if not args.lora_rank:
        if lora_flags:
            raise UserError(f"--{lora_flags[0].replace('_', '-')} goes with --lora-rank R")
        return
    if args.lora_rank < 1:
        raise UserError(f"--lora-rank must be at least 1, got {args.lora_rank}")
    if not args.ckpt:
        raise UserError("--lora-rank trains a LoRA on a model: pass the model with --ckpt")
    if args.train_text_encoder:
        raise UserError("--train-text-encoder trains the whole text encoder; with --lora-rank use --lora-text-encoder")
    if args.lora_text_encoder and model.text_encoder.cfg.layout != "clip":
        raise UserError("--lora-text-encoder is for SD 1.x models (their CLIP ViT-L text encoder); drop it")


@torch.no_grad()
def encode_posterior(t: Training, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, H, W] -> the VAE posterior's (mean, std), unscaled, float32 (std 0 for a VQ model: LDM trains on
    its pre-quantisation output). bf16 autocast only: the SD VAE overflows in fp16."""
    with t.run.autocast(t.run.amp_dtype == torch.bfloat16):
        d = t.model.vae.encode(x.to(t.run.device))
    if isinstance(d, vae_lib.DiagonalGaussianDistribution):
        return d.mean.float(), d.std.float()
    return d.float(), torch.zeros_like(d, dtype=torch.float32)


@torch.no_grad()
def encode_text(t: Training, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context [B, 77, D], SDXL's pooled text vector [B, P] or None), float32. On an SDXL base an empty caption
    (none, or dropped for classifier-free guidance) is all zeros, as in its training and its sampling."""
    model, tokens = t.model, t.model.tokenizer(captions).to(t.run.device)
    if not ldm.is_sdxl(model):
        return model.text_encoder(tokens).float(), None
    context, pooled = model.text_encoder(tokens, pooled=True)
    return ldm.zero_empty(model, captions, context.float(), pooled.float())


def added_conditioning(t: Training, pooled: torch.Tensor | None, sizes: torch.Tensor) -> torch.Tensor | None:
    """SDXL's y for a batch: its images' own original size and crop corner (sizes [B, 4], data.load_image_sizes),
    the training resolution as the target size, and the default aesthetic score for a refiner. None otherwise."""
    if pooled is None:
        return None
    r = t.args.resolution
    return ldm.added_conditioning(t.model, pooled, sizes[:, :2], sizes[:, 2:], torch.tensor([[r, r]] * len(sizes)),
                                  torch.full((len(sizes),), ldm.Sizes.aesthetic_score))


def build_caches(t: Training):
    """Posterior (mean, std) of every training image (and of its mirror image with --flip), and, while the text
    encoder is frozen, the context of every distinct caption. Kept on the CPU; each step indexes them."""
    run, args = t.run, t.args
    run.print(f"caching latents of {len(run.items)} images")
    loader = torch.utils.data.DataLoader(data.ImageDataset(run.items, args.resolution, args.seed),
                                         sampler=[(i, 0) for i in range(len(run.items))], batch_size=args.batch_size,
                                         collate_fn=data.collate, num_workers=args.num_workers,
                                         worker_init_fn=data.worker_init)
    means, stds, sources, sizes = [], [], [], []
    for src, x, geometry in tqdm(loader, disable=run.quiet, desc="caching latents", leave=False):
        sources.append(src)  # the image actually encoded (a file unreadable now is replaced by the next one)
        moments = [encode_posterior(t, v) for v in ([x, x.flip(-1)] if args.flip else [x])]
        means.append(torch.stack([m for m, _ in moments], 1).cpu())  # (B, views, C, h, w)
        stds.append(torch.stack([s for _, s in moments], 1).cpu())
        views = [geometry, data.mirrored(geometry, args.resolution)] if args.flip else [geometry]
        sizes.append(torch.stack(views, 1))  # (B, views, 4)
    t.latent_cache, t.cache_source = (torch.cat(means), torch.cat(stds)), torch.cat(sources)
    t.size_cache = torch.cat(sizes)
    if not text_trains(args):
        captions = list(dict.fromkeys([""] + [c for _, c in run.items]))
        t.caption_id = {c: i for i, c in enumerate(captions)}
        parts = [encode_text(t, captions[i:i + 256]) for i in range(0, len(captions), 256)]
        t.text_cache = tuple(None if parts[0][k] is None else torch.cat([p[k] for p in parts]).cpu()
                             for k in range(2))


# -----------------------------------------------------------------------------------------------------------------
# One step


def randomness(t: Training, step: int, positions: range) -> dict[str, torch.Tensor]:
    """Everything random about the samples at `positions` of a step's global batch, each from a generator seeded by
    (seed, step, position): the same numbers whichever rank and micro-batch a sample lands on."""
    f = t.model.downsample_factor
    T, shape = len(t.model.alphas_cumprod), (t.model.latent_channels, t.args.resolution // f, t.args.resolution // f)
    draws = []
    for p in positions:
        g = runs.step_generator(t.args.seed, step, p)
        draws.append(dict(t=torch.randint(0, T, (1,), generator=g), noise=torch.randn(1, *shape, generator=g),
                          posterior=torch.randn(1, *shape, generator=g),
                          offset=torch.randn(1, shape[0], 1, 1, generator=g), drop=torch.rand(1, generator=g)))
    return {k: torch.cat([d[k] for d in draws]) for k in draws[0]}


def micro_batch(t: Training, step: int, m: int) -> tuple[torch.Tensor, ...]:
    """(z0 scaled, noise, t, cond: context or tokens, y: SDXL's conditioning vector or None) of micro-batch m of
    `step` on this rank."""
    run, args, dev = t.run, t.args, t.run.device
    sl = run.sampler.micro_slice(m, run.rank)
    rnd = randomness(t, step, range(sl.start, sl.stop))
    if t.latent_cache is not None:
        idx, epoch = run.sampler.global_batch(step)
        idx = torch.as_tensor(idx[sl])
        flips = [int(np.random.default_rng([args.seed, epoch, int(i)]).random() < 0.5)
                 if args.flip else 0 for i in idx]  # the draw load_image makes for its flip
        view = torch.tensor(flips)
        mean, std = t.latent_cache[0][idx, view].to(dev), t.latent_cache[1][idx, view].to(dev)
        sizes = t.size_cache[idx, view]
        idx = t.cache_source[idx]
    else:
        idx, x, sizes = run.next_batch(step)
        mean, std = encode_posterior(t, x)
    z0 = (mean + std * rnd["posterior"].to(dev)) * t.model.scale_factor
    noise = (rnd["noise"] + args.noise_offset * rnd["offset"]).to(dev)
    keep = (rnd["drop"] >= args.uncond_prob).tolist()
    captions = [run.items[int(i)][1] if k else "" for i, k in zip(idx, keep)]
    pooled = None
    if text_trains(args):
        cond = t.model.tokenizer(captions).to(dev)
    elif t.text_cache is not None:
        rows = torch.tensor([t.caption_id[c] for c in captions])
        cond, pooled = (None if c is None else c[rows].to(dev) for c in t.text_cache)
    else:
        cond, pooled = encode_text(t, captions)
    return z0, noise, rnd["t"].to(dev), cond, added_conditioning(t, pooled, sizes)


def forward_backward(t: Training, step: int) -> torch.Tensor:
    """Gradients of step `step` accumulated into .grad (synced over ranks); returns the global-batch loss."""
    run, accum, losses = t.run, t.args.grad_accum, []
    for m in range(accum):
        z0, noise, timesteps, cond, y = micro_batch(t, step, m)
        no_sync = run.world > 1 and m < accum - 1  # DDP: all-reduce the gradients once, after the last micro-batch
        with t.denoiser.no_sync() if no_sync else nullcontext():
            with run.autocast():
                loss = ldm.diffusion_loss(t.model, t.denoiser, z0, noise, timesteps, cond, t.args.snr_gamma, y)
            run.backward(loss / accum)
        losses.append(loss.detach().float())
    return run.mean_over_ranks(losses)


def update_ema(t: Training, applied: torch.Tensor):
    """ema += (1 - decay) (w - ema), with weight 0 after a skipped step (a device flag: no wait for the GPU)."""
    n = t.ema_updates
    decay = min(t.args.ema_decay, (1 + n) / (10 + n))  # warm-up over the steps: early weights are averaged less
    torch._foreach_lerp_(t.ema, [p.detach() for p in t.trained], applied.float() * (1 - decay))
    t.ema_updates += 1


# -----------------------------------------------------------------------------------------------------------------
# State: checkpoints and export


def checkpoint_state(t: Training, step: int) -> dict:
    """What a ckpt-<step>.pt holds: the trained weights (the U-Net, or a LoRA in the kohya names its export uses,
    then with the base model from --ckpt) and their EMA, the optimizer and the run's position."""
    model, args = t.model, t.args
    state = dict(t.run.state_dict(step, t.optimizer), ema_updates=t.ema_updates,
                 model_config=json.dumps(model.model_config()))
    trained = t.network.kohya_state_dict() if t.network is not None else model.unet.state_dict()
    state["lora" if t.network is not None else "unet"] = trained
    if t.ema is not None:  # the trained tensors' names, in `t.trained` order (a LoRA's alphas are buffers)
        names = [k for k in trained if not k.endswith(".alpha")]
        state["ema"] = dict(zip(names, t.ema))
    # parts with no file to reload them from (trained, or random from-scratch weights) travel in the checkpoint
    if args.train_text_encoder or not args.ckpt:
        state["text_encoder"] = model.text_encoder.state_dict()
    if not args.ckpt and not args.vae:
        state["vae"] = model.vae.state_dict()
    return state


def load_state(t: Training, state: dict):
    if t.network is not None:
        if "lora" not in state:
            raise UserError(f"{t.run.out} holds a full U-Net run; resume it without --lora-rank")
        t.network.load_kohya_state_dict(state["lora"])
    else:
        if "unet" not in state:
            raise UserError(f"{t.run.out} holds a LoRA run; resume it with its --lora-rank")
        t.model.unet.load_state_dict(state["unet"])
    for name in ("text_encoder", "vae"):
        if name in state:
            getattr(t.model, name).load_state_dict(state[name])
    if t.ema is not None and "ema" in state:
        for e, v in zip(t.ema, state["ema"].values()):
            e.copy_(v)
    t.ema_updates = state["ema_updates"]
    t.run.restore(t.optimizer)


def export(t: Training, path):
    """final.safetensors (the whole model in the public single-file layout), or a LoRA run's lora.safetensors in the
    kohya format with sd-scripts' metadata (A1111 and ComfyUI list and load it)."""
    if t.network is None:
        return ldm.save_model(t.model, path)
    args = t.args
    lora_lib.save(t.network, t.model, path, {
        "ss_sd_model_name": str(args.ckpt and os.path.basename(str(args.ckpt))), "ss_resolution": str(
            (args.resolution, args.resolution)), "ss_steps": str(t.run.total), "ss_learning_rate": str(args.lr),
        "ss_num_train_images": str(len(t.run.items)), "ss_output_name": os.path.basename(str(t.run.out)),
        "ss_training_comment": f"train.py; base model {args.ckpt}"})


@contextmanager
def ema_weights(t: Training, use: bool = True):
    """Temporarily swap the EMA weights into the trained parameters (tensor swap, so restoring is exact)."""
    pairs = list(zip(t.trained, t.ema)) if t.ema is not None and use else []
    for p, e in pairs:
        p.data, e.data = e.data, p.data
    try:
        yield
    finally:
        for p, e in pairs:
            p.data, e.data = e.data, p.data


# -----------------------------------------------------------------------------------------------------------------
# Progress: validation loss, sample grids


@torch.no_grad()
def validate(t: Training) -> dict | None:
    """Mean loss over the held-out images at fixed timesteps (spread over 0..999) and fixed noise."""
    run, model, bs = t.run, t.model, t.args.batch_size
    if t.val_cache is None and run.val_items:
        x, captions, sizes = data.load_images(run.val_items, t.args.resolution)
        if x is None:
            run.val_items = []
        else:
            z0 = torch.cat([encode_posterior(t, x[i:i + bs])[0] for i in range(0, len(x), bs)])
            g = runs.step_generator(t.args.seed, 0)  # training steps count from 1: step 0's stream is free
            timesteps = torch.linspace(0, len(model.alphas_cumprod) - 1, len(x)).round().long()
            noise = torch.randn(z0.shape, generator=g).to(run.device)
            t.val_cache = z0 * model.scale_factor, noise, timesteps, captions, torch.tensor(sizes)
    if not run.val_items:
        return None
    z0, noise, timesteps, captions, sizes = t.val_cache
    model.eval()
    total = 0.0
    for i in range(0, len(z0), bs):
        ctx, pooled = encode_text(t, captions[i:i + bs])
        with run.autocast():
            loss = ldm.diffusion_loss(model, model.unet, z0[i:i + bs], noise[i:i + bs],
                                      timesteps[i:i + bs].to(run.device), ctx, y=added_conditioning(
                                          t, pooled, sizes[i:i + bs]))
        total += loss.item() * len(ctx)
    model.unet.train()
    model.text_encoder.train(t.args.train_text_encoder)
    return dict(val_loss=total / len(z0))


@torch.no_grad()
def sample_grid(t: Training, step: int):
    """OUT/samples/step-N.png: the sample prompts with the EMA weights, image i seeded --seed + i, each prompt written
    under its image and all of them in the PNG's `prompts` text chunk."""
    model, args = t.model, t.args
    model.eval()
    try:
        lora = t.network.merged(model) if t.network is not None else nullcontext()
        with ema_weights(t), lora, t.run.autocast():  # a LoRA merged: what sample.py --lora gives
            # one at a time: `sample.py PROMPT --seed S` redraws each image exactly (a batch of another size can
            # round differently); no CUDA graph, whose memory would stay held while training
            images = [ldm.sample(model, [p], steps=args.sample_steps, guidance_scale=args.sample_cfg,
                                 seed=args.seed + i, height=args.resolution, width=args.resolution, progress=False,
                                 cuda_graph=False)[0] for i, p in enumerate(t.prompts)]
    except ldm.NonFiniteError as e:
        return t.run.print(f"warning: no sample grid at step {step}: {e}")
    finally:
        model.unet.train()
        model.text_encoder.train(args.train_text_encoder)
    info = PngImagePlugin.PngInfo()  # what the grid shows, for tools that read it
    info.add_text("prompts", json.dumps(t.prompts))
    info.add_text("parameters", f"Steps: {args.sample_steps}, Sampler: DDIM, CFG scale: {args.sample_cfg}, "
                                f"Seed: {args.seed}, Size: {args.resolution}x{args.resolution}, Step: {step}")
    t.run.save_grid(ldm.image_grid(images, labels=t.prompts), step, info)


# -----------------------------------------------------------------------------------------------------------------
# The loop


def train(t: Training):
    """For each step: batch -> loss -> optimizer step -> EMA -> log / validate / sample / save; then
    final.safetensors (the public single-file layout, EMA weights unless --export-weights raw)."""
    run, args = t.run, t.args
    with run:  # leaves the process group however the run ends
        for step in run.steps():
            loss = forward_backward(t, step)  # tensors on the device from here to the log: no waiting on the GPU
            applied, norm = run.optimizer_step([t.optimizer], step, loss)
            if t.ema is not None:
                update_ema(t, applied)
            run.log_step(step, loss, norm, applied, t.optimizer.param_groups[0]["lr"])
            if run.due(step, args.val_every):
                run.log_validation(step, validate(t))
            if run.due(step, args.sample_every):
                sample_grid(t, step)
            if run.checkpoint_due(step):
                run.save(step, checkpoint_state(t, step))
        if not run.completed:
            return
        final = run.out / ("lora.safetensors" if t.network is not None else "final.safetensors")
        if run.rank == 0:
            with ema_weights(t, use=args.export_weights == "ema"):
                export(t, final)
            if not run.due(run.total, args.sample_every):  # a last grid when the last step made none
                sample_grid(t, run.total)
        run.finish(final)


def main(argv: list[str] = None):
    """The script, for a list of flags (as the command line gives them)."""
    train(setup(*parse_run_args(make_parser, argv)))


if __name__ == "__main__":
    sys.exit(run(main, errors=(CheckpointError,), interrupted=STOPPED_TRAINING,
                 out_of_memory="try a smaller --batch-size (with --grad-accum), "
                 "--grad-checkpointing, --precision bf16 or --cache-latents"))
