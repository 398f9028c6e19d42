"""Train or fine-tune the first stage of a latent diffusion model: a KL or VQ autoencoder learns to reconstruct
images under the LDM loss (L1 + LPIPS + KL or codebook term + a PatchGAN from --disc-start), with two Adam
optimizers as the original: the autoencoder (+ the learned logvar) and the discriminator.

    python train_vae.py --data my_images/ --config kl-f8 --out runs/vae       # or kl-f4, vq-f4, tiny-kl, tiny-vq ...
    python train_vae.py --out runs/vae --resume                                # after a crash or Ctrl-C
    python train.py --data my_images/ --vae runs/vae/final.safetensors --config tiny --out runs/ldm

final.safetensors is a standalone first-stage file (vae.load_autoencoder) that carries its config and the latent
scale factor 1 / std of its latents, estimated on the training images, for the U-Net stage. Resume, determinism,
DDP and signals: see runs.py.
"""

import argparse
import sys

from cli import STOPPED_TRAINING, HelpFormatter, Parser, UserError, add_run_flags, parse_run_args, run

# The LDM first-stage configs: Adam(0.5, 0.9), no warm-up or clipping, and for SD-sized presets lr = 4.5e-6 * global
# batch (base_learning_rate scaling). Tiny presets learn 64px images in minutes at 1e-3.
DEFAULTS = {
    "tiny": dict(lr=1e-3, batch_size=8, warmup_steps=0, steps=2000, save_every=500, sample_every=250, val_every=100,
                 grad_clip=0.0, disc_start=250),
    "sd": dict(batch_size=4, warmup_steps=0, steps=100000, save_every=5000, sample_every=1000, val_every=1000,
               grad_clip=0.0),
}
BASE_LR = 4.5e-6
# vae.PRESETS, named here so that --help needs no torch
CONFIGS = ("tiny-kl", "tiny-vq", "kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f16",
           "sd", "sdxl")


def make_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_run_flags(p, dict(resolution="the preset's", batch_size="8 tiny, 4 otherwise",
                          steps="2000 tiny, 100000 otherwise", lr="1e-3 tiny, else 4.5e-6 x global batch",
                          warmup_steps="0", grad_clip="0", precision="bf16 on a GPU, fp32 on the CPU",
                          save_every="500 tiny, 5000 otherwise", sample_every="250 tiny, 1000 otherwise",
                          val_every="100 tiny, 1000 otherwise"))
    a = p.add_argument
    a("--config", choices=CONFIGS, help="first-stage preset when training from scratch (default: tiny-kl)")
    a("--train-decoder-only", action="store_true", help="freeze the encoder (fine-tune a VAE's decoder, as vae-ft-mse)")
    a("--disc-start", type=int, help="steps before the discriminator trains and the GAN term counts "
                                     "(default: 50001 KL, 0 VQ, 250 tiny)")
    a("--disc-weight", type=float, help="weight of the adaptive GAN term (default: 0.5 KL, 0.75 VQ)")
    a("--kl-weight", type=float, default=1e-6, help="weight of the KL term (KL autoencoders)")
    a("--l2-weight", type=float, default=0.0, help="weight of an extra squared-error term beside L1")
    a("--perceptual-weights", nargs="+", metavar="PATH",
      help="LPIPS weights: torchvision VGG16 + LPIPS lin files, or an LDM first-stage checkpoint (else LPIPS off)")
    a("--codebook-ema", action="store_true", help="VQ: move codes by an EMA of their assigned encoder outputs")
    a("--restart-dead-codes", type=int, metavar="N", help="VQ: move a code unused for N steps onto an encoder output")
    return p


if __name__ == "__main__":
    parse_run_args(make_parser)  # --help and usage errors answer at once, before torch's seconds-long import

import json
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn

import checkpoint
import data
import ldm
import losses
import runs
import vae as vae_lib
from checkpoint import CheckpointError

# -----------------------------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Training:
    """What set-up builds and the loop reads: the run, the autoencoder, its loss (LPIPS, discriminator, logvar) and
    the two optimizers."""
    run: runs.Run
    model: vae_lib.AutoencoderKL | vae_lib.VQModel
    loss: nn.Module
    optimizers: list[torch.optim.Optimizer]  # [autoencoder (+ logvar), discriminator]
    codebook: vae_lib.CodebookEMA | None
    codes: list = None  # this step's (quantiser input, code indices), for the codebook update
    grid_cache: torch.Tensor = None
    val_cache: torch.Tensor = None

    @property
    def args(self) -> argparse.Namespace:
        return self.run.args

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.model.cfg.ch_mult) - 1)


def build_model(args) -> vae_lib.AutoencoderKL | vae_lib.VQModel:
    if args.ckpt:
        return vae_lib.load_autoencoder(args.ckpt, device="cpu", dtype=torch.float32)
    torch.manual_seed(args.seed)  # from-scratch weights are a function of the seed (resume rebuilds them)
    return vae_lib.build_autoencoder(vae_lib.PRESETS[args.config or "tiny-kl"])


def build_loss(run: runs.Run, model) -> nn.Module:
    """The LDM loss module of the preset's kind; with a first-stage --ckpt, that file's trained discriminator and
    logvar too."""
    args, tiny = run.args, model.cfg.ch < 128
    torch.manual_seed(args.seed)  # the discriminator's initial weights
    lcfg = replace(losses.PRESETS["vq-f4" if model.cfg.is_vq else "kl-f8"], disc_start=args.disc_start,
                   disc_weight=args.disc_weight, kl_weight=args.kl_weight, l2_weight=args.l2_weight,
                   disc_ndf=32 if tiny else 64, perceptual_weight=1.0 if args.perceptual_weights else 0.0)
    lpips = losses.LPIPS.from_pretrained(*args.perceptual_weights) if args.perceptual_weights else None
    if lpips is None:
        run.print("no --perceptual-weights: the perceptual (LPIPS) term is off; pass torchvision VGG16 + LPIPS lin "
                  "weights, or an LDM first-stage checkpoint")
    # without weights a width-1 LPIPS keeps the module layout at no cost (it is never evaluated)
    loss = losses.build_loss(lcfg, lpips and lpips.state_dict(), lpips.chns[0] if lpips else 1)
    if args.ckpt and not os.path.isdir(args.ckpt):  # an LDM first-stage checkpoint: its trained GAN state too
        trained = {k[len("loss."):]: v for k, v in checkpoint.read_checkpoint(args.ckpt)[0].items()
                   if k.startswith(("loss.discriminator.", "loss.logvar"))}
        own = {k: v for k, v in loss.state_dict().items() if not k.startswith("perceptual_loss.")}
        if trained and all(k in trained and trained[k].shape == v.shape for k, v in own.items()):
            loss.load_state_dict({**loss.state_dict(), **trained})
            run.print(f"discriminator{' and logvar' * ('logvar' in own)} from {args.ckpt}")
    return loss.to(run.device)


def setup(args: argparse.Namespace, explicit: set[str] = frozenset()) -> Training:
    run = runs.Run(args, explicit)
    if run.state is not None and "autoencoder" not in run.state:
        raise UserError(f"{run.out} holds a U-Net run; continue it with train.py --out {run.out} --resume")
    args = run.args
    model = build_model(args)
    preset = losses.PRESETS["vq-f4" if model.cfg.is_vq else "kl-f8"]
    run.fill({"disc_start": preset.disc_start, "disc_weight": preset.disc_weight,
              **DEFAULTS["tiny" if model.cfg.ch < 128 else "sd"]})
    if args.lr is None:
        args.lr = BASE_LR * args.batch_size * args.grad_accum * run.world
    args.resolution = args.resolution or model.cfg.resolution
    run.begin(2 ** (len(model.cfg.ch_mult) - 1))
    model.to(run.device).train().requires_grad_(True)
    loss = build_loss(run, model)
    if args.train_decoder_only:
        model.requires_grad_(False)
        model.post_quant_conv.requires_grad_(True)
        model.decoder.requires_grad_(True)
    codebook = None
    if model.cfg.is_vq and (args.codebook_ema or args.restart_dead_codes):
        codebook = vae_lib.CodebookEMA(model.quantize, ema=args.codebook_ema, restart_after=args.restart_dead_codes)
    ae_params = [p for p in model.parameters() if p.requires_grad] + ([loss.logvar] if hasattr(loss, "logvar") else [])
    optimizers = [torch.optim.Adam(ps, lr=args.lr, betas=(0.5, 0.9), fused=run.device.type == "cuda")
                  for ps in (ae_params, loss.discriminator.parameters())]
    t = Training(run, model, loss, optimizers, codebook)
    n_ae, n_d = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (model, loss.discriminator))
    kind = f"VQ, {model.cfg.n_embed} codes" if model.cfg.is_vq else "KL"
    run.announce(f"{n_ae:.1f}M autoencoder parameters ({kind}, f{t.downsample_factor}), {n_d:.1f}M discriminator "
                 f"from step {args.disc_start + 1}")
    if run.state is not None:
        load_state(t, run.state)
    return t


# -----------------------------------------------------------------------------------------------------------------
# One step


def reconstruct(t: Training, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(reconstruction, parts the loss needs). KL: the posterior sampled with `noise` (its mode when None); VQ: the
    quantiser input z (B, C, h, w), its flat codes and the codebook loss."""
    model = t.model
    if not model.cfg.is_vq:
        posterior = model.encode(x)
        z = posterior.mode() if noise is None else posterior.mean + posterior.std * noise
        return model.decode(z), dict(posterior=posterior)
    z = model.encode(x)
    quant, qloss, (_, _, indices) = model.quantize(z)
    return model.decoder(model.post_quant_conv(quant)), dict(z=z, indices=indices, qloss=qloss)


def forward_backward(t: Training, step: int) -> tuple[torch.Tensor, dict]:
    """Both losses of step `step`: the autoencoder's (reconstruction, KL/codebook, GAN term once the discriminator is
    on) with the discriminator frozen, then the discriminator's on detached reconstructions. Gradients are averaged
    over ranks by hand (two models, two optimizers, an adaptive weight: no DDP wrapper)."""
    run, args, model = t.run, t.args, t.model
    gstep = step - 1  # the reference's global_step counts from 0
    totals, records, t.codes = [], [], []
    for m in range(args.grad_accum):
        x = run.next_batch(step)[1].to(run.device, non_blocking=True)
        sl, h = run.sampler.micro_slice(m, run.rank), args.resolution // t.downsample_factor
        noise = torch.cat([torch.randn(1, model.cfg.embed_dim, h, h, generator=runs.step_generator(args.seed, step, p))
                           for p in range(sl.start, sl.stop)]).to(run.device)  # per-sample: same on any rank split
        t.loss.discriminator.requires_grad_(False)
        with run.autocast():
            recon, parts = reconstruct(t, x, noise)
            if model.cfg.is_vq:
                loss, log = t.loss(parts["qloss"], x, recon, 0, gstep, last_layer=model.get_last_layer())
                t.codes.append((parts["z"].detach(), parts["indices"]))
            else:
                loss, log = t.loss(x, recon, parts["posterior"], 0, gstep, last_layer=model.get_last_layer())
        t.loss.discriminator.requires_grad_(True)
        run.backward(loss / args.grad_accum)
        if gstep >= args.disc_start:
            with run.autocast():
                d_loss, d_log = t.loss.discriminator_loss(x, recon, gstep)
            log.update(d_log)
            run.backward(d_loss / args.grad_accum)
        totals.append(loss.detach().float())
        records.append({k: float(v) for k, v in log.items() if k != "total_loss"})
    run.average_gradients([p for o in t.optimizers for g in o.param_groups for p in g["params"]])
    logs = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
    if model.cfg.is_vq:
        perplexity, used = vae_lib.codebook_stats(torch.cat([i for _, i in t.codes]), model.cfg.n_embed)
        logs.update(perplexity=perplexity.item(), codes_used=int(used))
    return run.mean_over_ranks(totals), logs


def update_codebook(t: Training, step: int) -> int:
    """The codebook EMA / dead-code restart after an applied step; returns the number of codes restarted."""
    z, indices = torch.cat([z for z, _ in t.codes]), torch.cat([i for _, i in t.codes])
    return int(t.codebook.update(z, indices, runs.step_generator(t.args.seed, step))["codes_restarted"])


# -----------------------------------------------------------------------------------------------------------------
# State: checkpoints and export


def checkpoint_state(t: Training, step: int) -> dict:
    state = dict(t.run.state_dict(step, t.optimizers[0]), autoencoder=t.model.state_dict(),
                 discriminator=t.loss.discriminator.state_dict(), disc_optimizer=t.optimizers[1].state_dict(),
                 vae_config=json.dumps(asdict(t.model.cfg)))
    if hasattr(t.loss, "logvar"):
        state["logvar"] = t.loss.logvar.detach()
    if t.codebook is not None:
        state["codebook_ema"] = t.codebook.state_dict()
    return state


def load_state(t: Training, state: dict):
    t.model.load_state_dict(state["autoencoder"])
    t.loss.discriminator.load_state_dict(state["discriminator"])
    t.optimizers[1].load_state_dict(state["disc_optimizer"])
    if "logvar" in state:
        t.loss.logvar.data.copy_(state["logvar"])
    if t.codebook is not None and "codebook_ema" in state:
        t.codebook.load_state_dict(state["codebook_ema"])
    t.run.restore(t.optimizers[0])


def export(t: Training, path):
    """Standalone first-stage file (our keys, no prefix) with the estimated scale factor and the config in its
    metadata, so vae.load_autoencoder rebuilds any size and sets .scale_factor."""
    run, n = t.run, min(512, len(t.run.items))
    loader = torch.utils.data.DataLoader(data.ImageDataset(run.items, t.args.resolution, t.args.seed),
                                         sampler=[(i, 0) for i in range(n)], batch_size=t.args.batch_size,
                                         collate_fn=data.collate, num_workers=t.args.num_workers,
                                         worker_init_fn=data.worker_init)
    t.model.scale_factor = vae_lib.estimate_scale_factor(t.model, (x for _, x, _ in loader), max_images=n)
    run.print(f"scale factor 1/std = {t.model.scale_factor:.4f} (over {n} training images)")
    checkpoint.save_safetensors(path, {k: v.detach() for k, v in t.model.state_dict().items()},
                                {"scale_factor": repr(t.model.scale_factor),
                                 "vae_config": json.dumps(asdict(t.model.cfg))})


# -----------------------------------------------------------------------------------------------------------------
# Progress: held-out reconstructions


@torch.no_grad()
def reconstruct_eval(t: Training, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstructions (posterior mode) in [-1, 1], in batches, eval mode."""
    t.model.eval()
    bs = t.args.batch_size
    with t.run.autocast():
        out = torch.cat([reconstruct(t, x[i:i + bs].to(t.run.device))[0].float() for i in range(0, len(x), bs)])
    t.model.train()
    return out.clamp(-1, 1)


def validate(t: Training) -> dict | None:
    """PSNR (dB), SSIM and L1 of the held-out images' reconstructions."""
    run = t.run
    if t.val_cache is None and run.val_items:
        t.val_cache = data.load_images(run.val_items, t.args.resolution)[0]
        if t.val_cache is None:
            run.val_items = []
    if not run.val_items:
        return None
    x = t.val_cache.to(run.device)
    rec = reconstruct_eval(t, x)
    out = dict(val_psnr=losses.psnr(rec, x).item(), val_l1=(rec - x).abs().mean().item())
    if min(x.shape[-2:]) >= 11:  # SSIM's 11x11 window
        out["val_ssim"] = losses.ssim(rec / 2 + 0.5, x / 2 + 0.5).item()
    return out


def sample_grid(t: Training, step: int):
    """OUT/samples/step-N.png: four fixed images (held-out ones first) and their reconstructions side by side."""
    run = t.run
    if t.grid_cache is None:
        t.grid_cache = data.load_images((run.val_items + run.items)[:4], t.args.resolution)[0]
    x = t.grid_cache.to(run.device)
    pairs = [im for pair in zip(ldm.to_pil(x), ldm.to_pil(reconstruct_eval(t, x))) for im in pair]
    run.save_grid(ldm.image_grid(pairs), step)


# -----------------------------------------------------------------------------------------------------------------
# The loop


def train(t: Training):
    """For each step: batch -> both losses -> optimizer steps -> codebook -> log / save / validate / sample."""
    run, args = t.run, t.args
    with run:  # leaves the process group however the run ends
        for step in run.steps():
            loss, logs = forward_backward(t, step)
            applied, norm = run.optimizer_step(t.optimizers, step, loss)
            if t.codebook is not None and applied:
                logs["codes_restarted"] = update_codebook(t, step)
            run.log_step(step, loss, norm, applied, t.optimizers[0].param_groups[0]["lr"], logs)
            if run.checkpoint_due(step):
                run.save(step, checkpoint_state(t, step))
            if run.due(step, args.val_every):
                run.log_validation(step, validate(t))
            if run.due(step, args.sample_every):
                sample_grid(t, step)
        if run.completed and run.rank == 0:  # the final file, and a last grid when the last step made none
            export(t, run.out / "final.safetensors")
            if not run.due(run.total, args.sample_every):
                sample_grid(t, run.total)
        if run.completed:
            run.finish(run.out / "final.safetensors")


def main(argv: list[str] = None):
    """The script, for a list of flags (as the command line gives them)."""
    train(setup(*parse_run_args(make_parser, argv)))


if __name__ == "__main__":
    sys.exit(run(main, errors=(CheckpointError,), interrupted=STOPPED_TRAINING,
                 out_of_memory="try a smaller --batch-size (with --grad-accum) "
                 "or --precision bf16"))
