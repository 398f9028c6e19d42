"""Text-to-image (and image-to-image) from the command line:

    python sample.py "a photograph of an astronaut riding a horse"
    python sample.py "a watercolor fox" --lora runs/lora/lora.safetensors:0.8
    python sample.py "a watercolor fox <lora:lora:0.8>" --lora-dir runs/lora

Each PNG carries its generation settings in a `parameters` text chunk, in the format of the AUTOMATIC1111 web UI,
so `python sample.py --replay outputs/00000.png` regenerates it and checks the pixels. Without --ckpt the SD 1.5
weights are downloaded once into $LDM_HOME (default: the user cache folder, e.g. ~/.cache/ldm).

LoRAs come as A1111's prompt tags, <lora:NAME:WEIGHT> (NAME.safetensors, .pt or .ckpt in --lora-dir), and as
--lora FILE[:WEIGHT]; all of an image's LoRAs are merged into the weights before it is drawn (images whose prompts
name other LoRAs are drawn apart). The PNG records the tags in its prompt (a --lora file as the tag A1111 would
have had, added at the prompt's end) and A1111's "Lora hashes", by which --replay finds a renamed file.
"""

import argparse
import itertools
import math
import random
import re
import signal
import sys
import threading
import typing
from pathlib import Path

from cli import HelpFormatter, Parser, UserError, explicit_flags, run
from parameters import (EXTRA_NETWORK, SAMPLER_NAMES, SCHEDULE_NAMES, Job, format_lora_hashes, format_parameters,
                        lora_hash_for, lora_tag, lora_tags, parse_lora_hashes, parse_parameters)

SEED_MAX = 2 ** 64 - 1  # what torch.Generator.manual_seed takes


def lora_flag(text: str) -> tuple[Path, float]:
    """--lora FILE[:WEIGHT] -> (FILE, WEIGHT): a last ':' followed by a number is the weight, else part of the path."""
    path, sep, weight = text.rpartition(":")
    try:
        value = float(weight) if sep and path else None
    except ValueError:
        value = None
    if value is None:
        return Path(text), 1.0
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: the weight must be a finite number")
    return Path(path), value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Generate images with a Stable Diffusion checkpoint.",
                                formatter_class=HelpFormatter)
    p.add_argument("prompt", nargs="?", help="what to draw (optional with --prompts-file or --replay)")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt: what to steer away from")
    p.add_argument("--prompts-file", type=Path, metavar="FILE", help="UTF-8 text file, one prompt per line (blank "
                   "lines skipped); the model is loaded once")
    p.add_argument("--ckpt", type=Path, metavar="PATH", help="SD 1.x/2.x or SDXL .safetensors/.ckpt, diffusers "
                   "folder, or a train.py run: its folder or a ckpt-<step>.pt (default: SD 1.5 fp16, downloaded on "
                   "first use)")
    p.add_argument("--vae", type=Path, metavar="PATH", help="standalone VAE to use instead of the checkpoint's "
                   "(e.g. vae-ft-mse; sdxl-vae-fp16-fix runs in fp16, where SDXL's own VAE is kept in fp32/bf16)")
    p.add_argument("--lora", type=lora_flag, action="append", metavar="FILE[:WEIGHT]", help="merge "
                   "this LoRA (kohya or diffusers/PEFT .safetensors, or .pt) into the model's weights (not a "
                   "--refiner's) at WEIGHT (default 1); repeatable, and added to the prompt's <lora:NAME:WEIGHT> "
                   "tags. The PNG records it as the tag <lora:NAME:WEIGHT> (NAME: the file's name without its "
                   "extension) at the end of the prompt")
    p.add_argument("--lora-dir", type=Path, default=Path("models/Lora"), metavar="DIR", help="where a prompt's "
                   "<lora:NAME:WEIGHT> tags (A1111's syntax; <lora:NAME> is weight 1) find NAME.safetensors, .pt or "
                   ".ckpt, subfolders included (the default is A1111's folder, under the working directory; "
                   "ComfyUI's is models/loras). --replay and --params-from also look beside the PNG, and for a "
                   "renamed file by the Lora hashes the PNG records")
    p.add_argument("--embeddings", type=Path, metavar="DIR", help="textual-inversion embeddings (A1111 .pt or "
                   ".safetensors files, or a folder of them): a prompt word equal to a file's name becomes its vectors")
    p.add_argument("--prediction", choices=["eps", "v"], help="U-Net prediction type (default: from the file; "
                   "SD 2.x is probed)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (1 turns it off)")
    p.add_argument("--sampler", choices=list(SAMPLER_NAMES), default="ddim", help="sampler: ddim on its own "
                   "timestep grid, the others (k-diffusion's, as in A1111 and ComfyUI) on --scheduler's noise levels")
    p.add_argument("--scheduler", choices=list(SCHEDULE_NAMES), default="normal", help="noise levels of the "
                   "non-DDIM samplers: normal (timesteps evenly from 999 to 0), karras (rho 7), exponential")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 is deterministic, 1 is DDPM-like")
    p.add_argument("--clip-skip", type=int, default=1, metavar="N", help="condition on the text encoder's layer N "
                   "from the end (A1111's Clip skip; 1 = the model's own)")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the first image, image i uses seed + i; 0 to "
                   "2**64 - 1, -1 for a random one (default: random, printed)")
    p.add_argument("--height", type=int, metavar="PX", help="image height, any multiple of 8 (default: the model's "
                   "resolution)")
    p.add_argument("--width", type=int, metavar="PX", help="image width, any multiple of 8 (default: the model's "
                   "resolution)")
    p.add_argument("--n", type=int, default=1, help="images per prompt (more than one also writes a grid)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="images denoised together: faster on a "
                   "GPU, more memory (batched float maths may change a pixel by 1 against --replay)")
    p.add_argument("--refiner", type=Path, metavar="PATH", help="SDXL: a refiner checkpoint (sd_xl_refiner_1.0) that "
                   "runs the end of the schedule")
    p.add_argument("--refiner-switch", type=float, default=0.8, metavar="F", help="SDXL: the fraction of the "
                   "schedule the base runs before the refiner takes over")
    p.add_argument("--original-size", type=int, nargs=2, metavar=("W", "H"), help="SDXL: the size the image should "
                   "look as if it had before resizing (default: --width --height)")
    p.add_argument("--target-size", type=int, nargs=2, metavar=("W", "H"), help="SDXL base: the size conditioning's "
                   "target (default: --width --height)")
    p.add_argument("--crop", type=int, nargs=2, default=[0, 0], metavar=("TOP", "LEFT"), help="SDXL: the top-left "
                   "corner of the crop the image should look cut from")
    p.add_argument("--aesthetic-score", type=float, default=6.0, help="SDXL refiner: the aesthetic score to "
                   "condition on (the negative prompt gets 2.5)")
    p.add_argument("--init-image", type=Path, metavar="PATH", help="img2img: start from this image (resized to the "
                   "output size)")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: fraction of the steps to run (1 ignores "
                   "the init image)")
    p.add_argument("--out", type=Path, default=Path("outputs"), metavar="PATH", help="folder for numbered PNGs, or "
                   "a .png path (existing files are never overwritten)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="where to run")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="weights' precision "
                   "(auto: fp16 on CUDA, fp32 elsewhere)")
    p.add_argument("--tile", type=int, metavar="N", help="decode the image in overlapping tiles of N latent pixels "
                   "(64 = 512 px), so memory follows the tile and not the image: for large images")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net: faster steps after a minute or "
                   "so of compiling on the first image")
    p.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, launch each denoising step's kernels "
                   "one by one instead of replaying a captured CUDA graph (same images, slower)")
    p.add_argument("--params-from", type=Path, metavar="PNG", help="take prompt (with its LoRA tags), negative "
                   "prompt, steps, sampler, schedule, CFG, seed, size and clip skip from this PNG's parameters (ours "
                   "or A1111's); flags given override them")
    p.add_argument("--replay", type=Path, metavar="PNG", help="regenerate this PNG from its parameters and compare "
                   "pixels (exit 0 when identical, 1 when not); without --ckpt, the model its 'Model hash' names, "
                   "looked for in the download cache and beside the PNG")
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer at once, before torch's seconds-long import

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

import checkpoint
import clip
import ldm
import lora as lora_lib
import vae as vae_lib

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# -----------------------------------------------------------------------------------------------------------------
# Files: prompts, init image, PNG output


def read_prompts(args) -> list[str]:
    prompts = [args.prompt] if args.prompt else []
    if args.prompts_file:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts-file {args.prompts_file}: {getattr(e, 'strerror', None) or e}")
        prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"--prompts-file {args.prompts_file}: no prompts in it (one prompt per line)")
    if not prompts:
        raise UserError("no prompt: give one, or --prompts-file FILE, or --replay IMAGE")
    return prompts


def read_image(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def image_tensor(im: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> [1, 3, H, W] in [-1, 1], upright (EXIF orientation) and resized to the output size."""
    arr = np.asarray(ImageOps.exif_transpose(im).convert("RGB").resize((width, height), Image.LANCZOS),
                     dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1).permute(2, 0, 1)[None]


def _candidates(out: Path, grid: bool):
    """Paths to try, in order: the explicit file, then file-1, file-2, ...; or in a folder the next free number."""
    if out.suffix and not out.is_dir():
        stem = out.stem + ("-grid" if grid else "")
        yield out.with_name(stem + out.suffix)
        yield from (out.with_name(f"{stem}-{i}{out.suffix}") for i in itertools.count(1))
    else:
        prefix = "grid-" if grid else ""
        used = [int(m[1]) for f in out.iterdir() if (m := re.fullmatch(rf"{prefix}(\d+)\.png", f.name))]
        yield from (out / f"{prefix}{i:05d}.png" for i in itertools.count(max(used, default=-1) + 1))


def save_png(image: Image.Image, out: Path, parameters: str, grid: bool = False) -> Path:
    """Write a PNG with a `parameters` text chunk; never replaces a file (exclusive create, next free name)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    folder = out.parent if out.suffix and not out.is_dir() else out
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder {folder} ({e.strerror or e})") from None
    for path in _candidates(out, grid):
        try:
            with open(path, "xb") as f:
                try:
                    image.save(f, format="PNG", pnginfo=info)
                except BaseException:  # disk full, Ctrl-C: no half-written PNG is left behind
                    path.unlink(missing_ok=True)
                    raise
            return path
        except FileExistsError:
            continue


# -----------------------------------------------------------------------------------------------------------------
# Model and sampling


def load(args) -> tuple[ldm.LatentDiffusion, dict]:
    """The model on the chosen device/dtype (+ the --vae swap) and its fields for the parameters text."""
    if args.device == "cuda" and not torch.cuda.is_available() or (
            args.device == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device {args.device}: not available on this machine (use --device cpu)")
    device = ldm.pick_device(args.device)
    dtype = DTYPES.get(args.dtype) or ldm.default_dtype(device)
    try:
        path = args.ckpt or checkpoint.default_checkpoint()
    except checkpoint.DownloadError as e:
        raise UserError(f"{e}; to use a checkpoint you already have, pass --ckpt PATH") from None
    path = checkpoint.run_file(path) if path.is_dir() and checkpoint.run_file(path) else path  # a train.py run folder
    model = ldm.load_model(path, device=device, dtype=dtype, prediction_type=args.prediction)
    info = {"Model hash": checkpoint.file_sha256(path, progress=path.is_file() and path.stat().st_size > 1 << 28)[:10]
                          if path.is_file() else None,
            "Model": path.stem if path.is_file() else path.name}
    if args.vae:
        try:
            vae = vae_lib.load_autoencoder(args.vae, device=device, dtype=dtype)
        except (OSError, ValueError) as e:  # CheckpointError is a ValueError
            raise UserError(f"--vae {args.vae}: {e}") from None
        own, new = model.vae.state_dict(), vae.state_dict()
        if own.keys() != new.keys() or any(own[k].shape != new[k].shape for k in own):
            raise UserError(f"--vae {args.vae}: its keys or shapes do not fit this model's autoencoder")
        vae.scale_factor = model.scale_factor  # the U-Net was trained on latents at the checkpoint's scale
        model.vae = vae.eval().requires_grad_(False)
        info.update({"VAE hash": checkpoint.file_sha256(args.vae)[:10] if args.vae.is_file() else None,
                     "VAE": args.vae.stem})
    if args.embeddings:
        names = model.load_embeddings(args.embeddings)
        print(f"{len(names)} embedding{'s' * (len(names) != 1)} from {args.embeddings}: {', '.join(names)}",
              file=sys.stderr)
    if device.type == "cuda":  # NHWC is the layout tensor-core convolutions use: ~20% off a replayed U-Net step
        model.unet.to(memory_format=torch.channels_last)
    if args.compile:
        model.unet.compile(dynamic=False)  # compiled on the first step; one graph per batch shape
    return model, info


def available_memory(device: torch.device) -> int | None:
    """Bytes free for activations: the GPU's free memory, or the system's MemAvailable; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_size(model: ldm.LatentDiffusion, width: int, height: int, batch: int = 1, tile: int = None) -> tuple:
    """(width, height): the model's resolution where not given; one line for a size that cannot work."""
    width = model.resolution if width is None else width
    height = model.resolution if height is None else height
    f = model.downsample_factor
    if width <= 0 or height <= 0 or width % f or height % f:
        raise UserError(f"size {width}x{height}: width and height must be positive multiples of {f} (the VAE's "
                        "downsampling factor)")
    need, free = ldm.sampling_memory(model, batch, height, width, tile), available_memory(model.device)
    if free is not None and need > free:
        raise UserError(f"size {width}x{height} (batch {batch}) needs about {need / 2 ** 30:.1f} GiB for sampling, "
                        f"more than the {free / 2 ** 30:.1f} GiB free; decode in tiles (--tile 64), or make the "
                        "image or the batch smaller")
    return width, height


def job_info(model: ldm.LatentDiffusion, job: Job, info: dict, loras: dict = None) -> dict:
    """The model's fields for the parameters text, plus the job's "Lora hashes" (`loras`, lora_info) and A1111's "TI
    hashes" of the embeddings its prompts use."""
    used = model.embeddings_used([job.negative, lora_tags(job.prompt)[0]])
    return {**info, **(loras or {}), "TI hashes": clip.ti_hashes(used) if used else None}


def check_embeddings(model: ldm.LatentDiffusion, fields: dict, png: Path):
    """Every embedding a PNG's "TI hashes" names must be loaded (--embeddings); a different file is a warning."""
    loaded = {name: e.shorthash for name, e in model.embeddings.items()}
    for entry in filter(None, (e.strip() for e in fields.get("TI hashes", "").split(","))):
        name, _, want = entry.partition(":")
        if name.strip() not in loaded:
            raise UserError(f"{png} uses the embedding {name.strip()!r} (hash {want.strip()}); pass --embeddings with "
                            "the folder that holds it")
        if loaded[name.strip()] != want.strip():
            print(f"warning: embedding {name.strip()} is {loaded[name.strip()]}, the image's was {want.strip()}",
                  file=sys.stderr)


def _height_width(size: tuple[int, int] | None) -> tuple[int, int] | None:
    return None if size is None else (size[1], size[0])  # the PNG's and the flags' width x height -> (h, w)


def generate(model: ldm.LatentDiffusion, jobs: list[Job], init: torch.Tensor = None, tile: int = None,
             cuda_graph: bool = True, refiner: ldm.LatentDiffusion = None) -> list[Image.Image]:
    """The images of jobs that share every setting but prompt, negative prompt and seed."""
    job = jobs[0]
    sizes = ldm.Sizes(original_size=_height_width(job.original_size), target_size=_height_width(job.target_size),
                      crop=tuple(job.crop or (0, 0)),
                      aesthetic_score=ldm.Sizes.aesthetic_score if job.aesthetic_score is None else job.aesthetic_score)
    try:
        return ldm.sample(model, [lora_tags(j.prompt)[0] for j in jobs], negative_prompts=[j.negative for j in jobs],
                          seed=[j.seed for j in jobs], steps=job.steps, guidance_scale=job.cfg, eta=job.eta,
                          height=job.height, width=job.width, sampler=job.sampler, scheduler=job.scheduler,
                          clip_skip=job.clip_skip, init_image=init, strength=job.strength or 0.75, sizes=sizes,
                          refiner=refiner, refiner_switch=job.refiner_switch or 0.8, tile=tile,
                          cuda_graph=cuda_graph)
    except ldm.NonFiniteError as e:
        raise UserError(f"{e} (--dtype fp32 or bf16 may help)") from None
    except ValueError as e:  # settings ldm.sample refuses (e.g. from a --replay PNG)
        raise UserError(str(e)) from None


def sdxl_settings(model: ldm.LatentDiffusion, args, width: int, height: int, refiner) -> dict:
    """The Job fields of SDXL's size conditioning and refiner (none for other models)."""
    if not ldm.is_sdxl(model):
        return {}
    return dict(original_size=tuple(args.original_size or (width, height)),
                target_size=tuple(args.target_size or (width, height)), crop=tuple(args.crop),
                aesthetic_score=args.aesthetic_score if refiner is not None else None,
                refiner_switch=args.refiner_switch if refiner is not None else None)


def load_refiner(args, model: ldm.LatentDiffusion) -> tuple[ldm.LatentDiffusion | None, dict]:
    """--refiner: an SDXL refiner beside an SDXL base, on the same device and dtype, and its PNG fields."""
    if args.refiner is None:
        return None, {}
    if not ldm.is_sdxl(model):
        raise UserError("--refiner goes with an SDXL base checkpoint (--ckpt sd_xl_base_1.0.safetensors)")
    refiner = ldm.load_model(args.refiner, device=model.device, dtype=model.dtype)
    if not ldm.is_sdxl(refiner) or refiner.text_encoder.clip_l is not None:
        raise UserError(f"--refiner {args.refiner}: not an SDXL refiner (it should hold one text encoder, bigG)")
    digest = checkpoint.file_sha256(args.refiner)[:10] if args.refiner.is_file() else "-"
    return refiner, {"Refiner": f"{args.refiner.stem} [{digest}]"}


# -----------------------------------------------------------------------------------------------------------------
# LoRA: the files of <lora:NAME:WEIGHT> tags and --lora flags, their hashes, merged per group of images

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # the files A1111 lists in its Lora folder; for one NAME, this order


class LoraUse(typing.NamedTuple):
    """One LoRA of an image: the name its tag and "Lora hashes" give it, its file and its weight (the text
    encoders'; the U-Net's too unless unet_weight says otherwise: <lora:NAME:TE:UNET>)."""
    name: str
    path: Path
    weight: float
    unet_weight: float | None = None


class LoraFinder:
    """The file a <lora:NAME> tag names: NAME + one of LORA_SUFFIXES anywhere under `folders` (subfolders too, as
    A1111 lists its models/Lora). For the tags of an image (--replay, --params-from), whose "Lora hashes" say which
    file each was (`recorded`), the file with that hash wins, so that a renamed file is found too."""

    def __init__(self, folders: list[tuple[Path, str]], recorded: dict[str, str] = None):
        self.folders = list(dict.fromkeys(folders))  # (folder, how to name it in messages)
        self.recorded = recorded or {}
        self.hashes: dict[Path, str] = {}
        self._files = None

    def files(self) -> list[Path]:
        if self._files is None:
            found = {p.resolve(): p for folder, _ in self.folders if folder.is_dir() for p in sorted(folder.rglob("*"))
                     if p.suffix.lower() in LORA_SUFFIXES and p.is_file()}
            self._files = sorted(found.values(), key=lambda p: LORA_SUFFIXES.index(p.suffix.lower()))
        return self._files

    def shorthash(self, path: Path) -> str:
        """A1111's 12 hex digits of a LoRA file (checkpoint.lora_sha256), once per file and run."""
        if path not in self.hashes:
            self.hashes[path] = checkpoint.lora_sha256(path, progress=path.stat().st_size > 1 << 28)[:12]
        return self.hashes[path]

    def find(self, name: str) -> Path:
        named = [p for p in self.files() if p.stem == name]
        want = lora_hash_for(self.recorded, name)
        if want:
            for path in named + [p for p in self.files() if p not in named]:  # by name first: most often it is that
                if self.shorthash(path) == want:
                    if path.stem != name:
                        print(f"<lora:{name}> is {path}: the file with the image's Lora hash {want}", file=sys.stderr)
                    return path
        if named:
            if want:
                print(f"warning: LoRA {name} is {named[0]} (hash {self.shorthash(named[0])}), the image's had hash "
                      f"{want}", file=sys.stderr)
            return named[0]
        where = " or ".join(f"{folder} ({what}{'' if folder.is_dir() else ', no such folder'})"
                            for folder, what in self.folders)
        raise UserError(f"<lora:{name}>: no {name}.safetensors, .pt or .ckpt in {where}"
                        + (f", and no file there has the image's Lora hash {want}" if want else "")
                        + "; pass --lora-dir with the folder that holds it")


def lora_uses(prompt: str, finder: LoraFinder, flags: list[tuple[Path, float]] = ()) -> tuple[LoraUse, ...]:
    """The LoRAs of an image: its prompt's tags, then the --lora files, in the order they are merged."""
    uses = [LoraUse(tag.name, finder.find(tag.name), tag.weight, tag.unet) for tag in lora_tags(prompt)[1]]
    uses += [LoraUse(path.stem, path, weight) for path, weight in flags]
    for a in uses:
        same = [b.path for b in uses if b.name == a.name and b.path.resolve() != a.path.resolve()]
        if same:
            raise UserError(f"two LoRA files named {a.name!r} ({a.path} and {same[0]}): the image could not say which "
                            "it used; rename one")
    return tuple(uses)


def flag_loras(args) -> list[tuple[Path, float]]:
    """--lora FILE[:WEIGHT] files, each checked to exist (before the model loads)."""
    for path, _ in args.lora or []:
        if not path.is_file():
            raise UserError(f"--lora {path}: {'is a folder' if path.is_dir() else 'no such file'}")
        lora_tag(path.stem, 1.0)  # its name must fit in the tag the PNG records
    return list(args.lora or [])


def check_loras(model: ldm.LatentDiffusion, uses: list[tuple[LoraUse, ...]], ckpt) -> None:
    """Every LoRA file must fit the model (one line naming the file, before any image); a model loaded with a LoRA
    merged in (a LoRA training run) draws one set of further LoRAs only, as removing them would remove its own."""
    for path in dict.fromkeys(u.path for group in uses for u in group):
        lora_lib.resolve(model, lora_lib.read_lora(path)[0], path)
    if model.loras and len(set(uses)) > 1:
        raise UserError(f"{ckpt} has a LoRA merged in (a LoRA training run), so its images cannot each take other "
                        "LoRAs; pass the run's base model as --ckpt and its lora.safetensors as --lora")


def merge_loras(model: ldm.LatentDiffusion, uses: tuple[LoraUse, ...], merged: tuple[LoraUse, ...] = ()):
    """Make `uses` the LoRAs this script has merged into the model, where `merged` are; returns `uses`. Removing
    restores the weights bit for bit, so each image gets exactly its own LoRAs, merged in its own order."""
    if uses == merged:
        return uses
    if merged:
        model.remove_loras()
    for use in uses:
        model.apply_lora(use.path, use.weight, name=use.name, unet_multiplier=use.unet_weight)
    if uses:
        print("LoRA " + ", ".join(f"{u.name} x{u.weight:g}" + (f" (U-Net x{u.unet_weight:g})" if u.unet_weight
                                                                  is not None else "") for u in uses), file=sys.stderr)
    return uses


def lora_info(uses: tuple[LoraUse, ...], finder: LoraFinder) -> dict:
    return {"Lora hashes": format_lora_hashes([(u.name, finder.shorthash(u.path)) for u in uses]) if uses else None}


def batches(keys: list, size: int) -> list[range]:
    """Runs of at most `size` consecutive indices with equal keys (the LoRAs merged for them)."""
    out, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or i - start == size or keys[i] != keys[start]:
            out.append(range(start, i))
            start = i
    return out


def check_negative(negative: str):
    if EXTRA_NETWORK.search(negative):
        raise UserError("the negative prompt has an extra-network tag (<lora:...>); LoRA tags go in the prompt (A1111 "
                        "reads none in the negative prompt)")


# -----------------------------------------------------------------------------------------------------------------
# The two commands: generate, replay


def check_args(args):
    for name, low in (("steps", 1), ("n", 1), ("batch_size", 1)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if args.steps > 999:
        raise UserError(f"--steps must be at most 999 (the 1000-step training schedule, offset by 1), got {args.steps}")
    if not math.isfinite(args.cfg) or not math.isfinite(args.eta):
        raise UserError(f"--cfg and --eta must be finite numbers, got {args.cfg} and {args.eta}")
    if args.seed is not None and not (args.seed == -1 or 0 <= args.seed <= SEED_MAX - (args.n - 1)):
        raise UserError(f"--seed must be in 0..{SEED_MAX} (image i uses seed + i, up to {SEED_MAX}), or -1 for a "
                        f"random one; got {args.seed}")
    if args.tile is not None and args.tile < 8:
        raise UserError(f"--tile must be at least 8 latent pixels (64 = 512 px is a good size), got {args.tile}")
    if args.eta < 0:
        raise UserError(f"--eta must be >= 0, got {args.eta}")
    if args.eta and args.sampler != "ddim":
        raise UserError(f"--eta is DDIM's; {args.sampler} has its own noise (euler_a and the SDE samplers add it)")
    if args.sampler == "ddim" and args.scheduler != "normal":
        raise UserError(f"--scheduler {args.scheduler} is for the k-diffusion samplers; ddim runs its own timestep "
                        "grid (pick e.g. --sampler dpmpp_2m)")
    if args.init_image and not 0.0 < args.strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1], got {args.strength}")
    if args.out.suffix and not args.out.is_dir() and args.out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: give a folder or a .png file (the parameters live in a PNG text chunk)")


def lora_finder(args, png: Path = None, fields: dict = None) -> LoraFinder:
    """Where tags find their files: --lora-dir, and for an image's own tags the image's folder and its Lora hashes."""
    folders = [(args.lora_dir, "--lora-dir")] + ([(png.resolve().parent, "beside the image")] if png else [])
    return LoraFinder(folders, parse_lora_hashes((fields or {}).get("Lora hashes")))


def run_generate(args, params_fields: dict = None) -> int:
    check_args(args)
    prompts = read_prompts(args)
    check_negative(args.negative or "")
    flags = flag_loras(args)
    finder = lora_finder(args, args.params_from, params_fields)
    prompt_loras = {p: lora_uses(p, finder, flags) for p in prompts}  # every file found before the model loads
    suffix = "".join(lora_tag(path.stem, weight) for path, weight in flags)  # as A1111 records a LoRA it adds
    init_pil = read_image(args.init_image, "--init-image") if args.init_image else None
    model, info = load(args)
    check_loras(model, list(prompt_loras.values()), args.ckpt)
    if params_fields:
        check_embeddings(model, params_fields, args.params_from)
    width, height = check_size(model, args.width, args.height, args.batch_size, args.tile)
    init = image_tensor(init_pil, width, height) if init_pil else None
    seed = args.seed if args.seed not in (None, -1) else random.randrange(2 ** 32)  # -1: random, as in A1111
    print(f"seed {seed}" + (f" (images use {seed}..{seed + args.n - 1})" if args.n > 1 else ""), file=sys.stderr)
    refiner, refiner_info = load_refiner(args, model)
    info = {**info, **refiner_info}
    sdxl = sdxl_settings(model, args, width, height, refiner)
    jobs = [Job(p + suffix, args.negative or "", seed + i, args.steps, args.cfg, width, height, args.sampler,
                args.scheduler, args.eta, args.strength if init is not None else None, args.clip_skip, **sdxl)
            for p in prompts for i in range(args.n)]
    loras = [prompt_loras[p] for p in prompts for _ in range(args.n)]
    stop = []

    def on_sigint(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print("\nstopping after the current image (Ctrl-C again to stop now)", file=sys.stderr)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    written, merged = [], ()
    try:
        for run_of in batches(loras, args.batch_size):  # images with other LoRAs are drawn apart
            if stop:
                break
            chunk = [jobs[i] for i in run_of]
            merged = merge_loras(model, loras[run_of[0]], merged)
            images = generate(model, chunk, init, tile=args.tile, cuda_graph=not args.no_cuda_graph, refiner=refiner)
            for job, image in zip(chunk, images):
                text = format_parameters(job, job_info(model, job, info, lora_info(merged, finder)))
                print(save_png(image, args.out, text), flush=True)
                written.append(image)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    if len(written) > 1:
        cols = args.n if len(prompts) > 1 else math.ceil(math.sqrt(len(written)))
        text = format_parameters(jobs[0], {**info, **lora_info(loras[0], finder)})
        print(save_png(ldm.image_grid(written, cols), args.out, text, grid=True))
    if stop:
        print(f"interrupted: kept the {len(written)} image(s) written", file=sys.stderr)
        return 130
    return 0


WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def find_model(fields: dict, png: Path) -> Path | None:
    """The checkpoint a PNG names by its 'Model hash' (the first 10 hex digits of its sha256): the default weights
    (downloaded if need be), else a file in the download cache or beside the PNG. None: use the default."""
    want = fields.get("Model hash")
    if not want or want == checkpoint.DEFAULT_MODEL_SHA256[:10]:
        return None
    folders = dict.fromkeys([checkpoint.cache_dir(), png.resolve().parent])
    for path in sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir()
                       if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        if checkpoint.file_sha256(path, progress=path.stat().st_size > 1 << 28)[:10] == want:
            print(f"{png.name} names Model hash {want}: {path}", file=sys.stderr)
            return path
    raise UserError(f"{png} was made with Model hash {want} (Model: {fields.get('Model', '?')}), which is neither the "
                    f"default weights nor a file in {' or '.join(map(str, folders))}; pass it with --ckpt PATH")


def read_parameters(path: Path, flag: str) -> tuple[Image.Image, Job, dict]:
    """(the image, its settings, its raw fields) from a PNG's `parameters` text chunk (ours or A1111's)."""
    image = read_image(path, f"{flag} image")
    text = getattr(image, "text", {}).get("parameters")
    if not text:
        raise UserError(f"{flag} {path}: no 'parameters' text chunk (not written by this script or the A1111 UI)")
    job, fields = parse_parameters(text)
    if "Version" in fields and fields.get("RNG") != "CPU":  # A1111's default draws its noise on the GPU
        print(f"warning: {path.name} was made with A1111's {fields.get('RNG', 'GPU')} noise; the same settings give "
              "another picture here (A1111 and this project agree with its RNG source set to CPU)", file=sys.stderr)
    return image, job, fields


def take_parameters(args, explicit: set[str]) -> dict:
    """--params-from: the PNG's settings for every flag not given on the command line; returns its fields."""
    _, job, fields = read_parameters(args.params_from, "--params-from")
    settings = dict(prompt=job.prompt, negative=job.negative, steps=job.steps, sampler=job.sampler,
                    scheduler=job.scheduler, cfg=job.cfg, eta=job.eta, seed=job.seed, width=job.width,
                    height=job.height, clip_skip=job.clip_skip)
    if job.strength is not None and args.init_image:
        settings["strength"] = job.strength
    elif job.strength is not None:
        print(f"note: {args.params_from.name} was made with img2img (Denoising strength {job.strength}); without "
              "--init-image this is text-to-image", file=sys.stderr)
    for name, value in settings.items():
        if name not in explicit:
            setattr(args, name, value)
    return fields


def run_replay(args) -> int:
    image, job, fields = read_parameters(args.replay, "--replay")
    if job.strength is not None and not args.init_image:
        raise UserError(f"{args.replay} was made with img2img (Denoising strength {job.strength}); pass the same "
                       "--init-image")
    init_pil = read_image(args.init_image, "--init-image") if job.strength is not None else None
    if args.ckpt is None:
        args.ckpt = find_model(fields, args.replay)
    if job.refiner_switch is not None and args.refiner is None:
        raise UserError(f"{args.replay} was made with a refiner ({fields.get('Refiner', '?')}); pass it as --refiner")
    if args.lora:
        raise UserError("--replay takes its LoRAs from the image's <lora:NAME:WEIGHT> tags, found in --lora-dir or "
                        "beside the image; drop --lora")
    check_negative(job.negative)
    uses = lora_uses(job.prompt, lora_finder(args, args.replay, fields))
    model, info = load(args)
    check_loras(model, [uses], args.ckpt)
    refiner, _ = load_refiner(args, model)
    check_embeddings(model, fields, args.replay)
    check_size(model, job.width, job.height, 1, args.tile)
    for key in ("Model hash", "VAE hash"):
        if fields.get(key) != info.get(key):
            print(f"warning: {key} {info.get(key)} differs from the image's {fields.get(key)}; pass the --ckpt/--vae "
                  "it was made with", file=sys.stderr)
    init = image_tensor(init_pil, job.width, job.height) if init_pil else None
    merge_loras(model, uses)
    old = np.asarray(image.convert("RGB"), dtype=np.int16)
    new = generate(model, [job], init, tile=args.tile, cuda_graph=not args.no_cuda_graph, refiner=refiner)[0]
    new = np.asarray(new, dtype=np.int16)
    if old.shape != new.shape:
        print(f"mismatch: the image is {old.shape[1]}x{old.shape[0]}, its parameters say {job.width}x{job.height}")
        return 1
    diff = np.abs(old - new)
    if diff.max() == 0:
        print(f"match: identical pixels (seed {job.seed}, max pixel difference 0)")
        return 0
    changed, total = int((diff.max(-1) > 0).sum()), diff.shape[0] * diff.shape[1]
    print(f"mismatch: max pixel difference {diff.max()}, {changed} of {total} pixels differ")
    return 1


def main(argv: list[str] = None) -> int:
    args = build_parser().parse_args(argv)
    explicit = explicit_flags(build_parser, argv)

    def job(_):
        fields = take_parameters(args, explicit) if args.params_from else {}
        return run_replay(args) if args.replay else run_generate(args, fields)

    return run(job,
               errors=(checkpoint.CheckpointError,),
               out_of_memory="try --dtype fp16, --tile 64, a smaller --width/--height, or --batch-size 1")


if __name__ == "__main__":
    sys.exit(main())
