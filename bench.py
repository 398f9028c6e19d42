"""Benchmarks (never tests): this project against diffusers at identical settings, in one process, printed as one
table: seconds per image, U-Net ms per step and TFLOP/s, VAE decode, tiled decode memory, training images/s and
peak memory, checkpoint load time and peak RAM.

    python bench.py --device cuda             # SD 1.5 shapes: 512x512, 50 DDIM steps, CFG 7.5, fp16; training bf16
    python bench.py --device cuda --compile   # adds torch.compile rows (minutes of compile time)
    python bench.py --device cpu              # small sizes that finish in minutes on 2 cores, fp32
    python bench.py --only sample unet        # a subset of: sample dpmpp sdxl unet vae train load samplers
    python bench.py --device cuda --compile --json bench.json   # every row, also as JSON

Weights are random with the public SD 1.5 layout (the keys ldm.save_model writes), written once into --workdir, so
nothing is downloaded. diffusers (optional, requirements-dev.txt) runs on the very same weights, converted by its own
single-file converters, so the two outputs are compared too. Without diffusers only this project's column is
printed.
"""

import argparse
import os

import cli

NAMES = ("sample", "dpmpp", "sdxl", "unet", "vae", "train", "load", "samplers")  # in the order they run
DESCRIPTION = ("Benchmarks this project against diffusers at identical settings and on the very same random weights "
               "(SD 1.5 layout, written once into --workdir; nothing is downloaded), and prints one table: seconds "
               "per image, U-Net milliseconds per step and TFLOP/s, VAE decode time and tiled-decode memory, "
               "training images/s and peak memory, checkpoint load time and peak RAM. Without diffusers installed "
               "only this project's column is filled.")




def make_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=DESCRIPTION, formatter_class=cli.HelpFormatter)
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME",
                   help=f"run only these benchmarks, of: {', '.join(NAMES)} (default: all)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (CUDA; minutes of compile time)")
    p.add_argument("--workdir", default=os.environ.get("LDM_BENCH_DIR", "/tmp/ldm-bench"),
                   help="where the random full-size checkpoints are written (up to 14 GB)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file (measurement, ldm, diffusers, "
                                                "unit, ratio), rewritten after each benchmark")
    p.add_argument("--ckpt", help="a trained model for the samplers benchmark, e.g. runs/emoji-ldm (the samplers row "
                                  "runs only with it)")
    p.add_argument("--prompts", nargs="+", default=["an emoji of a red apple", "an emoji of a grinning face",
                                                    "an emoji of a red heart", "an emoji of a sun"],
                   help="prompts of the samplers benchmark")
    return p


if __name__ == "__main__":
    make_parser().parse_args()  # --help and usage errors answer at once, before torch's seconds-long import

import contextlib
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import checkpoint
import ldm
import lora as lora_lib
import unet as unet_lib

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
    sdxl_config: str  # model of the SDXL rows: "sdxl" (random SDXL base file, float16) or "tiny-sdxl"
    sdxl_size: int


GPU = Settings("sd1", (512,), 50, (1, 4), torch.float16, 512, 2048, "sd1", 512, 16, "bf16", "sdxl", 1024)
CPU = Settings("tiny", (64, 256), 50, (1, 4), torch.float32, 256, 512, "small", 64, 8, "fp32", "tiny-sdxl", 64)


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
    """Rows of (measurement, ours, diffusers, unit); the ratio says how many times better this project is. `extra`:
    tables of their own (the samplers' accuracy), printed after it."""

    def __init__(self):
        self.rows, self.extra = [], []

    def add(self, what: str, ours: float = None, theirs: float = None, unit: str = "", lower_is_better=True):
        self.rows.append((what, ours, theirs, unit, lower_is_better))
        print(f"  {what}: ldm {fmt(ours)} {unit}, diffusers {fmt(theirs)} {unit}", flush=True)

    def records(self) -> list[dict]:
        return [dict(measurement=what, ldm=ours, diffusers=theirs, unit=unit, ratio=(
            (theirs / ours if lower else ours / theirs) if ours and theirs else None))
            for what, ours, theirs, unit, lower in self.rows]

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


def make_random_checkpoint(path: Path, dtype: torch.dtype = torch.float32, preset: str = "sd1"):
    """A single-file checkpoint of an ldm.PRESETS model (SD 1.5 by default; "sdxl" for the SDXL base) with random
    values, in the public key layout (ldm.save_model's keys, which are the released file's; written once, then
    reused)."""
    if path.exists():
        return
    with torch.device("meta"):
        layout = ldm.build_model(preset).checkpoint_state_dict()  # meta tensors, plus SD's real schedule buffers
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, ref in layout.items():
        if not ref.is_meta:  # the DDPM schedule: the real values
            tensors[key] = ref.to(dtype)
        elif ref.dtype.is_floating_point:
            t = torch.randn(ref.shape, generator=g) * 0.02
            if key.endswith("norm.weight") or ".norm" in key and key.endswith("weight"):
                t = t + 1  # norms near identity keep activations in range through 16 levels of random layers
            tensors[key] = t.to(dtype)
        else:
            tensors[key] = torch.arange(ref.numel(), dtype=ref.dtype).reshape(ref.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    checkpoint.save_safetensors(path, tensors, {"format": "pt"})
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.time() - t0:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# the diffusers twin: the same weights in diffusers' own classes, converted by diffusers' own single-file converters


def unet_original_yaml(cfg, vae_ch_mult=(1, 2, 4, 4)) -> dict:
    """The parts of an original (LDM / sgm) yaml that diffusers reads for a U-Net config `cfg`: its params without the
    -1 head fields and unset (None) fields, as in the real yamls, `num_classes: sequential` where it takes a y, and
    the first stage's ch_mult (diffusers' sample_size = image_size / 2 ** (len - 1))."""
    params = {k: v for k, v in asdict(cfg).items() if v != -1 and v is not None}
    params.update(use_spatial_transformer=True, legacy=False)
    if cfg.adm_in_channels is not None:
        params["num_classes"] = "sequential"
    vae = {"params": {"ddconfig": {"ch_mult": list(vae_ch_mult)}}}
    return {"model": {"params": {"unet_config": {"params": params}, "first_stage_config": vae}}}


def unet_diffusers_config(cfg, image_size: int = None, vae_ch_mult=(1, 2, 4, 4)) -> dict:
    """The UNet2DConditionModel config diffusers derives from the original yaml of U-Net config `cfg` (its
    single-file loader's create_unet_diffusers_config_from_ldm) for images of `image_size` (default: the config's
    latent size x 8). Needs diffusers."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    yaml = unet_original_yaml(cfg, vae_ch_mult)
    params = yaml["model"]["params"]["unet_config"]["params"]
    # diffusers tells an SDXL U-Net (added "text_time" embedding) from a class-conditional one by the context width,
    # 2048 (base) or 1280 (refiner); a narrower SDXL-structured U-Net is read as its real width, then takes its own
    sdxl_width = cfg.adm_in_channels is not None and cfg.context_dim not in (2048, 1280)
    if sdxl_width:
        params["context_dim"] = 2048
    size = image_size or cfg.image_size * 2 ** (len(vae_ch_mult) - 1)
    with warnings.catch_warnings():  # diffusers deprecates image_size for from_single_file, not for this helper
        warnings.simplefilter("ignore", FutureWarning)
        config = create_unet_diffusers_config_from_ldm(yaml, {}, image_size=size)
    if sdxl_width:
        config["cross_attention_dim"] = cfg.context_dim
    if config["attention_head_dim"] is None:  # fixed head width with conv projections: heads per level
        config["attention_head_dim"] = [cfg.model_channels * m // cfg.num_head_channels for m in cfg.channel_mult]
    return config


def diffusers_configs(model: ldm.LatentDiffusion) -> tuple[dict, dict]:
    """(diffusers U-Net config, diffusers VAE config) for our model's architecture, as diffusers derives them from
    an original checkpoint and its yaml. Needs diffusers."""
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm
    vae_cfg = model.vae.cfg
    ddconfig = {k: getattr(vae_cfg, k) for k in ("double_z", "z_channels", "resolution", "in_channels", "out_ch",
                                                  "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")}
    yaml = {"model": {"params": {"first_stage_config": {"params": {"embed_dim": vae_cfg.embed_dim,
                                                                   "ddconfig": ddconfig}}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        vae_config = create_vae_diffusers_config_from_ldm(yaml, {}, image_size=model.resolution,
                                                          scaling_factor=model.scale_factor)
    return unet_diffusers_config(model.unet.cfg, model.resolution, vae_cfg.ch_mult), vae_config


def diffusers_unet_vae(model: ldm.LatentDiffusion, ckpt: dict, assign: bool = False):
    """(unet, unet_sd, vae, vae_sd): diffusers' UNet2DConditionModel and AutoencoderKL holding `model`'s weights
    (`ckpt`: its checkpoint_state_dict), moved by diffusers' own single-file converters, with the state dicts they
    loaded (sharing ckpt's tensors). assign=True: built on the meta device, taking ckpt's tensors themselves."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    unet_config, vae_config = diffusers_configs(model)
    build = torch.device("meta") if assign else contextlib.nullcontext()
    unet_sd = convert_ldm_unet_checkpoint(ckpt, unet_config)
    with build:
        unet = UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict(unet_sd, strict=True, assign=assign)
    vae_sd = convert_ldm_vae_checkpoint(ckpt, vae_config)
    with build:
        vae = AutoencoderKL(**vae_config).eval()
    vae.load_state_dict(vae_sd, strict=True, assign=assign)
    return unet, unet_sd, vae, vae_sd


def diffusers_scheduler(sampler: str, prediction_type: str = "eps"):
    """The diffusers scheduler that runs `sampler` as ldm.sample does: DDIM in the SD settings (steps_offset 1 on
    the "leading" grid), or Euler on k-diffusion's grid (timestep_spacing "linspace": the same sigmas wherever
    999 / (steps - 1) is a whole number, as diffusers interpolates sigma linearly in t, k-diffusion log sigma)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction_type])
    if sampler == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw)
    if sampler == "euler":
        return EulerDiscreteScheduler(timestep_spacing="linspace", **kw)
    raise ValueError(f"no diffusers scheduler set up for {sampler!r}")


def transformers_tokenizer(tokenizer, pad_token: str, folder: Path):
    """transformers' CLIPTokenizer with our tokenizer's vocabulary and merges (written into `folder`), padding with
    `pad_token` ("<|endoftext|>" for CLIP-L, "!" = id 0 for OpenCLIP)."""
    from transformers import CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=tokenizer.context_length)


def diffusers_sdxl_text_encoders(model: ldm.LatentDiffusion, ckpt: dict):
    """(text_encoder or None, text_encoder_2): transformers' CLIPTextModel (CLIP-L; None for the refiner) and
    CLIPTextModelWithProjection (bigG) holding the SDXL `model`'s text weights, by diffusers' own single-file
    converters from its checkpoint_state_dict `ckpt`."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    te = model.text_encoder
    parts = {k.rstrip("."): v for k, v in ldm.text_parts(te).items()}  # clip_l / clip_g -> the file's prefix

    def hf_config(c, **kw):
        return CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=4 * c.width,
                              num_hidden_layers=c.layers, num_attention_heads=c.heads,
                              max_position_embeddings=c.context_length, hidden_act=c.act, **kw)
    text_encoder = None
    if te.clip_l is not None:
        text_encoder = CLIPTextModel(hf_config(te.cfg.clip_l)).eval()
        prefix = parts["clip_l"][:-len("text_model.")]
        sd = convert_ldm_clip_checkpoint(ckpt, prefix)  # text_model.* (and the rest of ckpt, unmoved)
        expected = text_encoder.state_dict()  # transformers 5 names them without the text_model. prefix
        sd = {k[len("text_model."):] if k[len("text_model."):] in expected else k: v for k, v in sd.items()
              if k.startswith("text_model.")}
        missing, unexpected = text_encoder.load_state_dict(sd, strict=False)
        assert not missing and all(k.endswith("position_ids") for k in unexpected), (missing, unexpected)
    text_encoder_2 = CLIPTextModelWithProjection(hf_config(te.cfg.clip_g, projection_dim=te.cfg.clip_g.embed_dim))
    text_encoder_2.load_state_dict(convert_open_clip_checkpoint(text_encoder_2, ckpt, parts["clip_g"]), strict=True)
    return text_encoder, text_encoder_2.eval()


def diffusers_sdxl_pipeline(model: ldm.LatentDiffusion, sampler: str = "euler", refiner: ldm.LatentDiffusion = None,
                            tokenizer_dir: Path = None, assign: bool = False):
    """(base, refiner or None): diffusers' StableDiffusionXLPipeline on the SDXL `model`'s weights (and
    StableDiffusionXLImg2ImgPipeline on the refiner's), every part moved by diffusers' own single-file converters,
    in the public configs' settings (force_zeros_for_empty_prompt for the base, aesthetic scores for the refiner),
    with diffusers_scheduler(sampler) and transformers' tokenizers of our vocabulary (written into tokenizer_dir).
    assign=True: the U-Nets and VAEs take our tensors themselves. Needs diffusers and transformers."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    folder = Path(tokenizer_dir or tempfile.mkdtemp())
    tokenizer = transformers_tokenizer(model.tokenizer, "<|endoftext|>", folder / "tokenizer")
    tokenizer_2 = transformers_tokenizer(model.tokenizer, "!", folder / "tokenizer_2")
    pipes = []
    for part in (model, refiner):
        if part is None:
            pipes.append(None)
            continue
        ckpt = part.checkpoint_state_dict()
        unet, _, vae, _ = diffusers_unet_vae(part, ckpt, assign)
        text_encoder, text_encoder_2 = diffusers_sdxl_text_encoders(part, ckpt)
        common = dict(vae=vae, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, unet=unet,
                      scheduler=diffusers_scheduler(sampler, part.prediction_type), add_watermarker=False)
        if text_encoder is not None:
            pipe = StableDiffusionXLPipeline(text_encoder=text_encoder, tokenizer=tokenizer,
                                             force_zeros_for_empty_prompt=True, **common)
        else:
            pipe = StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                                                    force_zeros_for_empty_prompt=False, **common)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return tuple(pipes)


def diffusers_pipeline(model: ldm.LatentDiffusion, prediction_type: str = None, assign: bool = False):
    """(pipeline, layout): a diffusers StableDiffusionPipeline (DDIMScheduler in the SD settings) holding the same
    weights as our SD 1.x-layout `model`, via diffusers' single-file converters, and the layout: the diffusers
    configs plus which of our single-file keys each diffusers tensor comes from. assign=True: the U-Net and VAE
    are built on the meta device and take our tensors themselves (no second copy). Needs diffusers and
    transformers."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    ckpt = model.checkpoint_state_dict()
    unet, unet_sd, vae, vae_sd = diffusers_unet_vae(model, ckpt, assign)
    tc = model.text_encoder.cfg
    text_config = CLIPTextConfig(vocab_size=tc.vocab_size, hidden_size=tc.width, intermediate_size=4 * tc.width,
                                 num_hidden_layers=tc.layers, num_attention_heads=tc.heads,
                                 max_position_embeddings=tc.context_length, hidden_act=tc.act)
    text = CLIPTextModel(text_config).eval()
    prefix = ldm.PREFIXES["clip"]
    text_sd = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
    missing, unexpected = text.load_state_dict(text_sd, strict=False)
    assert not missing and all(k.endswith("position_ids") for k in unexpected), (missing, unexpected)
    scheduler = diffusers_scheduler("ddim", prediction_type or model.prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    source = {v.untyped_storage().data_ptr(): k for k, v in ckpt.items()}  # reshapes keep the storage
    def public(config) -> dict:  # without diffusers' "_" bookkeeping keys (unordered sets, different every run)
        return {k: v for k, v in config.items() if not k.startswith("_")}

    layout = {"unet_config": public(unet.config), "vae_config": public(vae.config),
              "text_config": text_config.to_dict(),
              "unet": {k: source[v.untyped_storage().data_ptr()] for k, v in unet_sd.items()},
              "vae": {k: source[v.untyped_storage().data_ptr()] for k, v in vae_sd.items()},
              "text_encoder": {k: prefix + k for k in text.state_dict()}}
    return pipe, layout


def diffusers_twin(model: ldm.LatentDiffusion):
    """diffusers' StableDiffusionPipeline holding this model's weights (U-Net and VAE share our tensors), on the
    model's device; None when diffusers is not installed."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    pipe, _ = diffusers_pipeline(model, assign=True)  # no second copy of the weights
    pipe.text_encoder.to(model.device, model.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# benchmarks


def bench_load(args, S: Settings, table: Table):
    """A fresh process per load, so its peak RSS is the load's alone; safetensors' own load_file as the reference.
    SD 1.5 in float32, and the SDXL base in float16 (as released; its VAE is kept in float32, ldm.load_model's
    guard against the SDXL VAE's float16 overflow)."""
    for preset, dtype, what in (("sd1", torch.float32, "4 GB fp32 SD 1.5"), ("sdxl", torch.float16,
                                                                            "7 GB fp16 SDXL base")):
        name = {"sd1": "sd15", "sdxl": "sdxl-base"}[preset]
        path = Path(args.workdir) / f"{name}-random-{str(dtype)[6:]}.safetensors"
        make_random_checkpoint(path, dtype=dtype, preset=preset)
        size = path.stat().st_size / 2 ** 20
        # time to usable weights: both return memory-mapped tensors, so every weight is read once inside the timing
        ours = (f"t = time.time(); m = ldm.load_model(P, device='cpu', dtype=torch.{str(dtype)[6:]})\n"
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
        print(f"  file {size:,.0f} MiB ({what}); diffusers column: safetensors.torch.load_file of the same file")
        table.add(f"load {what} file to CPU and read every weight: time", ours_s, st_s, "s")
        table.add(f"load {what}: peak RSS / file size", ours_peak / size, st_peak / size if st_peak else None, "x")


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
            model.__dict__.pop("_step_graphs", None)  # frees the graphs' memory pool before the next run
        if args.compile and cuda:  # the fast path: NHWC U-Net, compiled, replayed as a CUDA graph
            model.unet.to(memory_format=torch.channels_last)
            model.unet.compile(dynamic=False)
            for batch in S.batches:
                start = time.time()
                ours(batch, True)
                print(f"  compile for batch {batch} (first call): {time.time() - start:.0f} s", flush=True)
                measure("ldm NHWC + compile + CUDA graph", batch, lambda: ours(batch, True))
                model.__dict__.pop("_step_graphs", None)
        image = ours(1, False)

        pipe = diffusers_twin(model)
        if pipe is not None:
            def theirs(batch: int) -> torch.Tensor:
                tokens, empty = model.tokenizer([PROMPT] * batch), model.tokenizer([""] * batch)
                with torch.no_grad():
                    pe, ne = pipe.text_encoder(tokens.to(device))[0], pipe.text_encoder(empty.to(device))[0]
                    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=size, width=size,
                                num_inference_steps=S.steps, guidance_scale=7.5,
                                generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
                                output_type="pt").images  # image i from seed 0 + i, as ldm.sample(seed=0)

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


def sampler_rows(model: ldm.LatentDiffusion, pipe, label: str, S: Settings, table: Table, device: torch.device,
                 compile_unet, **kw):
    """ldm.sample at batch 1 with kw (sampler, steps, size, ...): eager, CUDA graph and, with compile_unet (a function
    compiling model.unet in place), compiled + graph, against `pipe` (a diffusers pipeline call taking the seed, or
    None) eager; seconds per image and peak memory."""
    cuda = device.type == "cuda"

    def ours(cuda_graph: bool, **more) -> torch.Tensor:
        return ldm.sample(model, [PROMPT], seed=0, progress=False, output_type="tensor", cuda_graph=cuda_graph,
                          **kw, **more)

    runs = {"eager": lambda: ours(False)}
    if cuda:
        runs["CUDA graph"] = lambda: ours(True)
    results = {}
    for name, fn in runs.items():
        reset_peak(device)
        results[name] = timed(fn, device), peak_gib(device)
        print(f"  {label}, {name}: {results[name][0]:.3f} s/image, peak {results[name][1]:.2f} GiB", flush=True)
    model.__dict__.pop("_step_graphs", None)
    theirs = (None, None)
    if pipe is not None:
        reset_peak(device)
        theirs = timed(pipe, device), peak_gib(device)
        print(f"  {label}, diffusers eager: {theirs[0]:.3f} s/image, peak {theirs[1]:.2f} GiB", flush=True)
    if compile_unet is not None and cuda:
        start = time.time()
        compile_unet()
        ours(True)
        print(f"  compile (first call): {time.time() - start:.0f} s", flush=True)
        reset_peak(device)
        results["compiled + CUDA graph"] = timed(lambda: ours(True), device), peak_gib(device)
        print(f"  {label}, compiled + CUDA graph: {results['compiled + CUDA graph'][0]:.3f} s/image", flush=True)
        model.__dict__.pop("_step_graphs", None)
    for name, (sec, _) in results.items():
        table.add(f"{label}, batch 1, {name}: s/image", sec, theirs[0], "s")
    best = "compiled + CUDA graph" if "compiled + CUDA graph" in results else "CUDA graph" if cuda else "eager"
    table.add(f"{label}, batch 1, {best}: peak memory", results[best][1], theirs[1], "GiB" if cuda else "GiB RSS")
    return results


def bench_dpmpp(args, S: Settings, table: Table, device: torch.device):
    """DPM++ 2M on the Karras schedule, 20 steps, CFG 7.5, batch 1: ldm's fast path (every sampler's step is a device
    function replayed as a CUDA graph) against diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, Karras
    sigmas) eager. The two solvers differ in detail (diffusers' is not k-diffusion's), so only the times compare."""
    size = S.sample_sizes[0]
    model = build_model(args, S, device, S.sample_config)
    pipe = diffusers_twin(model)
    call = None
    if pipe is not None:
        from diffusers import DPMSolverMultistepScheduler
        pipe.scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     algorithm_type="dpmsolver++", solver_order=2,
                                                     use_karras_sigmas=True)

        def call() -> torch.Tensor:  # text encoding included, as in ldm.sample
            tokens, empty = model.tokenizer([PROMPT]), model.tokenizer([""])
            with torch.no_grad():
                pe, ne = pipe.text_encoder(tokens.to(device))[0], pipe.text_encoder(empty.to(device))[0]
                return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=size, width=size,
                            num_inference_steps=20, guidance_scale=7.5,
                            generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images

    def compile_unet():
        model.unet.to(memory_format=torch.channels_last)
        model.unet.compile(dynamic=False)  # as sample.py --compile

    sampler_rows(model, call, f"sample {S.sample_config} {size}px DPM++ 2M Karras 20 steps", S, table, device,
                 compile_unet if args.compile else None, sampler="dpmpp_2m", scheduler="karras", steps=20,
                 height=size, width=size)
    pipe = model = None
    reset_peak(device)


def bench_sdxl(args, S: Settings, table: Table, device: torch.device):
    """The SDXL base at its size, Euler 30 steps, CFG 5, batch 1 (random weights in the released float16 file's
    layout, its VAE kept in bf16 / fp32 as ldm.load_model does): ldm eager, CUDA graph and compiled, against
    diffusers' StableDiffusionXLPipeline eager; then the peak memory of a VAE decode in 64-latent tiles."""
    cuda, size = device.type == "cuda", S.sdxl_size
    if S.sdxl_config == "sdxl":
        path = Path(args.workdir) / "sdxl-base-random-float16.safetensors"
        make_random_checkpoint(path, dtype=torch.float16, preset="sdxl")
        model = ldm.load_model(path, device=device, dtype=torch.float16)
    else:
        torch.manual_seed(0)
        model = ldm.build_model(S.sdxl_config).to(device, S.dtype).eval()
    call = None
    if importlib.util.find_spec("diffusers") is not None:
        pipe = diffusers_sdxl_pipeline(model, "euler", assign=True)[0]  # the U-Net and VAE share our tensors
        pipe.text_encoder.to(device, model.dtype)
        pipe.text_encoder_2.to(device, model.dtype)
        call = lambda: pipe(PROMPT, height=size, width=size, num_inference_steps=30, guidance_scale=5.0,  # noqa: E731
                            generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images

    def compile_unet():
        model.unet.to(memory_format=torch.channels_last)
        model.unet.compile(dynamic=False)  # as sample.py --compile

    label = f"sample {S.sdxl_config} {size}px Euler 30 steps"
    sampler_rows(model, call, label, S, table, device, compile_unet if args.compile else None, sampler="euler",
                 steps=30, guidance_scale=5.0, height=size, width=size)
    if cuda:
        reset_peak(device)
        sec = timed(lambda: ldm.sample(model, [PROMPT], seed=0, progress=False, output_type="tensor", sampler="euler",
                                       steps=30, guidance_scale=5.0, height=size, width=size, tile=64), device)
        table.add(f"{label}, batch 1, --tile 64 VAE decode: s/image", sec, None, "s")
        table.add(f"{label}, batch 1, --tile 64 VAE decode: peak memory", peak_gib(device), None, "GiB")
    pipe = model = call = None
    reset_peak(device)


def bench_unet(args, S: Settings, table: Table, device: torch.device):
    """One U-Net forward at batch 2 (the CFG pair), SD 1.5 shapes."""
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
    pipe = diffusers_twin(model)
    theirs = {}
    if pipe is not None:
        unet = pipe.unet
        fwd = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
        with torch.no_grad():
            diff = (fwd(x, t, context).float() - model.unet(x, t, context).float()).abs().max().item()
            print(f"  same weights and inputs: U-Net max abs difference {diff:.2e}")
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
    model = None
    reset_peak(device)


def bench_vae(args, S: Settings, table: Table, device: torch.device):
    """The SD 1.5 VAE: decode of one latent, ours beside diffusers' on the same weights; on CUDA, the peak memory of
    a large decode tiled vs untiled."""
    model = build_model(args, S, device, "sd1")
    h = S.unet_size // 8
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, h, h, generator=g).to(device, S.dtype) * 5
    repeat = 20 if device.type == "cuda" else 3
    pipe = diffusers_twin(model)
    with torch.no_grad():  # timed beside diffusers' decode, so both see the same machine state
        decode_ours = timed(lambda: model.decode_latents(z), device, repeat=repeat)
        decode_theirs = None
        if pipe is not None:
            diff = (model.decode_latents(z).float() - pipe.vae.decode(z / model.scale_factor).sample.float())
            print(f"  same weights and latent: decoded image max abs difference {diff.abs().max().item():.2e}")
            decode_theirs = timed(lambda: pipe.vae.decode(z / model.scale_factor).sample, device, repeat=repeat)
    pipe = None
    reset_peak(device)
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


def time_training(model: ldm.LatentDiffusion, unet, fwd, S: Settings, device: torch.device,
                  channels_last: bool = False, steps: int = 10, params: list = None) -> tuple[float, float, float]:
    """(images/s, peak GiB, seconds of the 3 warm-up steps: compile time) of train.py's U-Net step
    (ldm.diffusion_loss, backward, clipping, fused AdamW, EMA) on random latents and contexts of the training shapes.
    params: what trains (default: the U-Net's parameters that require grad; a LoRA's)."""
    reset_peak(device)
    torch.manual_seed(0)
    B, h = S.train_batch, S.train_size // model.downsample_factor
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(S.train_precision)
    z0 = torch.randn(B, model.latent_channels, h, h, device=device)
    if channels_last:
        z0 = z0.to(memory_format=torch.channels_last)
    context = torch.randn(B, 77, model.unet.cfg.context_dim, device=device)
    params = params if params is not None else [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
    ema = [p.detach().clone() for p in params]

    def step():
        t = torch.randint(0, 1000, (B,), device=device)
        noise = torch.randn_like(z0)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = ldm.diffusion_loss(model, fwd, z0, noise, t, context)  # train.py's loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-4)

    start = time.perf_counter()
    for _ in range(3):
        step()
    sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return B * steps / (time.perf_counter() - start), peak_gib(device), warmup


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]  # attn+ff


def lora_training(model: ldm.LatentDiffusion, S: Settings, device: torch.device, steps: int,
                  diffusers_config: dict = None) -> tuple[float, float, float]:
    """time_training of a rank-16 LoRA on the attention and feed-forward layers (train.py's default targets) of a
    frozen U-Net held in the autocast dtype, as train.py --lora-rank 16 runs it; diffusers_config: diffusers' U-Net
    with peft's adapters on the same layers instead (its LoRA weights in float32, as diffusers' LoRA script keeps
    them)."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(S.train_precision)
    torch.manual_seed(0)
    with torch.device(device):
        unet = (type(model.unet)(model.unet.cfg) if diffusers_config is None else
                __import__("diffusers").UNet2DConditionModel(**diffusers_config))
    unet.requires_grad_(False).to(amp or torch.float32).train()
    if diffusers_config is None:
        model.unet = unet
        params = list(lora_lib.LoRANetwork(model, 16, which="attn+ff").parameters())
        fwd = unet
    else:
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        fwd = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
    print(f"  {'ldm' if diffusers_config is None else 'diffusers + peft'} LoRA: "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters", flush=True)
    return time_training(model, unet, fwd, S, device, steps=steps, params=params)


def bench_train(args, S: Settings, table: Table, device: torch.device):
    """train.py's U-Net step (forward, loss, backward, clipping, AdamW, EMA) on cached latents (random latents and
    contexts of the right shapes); diffusers' U-Net of the same architecture in the same loop."""
    model = ldm.build_model(S.train_config, device="meta")  # for its configs only
    unet_cfg, h = model.unet.cfg, S.train_size // model.downsample_factor
    model.alphas_cumprod = model.alphas_cumprod.to(device)  # the schedule is real even in a meta-built model

    steps = 10 if device.type == "cuda" else 3
    results = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        with torch.device(device):
            unet = type(model.unet)(unet_cfg).train()
        unet.cfg.use_checkpoint = ckpt
        results["ldm", ckpt] = time_training(model, unet, unet, S, device, steps=steps)
        print(f"  ldm grad checkpointing {ckpt}: {results['ldm', ckpt][0]:.2f} images/s, "
              f"peak {results['ldm', ckpt][1]:.2f} GiB", flush=True)
        del unet
    if importlib.util.find_spec("diffusers") is not None:
        from diffusers import UNet2DConditionModel
        config = diffusers_configs(model)[0]
        for ckpt in (False, True):
            torch.manual_seed(0)
            with torch.device(device):
                unet = UNet2DConditionModel(**config).train()
            if ckpt:
                unet.enable_gradient_checkpointing()
            fwd = lambda x, t, c, unet=unet: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
            results["diffusers", ckpt] = time_training(model, unet, fwd, S, device, steps=steps)
            print(f"  diffusers grad checkpointing {ckpt}: {results['diffusers', ckpt][0]:.2f} images/s, "
                  f"peak {results['diffusers', ckpt][1]:.2f} GiB", flush=True)
            del unet, fwd
    results["ldm lora", False] = lora_training(model, S, device, steps)
    if importlib.util.find_spec("diffusers") is not None and importlib.util.find_spec("peft") is not None:
        results["diffusers lora", False] = lora_training(model, S, device, steps, diffusers_configs(model)[0])
    for who in ("ldm", "diffusers"):
        if (who + " lora", False) in results:
            (ips, peak, _), (full_ips, full_peak, _) = results[who + " lora", False], results[who, False]
            print(f"  {who} LoRA rank 16: {ips:.2f} images/s ({ips / full_ips:.2f}x full fine-tuning), peak "
                  f"{peak:.2f} GiB ({peak / full_peak:.0%} of full fine-tuning)", flush=True)
    if device.type == "cuda":  # the fast paths last: a compile that outlasts a time limit loses nothing else
        for ckpt in ((False, True) if args.compile else (False,)):
            torch.manual_seed(0)
            with torch.device(device):
                unet = type(model.unet)(unet_cfg).train()
            unet.cfg.use_checkpoint = ckpt
            unet.to(memory_format=torch.channels_last)
            if not ckpt:
                results["ldm cl", False] = time_training(model, unet, unet, S, device, channels_last=True,
                                                         steps=steps)
                print(f"  ldm channels_last: {results['ldm cl', False][0]:.2f} images/s, "
                      f"peak {results['ldm cl', False][1]:.2f} GiB", flush=True)
            if args.compile:  # train.py --compile: block by block, forward and backward
                unet_lib.compile_blocks(unet, dynamic=False)
                results["ldm compiled", ckpt] = time_training(model, unet, unet, S, device, True, steps)
                ips, peak, warmup = results["ldm compiled", ckpt]
                print(f"  ldm channels_last + compile_blocks, grad checkpointing {ckpt}: {ips:.2f} images/s, peak "
                      f"{peak:.2f} GiB (compile: the 3 warm-up steps took {warmup:.0f} s)", flush=True)
            del unet
    label = (f"train {S.train_config} U-Net {S.train_size}px ({h}x{h} latents), batch {S.train_batch}, "
             f"{S.train_precision}")
    mem = "GiB" if device.type == "cuda" else "GiB RSS"
    for ckpt in (False, True):
        g = " + grad checkpointing" if ckpt else ""
        theirs = results.get(("diffusers", ckpt), (None, None))
        table.add(f"{label}{g}: images/s", results["ldm", ckpt][0], theirs[0], "img/s", lower_is_better=False)
        table.add(f"{label}{g}: peak memory", results["ldm", ckpt][1], theirs[1], mem)
    for key, name in ((("ldm cl", False), "channels_last"), (("ldm compiled", False), "channels_last + compile"),
                      (("ldm compiled", True), "channels_last + compile + grad checkpointing")):
        if key in results:
            theirs = results.get(("diffusers", key[1]), (None,))[0]
            table.add(f"{label}, ldm {name}: images/s", results[key][0], theirs, "img/s", lower_is_better=False)
            if key[0] == "ldm compiled":
                table.add(f"{label}, ldm {name}: compile time (3 warm-up steps)", results[key][2], None, "s")
    theirs = results.get(("diffusers lora", False), (None, None))
    table.add(f"{label}, LoRA rank 16 attn+ff, frozen base: images/s", results["ldm lora", False][0], theirs[0],
              "img/s", lower_is_better=False)
    table.add(f"{label}, LoRA rank 16 attn+ff, frozen base: peak memory", results["ldm lora", False][1], theirs[1],
              mem)
    (lora_ips, lora_peak, _), (full_ips, full_peak, _) = results["ldm lora", False], results["ldm", False]
    table.add(f"{label}, LoRA: images/s of full fine-tuning's", lora_ips / full_ips,
              theirs[0] and theirs[0] / results["diffusers", False][0], "x", lower_is_better=False)
    if device.type == "cuda":  # the CPU's peak RSS is the process's, never reset
        table.add(f"{label}, LoRA: peak memory of full fine-tuning's", lora_peak / full_peak,
                  theirs[1] and theirs[1] / results["diffusers", False][1], "x")
    for key in (("ldm", False), ("ldm compiled", False)):
        if (key[0], True) in results:
            cost = 1 - results[key[0], True][0] / results[key][0]
            print(f"  gradient checkpointing costs {key[0]} {cost:.0%} of its throughput")


STEP_COUNTS = (10, 15, 20, 30, 50)


def bench_samplers(args, S: Settings, table: Table, device: torch.device):
    """Accuracy, not speed: how close each deterministic sampler's images come, at 10 to 50 steps, to a 1,000-step
    DPM++ 2M solution of the same ODE from the same noise (RMS over pixels in [0, 1], the prompts x 2 seeds), and at
    how many steps it gets as close as DDIM at 50. The ancestral and SDE samplers draw fresh noise every step, so
    they converge to other images and are left out."""
    if not args.ckpt:
        print("  samplers: pass --ckpt a trained model (e.g. runs/emoji-ldm from the README's quick start)")
        return
    model = ldm.load_model(args.ckpt, device=device, dtype=torch.float32)

    def images(sampler: str, scheduler: str, steps: int) -> torch.Tensor:
        return torch.cat([ldm.sample(model, args.prompts, seed=seed, steps=steps, sampler=sampler,
                                     scheduler=scheduler, guidance_scale=3.0, output_type="tensor", progress=False)
                          for seed in (0, 1000)]).clamp(-1, 1) / 2 + 0.5

    reference = images("dpmpp_2m", "normal", 1000)
    rows = {("ddim", "-"): {n: images("ddim", "normal", n) for n in STEP_COUNTS}}
    for sampler in ("euler", "heun", "lms", "dpmpp_2m"):
        for scheduler in ldm.SCHEDULERS:
            rows[sampler, scheduler] = {n: images(sampler, scheduler, n) for n in STEP_COUNTS}
            print(f"  {sampler} {scheduler} done", flush=True)
    errors = {key: {n: (x - reference).pow(2).mean().sqrt().item() for n, x in runs.items()}
              for key, runs in rows.items()}
    ddim50 = errors["ddim", "-"][50]
    # DDIM solves the same ODE on SD's own grid, which starts below the largest sigma (t = 981 for 50 steps) and
    # stops at t = 1: how far that is from the reference even with every step
    ddim_floor = (images("ddim", "normal", 999) - reference).pow(2).mean().sqrt().item()
    lines = ["| sampler | schedule | " + " | ".join(f"{n} steps" for n in STEP_COUNTS) + " | as close as DDIM-50 at |",
             "|---|---|" + "---|" * (len(STEP_COUNTS) + 1)]
    for (sampler, scheduler), errs in errors.items():
        reach = next((f"{n} steps" for n in STEP_COUNTS if errs[n] <= ddim50), "> 50 steps")
        lines.append(f"| {sampler} | {scheduler} | " + " | ".join(f"{errs[n]:.4f}" for n in STEP_COUNTS)
                     + f" | {reach} |")
    table.extra.append(f"Samplers on {args.ckpt} (CFG 3, {len(args.prompts)} prompts x 2 seeds, {model.resolution}px), "
                       "RMS error against a 1,000-step DPM++ 2M solution:\n\n" + "\n".join(lines)
                       + f"\n\nDDIM at 999 steps: {ddim_floor:.4f} (its grid's own start and end, not step error)")


BENCHMARKS = {"sample": bench_sample, "dpmpp": bench_dpmpp, "sdxl": bench_sdxl,
              "unet": bench_unet, "vae": bench_vae, "train": bench_train, "load": bench_load,
              "samplers": bench_samplers}
def main(argv=None):
    args = make_parser().parse_args(argv)
    assert tuple(BENCHMARKS) == NAMES
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    S = GPU if device.type == "cuda" else CPU
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    versions = f"torch {torch.__version__}"
    if importlib.util.find_spec("diffusers") is not None:
        import diffusers
        versions += f", diffusers {diffusers.__version__}"
    print(f"{name}; {versions}", flush=True)
    table = Table()
    for what, bench in BENCHMARKS.items():
        if what in (args.only or BENCHMARKS):
            print(f"[{what}]", flush=True)
            bench(*((args, S, table) if what == "load" else (args, S, table, device)))
            if args.json:  # after each benchmark: a later one that runs out of time loses nothing before it
                Path(args.json).write_text(json.dumps(dict(device=name, versions=versions, rows=table.records(),
                                                           extra=table.extra), indent=1))
    text = f"{name}; {versions}\n\n" + (f"{table.markdown()}\n" if table.rows else "") + "".join(
        f"\n{extra}\n" for extra in table.extra)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
