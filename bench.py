"""Benchmarks (never tests): checkpoint loading time and peak memory, sampling speed, U-Net step time.

    python bench.py load                      # full-size SD 1.5 single file with random weights: time + peak RSS
    python bench.py sample --device cpu       # seconds per image, tiny model on CPU
    python bench.py sample --device cuda --config sd1 --size 512   # SD 1.5-size random weights on a GPU

Full-size files are written once from the key/shape manifests in fixtures/manifests (random values) into
--workdir, so no weights need downloading.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import ldm

HERE = Path(__file__).resolve().parent


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def make_random_checkpoint(path: Path, manifest: str = "sd15", dtype: torch.dtype = None):
    """A single-file checkpoint with the public key layout and random values (written once, then reused)."""
    if path.exists():
        return
    spec = json.loads((HERE / "fixtures" / "manifests" / f"{manifest}.json").read_text())
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, (shape, dt) in spec.items():
        dt = getattr(torch, dt)
        if dt.is_floating_point:
            t = torch.randn(shape, generator=g) * 0.02
            tensors[key] = t.to(dtype or dt)
        else:
            tensors[key] = torch.arange(max(1, int(torch.tensor(shape).prod())), dtype=dt).reshape(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    ldm.save_safetensors(path, tensors, {"format": "pt"})


def bench_load(args):
    """Load in a fresh process so its peak RSS is the load's alone."""
    for dtype_name in ("float32", "float16"):
        path = Path(args.workdir) / f"sd15-random-{dtype_name}.safetensors"
        t0 = time.time()
        make_random_checkpoint(path, dtype=getattr(torch, dtype_name))
        if time.time() - t0 > 1:
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.time() - t0:.0f} s")
        code = (
            "import time, torch, ldm, bench\n"
            "t = time.time()\n"
            f"m = ldm.load_model({str(path)!r}, device='cpu', dtype=torch.float32, prediction_type='eps')\n"
            "load_s = time.time() - t\n"
            "after_load = bench.rss_mib()\n"
            "total = sum(float(p.float().sum()) for p in m.parameters())  # touch every page\n"
            "after_touch = bench.rss_mib()\n"
            "print(load_s, after_load[0], after_touch[0], after_touch[1])\n"
        )
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
        load_s, rss_load, rss_touch, peak = map(float, out.stdout.split()[-4:])
        size = path.stat().st_size / 2 ** 20
        print(f"load {path.name} ({size:,.0f} MiB on disk) -> fp32 on CPU: {load_s:.2f} s; RSS after load "
              f"{rss_load:,.0f} MiB, after reading every weight {rss_touch:,.0f} MiB, peak {peak:,.0f} MiB "
              f"({peak / size:.2f}x file size)")


def bench_sample(args):
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.config == "tiny":
        model = ldm.build_model("tiny").to(device, dtype).eval()
    else:
        path = Path(args.workdir) / "sd15-random-float16.safetensors"
        make_random_checkpoint(path, dtype=torch.float16)
        t = time.time()
        model = ldm.load_model(path, device=device, dtype=dtype, prediction_type="eps")
        print(f"load_model {path.name} -> {device} {dtype}: {time.time() - t:.2f} s")
    size = args.size or model.resolution
    for batch in (1, 4):
        prompts = ["a photograph of an astronaut riding a horse"] * batch
        ldm.sample(model, prompts, steps=2, height=size, width=size, seed=0, progress=False)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        images = ldm.sample(model, prompts, steps=args.steps, height=size, width=size, seed=0, progress=False,
                            output_type="tensor")
        images = ldm.to_pil(images) if torch.isfinite(images).all() else exit(f"non-finite pixels in {dtype}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device.type == "cuda" else ""
        print(f"sample {args.config} {size}x{size}, {args.steps} DDIM steps, CFG, batch {batch}, {dtype}: "
              f"{dt:.2f} s ({dt / batch:.2f} s per image){mem}")
        assert len(images) == batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["load", "sample"], help="which benchmark to run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--config", default="tiny", choices=["tiny", "sd1"], help="model size for `sample`")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for `sample`")
    p.add_argument("--workdir", default=os.environ.get("LDM_BENCH_DIR", "/tmp/ldm-bench"),
                   help="where random full-size checkpoints are written")
    args = p.parse_args(argv)
    {"load": bench_load, "sample": bench_sample}[args.what](args)


if __name__ == "__main__":
    main()
