"""Training throughput: images/s and peak memory of train.py's U-Net step (forward, backward, gradient clipping,
AdamW, EMA update) on cached latents, i.e. random latents and text contexts of the right shapes.

    python bench_train.py                     # tiny preset on the CPU (64px, batch 8, fp32)
    python bench_train.py --device cuda       # SD 1.5-size U-Net at 512px (64x64 latents), batch 16, bf16,
                                              # fused AdamW, without and with gradient checkpointing
"""

import argparse
import resource
import time

import torch

import ldm
import train


def bench(config: str, device: torch.device, batch: int, resolution: int, precision: str, checkpointing: bool,
          warmup: int, steps: int) -> tuple[float, float]:
    """(images/s, peak memory in GiB: allocated on CUDA, process RSS on the CPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = ldm.build_model(config)
    model.to(device)  # the schedule buffer is made on the CPU whatever the default device
    model.vae.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    unet = model.unet.train()
    unet.cfg.use_checkpoint = checkpointing
    f, C = model.downsample_factor, model.latent_channels
    z0 = torch.randn(batch, C, resolution // f, resolution // f, device=device)  # (B, 4, 64, 64) for SD at 512px
    context = torch.randn(batch, 77, unet.cfg.context_dim, device=device)
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
    ema = [p.detach().clone() for p in params]
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        t = torch.randint(0, len(model.alphas_cumprod), (batch,), device=device)
        noise = torch.randn_like(z0)
        with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
            loss = train.diffusion_loss(model, unet, z0, noise, t, context)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-4)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    sync()
    ips = batch * steps / (time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return ips, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train")
    p.add_argument("--config", choices=sorted(ldm.PRESETS), help="model preset (default: tiny on cpu, sd1 on cuda)")
    p.add_argument("--batch-size", type=int, help="images per step (default: 8 on cpu, 16 on cuda)")
    p.add_argument("--resolution", type=int, help="image size (default: the preset's, 512 for sd1)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="autocast (default: fp32 cpu, bf16 cuda)")
    p.add_argument("--grad-checkpointing", choices=["off", "on", "both"], help="default: off on cpu, both on cuda")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    config = args.config or ("sd1" if cuda else "tiny")
    batch = args.batch_size or (16 if cuda else 8)
    resolution = args.resolution or ldm.PRESETS[config]["resolution"]
    precision = args.precision or ("bf16" if cuda else "fp32")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing or
                                                                   ("both" if cuda else "off")]
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, torch {torch.__version__}: {config} U-Net, {resolution}px, batch {batch}, {precision}, "
          f"warm-up {args.warmup}, {args.steps} timed steps")
    for checkpointing in modes:
        try:
            ips, peak = bench(config, device, batch, resolution, precision, checkpointing, args.warmup, args.steps)
            what = "peak allocated" if cuda else "peak RSS"
            print(f"  grad checkpointing {'on ' if checkpointing else 'off'}: {ips:8.2f} images/s, "
                  f"{batch / ips * 1000:7.1f} ms/step, {what} {peak:.2f} GiB", flush=True)
        except torch.cuda.OutOfMemoryError:
            print(f"  grad checkpointing {'on ' if checkpointing else 'off'}: out of memory", flush=True)
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
