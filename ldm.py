"""Latent diffusion: the noise schedule, LatentDiffusion, the DDIM sampler with classifier-free guidance,
checkpoint reading (safetensors parsed here, pickles through a restricted unpickler), `load_model` and `sample`.

A LatentDiffusion is three frozen-or-trained parts plus a schedule:
    vae           (vae.AutoencoderKL | vae.VQModel)  image [B, 3, H, W] in [-1, 1]  <->  latent [B, 4, H/8, W/8]
    text_encoder  (clip.CLIPTextModel | clip.OpenCLIPTextModel)  tokens [B, 77]  ->  context [B, 77, D]
    unet          (unet.UNetModel)  (z_t [B, 4, h, w], t [B], context)  ->  eps or v
Single-file checkpoints hold them under the prefixes in PREFIXES; everything else in such a file is either in
IGNORED (known and deliberately dropped) or an error.

    import ldm
    model = ldm.load_model("v1-5-pruned-emaonly.safetensors")
    images = ldm.sample(model, ["a red apple"], seed=0)
"""

import argparse
import contextlib
import hashlib
import http.client
import json
import math
import mmap
import os
import pickle
import struct
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import clip
import unet as unet_lib
import vae as vae_lib

# -----------------------------------------------------------------------------------------------------------------
# Checkpoint files: .safetensors (parsed here, memory-mapped) and .ckpt/.pt/.bin pickles (restricted unpickler)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _map_file(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        # ACCESS_COPY: writable private pages, so tensors may be modified in place without touching the file
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _tensor_at(buf: mmap.mmap, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor viewing `buf` at byte `offset` (zero-copy when aligned)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if offset % itemsize:  # misaligned data: one copy of this tensor rather than undefined behaviour
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=numel * itemsize, offset=offset).clone()
        return raw.view(dtype).reshape(shape)
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).reshape(shape)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a .safetensors file: u64 little-endian header length, JSON header, raw little-endian data.
    Tensors are memory-mapped views, so reading a 4 GB file costs no extra copy."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes); re-download it")
    buf = _map_file(path)
    (header_len,) = struct.unpack("<Q", buf[:8])
    if header_len > size - 8 or header_len > 100_000_000:
        raise CheckpointError(f"{path}: corrupt safetensors header (claims {header_len} bytes, file has {size}); "
                              "the file is truncated or not safetensors, re-download it")
    try:
        header = json.loads(bytes(buf[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + header_len, size - 8 - header_len
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            ok = 0 <= begin <= end <= data_len and end - begin == nbytes and all(d >= 0 for d in shape)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors entry {name!r}: {info} "
                                  f"(data section is {data_len} bytes); the file is truncated or damaged")
        tensors[name] = _tensor_at(buf, data_start + begin, dtype, shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] = None):
    """Write a .safetensors file atomically (temporary file, fsync, rename): a crash leaves any old file intact.
    Tensors are streamed one at a time, so writing never holds a second copy of the model."""
    path = Path(path)
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte aligned data section
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for t in tensors.values():
                if t.numel():
                    f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Inert:
    """Stands in for training-time objects in a pickle (Lightning callback states, numpy scalars): it accepts any
    construction and state and does nothing, so their entries load as harmless placeholders."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _rebuild_tensor(storage, storage_offset, size, stride, *args):
    return torch.empty((0,), dtype=storage[1]).set_(storage[0], storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *args):
    return data


# What a checkpoint pickle may name: tensor rebuilders, storage types, dtypes and plain containers.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): dict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("torch", "Size"): torch.Size,
    **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
}
# Module prefixes whose objects real SD/LDM .ckpt files carry next to the weights (Lightning bookkeeping,
# numpy scalars for the global step). They become _Inert placeholders; nothing from them is imported or run.
_INERT_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "numpy.", "argparse")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, load_storage):
        super().__init__(file)
        self.path, self.load_storage = path, load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8"):
            return getattr(torch, name)
        if any((module + ".").startswith(p) for p in _INERT_MODULES):
            return _Inert
        raise CheckpointError(f"{self.path}: refusing to load, the pickle asks for {module}.{name}, which could run "
                              "code; only tensors and plain containers are allowed (convert it to .safetensors with "
                              "a tool you trust)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unsupported pickle storage reference {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.path}: unsupported storage type {dtype!r}")
        return self.load_storage(str(key), dtype, int(numel)), dtype


def read_pickle_checkpoint(path: str | os.PathLike):
    """Read a torch zip pickle (.ckpt/.pt/.bin) without running code from it; storages are memory-mapped."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch zip checkpoint (legacy or corrupt pickle); re-save it with "
                              "torch >= 1.6 or convert it to .safetensors")
    buf = _map_file(path)
    with zipfile.ZipFile(path) as zf:
        members = {info.filename: info for info in zf.infolist()}
        pkl = next((n for n in members if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError(f"{path}: zip file without data.pkl; not a torch checkpoint")
        root = pkl[: -len("data.pkl")]
        if root + "byteorder" in members and zf.read(root + "byteorder") != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.UntypedStorage:
            info = members.get(f"{root}data/{key}")
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if info is None or info.compress_type != zipfile.ZIP_STORED or info.file_size < nbytes:
                raise CheckpointError(f"{path}: storage {key} is missing or damaged; re-download the file")
            # the member's bytes start after its local header: 30 fixed bytes + name + extra field
            name_len, extra_len = struct.unpack("<HH", buf[info.header_offset + 26: info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            if nbytes == 0:
                return torch.UntypedStorage(0)
            return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start).untyped_storage()

        with zf.open(pkl) as f:
            try:
                return _RestrictedUnpickler(f, path, load_storage).load()
            except CheckpointError:
                raise
            except Exception as e:  # truncated or garbled pickle stream
                raise CheckpointError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e}); "
                                      "re-download the file") from None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(flat state dict, metadata) from a .safetensors or torch pickle file; a {'state_dict': ...} wrapper is
    unwrapped and its other entries (global_step, Lightning states) are ignored."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; pass the path of a .safetensors or .ckpt checkpoint")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass a checkpoint file (or a diffusers folder to load_model)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        obj = read_pickle_checkpoint(path)
        metadata = {}
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            if isinstance(obj.get("global_step"), int):
                metadata["global_step"] = str(obj["global_step"])
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, metadata
    return read_safetensors(path)


# -----------------------------------------------------------------------------------------------------------------
# Noise schedule


def make_schedule(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012):
    """SD's 'scaled linear' betas: linear in sqrt space, computed in float64 (as the original), returned as
    the float64 betas. alphas_cumprod[0] ~ 0.99915, alphas_cumprod[999] ~ 0.0046601."""
    # explicit device: the schedule is small and must stay real even while modules are built on the meta device
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64, device="cpu") ** 2


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 12 DDPM buffers SD checkpoints store at the top level (float32, from float64 arithmetic); written into
    exported files so they carry the same keys as the public ones."""
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)  # v_posterior = 0
    out = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    return {k: v.float() for k, v in out.items()}


# -----------------------------------------------------------------------------------------------------------------
# The model


# Where each part lives in a single-file SD checkpoint (the text encoder's prefix depends on its layout).
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.transformer.text_model.",    # SD 1.x, transformers CLIPTextModel names
    "openclip": "cond_stage_model.model.",                 # SD 2.x, OpenCLIP names
}
# Keys real files carry that we knowingly drop: EMA copies (model_ema.*; pruned files already hold EMA weights as
# the main ones), schedule buffers (recomputed), CLIP's position_ids (an arange), training losses (loss.*).
IGNORED_PREFIXES = ("model_ema.", "loss.")
IGNORED_KEYS = set(schedule_buffers(make_schedule(10))) | {"logvar", "lvlb_weights", "scale_factor"}
IGNORED_SUFFIXES = ("embeddings.position_ids",)

# Whole-model presets: which part presets go together, and the facts the weights cannot tell.
PRESETS = {
    "sd1": dict(unet="sd1", vae="sd", text="sd1", scale_factor=0.18215, prediction_type="eps", resolution=512),
    "sd2": dict(unet="sd2", vae="sd", text="sd2", scale_factor=0.18215, prediction_type="v", resolution=768),
    "tiny": dict(unet="tiny", vae="tiny-kl", text="tiny", scale_factor=1.0, prediction_type="eps", resolution=64),
    "small": dict(unet="small", vae="tiny-kl", text="tiny", scale_factor=1.0, prediction_type="eps", resolution=64),
}


def _is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


class LatentDiffusion(nn.Module):
    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: clip.Tokenizer, *,
                 scale_factor: float = 0.18215, prediction_type: str = "eps", resolution: int = 512,
                 config: dict = None):
        super().__init__()
        if prediction_type not in ("eps", "v"):
            raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scale_factor = scale_factor  # 0.18215 = 1/std of SD-VAE latents, so the U-Net sees unit variance
        self.prediction_type = prediction_type
        self.resolution = resolution  # default image size the weights were trained at
        self.config = config or {}
        # float64 arithmetic then float32, as the original; kept out of the state dict (not in public files)
        alphas_cumprod = schedule_buffers(make_schedule())["alphas_cumprod"]  # computed on the CPU
        default_device = torch.empty(0).device  # honours an enclosing `with torch.device(...)`, except meta
        self.register_buffer("alphas_cumprod", alphas_cumprod if default_device.type == "meta"
                             else alphas_cumprod.to(default_device), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return self.unet.cfg.in_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.cfg.ch_mult) - 1)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """[B, 77, D]: what the U-Net cross-attends to."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.text_encoder(tokens).to(self.dtype)

    def encode_images(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator = None):
        """Images in [-1, 1] [B, 3, H, W] -> scaled latents [B, C, H/f, W/f]. The posterior mean by default
        (deterministic); `sample=True` draws from the posterior, as training does. VQ: the pre-quantisation
        encoder output, as the original LDM."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(x.to(vae_dtype))
        if isinstance(z, vae_lib.DiagonalGaussianDistribution):
            z = z.sample(generator) if sample else z.mode()
        return (z * self.scale_factor).to(self.dtype)

    def decode_latents(self, z: torch.Tensor, tile: int = None) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (not clamped). Runs in the VAE's dtype, which may be float32 while
        the U-Net is float16. tile: decode in overlapping tiles of this many latent pixels (memory follows the
        tile, not the image; see vae.Decoder)."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = z.to(vae_dtype) / self.scale_factor
        return self.vae.decode(z, tile=tile, overlap=min(16, tile // 4)) if tile else self.vae.decode(z)

    def training_target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "eps":
            return noise
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(z0)  # z0's dtype and device
        return a.sqrt() * noise - (1 - a).sqrt() * z0  # v = sqrt(a) eps - sqrt(1 - a) x0

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(z_t | z0) at timesteps t, on z0's device (img2img mixes on the CPU whatever the model's device)."""
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(z0)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def training_step(self, images: torch.Tensor, prompts: list[str], generator: torch.Generator = None):
        """Simple DDPM loss ||target - unet(z_t, t, c)||^2 with a frozen VAE and text encoder."""
        with torch.no_grad():
            z0 = self.encode_images(images, sample=True, generator=generator)
            context = self.encode_prompt(prompts)
        B = z0.shape[0]
        t = torch.randint(0, len(self.alphas_cumprod), (B,), generator=generator, device=z0.device)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        pred = self.unet(self.add_noise(z0, noise, t), t, context)
        return F.mse_loss(pred.float(), self.training_target(z0, noise, t).float())

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the public single-file SD key names (plus the schedule buffers SD files carry)."""
        parts = {"unet": self.unet, "vae": self.vae, self.text_encoder.cfg.layout: self.text_encoder}
        sd = {PREFIXES[name] + k: v for name, module in parts.items() for k, v in module.state_dict().items()}
        sd.update(schedule_buffers(make_schedule()))
        return sd

    def model_config(self) -> dict:
        """Everything the weights cannot say, stored in exported files' metadata so load_model needs nothing else."""
        return dict(unet=asdict(self.unet.cfg), vae=asdict(self.vae.cfg), text=asdict(self.text_encoder.cfg),
                    pad_id=self.tokenizer.pad_id, scale_factor=self.scale_factor,
                    prediction_type=self.prediction_type, resolution=self.resolution)


# -----------------------------------------------------------------------------------------------------------------
# Sampling: DDIM with classifier-free guidance


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """SD's 'leading' grid with offset 1: [1, 21, ..., 981] for 50 steps; denoising runs it in reverse."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    return [t + 1 for t in range(0, num_train_timesteps, num_train_timesteps // steps)][:steps]


def predict_eps_x0(model: LatentDiffusion, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
    """(eps, x0) from the U-Net output, for eps- or v-prediction; a = alphas_cumprod[t]."""
    if model.prediction_type == "v":
        return a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out
    return out, (x - (1 - a).sqrt() * out) / a.sqrt()


def ddim_step(model: LatentDiffusion, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, a: torch.Tensor,
              a_prev: torch.Tensor, noise: torch.Tensor, guidance_scale: float, eta: float) -> torch.Tensor:
    """One DDIM update x_t -> x_prev. Everything is a device tensor (t (B or 2B,) long; a, a_prev 0-dim float32
    alphas_cumprod; noise like x, zeros when eta = 0), so the step never waits on the host and can be replayed
    as a CUDA graph. CFG when cond holds twice x's batch: [uncond; cond], eps_u + s * (eps_c - eps_u)."""
    use_cfg = cond.shape[0] != x.shape[0]
    out = model.unet(torch.cat([x, x]) if use_cfg else x, t, cond)
    if use_cfg:
        out_u, out_c = out.chunk(2)
        out = out_u + guidance_scale * (out_c - out_u)
    eps, x0 = predict_eps_x0(model, out.float(), x.float(), a)
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
    return (x + sigma * noise if eta > 0 else x).to(model.dtype)


class CUDAGraphStep:
    """A function captured once per input signature as a CUDA graph, then replayed: the U-Net's thousand-odd kernels
    launch as one, which is most of an eager small-batch step's time on a fast GPU. Inputs are copied into static
    buffers; the result is copied out of the graph's static output. Weights are read where they live at capture, so
    a model moved or cast afterwards needs a new instance."""

    def __init__(self, fn):
        self.fn, self.graphs = fn, {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((a.shape, a.dtype) for a in args)
        if key not in self.graphs:
            static = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up outside capture: cuDNN/cuBLAS pick and allocate workspaces here
                for _ in range(2):
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(*static)
            self.graphs[key] = graph, static, out
        graph, static, out = self.graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return out.clone()


@torch.no_grad()
def ddim_sample(model: LatentDiffusion, x: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor = None, *,
                steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0, generator: torch.Generator = None,
                start_step: int = 0, progress: bool = True, cuda_graph: bool = True) -> torch.Tensor:
    """Denoise latents x [B, C, h, w] from the noisiest grid point (or from `start_step` into the reversed grid,
    for img2img). CFG is eps_u + s * (eps_c - eps_u), with the conditional and unconditional passes in one batch.
    eta = 0 is deterministic DDIM; eta = 1 is DDPM-like; its noise comes from `generator` (drawn on the CPU, all
    steps' noise up front, so the loop has no host-to-device copies). cuda_graph: on a CUDA device, replay each step
    as a captured graph (the same kernels, so the same numbers as eager)."""
    timesteps = ddim_timesteps(steps, len(model.alphas_cumprod))
    order = list(reversed(range(len(timesteps))))[start_step:]
    device = x.device
    use_cfg = uncond is not None and guidance_scale != 1.0
    cond = torch.cat([uncond, context]) if use_cfg else context
    ac = model.alphas_cumprod.to(device, torch.float32)
    t_all = torch.tensor(timesteps, device=device)
    a_all = ac[t_all]
    a_prev_all = torch.cat([ac[:1], a_all[:-1]])  # the last step lands on alphas_cumprod[0], not 1
    noise = torch.zeros(1, device=device).expand(x.shape)
    if eta > 0:
        noise = torch.stack([torch.randn(x.shape, generator=generator) for _ in order]).to(device)
    run = lambda *a: ddim_step(model, *a, guidance_scale, eta)  # noqa: E731
    # not under autocast: its cast-weight cache is freed when the region ends, and a cached graph would read it
    if cuda_graph and device.type == "cuda" and not torch.is_autocast_enabled("cuda"):
        graphs = model.__dict__.setdefault("_ddim_graphs", {})  # kept per model: later calls replay, not recapture
        key = (guidance_scale, eta, model.dtype, next(model.unet.parameters()).data_ptr())
        if key not in graphs:
            graphs.clear()  # one live set: each graph holds its own activation memory
            graphs[key] = CUDAGraphStep(run)
        run = graphs[key]
    for n, i in enumerate(tqdm(order, desc="sampling", disable=not progress, leave=False)):
        x = run(x, t_all[i].expand(cond.shape[0]), cond, a_all[i], a_prev_all[i], noise[n] if eta > 0 else noise)
    return x


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] images [B, 3, H, W] -> PIL, rounded as the reference pipelines round."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]


@torch.no_grad()
def sample(model: LatentDiffusion, prompts: list[str], *, negative_prompts: list[str] = None, height: int = None,
           width: int = None, steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0, seed: int = None,
           sampler: str = "ddim", init_image: torch.Tensor = None, strength: float = 0.75,
           progress: bool = True, output_type: str = "pil", cuda_graph: bool = True, tile: int = None):
    """Text-to-image (or image-to-image with `init_image` in [-1, 1], [B or 1, 3, H, W]). Noise is drawn on the CPU
    from torch.Generator("cpu").manual_seed(seed), so a seed gives the same image on every device. cuda_graph: replay
    the denoising steps as a CUDA graph on a CUDA device; tile: decode in tiles of this many latent pixels."""
    if sampler != "ddim":
        raise ValueError(f"unknown sampler {sampler!r}; available: ddim")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negative_prompts = [""] * len(prompts) if negative_prompts is None else (
        [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts))
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    f = model.downsample_factor
    height, width = height or model.resolution, width or model.resolution
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {width}x{height}")
    generator = torch.Generator("cpu")
    generator.manual_seed(int(seed) if seed is not None else torch.seed())

    B, device = len(prompts), model.device
    context = model.encode_prompt(prompts)
    uncond = model.encode_prompt(negative_prompts) if guidance_scale != 1.0 else None
    shape = (B, model.latent_channels, height // f, width // f)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32)
    start_step = 0
    if init_image is not None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        z0 = model.encode_images(init_image.to(device)).float().cpu().expand(shape)
        start_step = steps - min(int(steps * strength), steps)
        timesteps = ddim_timesteps(steps, len(model.alphas_cumprod))
        t = timesteps[steps - 1 - start_step] if start_step < steps else 0
        latents = model.add_noise(z0, latents, torch.tensor([t])) if start_step < steps else z0
    x = ddim_sample(model, latents.to(device, model.dtype), context, uncond, steps=steps,
                    guidance_scale=guidance_scale, eta=eta, generator=generator, start_step=start_step,
                    progress=progress, cuda_graph=cuda_graph)
    images = model.decode_latents(x, tile=tile)
    return to_pil(images) if output_type == "pil" else images


# -----------------------------------------------------------------------------------------------------------------
# Loading


def build_model(preset: str | dict = "tiny", *, device=None, prediction_type: str = None) -> LatentDiffusion:
    """A LatentDiffusion with fresh weights from a preset name or a model_config() dict."""
    cfg = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    unet_cfg = _part_config(unet_lib.UNetConfig, unet_lib.PRESETS, cfg["unet"])
    vae_cfg = _part_config(vae_lib.AutoencoderConfig, vae_lib.PRESETS, cfg["vae"])
    text_cfg = _part_config(clip.TextConfig, clip.PRESETS, cfg["text"])
    pad_id = cfg.get("pad_id", 0 if text_cfg.layout == "openclip" else 49407)  # SD 2.x pads with 0, SD 1.x with EOT
    with torch.device(device) if device is not None else contextlib.nullcontext():  # honours an outer meta context
        model = LatentDiffusion(unet_lib.UNetModel(unet_cfg), vae_lib.build_autoencoder(vae_cfg),
                                clip.build_text_encoder(text_cfg), clip.Tokenizer(pad_id=pad_id),
                                scale_factor=cfg["scale_factor"],
                                prediction_type=prediction_type or cfg["prediction_type"],
                                resolution=cfg.get("resolution", 512))
    return model


def _part_config(cls, presets: dict, value):
    if isinstance(value, str):
        return presets[value]
    value = dict(value)
    for k, v in value.items():  # JSON turns tuples into lists
        if isinstance(v, list):
            value[k] = tuple(v)
    return cls(**value)


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str):
    """load_state_dict(strict=True, assign=True), with an error that names the offending keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd
                  and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        problems = [f"{name}: {show(keys)}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise CheckpointError(f"{what} does not fit the model; " + "; ".join(problems))
    module.load_state_dict(sd, strict=True, assign=True)


def _check_materialized(module: nn.Module):
    leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: tensors left on the meta device after loading: {leftover[:5]}")


def split_checkpoint(sd: dict[str, torch.Tensor], path) -> dict[str, dict[str, torch.Tensor]]:
    """Split a single-file SD state dict by PREFIXES; every key must either belong to a part or be ignored."""
    parts = {name: {} for name in PREFIXES}
    stray = []
    for key, value in sd.items():
        name = next((n for n, p in PREFIXES.items() if key.startswith(p)), None)
        if name is not None and not _is_ignored(key):
            parts[name][key[len(PREFIXES[name]):]] = value
        elif name is None and not _is_ignored(key):
            stray.append(key)
    if stray:
        raise CheckpointError(f"{path}: unexpected keys outside the known parts: {', '.join(stray[:5])}"
                              + (f" ... ({len(stray)} in all)" if len(stray) > 5 else ""))
    return parts


def detect_layout(sd: dict[str, torch.Tensor], path) -> str:
    """'sd1' | 'sd2' | 'vae' (standalone VAE / LDM first stage) from key names; anything else is an error."""
    keys = list(sd)
    if any(k.startswith(PREFIXES["unet"]) for k in keys):
        if any(k.startswith(PREFIXES["openclip"]) for k in keys):
            return "sd2"
        if any(k.startswith(PREFIXES["clip"]) for k in keys):
            return "sd1"
        raise CheckpointError(f"{path}: has a U-Net but no known text encoder (looked for "
                              f"{PREFIXES['clip']!r} and {PREFIXES['openclip']!r})")
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.")) for k in keys):
        return "vae"
    roots = sorted({k.split(".")[0] for k in keys})
    raise CheckpointError(f"{path}: unknown checkpoint layout ({len(keys)} tensors; top-level names: "
                          f"{', '.join(roots[:10])}); expected an SD 1.x/2.x single file, an LDM first stage, "
                          "or a diffusers folder")


@torch.no_grad()
def probe_prediction_type(model: LatentDiffusion) -> str:
    """eps vs v cannot be read from the weights. Probe: feed a constant latent (0.5 everywhere) at t = 999 with a
    zero context. There alpha_cumprod ~ 0.005, so the input is essentially noise: an eps-model returns roughly its
    input (mean(out - x) near 0), a v-model returns roughly -x0 (v = sqrt(a) eps - sqrt(1-a) x0), whose mean lies
    well below the input. The threshold -1 separates the public SD 2.x eps and v checkpoints."""
    device, dtype = model.device, model.dtype
    x = torch.full((1, model.latent_channels, 8, 8), 0.5, device=device, dtype=dtype)
    context = torch.zeros(1, 77, model.unet.cfg.context_dim, device=device, dtype=dtype)
    out = model.unet(x, torch.tensor([999], device=device), context)
    return "v" if (out.float() - x.float()).mean().item() < -1 else "eps"


def model_from_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str] = None, *, path="checkpoint",
                          prediction_type: str = None) -> tuple[LatentDiffusion, dict]:
    """Build on the meta device and assign a single-file state dict, part by part, strictly. Returns the model
    (tensors are the state dict's own, no copies) and its config (prediction_type None: not yet decided)."""
    metadata = metadata or {}
    if "ldm_config" in metadata:  # written by train.py: the config the weights cannot reveal
        cfg = json.loads(metadata["ldm_config"])
    else:
        layout = detect_layout(sd, path)
        if layout == "vae":
            raise CheckpointError(f"{path}: holds an autoencoder only; load it with vae.load_autoencoder, or pass "
                                  "it as --vae next to a full checkpoint")
        cfg = dict(PRESETS[layout])
        # shapes tell the U-Net's size (e.g. 9 input channels for inpainting models); presets tell the rest
        cfg["unet"] = asdict(unet_lib.infer_config(
            {k[len(PREFIXES["unet"]):]: v for k, v in sd.items() if k.startswith(PREFIXES["unet"])}))
        if layout == "sd2":
            cfg["prediction_type"] = None  # decided below
    if prediction_type:
        cfg["prediction_type"] = prediction_type
    with torch.device("meta"):
        model = build_model(cfg, prediction_type=cfg["prediction_type"] or "eps")
    parts = split_checkpoint(sd, path)
    text_name = model.text_encoder.cfg.layout
    _load_strict(model.unet, parts["unet"], f"{path} (U-Net, {PREFIXES['unet']}*)")
    _load_strict(model.vae, parts["vae"], f"{path} (VAE, {PREFIXES['vae']}*)")
    _load_strict(model.text_encoder, parts[text_name], f"{path} (text encoder, {PREFIXES[text_name]}*)")
    leftover = [n for n in PREFIXES if n not in ("unet", "vae", text_name) and parts[n]]
    if leftover:
        raise CheckpointError(f"{path}: holds two text encoders ({text_name} and {leftover[0]})")
    return model, cfg


def _load_diffusers_folder(path: Path, prediction_type):
    """A diffusers pipeline folder: unet/, vae/, text_encoder/, tokenizer/ (+ scheduler/ for the prediction type)."""
    def part(name: str):
        folder = path / name
        cfg_file = folder / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{path}: diffusers folder without {name}/config.json")
        for fname in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                      "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"):
            if (folder / fname).exists():
                return json.loads(cfg_file.read_text()), read_checkpoint(folder / fname)[0]
        raise CheckpointError(f"{path}: no weights file in {name}/ (looked for *.safetensors and *.bin)")

    unet_json, unet_sd = part("unet")
    vae_json, vae_sd = part("vae")
    text_json, text_sd = part("text_encoder")
    unet_cfg = unet_lib.config_from_diffusers(unet_json)
    vae_cfg = vae_lib.config_from_diffusers(vae_json)
    text_cfg = clip.config_from_diffusers(text_json)
    scheduler = path / "scheduler" / "scheduler_config.json"
    sched = json.loads(scheduler.read_text()) if scheduler.exists() else {}
    pred = {"epsilon": "eps", "v_prediction": "v"}.get(sched.get("prediction_type", "epsilon"), "eps")
    tokenizer = clip.Tokenizer.from_diffusers(path / "tokenizer") if (path / "tokenizer").exists() else None
    cfg = dict(unet=asdict(unet_cfg), vae=asdict(vae_cfg), text=asdict(text_cfg),
               scale_factor=vae_json.get("scaling_factor", 0.18215), prediction_type=prediction_type or pred,
               resolution=unet_cfg.image_size * 2 ** (len(vae_cfg.ch_mult) - 1),
               pad_id=tokenizer.pad_id if tokenizer else (0 if text_cfg.layout == "openclip" else 49407))
    with torch.device("meta"):
        model = build_model(cfg)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    _load_strict(model.unet, unet_lib.convert_diffusers(unet_sd, unet_cfg), f"{path}/unet")
    _load_strict(model.vae, vae_lib.convert_diffusers(vae_sd), f"{path}/vae")
    _load_strict(model.text_encoder, clip.convert_diffusers(text_sd, text_cfg), f"{path}/text_encoder")
    return model, cfg


def load_model(path: str | os.PathLike = None, *, device=None, dtype=None,
               prediction_type: str = None) -> LatentDiffusion:
    """Load an SD 1.x/2.x single file (.safetensors/.ckpt), a diffusers folder, or a file train.py exported.
    Weights are memory-mapped and assigned into modules built on the meta device: never two copies in memory.
    dtype defaults to float16 on CUDA and float32 elsewhere."""
    if path is None:  # the default weights, downloaded into cache_dir() on first use (DownloadError if that fails)
        path = default_checkpoint()
    path = Path(path)
    if prediction_type not in (None, "eps", "v"):
        raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")
    if path.is_dir():
        model, cfg = _load_diffusers_folder(path, prediction_type)
    elif path.exists():
        sd, metadata = read_checkpoint(path)
        model, cfg = model_from_state_dict(sd, metadata, path=path, prediction_type=prediction_type)
    else:
        raise CheckpointError(f"{path}: no such file or folder; pass the path of an SD checkpoint")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_materialized(model)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    model.to(device=device, dtype=dtype)
    model.alphas_cumprod = schedule_buffers(make_schedule())["alphas_cumprod"].to(device)  # float32 whatever dtype
    model.config = cfg
    if cfg.get("prediction_type") is None:
        model.prediction_type = probe_prediction_type(model)
        model.resolution = 768 if model.prediction_type == "v" else 512  # 2.x-768-v vs 2.x-base
        cfg.update(prediction_type=model.prediction_type, resolution=model.resolution)
        print(f"{path.name}: SD 2.x checkpoint, prediction type probed as {model.prediction_type!r} "
              "(pass prediction_type='eps' or 'v' to override)")
    return model.eval().requires_grad_(False)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """For the command-line scripts: defaults in --help, except None and off switches (their help says what
    happens without them)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


# -----------------------------------------------------------------------------------------------------------------
# Default weights: SD 1.5 (fp16 single file), downloaded once into a cache folder with urllib only

DEFAULT_MODEL_URL = ("https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                     "v1-5-pruned-emaonly-fp16.safetensors")
DEFAULT_MODEL_SHA256 = "e9476a13728cd75d8279f6ec8bad753a66a1957ca375a1464dc63b37db6e3916"  # ~2.1 GB


class DownloadError(RuntimeError):
    """The default weights could not be fetched or verified; the message says what failed."""


def cache_dir() -> Path:
    """$LDM_HOME, else the platform's user cache folder + /ldm (~/.cache/ldm on Linux)."""
    if os.environ.get("LDM_HOME"):
        return Path(os.environ["LDM_HOME"]).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "ldm"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ldm"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm"


def _sha256_index() -> tuple[Path, dict]:
    index_file = cache_dir() / "sha256.json"
    try:
        return index_file, json.loads(index_file.read_text())
    except (OSError, ValueError):
        return index_file, {}


def _remember_sha256(path: Path, digest: str):
    index_file, index = _sha256_index()
    st = path.stat()
    index[str(path.resolve())] = dict(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=digest)
    try:  # a read-only cache only costs a re-hash next time
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_name(f"{index_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_file)
    except OSError:
        pass


def _hash_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"sha256 {path.name}", disable=not progress, leave=False) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, progress: bool = False) -> str:
    """sha256 hex of a file, remembered in cache_dir()/sha256.json by (absolute path, size, mtime): hashing 2 GB
    takes seconds, so it is done once per file version."""
    path = Path(path)
    st = path.stat()
    entry = _sha256_index()[1].get(str(path.resolve()))
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    digest = _hash_file(path, progress)
    _remember_sha256(path, digest)
    return digest


def _fetch_into(url: str, part: Path, progress: bool, timeout: float) -> int | None:
    """Append the missing bytes of `url` to `part` (HTTP Range from its current size). Returns the full size
    the server announced (None if it did not). A server that ignores Range answers 200: start again from zero."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "ldm"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        total = e.headers.get("Content-Range", "").rpartition("/")[2]  # "bytes */SIZE": the part is complete
        return int(total) if total.isdigit() else offset
    with response:
        if response.status == 206:
            start = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0]
            if start != str(offset):
                raise DownloadError(f"{url}: server resumed at byte {start}, asked for {offset}")
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            total = int(total) if total.isdigit() else None
        else:  # 200: the whole file, whatever was asked
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
                disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def _verify(path: Path, size: int | None, sha256: str | None):
    """Size as announced, a readable checkpoint header, and the pinned sha256 if there is one."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DownloadError(f"incomplete download ({actual} of {size} bytes)")
    try:
        read_checkpoint(path)  # parses the header (and checks every tensor lies inside the file); data stays mapped
    except CheckpointError as e:
        raise DownloadError(f"downloaded file is not a valid checkpoint ({e})") from None
    if sha256:
        digest = _hash_file(path)
        if digest != sha256.lower():
            raise DownloadError(f"sha256 mismatch: got {digest}, expected {sha256.lower()}")


def download(url: str, dest: str | os.PathLike, *, sha256: str = None, progress: bool = True, attempts: int = 3,
             timeout: float = 30.0) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming the part file after an interruption (here, on the
    next of `attempts`, or on the next call). The part is renamed to `dest` only once verified; a file that fails
    verification is deleted. Errors are DownloadError with a one-line message."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {dest.parent}: {e.strerror or e}") from None
    for attempt in range(1, attempts + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            size = _fetch_into(url, part, progress, timeout)
            if size is None or part.stat().st_size >= size:
                break
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, cut connections
            reason = e.reason if type(e) is urllib.error.URLError else e  # e.g. "[Errno 111] Connection refused"
            got = part.stat().st_size if part.exists() else 0
            if attempt == attempts or got <= before:  # retry only a connection that was delivering bytes
                raise DownloadError(f"download of {url} failed: {reason or type(e).__name__}"
                                    + (f"; {got} bytes kept in {part}, run again to resume" if got else "")) from None
    else:
        raise DownloadError(f"download of {url} stopped early ({part.stat().st_size} of {size} bytes kept in "
                            f"{part}); run again to resume")
    try:
        _verify(part, size, sha256)
    except DownloadError as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: {e}; the partial file was deleted, run again to re-download") from None
    os.replace(part, dest)
    if sha256:  # already hashed while verifying: Model hash lookups need not read the file again
        _remember_sha256(dest, sha256.lower())
    return dest


def default_checkpoint(progress: bool = True) -> Path:
    """The default weights' path in cache_dir(), downloaded on first use. $LDM_MODEL_URL replaces the source
    (mirrors, tests); such a URL is pinned only by $LDM_MODEL_SHA256."""
    url = os.environ.get("LDM_MODEL_URL") or DEFAULT_MODEL_URL
    sha256 = os.environ.get("LDM_MODEL_SHA256") or (DEFAULT_MODEL_SHA256 if url == DEFAULT_MODEL_URL else None)
    name = url.split("?")[0].rstrip("/").rpartition("/")[2] or "model.safetensors"
    dest = cache_dir() / name
    if not dest.exists():
        print(f"downloading the default weights from {url} into {dest.parent}", file=sys.stderr)
        download(url, dest, sha256=sha256, progress=progress)
    return dest
