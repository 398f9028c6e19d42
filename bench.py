"""Benchmarks (never tests): this project against diffusers at identical settings, in one process, printed as one
table: seconds per image, U-Net ms per step and TFLOP/s, VAE decode, tiled decode memory, training images/s and
peak memory, checkpoint load time and peak RAM.

    python bench.py --device cuda             # SD 1.5 shapes: 512x512, 50 DDIM steps, CFG 7.5, fp16; training bf16
    python bench.py --device cuda --compile   # adds torch.compile rows (minutes of compile time)
    python bench.py --device cpu              # small sizes that finish in minutes on 2 cores, fp32
    python bench.py --only sample unet        # a subset of: load sample unet vae train

Weights are random with the public SD 1.5 layout, written once from fixtures/manifests into --workdir, so nothing
is downloaded. diffusers (optional, requirements-dev.txt) runs on the very same weights, converted by its own
single-file converters, so the two outputs are compared too. Without diffusers only this project's column is
printed.
"""

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import ldm

HERE = Path(__file__).resolve().parent
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class Settings:
    """What each device measures; the GPU numbers are the SD 1.5 deployment shapes."""
    sample_config: str  # model for the whole-pipeline rows: "sd1" (random SD 1.5 file) or "tiny"
    sample_sizes: tuple  # image sides for the whole-pipeline rows
    steps: int
    batches: tuple
    dtype: torch.dtype  # inference weights
    unet_size: int  # image side of the U-Net and VAE rows (SD 1.5 U-Net and VAE)
    tile_size: int  # image side of the tiled-decode row
    train_config: str
    train_size: int  # image side; latents are size / 8 (sd1) or / 4 (tiny presets)
    train_batch: int
    train_precision: str


GPU = Settings("sd1", (512,), 50, (1, 4), torch.float16, 512, 2048, "sd1", 512, 16, "bf16")
CPU = Settings("tiny", (64, 256), 50, (1, 4), torch.float32, 256, 512, "small", 64, 8, "fp32")


# ----------------------------------------------------------------------------------------------------------------
# helpers


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeat: int = 3, warmup: int = 1) -> float:
    """Fastest of `repeat` timed calls after `warmup` untimed ones (the minimum: a shared machine only ever adds
    time); 5 calls when a warm-up call took under a second, 1 when it took over 10 s."""
    for _ in range(warmup):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        took = time.perf_counter() - start
        repeat = 1 if took > 10 else max(repeat, 5) if took < 1 else repeat
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def reset_peak(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since reset_peak; on the CPU the process's peak RSS (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return rss_mib()[1] / 1024


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class Table:
    """Rows of (measurement, ours, diffusers, unit); the ratio says how many times better this project is."""

    def __init__(self):
        self.rows = []

    def add(self, what: str, ours: float = None, theirs: float = None, unit: str = "", lower_is_better=True):
        self.rows.append((what, ours, theirs, unit, lower_is_better))
        print(f"  {what}: ldm {fmt(ours)} {unit}, diffusers {fmt(theirs)} {unit}", flush=True)

    def markdown(self) -> str:
        lines = ["| measurement | ldm | diffusers | ldm vs diffusers |", "|---|---|---|---|"]
        for what, ours, theirs, unit, lower in self.rows:
            ratio = "-"
            if ours and theirs:
                ratio = f"{(theirs / ours if lower else ours / theirs):.2f}x"
            lines.append(f"| {what} | {fmt(ours)} {unit} | {fmt(theirs)} {unit} | {ratio} |")
        return "\n".join(lines)


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


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
            if key.endswith("norm.weight") or ".norm" in key and key.endswith("weight"):
                t = t + 1  # norms near identity keep activations in range through 16 levels of random layers
            tensors[key] = t.to(dtype or dt)
        else:
            tensors[key] = torch.arange(max(1, int(torch.tensor(shape).prod())), dtype=dt).reshape(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ldm.save_safetensors(path, tensors, {"format": "pt"})
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.time() - t0:.0f} s", flush=True)


def gen_ldm():
    """fixtures/gen_ldm.py: the diffusers configs and converters the parity fixtures use."""
    spec = importlib.util.spec_from_file_location("gen_ldm", HERE / "fixtures" / "gen_ldm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def diffusers_twin(model: ldm.LatentDiffusion):
    """diffusers' StableDiffusionPipeline holding this model's weights (U-Net and VAE share our tensors), converted by
    diffusers' own single-file converters; None when diffusers is not installed."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    pipe, _ = gen_ldm().diffusers_pipeline(model, model.prediction_type, assign=True)  # no second copy of the weights
    pipe.text_encoder.to(model.device, model.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# benchmarks


def bench_load(args, S: Settings, table: Table):
    """A fresh process per load, so its peak RSS is the load's alone; safetensors' own load_file as the reference."""
    path = Path(args.workdir) / "sd15-random-float32.safetensors"
    make_random_checkpoint(path, dtype=torch.float32)
    size = path.stat().st_size / 2 ** 20
    # time to usable weights: both return memory-mapped tensors, so every weight is read once inside the timing
    ours = ("t = time.time(); m = ldm.load_model(P, device='cpu', dtype=torch.float32, prediction_type='eps')\n"
            "n = sum(float(p.sum()) for p in m.parameters()); s = time.time() - t\n")
    theirs = ("from safetensors.torch import load_file\n"
              "t = time.time(); m = load_file(P); n = sum(float(v.float().sum()) for v in m.values())\n"
              "s = time.time() - t\n")
    results = []
    for code in (ours, theirs):
        if "safetensors.torch" in code and importlib.util.find_spec("safetensors") is None:
            results.append((None, None))
            continue
        code = f"import time, torch, ldm, bench\nP = {str(path)!r}\n" + code + "print(s, bench.rss_mib()[1])\n"
        subprocess.run(["sync"], check=False)
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
        results.append(tuple(map(float, out.stdout.split()[-2:])))
    (ours_s, ours_peak), (st_s, st_peak) = results
    print(f"  file {size:,.0f} MiB (fp32 SD 1.5); diffusers column: safetensors.torch.load_file of the same file")
    table.add("load 4 GB fp32 file to CPU and read every weight: time", ours_s, st_s, "s")
    table.add("load: peak RSS / file size", ours_peak / size, st_peak / size if st_peak else None, "x")


def build_model(args, S: Settings, device: torch.device, config: str) -> ldm.LatentDiffusion:
    if config == "tiny":
        torch.manual_seed(0)
        return ldm.build_model("tiny").to(device, S.dtype).eval()
    dtype_name = "float16" if S.dtype == torch.float16 else "float32"
    path = Path(args.workdir) / f"sd15-random-{dtype_name}.safetensors"
    make_random_checkpoint(path, dtype=S.dtype)
    t = time.time()
    model = ldm.load_model(path, device=device, dtype=S.dtype, prediction_type="eps")
    print(f"  load_model {path.name} -> {device} {S.dtype}: {time.time() - t:.2f} s", flush=True)
    return model


def bench_sample(args, S: Settings, table: Table, device: torch.device):
    """Whole text-to-image runs: prompt encoding, 50 DDIM steps with CFG, VAE decode."""
    cuda = device.type == "cuda"
    variants = {"eager": False, "CUDA graph": True} if cuda else {"eager": False}
    for size in S.sample_sizes:
        model = build_model(args, S, device, S.sample_config)
        results = {}  # (variant, batch) -> (seconds per image, peak memory)

        def ours(batch: int, cuda_graph: bool) -> torch.Tensor:
            return ldm.sample(model, [PROMPT] * batch, steps=S.steps, height=size, width=size, seed=0,
                              progress=False, output_type="tensor", cuda_graph=cuda_graph)

        def measure(name: str, batch: int, fn, resident_gib: float = 0.0):
            reset_peak(device)
            sec = timed(fn, device, repeat=3 if batch == 1 else 2) / batch
            results[name, batch] = sec, peak_gib(device) - resident_gib
            print(f"  {name} batch {batch}: {sec:.3f} s/image, peak {results[name, batch][1]:.2f} GiB", flush=True)

        for batch in S.batches:
            for name, graph in variants.items():
                measure(f"ldm {name}", batch, lambda: ours(batch, graph))
            model.__dict__.pop("_ddim_graphs", None)  # frees the graphs' memory pool before the next run
        if args.compile and cuda:  # the fast path: NHWC U-Net, compiled, replayed as a CUDA graph
            model.unet.to(memory_format=torch.channels_last)
            model.unet.compile(dynamic=False)
            for batch in S.batches:
                start = time.time()
                ours(batch, True)
                print(f"  compile for batch {batch} (first call): {time.time() - start:.0f} s", flush=True)
                measure("ldm NHWC + compile + CUDA graph", batch, lambda: ours(batch, True))
                model.__dict__.pop("_ddim_graphs", None)
        image = ours(1, False)

        pipe = diffusers_twin(model)
        if pipe is not None:
            def theirs(batch: int) -> torch.Tensor:
                tokens, empty = model.tokenizer([PROMPT] * batch), model.tokenizer([""] * batch)
                with torch.no_grad():
                    pe, ne = pipe.text_encoder(tokens.to(device))[0], pipe.text_encoder(empty.to(device))[0]
                    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=size, width=size,
                                num_inference_steps=S.steps, guidance_scale=7.5,
                                generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images

            resident = nbytes(model.text_encoder) / 2 ** 30 if cuda else 0.0  # ours stays on the GPU meanwhile
            for batch in S.batches:
                measure("diffusers", batch, lambda: theirs(batch), resident)
            err = ((image.float().cpu() / 2 + 0.5).clamp(0, 1) - theirs(1).float().cpu()).abs().max().item()
            print(f"  same seed, same weights: max abs pixel difference ldm vs diffusers {err:.2e} (of 1; random "
                  "full-size weights in fp16 amplify rounding over 50 steps, the U-Net row compares one step)")
        label = f"sample {S.sample_config} {size}px {S.steps} steps"
        for (name, batch), (sec, _) in results.items():
            if name != "diffusers":
                table.add(f"{label}, batch {batch}, {name}: s/image", sec, results.get(("diffusers", batch), [None])[0],
                          "s")
        best = "ldm CUDA graph" if cuda else "ldm eager"
        table.add(f"{label}, batch 1: peak memory", results[best, 1][1], results.get(("diffusers", 1), [0, None])[1],
                  "GiB" if cuda else "GiB RSS")
        pipe = model = None
        reset_peak(device)


def bench_unet(args, S: Settings, table: Table, device: torch.device):
    """One U-Net forward at batch 2 (the CFG pair), SD 1.5 shapes; VAE decode of one latent; tiled decode memory."""
    model = build_model(args, S, device, "sd1")
    h = S.unet_size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, h, h, generator=g).to(device, S.dtype)
    t = torch.tensor([999, 999], device=device)
    context = torch.randn(2, 77, 768, generator=g).to(device, S.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.unet(x, t, context)
    gflop = counter.get_total_flops() / 1e9
    print(f"  U-Net forward, batch 2, {h}x{h} latents: {gflop:,.0f} GFLOP")
    repeat = 20 if device.type == "cuda" else 3

    def forward_times(fwd, prefix: str = "") -> dict[str, float]:
        """Seconds per U-Net call: eager and, on CUDA, replayed as a captured graph."""
        with torch.no_grad():
            out = {prefix + "eager": timed(lambda: fwd(x, t, context), device, repeat=repeat)}
            if device.type == "cuda":
                graphed = ldm.CUDAGraphStep(fwd)
                out[prefix + "CUDA graph"] = timed(lambda: graphed(x, t, context), device, repeat=repeat, warmup=2)
        print("  " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in out.items()), flush=True)
        return out

    ours = forward_times(lambda x, t, c: model.unet(x, t, c))
    z = torch.randn(1, 4, h, h, generator=g).to(device, S.dtype) * 5
    pipe = diffusers_twin(model)
    with torch.no_grad():  # timed beside diffusers' decode, so both see the same machine state
        decode_ours = timed(lambda: model.decode_latents(z), device, repeat=repeat)
    theirs, decode_theirs = {}, None
    if pipe is not None:
        unet = pipe.unet
        fwd = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
        with torch.no_grad():
            diff = (fwd(x, t, context).float() - model.unet(x, t, context).float()).abs().max().item()
            print(f"  same weights and inputs: U-Net max abs difference {diff:.2e}")
            decode_theirs = timed(lambda: pipe.vae.decode(z / model.scale_factor).sample, device, repeat=repeat)
        theirs = forward_times(fwd, "diffusers ")
        theirs = {k.split(" ", 1)[1]: v for k, v in theirs.items()}
        pipe = unet = fwd = None
        reset_peak(device)

    if device.type == "cuda":  # variants after the twin is gone: they replace our weight tensors
        model.unet.to(memory_format=torch.channels_last)
        ours.update(forward_times(lambda x, t, c: model.unet(x, t, c), "channels_last "))
        if args.compile:
            start = time.time()
            model.unet.compile(dynamic=False)
            with torch.no_grad():
                model.unet(x, t, context)
            print(f"  torch.compile (default mode) of the U-Net: first call {time.time() - start:.0f} s")
            ours.update(forward_times(lambda x, t, c: model.unet(x, t, c), "channels_last compiled "))
    for kind, sec in ours.items():
        ref = theirs.get("CUDA graph" if kind.endswith("graph") else "eager")  # diffusers' plain counterpart
        table.add(f"U-Net fwd batch 2, {h}x{h} latents, {kind}: ms", sec * 1e3, ref and ref * 1e3, "ms")
        table.add(f"U-Net fwd {kind}: TFLOP/s", gflop / sec / 1e3, ref and gflop / ref / 1e3, "TFLOP/s",
                  lower_is_better=False)
    table.add(f"VAE decode 1 x {h}x{h} latent -> {S.unet_size}px: ms", decode_ours * 1e3,
              decode_theirs and decode_theirs * 1e3, "ms")

    if device.type == "cuda":  # the CPU's peak RSS cannot be reset within a process
        tiled_rows(model, S, table, device, g)
    model = None
    reset_peak(device)


def tiled_rows(model: ldm.LatentDiffusion, S: Settings, table: Table, device: torch.device, g: torch.Generator):
    """Peak memory and time of a large decode, ours with --tile 64 vs untiled."""
    big = S.tile_size // 8
    zb = torch.randn(1, 4, big, big, generator=g).to(device, S.dtype) * 5
    peaks = {}
    for name, tile in (("tiled", 64), ("untiled", None)):
        reset_peak(device)
        try:
            with torch.no_grad():
                sec = timed(lambda: model.decode_latents(zb, tile=tile), device, repeat=1, warmup=0)
            peaks[name] = (peak_gib(device), sec)
        except torch.cuda.OutOfMemoryError:
            peaks[name] = (None, None)
        print(f"  decode {S.tile_size}px {name}: peak {peaks[name][0]} GiB, {peaks[name][1]} s")
    table.add(f"VAE decode {S.tile_size}x{S.tile_size}, --tile 64 vs untiled: peak memory", peaks["tiled"][0],
              peaks["untiled"][0], "GiB")
    table.add(f"VAE decode {S.tile_size}x{S.tile_size} --tile 64: s", peaks["tiled"][1], peaks["untiled"][1], "s")
    print("  (the tiled-decode rows compare ldm --tile 64 with ldm untiled, not diffusers)")


def bench_train(args, S: Settings, table: Table, device: torch.device):
    """train.py's U-Net step (forward, loss, backward, clipping, AdamW, EMA) on cached latents (random latents and
    contexts of the right shapes); diffusers' U-Net of the same architecture in the same loop."""
    model = ldm.build_model(S.train_config, device="meta")  # for its configs only
    unet_cfg, f = model.unet.cfg, model.downsample_factor
    h = S.train_size // f
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(S.train_precision)
    alphas_cumprod = torch.cumprod(1 - ldm.make_schedule(), 0).float()

    def run(unet, fwd, checkpointing: bool, channels_last: bool = False, steps: int = 10) -> tuple[float, float]:
        reset_peak(device)
        torch.manual_seed(0)
        B = S.train_batch
        z0 = torch.randn(B, model.latent_channels, h, h, device=device)
        if channels_last:
            z0 = z0.to(memory_format=torch.channels_last)
        context = torch.randn(B, 77, unet_cfg.context_dim, device=device)
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
        ema = [p.detach().clone() for p in params]
        alphas = alphas_cumprod.to(device)

        def step():
            t = torch.randint(0, 1000, (B,), device=device)
            noise = torch.randn_like(z0)
            a = alphas[t].view(-1, 1, 1, 1)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                pred = fwd(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, context)
                loss = (pred.float() - noise).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-4)

        for _ in range(3):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        sec = (time.perf_counter() - start) / steps
        return B / sec, peak_gib(device)

    steps = 10 if device.type == "cuda" else 3
    results = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        with torch.device(device):
            unet = type(model.unet)(unet_cfg).train()
        unet.cfg.use_checkpoint = ckpt
        results["ldm", ckpt] = run(unet, unet, ckpt, steps=steps)
        print(f"  ldm grad checkpointing {ckpt}: {results['ldm', ckpt][0]:.2f} images/s, "
              f"peak {results['ldm', ckpt][1]:.2f} GiB", flush=True)
        del unet
    if importlib.util.find_spec("diffusers") is not None:
        from diffusers import UNet2DConditionModel
        config = gen_ldm().diffusers_unet_config(model)
        for ckpt in (False, True):
            torch.manual_seed(0)
            with torch.device(device):
                unet = UNet2DConditionModel(**config).train()
            if ckpt:
                unet.enable_gradient_checkpointing()
            fwd = lambda x, t, c, unet=unet: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
            results["diffusers", ckpt] = run(unet, fwd, ckpt, steps=steps)
            print(f"  diffusers grad checkpointing {ckpt}: {results['diffusers', ckpt][0]:.2f} images/s, "
                  f"peak {results['diffusers', ckpt][1]:.2f} GiB", flush=True)
            del unet, fwd
    if device.type == "cuda":  # the fast paths last: a compile that outlasts a time limit loses nothing else
        torch.manual_seed(0)
        with torch.device(device):
            unet = type(model.unet)(unet_cfg).train()
        unet.cfg.use_checkpoint = False
        unet.to(memory_format=torch.channels_last)
        results["ldm cl", False] = run(unet, unet, False, channels_last=True, steps=steps)
        print(f"  ldm channels_last: {results['ldm cl', False][0]:.2f} images/s, "
              f"peak {results['ldm cl', False][1]:.2f} GiB", flush=True)
        if args.compile:
            start = time.time()
            unet.compile(dynamic=False)
            results["ldm compiled", False] = run(unet, unet, False, channels_last=True, steps=steps)
            print(f"  ldm channels_last + compile: {results['ldm compiled', False][0]:.2f} images/s, peak "
                  f"{results['ldm compiled', False][1]:.2f} GiB (compile and run {time.time() - start:.0f} s)",
                  flush=True)
        del unet
    label = (f"train {S.train_config} U-Net {S.train_size}px ({h}x{h} latents), batch {S.train_batch}, "
             f"{S.train_precision}")
    mem = "GiB" if device.type == "cuda" else "GiB RSS"
    for ckpt in (False, True):
        g = " + grad checkpointing" if ckpt else ""
        theirs = results.get(("diffusers", ckpt), (None, None))
        table.add(f"{label}{g}: images/s", results["ldm", ckpt][0], theirs[0], "img/s", lower_is_better=False)
        table.add(f"{label}{g}: peak memory", results["ldm", ckpt][1], theirs[1], mem)
    for key, name in ((("ldm cl", False), "channels_last"), (("ldm compiled", False), "channels_last + compile")):
        if key in results:
            table.add(f"{label}, ldm {name}: images/s", results[key][0], results.get(("diffusers", False), (None,))[0],
                      "img/s", lower_is_better=False)
    cost = 1 - results["ldm", True][0] / results["ldm", False][0]
    print(f"  gradient checkpointing costs ldm {cost:.0%} of its throughput")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ldm.HelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--only", nargs="+", default=["load", "sample", "unet", "train"],
                   choices=["load", "sample", "unet", "train"], help="which benchmarks to run (unet includes the VAE)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (CUDA; minutes of compile time)")
    p.add_argument("--workdir", default=os.environ.get("LDM_BENCH_DIR", "/tmp/ldm-bench"),
                   help="where the random full-size checkpoints are written (6 GB)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    S = GPU if device.type == "cuda" else CPU
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    versions = f"torch {torch.__version__}"
    if importlib.util.find_spec("diffusers") is not None:
        import diffusers
        versions += f", diffusers {diffusers.__version__}"
    print(f"{name}; {versions}", flush=True)
    table = Table()
    for what in ("sample", "unet", "train", "load"):  # load last: it writes a 4 GB file first
        if what in args.only:
            print(f"[{what}]", flush=True)
            {"load": bench_load, "sample": bench_sample, "unet": bench_unet, "train": bench_train}[what](
                *((args, S, table) if what == "load" else (args, S, table, device)))
    text = f"{name}; {versions}\n\n{table.markdown()}\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
