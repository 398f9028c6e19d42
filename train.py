"""Train or fine-tune a latent diffusion model's U-Net, or its first-stage autoencoder, on a folder of images.

--stage unet (default): the VAE and the text encoder stay frozen (unless --train-text-encoder) and the U-Net learns
    loss = || target - unet(z_t, t, c) ||^2,  z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps,  z0 = scale_factor * E(x)
with target = eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) z0 for v-prediction models.
--stage autoencoder: a KL or VQ autoencoder learns reconstruction (L1, LPIPS, KL or codebook term, PatchGAN), and
its export carries scale_factor = 1 / std of its latents for the U-Net stage.

    python train.py --data my_images/ --ckpt v1-5-pruned-emaonly.safetensors --out runs/cats
    python train.py --data my_images/ --out runs/cats --resume          # after a crash or Ctrl-C
    torchrun --nproc_per_node 8 train.py --data my_images/ --ckpt ... --out runs/big
    python train.py --data my_images/ --stage autoencoder --config kl-f8 --out runs/vae
    python train.py --data my_images/ --vae runs/vae/final.safetensors --config tiny --out runs/ldm

Everything random is a function of (--seed, step): each epoch is a permutation seeded by (seed, epoch), the timestep
and noise of the sample at position p of a step's global batch come from a generator seeded by (seed, step, p), and
augmentations from (seed, epoch, image). So a resumed run repeats the uninterrupted one exactly, and N
ranks compute the gradient of the same global batch as one process would.
"""

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw
from tqdm import tqdm

import ldm
import losses
import unet as unet_lib
import vae as vae_lib
from data import (ImageDataset, StepSampler, check_images, collate, find_images, load_image, split_items,
                  worker_init)

# Defaults by model size ("tiny": CPU-sized, learns in a few dozen steps; "sd": SD 1.x/2.x-sized fine-tuning).
DEFAULTS = {
    "tiny": dict(lr=1e-3, batch_size=8, warmup_steps=10, ema_decay=0.999, steps=2000, save_every=500,
                 sample_every=250, val_every=100, grad_clip=1.0),
    "sd": dict(lr=1e-5, batch_size=4, warmup_steps=500, ema_decay=0.9999, steps=20000, save_every=1000,
               sample_every=1000, val_every=500, grad_clip=1.0),
}
# The autoencoder stage as the LDM first-stage configs: Adam(0.5, 0.9), no warm-up or clipping, and for SD-sized
# presets lr = 4.5e-6 * global batch (base_learning_rate scaling). Tiny presets learn 64px images in minutes at 1e-3.
AE_DEFAULTS = {
    "tiny": dict(lr=1e-3, batch_size=8, warmup_steps=0, steps=2000, save_every=500, sample_every=250, val_every=100,
                 grad_clip=0.0, disc_start=250),
    "sd": dict(batch_size=4, warmup_steps=0, steps=100000, save_every=5000, sample_every=1000, val_every=1000,
               grad_clip=0.0),
}
AE_BASE_LR = 4.5e-6
SCRATCH_SD_LR = 1e-4  # from-scratch SD-sized runs (LDM's text-to-image rate) rather than fine-tuning's 1e-5
# Settings that fix the data order and noise: changing them on --resume breaks exact continuation.
ORDER_ARGS = ("data", "seed", "batch_size", "grad_accum", "resolution", "val_fraction", "random_crop", "flip")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=ldm.HelpFormatter)
    a = p.add_argument
    a("--data", help="image folder (recursive; same-named .txt captions or a metadata.jsonl); "
                     "with --resume, the run's own by default")
    a("--out", required=True, help="run folder: checkpoints, log.jsonl, loss.png, samples/, final.safetensors")
    a("--stage", choices=["unet", "autoencoder"], default="unet", help="train the U-Net, or the first-stage autoencoder")
    a("--ckpt", help="start from this SD/LDM checkpoint (.safetensors/.ckpt or diffusers folder): fine-tuning; "
                     "with --stage autoencoder any file vae.load_autoencoder reads")
    a("--config", choices=sorted(set(ldm.PRESETS) | set(vae_lib.PRESETS)),
      help="preset when training from scratch: a model (default tiny), or with --stage autoencoder a first stage "
           "(kl-f8, vq-f4, ...; default tiny-kl)")
    a("--vae", help="autoencoder file (default: --ckpt's, or for --config the preset's, randomly initialised)")
    a("--prediction-type", choices=["eps", "v"], help="override the model's prediction type")
    a("--resume", action="store_true", help="continue from the latest loadable checkpoint in --out")
    a("--train-text-encoder", action="store_true", help="train the text encoder too (else frozen)")
    a("--resolution", type=int, help="training image size (default: the model's)")
    a("--random-crop", action="store_true", help="random instead of centre crop after resizing the short side")
    a("--flip", action="store_true", help="random horizontal flips")
    a("--val-fraction", type=float, default=0.02, help="share of images held out for the validation loss")
    a("--batch-size", type=int, help="images per GPU per micro-batch (default: 8 tiny, 4 SD)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--steps", type=int, help="total optimizer steps, counted from 1 (default: 2000 tiny, 20000 SD)")
    a("--epochs", type=int, help="total epochs instead of --steps")
    a("--lr", type=float, help="peak learning rate (default: 1e-3 tiny, 1e-5 SD fine-tune, 1e-4 SD scratch; "
                               "autoencoders: 1e-3 tiny, else 4.5e-6 x global batch)")
    a("--warmup-steps", type=int, help="linear warm-up steps (default: 10 tiny, 500 SD)")
    a("--lr-schedule", choices=["constant", "cosine"], default="constant", help="after warm-up")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--grad-clip", type=float, help="max gradient norm, 0: off (default: 1 U-Net, 0 autoencoder)")
    a("--precision", choices=["bf16", "fp16", "fp32"], help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    a("--grad-checkpointing", action="store_true", help="recompute U-Net activations in backward (less memory)")
    a("--channels-last", action="store_true", help="U-Net weights and activations in NHWC layout (the layout "
      "tensor-core convolutions use; see bench.py)")
    a("--compile", action="store_true", help="torch.compile the U-Net: faster GPU steps after minutes of compiling")
    a("--ema-decay", type=float, help="EMA of the U-Net (0: off; default 0.999 tiny, 0.9999 SD)")
    a("--cache-latents", action="store_true", help="encode every image (and frozen-encoder caption) once")
    a("--uncond-prob", type=float, default=0.1, help="caption dropout probability (for classifier-free guidance)")
    a("--snr-gamma", type=float, help="min-SNR loss weighting with this gamma (e.g. 5)")
    a("--noise-offset", type=float, default=0.0, help="add this times per-channel constant noise")
    a("--seed", type=int, default=0, help="seed of data order, noise, augmentation and from-scratch weights")
    a("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="data loading processes per GPU")
    a("--device", help="cpu or cuda (default: cuda if available)")
    a("--save-every", type=int, help="checkpoint every N steps, 0: only at the end (default: 500 tiny, 1000 SD)")
    a("--keep", type=int, default=3, help="number of checkpoints kept (at least 1)")
    a("--sample-every", type=int, help="sample grid every N steps, 0: only at the end (default: 250 tiny, 1000 SD)")
    a("--sample-prompts", nargs="+", help="prompts of the sample grid (default: 4 captions from the data)")
    a("--sample-steps", type=int, default=25, help="DDIM steps of the sample grid")
    a("--sample-cfg", type=float, default=5.0, help="guidance scale of the sample grid")
    a("--val-every", type=int, help="validation loss every N steps (default: 100 tiny, 500 SD)")
    a("--export-weights", choices=["ema", "raw"], default="ema", help="U-Net weights in final.safetensors")
    a("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    a("--no-progress", action="store_true", help="no progress bar")
    # autoencoder stage
    a("--train-decoder-only", action="store_true", help="freeze the encoder (fine-tune a VAE's decoder, as vae-ft-mse)")
    a("--disc-start", type=int, help="steps before the discriminator trains and the GAN term counts "
                                     "(default: the preset's, 50001 KL, 0 VQ, 250 tiny)")
    a("--disc-weight", type=float, help="weight of the adaptive GAN term (default: 0.5 KL, 0.75 VQ)")
    a("--kl-weight", type=float, default=1e-6, help="weight of the KL term (KL autoencoders)")
    a("--l2-weight", type=float, default=0.0, help="weight of an extra squared-error term beside L1")
    a("--perceptual-weights", nargs="+", metavar="PATH",
      help="LPIPS weights: torchvision VGG16 + LPIPS lin files, or an LDM first-stage checkpoint (else LPIPS off)")
    a("--codebook-ema", action="store_true", help="VQ: move codes by an EMA of their assigned encoder outputs")
    a("--restart-dead-codes", type=int, metavar="N", help="VQ: move a code unused for N steps onto an encoder output")
    return p


def parse_args(argv: list[str] = None) -> tuple[argparse.Namespace, set[str]]:
    """(args, names of the flags given explicitly): on --resume those override the run's saved settings."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.data is None and not args.resume:
        parser.error("the following arguments are required: --data (unless --resume continues a run)")
    explicit = make_parser()
    for action in explicit._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return args, set(vars(explicit.parse_args(argv)))


# -----------------------------------------------------------------------------------------------------------------
# Loss, schedule, EMA


def step_generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints (e.g. (seed, step)); same numbers on every device and rank."""
    return torch.Generator("cpu").manual_seed(int(np.random.SeedSequence(list(seeds)).generate_state(1, np.uint64)[0]))


def diffusion_loss(model: ldm.LatentDiffusion, denoise, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   cond, snr_gamma: float = None) -> torch.Tensor:
    """Mean over the batch of ||target - denoise(z_t, t, cond)||^2 (mean over C, H, W), optionally min-SNR weighted:
    w = min(snr, gamma) / snr for eps, / (snr + 1) for v (Hang et al. 2023), snr = a / (1 - a)."""
    pred = denoise(model.add_noise(z0, noise, t), t, cond)
    target = model.training_target(z0, noise, t)
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma:
        a = model.alphas_cumprod[t].float()
        snr = a / (1 - a)
        per_sample = per_sample * snr.clamp(max=snr_gamma) / (snr + 1 if model.prediction_type == "v" else snr)
    return per_sample.mean()


def lr_at(step: int, lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over steps 1..warmup, then constant or cosine to 0 at `total`."""
    if step <= warmup:
        return lr * step / max(1, warmup)
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return lr


class Denoiser(nn.Module):
    """What DDP wraps: the U-Net, plus the text encoder when it is trained (so its gradients are synced too)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module = None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        context = self.text_encoder(cond) if self.text_encoder is not None else cond  # cond: tokens or context
        return self.unet(z_t, t, context)


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict:
    """Every global RNG state as tensors and plain types (loadable with torch.load(weights_only=True))."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=torch.tensor(mt, dtype=torch.int64), python_version=version, python_gauss=gauss,
                 numpy=torch.from_numpy(keys.astype(np.int64)), numpy_pos=int(pos),
                 numpy_gauss=[int(has_gauss), float(cached)], torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         *state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict):
    """torch.save to a temporary file, flush, fsync, rename: a crash at any point leaves older files intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(out: Path) -> list[Path]:
    """ckpt-<step>.pt files in `out`, newest step first."""
    found = [(int(p.stem.split("-")[1]), p) for p in out.glob("ckpt-*.pt") if p.stem.split("-")[1].isdigit()]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest_checkpoint(out: Path) -> tuple[dict, Path] | tuple[None, None]:
    """The newest checkpoint that loads; damaged ones are reported and passed over."""
    for path in list_checkpoints(out):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:
            print(f"warning: {path.name} does not load ({type(e).__name__}: {e}); trying an older one", file=sys.stderr)
    return None, None


def export_tensors(model: ldm.LatentDiffusion, unet_weights: dict[str, torch.Tensor] = None) -> dict:
    """Public single-file SD keys (ldm.LatentDiffusion.checkpoint_state_dict), with `unet_weights` (e.g. the EMA)
    in place of the U-Net's own."""
    sd = model.checkpoint_state_dict()
    for k, v in (unet_weights or {}).items():
        sd[ldm.PREFIXES["unet"] + k] = v
    return {k: v.detach() for k, v in sd.items()}


def export_config(model: ldm.LatentDiffusion) -> dict[str, str]:
    cfg = model.model_config()
    cfg["unet"]["use_checkpoint"] = False  # a training setting, not part of the model
    return {"ldm_config": json.dumps(cfg)}


# -----------------------------------------------------------------------------------------------------------------
# Progress: loss curve and sample grid


def draw_loss_curve(log_path: Path, png_path: Path, size=(800, 400)):
    """Training loss (light: per step, dark: smoothed) and validation loss (red dots) against step, drawn with PIL."""
    train, val = [], []
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        rec = json.loads(line)
        if rec.get("loss") is not None:
            train.append((rec["step"], rec["loss"]))
        if rec.get("val_loss") is not None:
            val.append((rec["step"], rec["val_loss"]))
    if not train:
        return
    W, H, pad = size[0], size[1], 50
    ys = [y for _, y in train + val]
    lo, hi = min(ys), float(np.percentile(ys, 99)) if len(ys) > 20 else max(ys)
    hi = hi if hi > lo else lo + 1e-6
    x_max = max(train[-1][0], 2)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)

    def xy(step, y):
        return (pad + (W - 2 * pad) * (step - 1) / (x_max - 1),
                H - pad - (H - 2 * pad) * (min(y, hi) - lo) / (hi - lo))

    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    smooth, s = [], train[0][1]
    for step, y in train:
        s = 0.9 * s + 0.1 * y
        smooth.append((step, s))
    if len(train) > 1:
        d.line([xy(*p) for p in train], fill=(170, 190, 230), width=1)
        d.line([xy(*p) for p in smooth], fill=(20, 60, 160), width=2)
    for p in val:
        x, y = xy(*p)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
    d.text((pad, 15), f"loss  (last smoothed {smooth[-1][1]:.4f}" + (f", val {val[-1][1]:.4f}" if val else "") + ")",
           fill="black")
    d.text((4, pad - 6), f"{hi:.3g}", fill="black")
    d.text((4, H - pad - 6), f"{lo:.3g}", fill="black")
    d.text((W - pad - 40, H - pad + 8), f"step {x_max}", fill="black")
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    im.save(tmp)
    os.replace(tmp, png_path)


def image_grid(images: list[Image.Image], cols: int = 4) -> Image.Image:
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# -----------------------------------------------------------------------------------------------------------------
# Training


class Trainer:
    """The machinery every stage shares: device and process group, resume, the data split and step order, the loop
    with logging, validation, sample grids, signals and non-finite-loss handling, checkpoints and export. A stage
    subclass supplies the pieces: build_model / fill_defaults / setup (trained modules, self.optimizers),
    forward_backward, after_step, stage_state / load_stage_state, export, validate and sample_grid.
    Under torchrun every rank builds one; only rank 0 logs, samples, validates and writes files."""

    def __init__(self, args: argparse.Namespace, explicit: set[str] = frozenset(), resumed: tuple = None):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
        if use_cuda:  # always an indexed device: torch.cuda.set_device refuses a bare "cuda"
            explicit_index = args.device and ":" in args.device and self.world == 1
            self.device = torch.device(args.device if explicit_index else f"cuda:{local_rank}")
        else:
            self.device = torch.device(args.device or "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 parts, e.g. the loss
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.out = Path(args.out)
        state = None
        if args.resume:
            state, path = resumed or load_latest_checkpoint(self.out)
            if state is None:
                if args.data is None:
                    raise SystemExit(f"error: no loadable checkpoint in {self.out} to resume; "
                                     "pass --data to start a run")
                self.print(f"no loadable checkpoint in {self.out}; starting a new run")
            else:
                args = self.merge_args(state["args"], args, explicit)
                self.print(f"resuming from {path} (step {state['step']})")
        elif list_checkpoints(self.out):
            raise SystemExit(f"error: {self.out} already holds checkpoints; pass --resume to continue that run or "
                             "choose another --out")
        if args.cache_latents and args.random_crop:
            raise SystemExit("error: --random-crop needs the images at every step; drop it or --cache-latents")
        items, self.has_captions = find_images(args.data)  # before building anything: a bad folder fails fast
        items, bad = check_images(items, progress=self.rank == 0 and not args.no_progress)
        if bad:
            self.print(f"skipped {len(bad)} unreadable image{'s' * (len(bad) > 1)}: "
                       + ", ".join(p.name for p in bad[:5]) + (", ..." if len(bad) > 5 else ""))
        if not items:
            raise SystemExit(f"error: --data {args.data}: none of the {len(bad)} images could be read")

        self.model = self.build_model(args)
        self.fill_defaults(args)
        if args.resolution % self.downsample_factor:
            raise SystemExit(f"error: --resolution must be a multiple of {self.downsample_factor}")
        if args.precision is None:
            args.precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.args = args

        # data: a seeded held-out split, then the step sampler over the rest
        self.items, self.val_items = split_items(items, args.val_fraction, args.seed)
        self.sampler = StepSampler(len(self.items), args.batch_size, self.world, self.rank, args.grad_accum,
                                   args.seed, 1, 0)
        self.global_batch = self.sampler.G
        self.total = args.epochs * self.sampler.steps_per_epoch if args.epochs else args.steps
        self.dataset = ImageDataset(self.items, args.resolution, args.seed, args.random_crop, args.flip)
        self.batches, self.val_cache = None, None

        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "fp16" else None
        self.model.to(self.device)
        self.setup(args)  # trained modules and self.optimizers (the first one's LR is logged)
        self.optimizer = self.optimizers[0]
        self.bad_steps, self.stop_requested, self.start = 0, False, 1
        self.print(self.describe() + f", {args.resolution}px, device {self.device}, world {self.world}, "
                                     f"precision {args.precision}")
        if state is not None:
            self.load_state(state)

    # --- setup -----------------------------------------------------------------------------------------------

    def print(self, *a):
        if self.rank == 0:
            tqdm.write(" ".join(map(str, a)))

    def merge_args(self, saved: dict, given: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
        """The run's saved settings, overridden by the flags given now (e.g. a larger --steps)."""
        args = argparse.Namespace(**{**vars(given), **saved})  # settings newer than the checkpoint: defaults
        for k in explicit:
            if k in ORDER_ARGS and saved.get(k) != getattr(given, k):
                self.print(f"warning: --{k.replace('_', '-')} changed on resume; the run no longer repeats exactly")
            setattr(args, k, getattr(given, k))
        if "steps" in explicit:
            args.epochs = None
        if "epochs" in explicit:
            args.steps = None
        args.resume = True
        return args

    def fill(self, args, defaults: dict):
        for k, v in defaults.items():
            if getattr(args, k, None) is None and not (k == "steps" and args.epochs):
                setattr(args, k, v)

    @property
    def no_bar(self) -> bool:
        return self.rank != 0 or self.args.no_progress

    def make_batches(self, start: int):
        """Iterator over this rank's micro-batches (index, image) from step `start` (None with cached latents)."""
        if self.args.cache_latents:
            return None
        sampler = StepSampler(len(self.items), self.args.batch_size, self.world, self.rank, self.args.grad_accum,
                              self.args.seed, start, self.total)
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.args.num_workers,
            pin_memory=self.device.type == "cuda", worker_init_fn=worker_init))

    def autocast(self, enabled: bool = True):
        if self.amp_dtype is None or not enabled:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def load_images(self, items: list[tuple[Path, str]]) -> tuple[torch.Tensor | None, list[str]]:
        """(images [N, 3, R, R] or None, their captions), centre-cropped; unreadable files are left out."""
        x, captions = [], []
        for path, caption in items:
            try:
                x.append(load_image(path, self.args.resolution))
                captions.append(caption)
            except Exception as e:
                print(f"warning: validation image {path} is unreadable, left out ({e})", file=sys.stderr)
        return (torch.stack(x) if x else None), captions

    # --- one step --------------------------------------------------------------------------------------------

    def optimizer_step(self, step: int, loss: float, logs: dict) -> tuple[bool, float]:
        """(applied, grad norm of the first optimizer's parameters). Each optimizer with gradients steps; a
        non-finite loss or gradient skips the update (GradScaler does this in fp16)."""
        lr = lr_at(step, self.args.lr, self.args.warmup_steps, self.total, self.args.lr_schedule)
        active = [o for o in self.optimizers if any(p.grad is not None for g in o.param_groups for p in g["params"])]
        norms = []
        for opt in active:
            for group in opt.param_groups:
                group["lr"] = lr
            if self.scaler:
                self.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            norms.append(torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip or float("inf")).item())
        applied = math.isfinite(loss) and all(math.isfinite(n) for n in norms)
        if self.scaler:
            scale = self.scaler.get_scale()
            for opt in active:
                self.scaler.step(opt)
            self.scaler.update()
            applied = applied and self.scaler.get_scale() >= scale  # the scale drops exactly when a step is skipped
        elif applied:
            for opt in active:
                opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if applied:
            self.after_step(step, logs)
        return applied, norms[0] if norms else 0.0

    def after_step(self, step: int, logs: dict):
        """Updates that follow an applied optimizer step (EMA weights, codebook); may add to the step's log."""

    # --- state -----------------------------------------------------------------------------------------------

    def state_dict(self, step: int) -> dict:
        args = self.args
        epoch, epoch_step = divmod(step, self.sampler.steps_per_epoch)
        return dict(step=step, epoch=epoch, epoch_step=epoch_step, images_seen=step * self.global_batch,
                    optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict() if self.scaler else {},
                    lr_schedule=dict(name=args.lr_schedule, lr=args.lr, warmup_steps=args.warmup_steps,
                                     total=self.total, last_lr=self.optimizer.param_groups[0]["lr"]),
                    rng=rng_state(), args=vars(args), world_size=self.world, **self.stage_state())

    def load_state(self, state: dict):
        self.load_stage_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if state["world_size"] != self.world:
            self.print(f"warning: resuming a {state['world_size']}-process run on {self.world}; the data order changes")
        self.start = state["step"] + 1

    def save(self, step: int):
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.out / f"ckpt-{step:07d}.pt", self.state_dict(step))
            for old in list_checkpoints(self.out)[max(1, self.args.keep):]:
                old.unlink(missing_ok=True)
            draw_loss_curve(self.out / "log.jsonl", self.out / "loss.png")
        if self.world > 1:
            dist.barrier()

    # --- progress --------------------------------------------------------------------------------------------

    def log(self, record: dict):
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self):
        """Drop log lines past the step training restarts from (they were written after the last checkpoint)."""
        path = self.out / "log.jsonl"
        if self.start == 1 or not path.exists():
            path.unlink(missing_ok=True)
            return
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < self.start]
        path.write_text("".join(ln + "\n" for ln in lines))

    # --- the loop --------------------------------------------------------------------------------------------

    def request_stop(self, signum, frame):
        if self.stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        self.print(f"\n{signal.Signals(signum).name}: finishing this step, saving, then exiting "
                   "(again to abort without saving)")

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (all ranks must leave the loop after the same step)."""
        if self.world == 1:
            return self.stop_requested
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def run(self):
        args, out = self.args, self.out
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            self.truncate_log()
        if self.start > self.total:
            self.print(f"already at step {self.start - 1} of {self.total}")
            return self.finish(self.start - 1)
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        self.batches = self.make_batches(self.start)
        bar = tqdm(total=self.total, initial=self.start - 1, disable=self.no_bar, dynamic_ncols=True, unit="step")
        try:
            tick = time.perf_counter()
            for step in range(self.start, self.total + 1):
                loss, logs = self.forward_backward(step)
                loss = loss.item()
                applied, norm = self.optimizer_step(step, loss, logs)
                now = time.perf_counter()
                ips, tick = self.global_batch / (now - tick), now
                # fp16: GradScaler skips overflowing steps while it calibrates; only a non-finite loss counts there
                bad = not math.isfinite(loss) or (not applied and self.scaler is None)
                self.bad_steps = self.bad_steps + 1 if bad else 0
                lr = self.optimizer.param_groups[0]["lr"]
                if self.rank == 0:
                    finite = {k: v for k, v in logs.items() if math.isfinite(v)}
                    self.log(dict(step=step, epoch=(step - 1) // self.sampler.steps_per_epoch,
                                  loss=loss if math.isfinite(loss) else None, lr=lr,
                                  grad_norm=norm if math.isfinite(norm) else None, images_per_s=round(ips, 3),
                                  applied=applied, **finite))
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}", refresh=False)
                    bar.update(1)
                if self.bad_steps >= args.max_bad_steps:
                    self.save(step)
                    raise SystemExit(f"error: the loss was not finite for {self.bad_steps} steps in a row (step "
                                     f"{step}); saved the last good weights. Lower --lr, or use --precision bf16/fp32")
                if args.val_every and step % args.val_every == 0 and self.rank == 0:
                    val = self.validate()
                    if val:
                        self.log(dict(step=step, **val))
                        bar.write(f"step {step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in val.items()))
                if args.sample_every and step % args.sample_every == 0 and self.rank == 0:
                    self.sample_grid(step)
                stop = self.stop_agreed()
                if stop or (args.save_every and step % args.save_every == 0) or step == self.total:
                    self.save(step)
                if stop and step < self.total:
                    self.print(f"stopped at step {step}; continue with --resume")
                    return
                tick += time.perf_counter() - now  # validation, samples and saves do not count against images/s
            self.finish(self.total)
        finally:
            bar.close()
            self.batches = None
            for s, h in handlers.items():
                signal.signal(s, h)

    def finish(self, step: int):
        """Export final.safetensors, a last sample grid and the loss curve."""
        if self.rank == 0:
            self.export(self.out / "final.safetensors")
            if not (self.args.sample_every and step % self.args.sample_every == 0):
                self.sample_grid(step)
            draw_loss_curve(self.out / "log.jsonl", self.out / "loss.png")
            self.print(f"wrote {self.out / 'final.safetensors'}")
        if self.world > 1:
            dist.barrier()


class UNetTrainer(Trainer):
    """The latent diffusion stage: the U-Net (and optionally the text encoder) learns to denoise VAE latents; AdamW,
    an EMA of the U-Net, optional cached latents and caption contexts."""

    def build_model(self, args) -> ldm.LatentDiffusion:
        if args.ckpt:  # fp32 master weights on the CPU first, then moved
            model = ldm.load_model(args.ckpt, device="cpu", dtype=torch.float32, prediction_type=args.prediction_type)
            if args.vae:  # e.g. a fine-tuned SD VAE in place of the checkpoint's own, with its latent scale
                model.vae = vae_lib.load_autoencoder(args.vae, device="cpu", dtype=torch.float32)
                model.scale_factor = model.vae.scale_factor
            return model
        args.config = args.config or "tiny"
        if args.config not in ldm.PRESETS:
            raise SystemExit(f"error: --config {args.config} is a first-stage preset; the U-Net stage takes "
                             f"{', '.join(sorted(ldm.PRESETS))} (or --stage autoencoder)")
        torch.manual_seed(args.seed)  # from-scratch weights are a function of the seed (resume rebuilds them)
        cfg = dict(ldm.PRESETS[args.config])
        vae = None
        if args.vae:  # e.g. one trained with --stage autoencoder: its estimated scale factor comes along
            vae = vae_lib.load_autoencoder(args.vae, device="cpu", dtype=torch.float32)
            unet_cfg = unet_lib.PRESETS[cfg["unet"]]
            cfg.update(vae=asdict(replace(vae.cfg, scale_factor=vae.scale_factor)), scale_factor=vae.scale_factor,
                       unet=asdict(replace(unet_cfg, in_channels=vae.cfg.embed_dim, out_channels=vae.cfg.embed_dim)))
        model = ldm.build_model(cfg, prediction_type=args.prediction_type)
        if vae is not None:
            model.vae = vae
        return model

    def fill_defaults(self, args):
        kind = "tiny" if self.model.unet.cfg.model_channels < 320 else "sd"
        scratch_sd = kind == "sd" and not args.ckpt
        self.fill(args, dict(DEFAULTS[kind], lr=SCRATCH_SD_LR if scratch_sd else DEFAULTS[kind]["lr"]))
        args.resolution = args.resolution or self.model.resolution
        self.downsample_factor = self.model.downsample_factor

    def setup(self, args):
        model, device = self.model, self.device
        if not self.has_captions:
            self.print("no captions found (.txt or metadata.jsonl): training unconditionally with empty prompts")
        self.latent_shape = (model.latent_channels, args.resolution // model.downsample_factor,
                             args.resolution // model.downsample_factor)
        self.prompts = args.sample_prompts or list(dict.fromkeys(
            self.items[i * len(self.items) // 4][1] for i in range(min(4, len(self.items)))))
        model.vae.eval().requires_grad_(False)
        model.text_encoder.train(args.train_text_encoder).requires_grad_(args.train_text_encoder)
        model.unet.train().requires_grad_(True)
        model.unet.cfg.use_checkpoint = args.grad_checkpointing
        if args.channels_last:
            model.unet.to(memory_format=torch.channels_last)
        if args.compile:
            model.unet.compile()  # in place: parameter names and the state dict stay the same
        self.denoiser = Denoiser(model.unet, model.text_encoder if args.train_text_encoder else None)
        self.ddp = self.denoiser
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.denoiser, device_ids=[device.index] if device.type == "cuda" else None)
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        self.optimizers = [torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                                             fused=device.type == "cuda")]
        self.ema = [p.detach().clone() for p in model.unet.parameters()] if args.ema_decay else None
        self.ema_updates = 0
        self.latent_cache, self.text_cache = None, None
        if args.cache_latents:
            self.build_caches()

    def describe(self) -> str:
        return (f"{sum(p.numel() for p in self.model.unet.parameters()) / 1e6:.1f}M U-Net parameters, "
                f"prediction {self.model.prediction_type}")

    @torch.no_grad()
    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] -> the VAE posterior's (mean, std), unscaled, float32 (std 0 for a VQ model: LDM
        trains on its pre-quantisation output). bf16 autocast only: the SD VAE overflows in fp16."""
        with self.autocast(self.amp_dtype == torch.bfloat16):
            d = self.model.vae.encode(x.to(self.device))
        if isinstance(d, vae_lib.DiagonalGaussianDistribution):
            return d.mean.float(), d.std.float()
        return d.float(), torch.zeros_like(d, dtype=torch.float32)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.model.text_encoder(self.model.tokenizer(captions).to(self.device)).float()

    def build_caches(self):
        """Posterior (mean, std) of every training image (and of its mirror image with --flip), and, while the text
        encoder is frozen, the context of every distinct caption. Kept on the CPU; each step indexes them."""
        self.print(f"caching latents of {len(self.items)} images")
        loader = torch.utils.data.DataLoader(ImageDataset(self.items, self.args.resolution, self.args.seed),
                                             sampler=[(i, 0) for i in range(len(self.items))],
                                             batch_size=self.args.batch_size, collate_fn=collate,
                                             num_workers=self.args.num_workers, worker_init_fn=worker_init)
        means, stds, sources = [], [], []
        for src, x in tqdm(loader, disable=self.no_bar, desc="caching latents", leave=False):
            sources.append(src)  # the image actually encoded (a file unreadable now is replaced by the next one)
            views = [x, x.flip(-1)] if self.args.flip else [x]
            moments = [self.encode_posterior(v) for v in views]
            means.append(torch.stack([m for m, _ in moments], 1).cpu())  # (B, views, C, h, w)
            stds.append(torch.stack([s for _, s in moments], 1).cpu())
        self.latent_cache, self.cache_source = (torch.cat(means), torch.cat(stds)), torch.cat(sources)
        if not self.args.train_text_encoder:
            captions = list(dict.fromkeys([""] + [c for _, c in self.items]))
            self.caption_id = {c: i for i, c in enumerate(captions)}
            self.text_cache = torch.cat([self.encode_text(captions[i:i + 256]).cpu()
                                         for i in range(0, len(captions), 256)])

    # --- one step --------------------------------------------------------------------------------------------

    def randomness(self, step: int, positions: range) -> dict[str, torch.Tensor]:
        """Everything random about the samples at `positions` of a step's global batch, each from a generator seeded
        by (seed, step, position): the same numbers whichever rank and micro-batch a sample lands on."""
        T, shape, draws = len(self.model.alphas_cumprod), self.latent_shape, []
        for p in positions:
            g = step_generator(self.args.seed, step, p)
            draws.append(dict(t=torch.randint(0, T, (1,), generator=g), noise=torch.randn(1, *shape, generator=g),
                              posterior=torch.randn(1, *shape, generator=g),
                              offset=torch.randn(1, shape[0], 1, 1, generator=g), drop=torch.rand(1, generator=g)))
        return {k: torch.cat([d[k] for d in draws]) for k in draws[0]}

    def micro_batch(self, step: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z0 scaled, noise, t, cond: context or tokens) of micro-batch m of `step` on this rank."""
        sl, dev = self.sampler.micro_slice(m, self.rank), self.device
        rnd = self.randomness(step, range(sl.start, sl.stop))
        if self.latent_cache is not None:
            idx, epoch = self.sampler.global_batch(step)
            idx = torch.as_tensor(idx[sl])
            flips = [int(np.random.default_rng([self.args.seed, epoch, int(i)]).random() < 0.5)
                     if self.args.flip else 0 for i in idx]  # the draw load_image makes for its flip
            view = torch.tensor(flips)
            mean, std = self.latent_cache[0][idx, view].to(dev), self.latent_cache[1][idx, view].to(dev)
            idx = self.cache_source[idx]
        else:
            if self.batches is None:
                self.batches = self.make_batches(step)
            idx, x = next(self.batches)
            mean, std = self.encode_posterior(x)
        z0 = (mean + std * rnd["posterior"].to(dev)) * self.model.scale_factor
        noise = (rnd["noise"] + self.args.noise_offset * rnd["offset"]).to(dev)
        keep = (rnd["drop"] >= self.args.uncond_prob).tolist()
        captions = [self.items[int(i)][1] if k else "" for i, k in zip(idx, keep)]
        if self.args.train_text_encoder:
            cond = self.model.tokenizer(captions).to(dev)
        elif self.text_cache is not None:
            cond = self.text_cache[torch.tensor([self.caption_id[c] for c in captions])].to(dev)
        else:
            cond = self.encode_text(captions)
        return z0, noise, rnd["t"].to(dev), cond

    def forward_backward(self, step: int) -> tuple[torch.Tensor, dict]:
        """Gradients of step `step` accumulated into .grad (synced over ranks); returns the global-batch loss."""
        accum, losses_ = self.args.grad_accum, []
        for m in range(accum):
            z0, noise, t, cond = self.micro_batch(step, m)
            sync = self.ddp.no_sync() if self.world > 1 and m < accum - 1 else nullcontext()
            with sync:
                with self.autocast():
                    loss = diffusion_loss(self.model, self.ddp, z0, noise, t, cond, self.args.snr_gamma)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses_.append(loss.detach().float())
        loss = torch.stack(losses_).mean()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return loss, {}

    def after_step(self, step: int, logs: dict):
        if self.ema is not None:
            n = self.ema_updates
            decay = min(self.args.ema_decay, (1 + n) / (10 + n))  # warm-up: early weights are averaged less
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.unet.parameters()], 1 - decay)
            self.ema_updates += 1

    # --- state -----------------------------------------------------------------------------------------------

    def stage_state(self) -> dict:
        model, args = self.model, self.args
        state = dict(unet=model.unet.state_dict(), ema_updates=self.ema_updates,
                     model_config=json.dumps(model.model_config()))
        if self.ema is not None:
            state["ema"] = dict(zip(model.unet.state_dict().keys(), self.ema))
        # parts with no file to reload them from (trained, or random from-scratch weights) travel in the checkpoint
        if args.train_text_encoder or not args.ckpt:
            state["text_encoder"] = model.text_encoder.state_dict()
        if not args.ckpt and not args.vae:
            state["vae"] = model.vae.state_dict()
        return state

    def load_stage_state(self, state: dict):
        model = self.model
        model.unet.load_state_dict(state["unet"])
        for name in ("text_encoder", "vae"):
            if name in state:
                getattr(model, name).load_state_dict(state[name])
        if self.ema is not None and "ema" in state:
            for e, v in zip(self.ema, state["ema"].values()):
                e.copy_(v)
        self.ema_updates = state["ema_updates"]

    @contextmanager
    def ema_weights(self):
        """Temporarily swap the EMA weights into the U-Net (tensor swap, so restoring is exact)."""
        params = list(self.model.unet.parameters())
        if self.ema is not None:
            for p, e in zip(params, self.ema):
                p.data, e.data = e.data, p.data
        try:
            yield
        finally:
            if self.ema is not None:
                for p, e in zip(params, self.ema):
                    p.data, e.data = e.data, p.data

    def export(self, path: Path):
        weights = None
        if self.ema is not None and self.args.export_weights == "ema":
            weights = dict(zip(self.model.unet.state_dict().keys(), self.ema))
        ldm.save_safetensors(path, export_tensors(self.model, weights), export_config(self.model))


    # --- progress --------------------------------------------------------------------------------------------

    @torch.no_grad()

    @torch.no_grad()
    def validate(self) -> dict | None:
        """Mean loss over the held-out images at fixed timesteps (spread over 0..999) and fixed noise."""
        model, bs = self.model, self.args.batch_size
        if self.val_cache is None and self.val_items:
            x, self.val_captions = self.load_images(self.val_items)
            if x is None:
                self.val_items = []
            else:
                z0 = torch.cat([self.encode_posterior(x[i:i + bs])[0] for i in range(0, len(x), bs)])
                g = step_generator(self.args.seed, 0)  # training steps count from 1: step 0's stream is free
                t = torch.linspace(0, len(model.alphas_cumprod) - 1, len(x)).round().long()
                self.val_cache = z0 * model.scale_factor, torch.randn(z0.shape, generator=g).to(self.device), t
        if not self.val_items:
            return None
        z0, noise, t = self.val_cache
        captions = self.val_captions
        model.eval()
        total = 0.0
        for i in range(0, len(z0), bs):
            ctx = self.encode_text(captions[i:i + bs])
            with self.autocast():
                loss = diffusion_loss(model, model.unet, z0[i:i + bs], noise[i:i + bs], t[i:i + bs].to(self.device),
                                      ctx)
            total += loss.item() * len(ctx)
        model.unet.train()
        model.text_encoder.train(self.args.train_text_encoder)
        return dict(val_loss=total / len(z0))

    @torch.no_grad()
    def sample_grid(self, step: int):
        model = self.model
        model.eval()
        with self.ema_weights(), self.autocast():
            images = ldm.sample(model, self.prompts, steps=self.args.sample_steps,
                                guidance_scale=self.args.sample_cfg, seed=self.args.seed,
                                height=self.args.resolution, width=self.args.resolution, progress=False,
                                cuda_graph=False)  # a kept graph would hold its activation memory while training
        model.unet.train()
        model.text_encoder.train(self.args.train_text_encoder)
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        image_grid(images).save(self.out / "samples" / f"step-{step:07d}.png")



class AutoencoderTrainer(Trainer):
    """The first stage: a KL or VQ autoencoder learns to reconstruct images under the LDM loss (L1 + LPIPS + KL or
    codebook term + a PatchGAN from --disc-start), with two Adam optimizers as the original: autoencoder (+ the
    learned logvar) and discriminator. final.safetensors is a standalone first-stage file (vae.load_autoencoder)
    carrying the estimated latent scale factor."""

    def build_model(self, args) -> vae_lib.AutoencoderKL | vae_lib.VQModel:
        if args.ckpt:
            return vae_lib.load_autoencoder(args.ckpt, device="cpu", dtype=torch.float32)
        args.config = args.config or "tiny-kl"
        if args.config not in vae_lib.PRESETS:
            raise SystemExit(f"error: --config {args.config} is not a first-stage preset; --stage autoencoder takes "
                             f"{', '.join(sorted(vae_lib.PRESETS))}")
        torch.manual_seed(args.seed)  # from-scratch weights are a function of the seed (resume rebuilds them)
        return vae_lib.build_autoencoder(vae_lib.PRESETS[args.config])

    def fill_defaults(self, args):
        cfg = self.model.cfg
        self.tiny = cfg.ch < 128
        self.loss_preset = losses.PRESETS["vq-f4" if cfg.is_vq else "kl-f8"]
        self.fill(args, dict(dict(disc_start=self.loss_preset.disc_start, disc_weight=self.loss_preset.disc_weight),
                             **AE_DEFAULTS["tiny" if self.tiny else "sd"]))
        if args.lr is None:
            args.lr = AE_BASE_LR * args.batch_size * args.grad_accum * self.world
        args.resolution = args.resolution or cfg.resolution
        self.downsample_factor = 2 ** (len(cfg.ch_mult) - 1)
        if args.cache_latents:
            raise SystemExit("error: --cache-latents is a U-Net stage setting")

    def setup(self, args):
        model, device = self.model, self.device
        torch.manual_seed(args.seed)  # the discriminator's initial weights
        lcfg = replace(self.loss_preset, disc_start=args.disc_start, disc_weight=args.disc_weight,
                       kl_weight=args.kl_weight, l2_weight=args.l2_weight, disc_ndf=32 if self.tiny else 64,
                       perceptual_weight=1.0 if args.perceptual_weights else 0.0)
        lpips = losses.LPIPS.from_pretrained(*args.perceptual_weights) if args.perceptual_weights else None
        if lpips is None:
            self.print("no --perceptual-weights: the perceptual (LPIPS) term is off; pass torchvision VGG16 + LPIPS "
                       "lin weights, or an LDM first-stage checkpoint")
        # without weights a width-1 LPIPS keeps the module layout at no cost (it is never evaluated)
        self.loss = losses.build_loss(lcfg, lpips and lpips.state_dict(), lpips.chns[0] if lpips else 1).to(device)
        if args.ckpt and not os.path.isdir(args.ckpt):  # an LDM first-stage checkpoint: its trained GAN state too
            trained = {k[len("loss."):]: v for k, v in ldm.read_checkpoint(args.ckpt)[0].items()
                       if k.startswith(("loss.discriminator.", "loss.logvar"))}
            own = {k: v for k, v in self.loss.state_dict().items() if not k.startswith("perceptual_loss.")}
            if trained and all(k in trained and trained[k].shape == v.shape for k, v in own.items()):
                self.loss.load_state_dict({**self.loss.state_dict(), **trained})
                self.print(f"discriminator{' and logvar' * ('logvar' in own)} from {args.ckpt}")
        model.train().requires_grad_(True)
        if args.train_decoder_only:
            model.requires_grad_(False)
            model.post_quant_conv.requires_grad_(True)
            model.decoder.requires_grad_(True)
        self.codebook = None
        if model.cfg.is_vq and (args.codebook_ema or args.restart_dead_codes):
            self.codebook = vae_lib.CodebookEMA(model.quantize, ema=args.codebook_ema,
                                                restart_after=args.restart_dead_codes)
        ae_params = [p for p in model.parameters() if p.requires_grad]
        ae_params += [self.loss.logvar] if hasattr(self.loss, "logvar") else []
        self.params = ae_params + list(self.loss.discriminator.parameters())
        self.optimizers = [torch.optim.Adam(ps, lr=args.lr, betas=(0.5, 0.9), fused=device.type == "cuda")
                           for ps in (ae_params, self.loss.discriminator.parameters())]
        self.grid_cache = None

    def describe(self) -> str:
        n_ae = sum(p.numel() for p in self.model.parameters()) / 1e6
        n_d = sum(p.numel() for p in self.loss.discriminator.parameters()) / 1e6
        kind = f"VQ, {self.model.cfg.n_embed} codes" if self.model.cfg.is_vq else "KL"
        return (f"{n_ae:.1f}M autoencoder parameters ({kind}, f{self.downsample_factor}), {n_d:.1f}M discriminator "
                f"from step {self.args.disc_start + 1}")

    # --- one step --------------------------------------------------------------------------------------------

    def reconstruct(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(reconstruction, parts the loss needs). KL: the posterior sampled with `noise` (its mode when None);
        VQ: the quantiser input z (B, C, h, w), its flat codes and the codebook loss."""
        model = self.model
        if not model.cfg.is_vq:
            posterior = model.encode(x)
            z = posterior.mode() if noise is None else posterior.mean + posterior.std * noise
            return model.decode(z), dict(posterior=posterior)
        z = model.encode(x)
        quant, qloss, (_, _, indices) = model.quantize(z)
        return model.decoder(model.post_quant_conv(quant)), dict(z=z, indices=indices, qloss=qloss)

    def forward_backward(self, step: int) -> tuple[torch.Tensor, dict]:
        """Both losses of step `step`: the autoencoder's (reconstruction, KL/codebook, GAN term once the
        discriminator is on) with the discriminator frozen, then the discriminator's on detached reconstructions.
        Gradients are averaged over ranks by hand (two models, two optimizers, an adaptive weight: no DDP wrapper)."""
        args, model, dev = self.args, self.model, self.device
        gstep = step - 1  # the reference's global_step counts from 0
        disc_on = gstep >= args.disc_start
        accum, totals, records = args.grad_accum, [], []
        self.codes = []
        if self.batches is None:
            self.batches = self.make_batches(step)
        for m in range(accum):
            _, x = next(self.batches)
            x = x.to(dev, non_blocking=True)
            sl = self.sampler.micro_slice(m, self.rank)
            h = args.resolution // self.downsample_factor
            noise = torch.cat([torch.randn(1, model.cfg.embed_dim, h, h, generator=step_generator(args.seed, step, p))
                               for p in range(sl.start, sl.stop)]).to(dev)  # per-sample: same on any rank split
            self.loss.discriminator.requires_grad_(False)
            with self.autocast():
                recon, parts = self.reconstruct(x, noise)
                if model.cfg.is_vq:
                    loss, log = self.loss(parts["qloss"], x, recon, 0, gstep, last_layer=model.get_last_layer())
                    self.codes.append((parts["z"].detach(), parts["indices"]))
                else:
                    loss, log = self.loss(x, recon, parts["posterior"], 0, gstep, last_layer=model.get_last_layer())
            self.loss.discriminator.requires_grad_(True)
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if disc_on:
                with self.autocast():
                    d_loss, d_log = self.loss.discriminator_loss(x, recon, gstep)
                log.update(d_log)
                (self.scaler.scale(d_loss / accum) if self.scaler else d_loss / accum).backward()
            totals.append(loss.detach().float())
            records.append({k: float(v) for k, v in log.items() if k != "total_loss"})
        loss = torch.stack(totals).mean()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        logs = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
        if model.cfg.is_vq:
            perplexity, used = vae_lib.codebook_stats(torch.cat([i for _, i in self.codes]), model.cfg.n_embed)
            logs.update(perplexity=perplexity.item(), codes_used=int(used))
        return loss, logs

    def after_step(self, step: int, logs: dict):
        if self.codebook is not None:
            z = torch.cat([z for z, _ in self.codes])
            stats = self.codebook.update(z, torch.cat([i for _, i in self.codes]), step_generator(self.args.seed, step))
            logs["codes_restarted"] = int(stats["codes_restarted"])
        self.codes = []

    # --- state -----------------------------------------------------------------------------------------------

    def stage_state(self) -> dict:
        state = dict(autoencoder=self.model.state_dict(), discriminator=self.loss.discriminator.state_dict(),
                     disc_optimizer=self.optimizers[1].state_dict(), vae_config=json.dumps(asdict(self.model.cfg)))
        if hasattr(self.loss, "logvar"):
            state["logvar"] = self.loss.logvar.detach()
        if self.codebook is not None:
            state["codebook_ema"] = self.codebook.state_dict()
        return state

    def load_stage_state(self, state: dict):
        self.model.load_state_dict(state["autoencoder"])
        self.loss.discriminator.load_state_dict(state["discriminator"])
        self.optimizers[1].load_state_dict(state["disc_optimizer"])
        if "logvar" in state:
            self.loss.logvar.data.copy_(state["logvar"])
        if self.codebook is not None and "codebook_ema" in state:
            self.codebook.load_state_dict(state["codebook_ema"])

    def export(self, path: Path):
        """Standalone first-stage file (our keys, no prefix) with the estimated scale factor and the config in its
        metadata, so vae.load_autoencoder rebuilds any size and sets .scale_factor."""
        n = min(512, len(self.items))
        loader = torch.utils.data.DataLoader(ImageDataset(self.items, self.args.resolution, self.args.seed),
                                             sampler=[(i, 0) for i in range(n)], batch_size=self.args.batch_size,
                                             collate_fn=collate, num_workers=self.args.num_workers,
                                             worker_init_fn=worker_init)
        scale = vae_lib.estimate_scale_factor(self.model, (x for _, x in loader), max_images=n)
        self.model.scale_factor = scale
        self.print(f"scale factor 1/std = {scale:.4f} (over {n} training images)")
        cfg = replace(self.model.cfg, scale_factor=scale)
        ldm.save_safetensors(path, {k: v.detach() for k, v in self.model.state_dict().items()},
                             {"scale_factor": repr(scale), "vae_config": json.dumps(asdict(cfg))})

    # --- progress --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct_eval(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstructions (posterior mode) in [-1, 1], in batches, eval mode."""
        self.model.eval()
        bs = self.args.batch_size
        with self.autocast():
            out = torch.cat([self.reconstruct(x[i:i + bs].to(self.device))[0].float() for i in range(0, len(x), bs)])
        self.model.train()
        return out.clamp(-1, 1)

    def validate(self) -> dict | None:
        """PSNR (dB), SSIM and L1 of the held-out images' reconstructions."""
        if self.val_cache is None and self.val_items:
            self.val_cache = self.load_images(self.val_items)[0]
            if self.val_cache is None:
                self.val_items = []
        if not self.val_items:
            return None
        x = self.val_cache.to(self.device)
        rec = self.reconstruct_eval(x)
        out = dict(val_psnr=losses.psnr(rec, x).item(), val_l1=(rec - x).abs().mean().item())
        if min(x.shape[-2:]) >= 11:  # SSIM's 11x11 window
            out["val_ssim"] = losses.ssim(rec / 2 + 0.5, x / 2 + 0.5).item()
        return out

    def sample_grid(self, step: int):
        """Inputs and reconstructions side by side: four fixed images (held-out ones first)."""
        if self.grid_cache is None:
            self.grid_cache = self.load_images((self.val_items + self.items)[:4])[0]
        x = self.grid_cache.to(self.device)
        pairs = [im for pair in zip(ldm.to_pil(x), ldm.to_pil(self.reconstruct_eval(x))) for im in pair]
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        image_grid(pairs).save(self.out / "samples" / f"step-{step:07d}.png")


def make_trainer(args: argparse.Namespace, explicit: set[str] = frozenset()) -> Trainer:
    """The stage's trainer; on --resume the stage is the checkpoint's unless --stage is given."""
    resumed = load_latest_checkpoint(Path(args.out)) if args.resume else None
    stage = args.stage
    if resumed and resumed[0] is not None and "stage" not in explicit:
        stage = resumed[0]["args"].get("stage", "unet")
    return (AutoencoderTrainer if stage == "autoencoder" else UNetTrainer)(args, explicit, resumed)


def main(argv: list[str] = None):
    args, explicit = parse_args(argv)
    trainer = make_trainer(args, explicit)
    try:
        trainer.run()
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
