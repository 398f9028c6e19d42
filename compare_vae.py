"""KL-VAE vs VQ-VAE, measured: train both first stages with the same compression and budget on the same data, then a
small U-Net on each one's latents, and write a report (markdown table + PNG).

    python compare_vae.py --data ../shared/data/noto_128 --out runs/compare

Each stage is an ordinary `train_vae.py` or `train.py` run (so every run folder can be resumed, inspected and
sampled); this script only chooses matching settings, evaluates the results on the same held-out split and writes
OUT/report.md and OUT/report.png.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from cli import HelpFormatter, Parser


def make_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="image folder, as train.py reads it")
    p.add_argument("--out", required=True, help="folder for the four runs and the report")
    p.add_argument("--resolution", type=int, default=64, help="image size")
    p.add_argument("--kl-config", default="tiny-kl", help="KL first-stage preset")
    p.add_argument("--vq-config", default="tiny-vq", help="VQ first-stage preset (same downsampling factor)")
    p.add_argument("--ae-steps", type=int, default=1500, help="autoencoder training steps, each stage")
    p.add_argument("--unet-steps", type=int, default=1500, help="U-Net training steps on each stage's latents")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of every run")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share, the same split for every run")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--eval-images", type=int, default=256, help="held-out images used for PSNR/SSIM")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the U-Net runs' sample grids")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further flags for every run (those "
                   "train_vae.py and train.py share)")
    return p


if __name__ == "__main__":
    make_parser().parse_args()  # --help and usage errors answer at once

import numpy as np
import torch
from PIL import Image

import data
import losses
import vae as vae_lib

HERE = Path(__file__).resolve().parent


def run_train(script: str, argv: list[str]):
    print(f"$ python {script} " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, str(HERE / script), *argv], check=True)


def last_value(log: Path, key: str) -> float | None:
    values = [rec[key] for rec in map(json.loads, log.read_text().splitlines()) if key in rec]
    return values[-1] if values else None


@torch.no_grad()
def evaluate(model, images: torch.Tensor, batch_size: int = 64) -> dict:
    """PSNR / SSIM of reconstructions, latent statistics and, for VQ, codebook usage, over `images` in [-1, 1]."""
    recons, latents, indices = [], [], []
    for x in images.split(batch_size):
        if isinstance(model, vae_lib.VQModel):
            h = model.encode(x)
            _, _, (_, _, idx) = model.quantize(h)
            recons.append(model.decode(h))
            latents.append(h)
            indices.append(idx.reshape(-1))
        else:
            posterior = model.encode(x)
            recons.append(model.decode(posterior.mode()))
            latents.append(posterior.sample(torch.Generator().manual_seed(0)))
    recon = torch.cat(recons).clamp(-1, 1)
    z = torch.cat(latents)
    out = {
        "psnr": losses.psnr(recon, images).item(),
        "ssim": losses.ssim((recon + 1) / 2, (images + 1) / 2).item(),
        "latent_shape": tuple(z.shape[1:]),
        "latent_std": z.std().item(),
        "recon": recon,
    }
    if indices:
        perplexity, used = vae_lib.codebook_stats(torch.cat(indices), model.cfg.n_embed)
        out.update(codebook_used=int(used), perplexity=float(perplexity))
    return out


def compression(cfg: vae_lib.AutoencoderConfig, resolution: int) -> str:
    f = 2 ** (len(cfg.ch_mult) - 1)
    h = resolution // f
    values = 3 * resolution ** 2 / (cfg.embed_dim * h * h)
    if cfg.is_vq:  # a code index per latent position: log2(K) bits against 24 bits per pixel
        bits = 24 * resolution ** 2 / (h * h * math.log2(cfg.n_embed))
        return f"f{f}, {values:.0f}x values, {bits:.0f}x bits"
    return f"f{f}, {values:.0f}x values"


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))


def train_both(args, out: Path, images: torch.Tensor) -> tuple[dict, dict]:
    """Each first stage, then a U-Net on its latents (runs already finished are kept), evaluated on `images`:
    ({kind: report row}, {kind: reconstructions})."""
    common = ["--data", args.data, "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
              "--val-fraction", str(args.val_fraction), "--seed", str(args.seed), "--no-progress", *args.extra]
    rows, recons = {}, {}
    for kind, config in (("KL", args.kl_config), ("VQ", args.vq_config)):
        ae_dir, ldm_dir = out / f"{kind.lower()}-vae", out / f"{kind.lower()}-ldm"
        if not (ae_dir / "final.safetensors").exists():
            run_train("train_vae.py", ["--config", config, "--steps", str(args.ae_steps), "--out", str(ae_dir),
                                       *common])
        if not (ldm_dir / "final.safetensors").exists():
            val_every = 100 if args.unet_steps % 100 == 0 else args.unet_steps  # a validation at the last step
            run_train("train.py", ["--config", "tiny", "--vae", str(ae_dir / "final.safetensors"), "--cache-latents",
                                   "--steps", str(args.unet_steps), "--val-every", str(val_every),
                                   "--sample-steps", str(args.sample_steps), "--out", str(ldm_dir), *common])
        model = vae_lib.load_autoencoder(ae_dir / "final.safetensors").eval()
        result = evaluate(model, images)
        recons[kind] = result.pop("recon")
        result.update(config=config, compression=compression(model.cfg, args.resolution),
                      scale_factor=model.scale_factor, unet_val_loss=last_value(ldm_dir / "log.jsonl", "val_loss"),
                      params=sum(p.numel() for p in model.parameters()))
        rows[kind] = result
        print(kind, {k: v for k, v in result.items()})
    return rows, recons


def markdown_table(rows: dict, unet_steps: int) -> str:
    lines = [f"| | {' | '.join(rows)} |", "|---|" + "---|" * len(rows)]
    fields = [("preset", "config"), ("parameters", "params"), ("compression", "compression"),
              ("latent shape", "latent_shape"), ("held-out PSNR (dB)", "psnr"), ("held-out SSIM", "ssim"),
              ("latent std", "latent_std"), ("scale factor (1/std)", "scale_factor"),
              ("codebook codes used", "codebook_used"), ("codebook perplexity", "perplexity"),
              (f"U-Net validation loss after {unet_steps} steps", "unet_val_loss")]
    for label, key in fields:
        cells = []
        for r in rows.values():
            v = r.get(key)
            cells.append("-" if v is None else f"{v:,.4g}" if isinstance(v, float) else
                         f"{v:,}" if isinstance(v, int) else str(v))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv=None):
    args = make_parser().parse_args(argv)
    out = Path(args.out)
    items, _ = data.find_images(args.data)
    _, val_items = data.split_items(items, args.val_fraction, args.seed)
    images = torch.stack([data.load_image(path, args.resolution) for path, _ in val_items[:args.eval_images]])
    rows, recons = train_both(args, out, images)
    table = markdown_table(rows, args.unet_steps)
    n = min(8, len(images))
    grid = Image.new("RGB", (n * args.resolution, 3 * args.resolution), "white")
    for i in range(n):
        for row, x in enumerate((images[i], recons["KL"][i], recons["VQ"][i])):
            grid.paste(to_pil(x), (i * args.resolution, row * args.resolution))
    grid.save(out / "report.png")
    (out / "report.md").write_text(
        f"# KL-VAE vs VQ-VAE on {args.data} at {args.resolution}px\n\n{args.ae_steps} autoencoder steps and "
        f"{args.unet_steps} U-Net steps each, batch {args.batch_size}, seed {args.seed}; metrics on "
        f"{len(images)} held-out images.\n\n{table}\n\n![held-out images, KL and VQ reconstructions](report.png)\n\n"
        "Rows of the picture: held-out inputs, KL reconstructions, VQ reconstructions.\n")
    print(table)
    print(f"wrote {out / 'report.md'} and {out / 'report.png'}")


if __name__ == "__main__":
    main()
