"""Latent diffusion: the noise schedule, LatentDiffusion, sampling with classifier-free guidance, `sample`,
and `load_model` / `save_model`.

A LatentDiffusion is three frozen-or-trained parts plus a schedule:
    vae           (vae.AutoencoderKL | vae.VQModel)  image [B, 3, H, W] in [-1, 1]  <->  latent [B, 4, H/8, W/8]
    text_encoder  (clip.CLIPTextModel | clip.OpenCLIPTextModel)  tokens [B, 77]  ->  context [B, 77, D] per chunk
    unet          (unet.UNetModel)  (z_t [B, 4, h, w], t [B], context)  ->  eps or v
Single-file checkpoints hold them under the prefixes in PREFIXES; every other key in such a file is either one
that checkpoint.is_ignored knowingly drops or an error. Files are read and written by checkpoint.py.

    import ldm
    model = ldm.load_model("v1-5-pruned-emaonly.safetensors")
    images = ldm.sample(model, ["a red apple"], seed=0)
"""

import contextlib
import json
import math
import os
import random
import sys
import textwrap
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import checkpoint
import clip
import lora as lora_lib
import unet as unet_lib
import vae as vae_lib
from checkpoint import CheckpointError

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
    "sdxl_l": "conditioner.embedders.0.transformer.text_model.",  # SDXL base: CLIP-L (SD 1.x's names)
    "sdxl_g": "conditioner.embedders.1.model.",            # SDXL base: OpenCLIP bigG (SD 2.x's names)
    "refiner_g": "conditioner.embedders.0.model.",         # SDXL refiner: bigG alone
}

# Whole-model presets: which part presets go together, and the facts the weights cannot tell. The latent scale
# factor belongs to the autoencoder preset (0.18215 for SD's VAE).
PRESETS = {
    "sd1": dict(unet="sd1", vae="sd", text="sd1", prediction_type="eps", resolution=512),
    "sd2": dict(unet="sd2", vae="sd", text="sd2", prediction_type="v", resolution=768),
    "tiny": dict(unet="tiny", vae="tiny-kl", text="tiny", prediction_type="eps", resolution=64),
    "small": dict(unet="small", vae="tiny-kl", text="tiny", prediction_type="eps", resolution=64),
    "sdxl": dict(unet="sdxl", vae="sdxl", text="sdxl", prediction_type="eps", resolution=1024),
    "sdxl-refiner": dict(unet="sdxl-refiner", vae="sdxl", text="sdxl-refiner", prediction_type="eps",
                         resolution=1024),
    "tiny-sdxl": dict(unet="tiny-sdxl", vae="tiny-kl", text="tiny-sdxl", prediction_type="eps", resolution=64),
    "tiny-sdxl-refiner": dict(unet="tiny-sdxl-refiner", vae="tiny-kl", text="tiny-sdxl-refiner",
                              prediction_type="eps", resolution=64),
}


def text_parts(text_encoder: nn.Module) -> dict[str, str]:
    """{prefix in the text encoder's state dict: prefix in a single file}: one part for SD 1.x / 2.x, CLIP-L and
    bigG (clip_l., clip_g.) for the SDXL base, bigG alone for the refiner."""
    layout = text_encoder.cfg.layout
    if layout != "sdxl":
        return {"": PREFIXES[layout]}
    if text_encoder.clip_l is None:
        return {"clip_g.": PREFIXES["refiner_g"]}
    return {"clip_l.": PREFIXES["sdxl_l"], "clip_g.": PREFIXES["sdxl_g"]}


class LatentDiffusion(nn.Module):
    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: clip.Tokenizer, *,
                 prediction_type: str = "eps", resolution: int = 512, config: dict = None):
        super().__init__()
        if prediction_type not in ("eps", "v"):
            raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
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

    @property
    def scale_factor(self) -> float:
        """Latent scale (1/std of the autoencoder's latents, so the U-Net sees unit variance; 0.18215 for SD's VAE).
        It is the autoencoder's: kept in its config and saved with it, so swapping the VAE swaps the scale."""
        return self.vae.scale_factor

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], clip_skip: int = 1, pooled: bool = False):
        """[B, 77 k, D]: what the U-Net cross-attends to, in the model's dtype, on its device. Prompts are read as
        AUTOMATIC1111's web UI reads them (clip.PromptChunker): "(word:1.2)", "(word)", "[word]", BREAK, names of
        embeddings loaded with load_embeddings; chunks of 75 tokens, each encoded on its own and concatenated.
        All prompts of one call are padded with empty-prompt chunks to the same chunk count k, so prompts and
        negative prompts encoded together line up. clip_skip: 1 = the model's usual layer, N = N - 1 layers
        before it (A1111's "Clip skip"; SDXL: in both encoders). A plain prompt of up to 75 tokens gives exactly the
        text encoder's output for its 77-token row. SDXL: D = 768 + 1280 (the refiner: 1280).
        pooled=True: (context, pooled) with SDXL's pooled bigG vector of each prompt's first chunk [B, 1280], or
        None for SD 1.x / 2.x."""
        chunks = self.prompt_chunker().batch(list(prompts))
        out = clip.encode_chunks(self.text_encoder, chunks, clip_skip, pooled=pooled)
        if not pooled:
            return out.to(self.device, self.dtype)
        context, vector = out
        return context.to(self.device, self.dtype), None if vector is None else vector.to(self.device, self.dtype)

    def prompt_chunker(self) -> clip.PromptChunker:
        """The chunker encode_prompt uses: this model's tokenizer and loaded embeddings."""
        return clip.PromptChunker(self.tokenizer, self.embeddings.values())

    @property
    def embeddings(self) -> dict[str, clip.Embedding]:
        """Textual-inversion embeddings by name, in load order (load_embeddings adds them; not in the state dict)."""
        return self.__dict__.setdefault("_embeddings", {})

    def load_embeddings(self, path: str | os.PathLike) -> list[str]:
        """Load textual-inversion embeddings from a file (A1111 .pt / .safetensors, diffusers learned_embeds) or a
        folder of them (subfolders included), each named by its file stem; a prompt word (token sequence) equal to a
        name is replaced by its vectors. A name loaded again is replaced. All files are read before any is added, so
        a bad one (a one-line CheckpointError, e.g. an SD 2.x embedding on SD 1.x) changes nothing. SDXL takes SDXL
        files (clip_l + clip_g: each encoder gets its own vectors). Returns the names loaded."""
        width = clip.embedding_width(self.text_encoder)  # SDXL: {"clip_l": 768, "clip_g": 1280}
        loaded = [clip.read_embedding(p, width) for p in clip.embedding_files(path)]
        for e in loaded:
            if not self.tokenizer.encode(e.name):
                raise CheckpointError(f"{e.path}: the name {e.name!r} has no tokens, so no prompt can use it; "
                                      f"rename the file")
        for e in loaded:
            self.embeddings.pop(e.name, None)  # re-added last: of two names with the same tokens, the later wins
            self.embeddings[e.name] = e
        return [e.name for e in loaded]

    def embeddings_used(self, prompts: list[str]) -> list[clip.Embedding]:
        """The loaded embeddings that `prompts` use, in order of first use, each once. For image metadata:
        clip.ti_hashes(model.embeddings_used([negative, prompt])) is A1111's "TI hashes" value."""
        chunker = self.prompt_chunker()
        return list({id(e): e for p in prompts for e in chunker(p).embeddings}.values())

    def apply_lora(self, source, multiplier: float = 1.0, name: str = None,
                   unet_multiplier: float = None) -> lora_lib.Applied:
        """Merge a LoRA (kohya or diffusers / PEFT .safetensors, or its state dict) into the weights at `multiplier`
        (the U-Net's at `unet_multiplier` when given; lora.apply: strict, one-line errors for modules or shapes that
        do not fit). Several stack; remove_loras undoes them all exactly."""
        return lora_lib.apply(self, source, multiplier, name, unet_multiplier)

    def remove_loras(self):
        """Every weight a LoRA changed back to its value before the first apply_lora, bit for bit."""
        lora_lib.remove(self)

    @property
    def loras(self) -> list[lora_lib.Applied]:
        """The LoRAs merged into the weights, in order."""
        return self.__dict__.get("_loras", [])

    def encode_images(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator = None):
        """Images in [-1, 1] [B, 3, H, W] -> scaled latents [B, C, H/f, W/f]. The posterior mean by default
        (deterministic); `sample=True` draws from the posterior. VQ: the pre-quantisation encoder output, as the
        original LDM."""
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

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the public single-file key names (plus the schedule buffers SD 1.x/2.x files carry;
        SDXL files have none)."""
        sd = {PREFIXES[name] + k: v for name, module in (("unet", self.unet), ("vae", self.vae))
              for k, v in module.state_dict().items()}
        parts = text_parts(self.text_encoder)
        for k, v in self.text_encoder.state_dict().items():
            ours = next(p for p in parts if k.startswith(p))
            sd[parts[ours] + k[len(ours):]] = v
        if self.text_encoder.cfg.layout != "sdxl":
            sd.update(schedule_buffers(make_schedule()))
        return sd

    def model_config(self) -> dict:
        """Everything the weights cannot say, stored in exported files' metadata so load_model needs nothing else."""
        return dict(unet=asdict(replace(self.unet.cfg, use_checkpoint=False)),  # a training setting, not the model's
                    vae=asdict(self.vae.cfg), text=asdict(self.text_encoder.cfg), pad_id=self.tokenizer.pad_id,
                    prediction_type=self.prediction_type, resolution=self.resolution)


def diffusion_loss(model: LatentDiffusion, denoise, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond,
                   snr_gamma: float = None, y: torch.Tensor = None) -> torch.Tensor:
    """The training loss: mean over the batch of ||target - denoise(z_t, t, cond[, y])||^2 (mean over C, H, W), with
    z_t = sqrt(a_t) z0 + sqrt(1 - a_t) noise and target = noise (eps) or v. `denoise` is the U-Net or what wraps it
    (DDP, a text encoder in training); y: SDXL's conditioning vector. snr_gamma: min-SNR weighting
    w = min(snr, gamma) / snr for eps, / (snr + 1) for v (Hang et al. 2023), snr = a / (1 - a)."""
    z_t = model.add_noise(z0, noise, t)
    pred = denoise(z_t, t, cond) if y is None else denoise(z_t, t, cond, y)
    target = model.training_target(z0, noise, t)
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma:
        a = model.alphas_cumprod[t].float()
        snr = a / (1 - a)
        per_sample = per_sample * snr.clamp(max=snr_gamma) / (snr + 1 if model.prediction_type == "v" else snr)
    return per_sample.mean()


# -----------------------------------------------------------------------------------------------------------------
# Sampling. A sampler is a loop over steps of the U-Net with CFG; each step is a function of device tensors only, so
# it never waits on the host and can be replayed as a CUDA graph. DDIM is the first; more slot in beside it.


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """SD's 'leading' grid with offset 1: [1, 21, ..., 981] for 50 steps; denoising runs it in reverse. The offset
    leaves room for num_train_timesteps - 1 steps at most."""
    if not 1 <= steps < num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps - 1}, got {steps}")
    return [t + 1 for t in range(0, num_train_timesteps, num_train_timesteps // steps)][:steps]


def guided_output(model: LatentDiffusion, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  guidance_scale: float, y: torch.Tensor = None) -> torch.Tensor:
    """The U-Net output at x, t. CFG when cond holds twice x's batch ([uncond; cond], one batched pass):
    out_u + s * (out_c - out_u). y: SDXL's conditioning vector, batched as cond ([uncond; cond])."""
    use_cfg = cond.shape[0] != x.shape[0]
    x = torch.cat([x, x]) if use_cfg else x
    out = model.unet(x, t, cond) if y is None else model.unet(x, t, cond, y)
    if use_cfg:
        out_u, out_c = out.chunk(2)
        out = out_u + guidance_scale * (out_c - out_u)
    return out


def predict_eps_x0(model: LatentDiffusion, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
    """(eps, x0) from the U-Net output, for eps- or v-prediction; a = alphas_cumprod[t]."""
    if model.prediction_type == "v":
        return a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out
    return out, (x - (1 - a).sqrt() * out) / a.sqrt()


def ddim_step(model: LatentDiffusion, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, a: torch.Tensor,
              a_prev: torch.Tensor, noise: torch.Tensor, y: torch.Tensor, guidance_scale: float,
              eta: float) -> torch.Tensor:
    """One DDIM update x_t -> x_prev. t (B or 2B,) long; a, a_prev 0-dim float32 alphas_cumprod; noise like x
    (unused when eta = 0); y: SDXL's conditioning vector or None."""
    out = guided_output(model, x, t, cond, guidance_scale, y)
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

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        key = tuple(None if a is None else (a.shape, a.dtype) for a in args)
        if key not in self.graphs:
            static = [None if a is None else a.clone() for a in args]
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
            if a is not None:
                s.copy_(a)
        graph.replay()
        return out.clone()


def step_function(model: LatentDiffusion, fn, key: tuple, cuda_graph: bool, device: torch.device):
    """`fn`, or on CUDA its CUDAGraphStep, kept on the model so that later calls replay instead of recapturing.
    Not under autocast: its cast-weight cache is freed when the region ends, and a kept graph would read it."""
    if not (cuda_graph and device.type == "cuda" and not torch.is_autocast_enabled("cuda")):
        return fn
    graphs = model.__dict__.setdefault("_step_graphs", {})
    key = (*key, model.dtype, next(model.unet.parameters()).data_ptr())
    if key not in graphs:
        graphs.clear()  # one live set: each graph holds its own activation memory
        graphs[key] = CUDAGraphStep(fn)
    return graphs[key]


def draw_noise(generators: list[torch.Generator], shape: tuple, n: int) -> torch.Tensor:
    """[n, B, *shape]: n fresh draws for each image, in order, each continuing that image's own generator."""
    draws = [torch.cat([torch.randn((1, *shape), generator=g) for g in generators]) for _ in range(n)]
    return torch.stack(draws) if draws else torch.empty((0, len(generators), *shape))


@torch.no_grad()
def ddim_sample(model: LatentDiffusion, x: torch.Tensor, cond: torch.Tensor, *, steps: int = 50,
                guidance_scale: float = 7.5, eta: float = 0.0, generators: list[torch.Generator] = None,
                start_step: int = 0, end_step: int = None, y: torch.Tensor = None, progress: bool = True,
                cuda_graph: bool = True) -> torch.Tensor:
    """Denoise latents x [B, C, h, w] over the reversed grid's steps start_step..end_step (all of them by default;
    img2img starts later, a refiner takes over after end_step). cond: the context [B, 77 k, D], or [2B, 77 k, D] as
    [uncond; cond] for CFG; y: SDXL's conditioning vector, batched as cond. eta = 0 is deterministic DDIM, eta = 1
    DDPM-like: image i's per-step noise continues its own generators[i] (drawn on the CPU, all steps up front, so the
    loop has no host-to-device copies). cuda_graph: on a CUDA device, replay each step as a captured graph (the
    same kernels, so the same numbers as eager)."""
    timesteps = ddim_timesteps(steps, len(model.alphas_cumprod))
    order = list(reversed(range(len(timesteps))))[start_step:end_step]
    device = x.device
    ac = model.alphas_cumprod.to(device, torch.float32)
    t_all = torch.tensor(timesteps, device=device)
    a_all = ac[t_all]
    a_prev_all = torch.cat([ac[:1], a_all[:-1]])  # the last step lands on alphas_cumprod[0], not 1
    noise = torch.zeros(1, device=device).expand(x.shape)
    if eta > 0:  # (steps, B, C, h, w): image i's draws in step order from its own generator
        noise = draw_noise(generators, x.shape[1:], len(order)).to(device)
    run = step_function(model, lambda *a: ddim_step(model, *a, guidance_scale, eta), ("ddim", guidance_scale, eta),
                        cuda_graph, device)
    for n, i in enumerate(tqdm(order, desc="sampling", disable=not progress, leave=False)):
        x = run(x, t_all[i].expand(cond.shape[0]), cond, a_all[i], a_prev_all[i], noise[n] if eta > 0 else noise, y)
    return x


# The k-diffusion samplers (what AUTOMATIC1111 and ComfyUI run): SD's discrete schedule seen as a denoiser over the
# noise level sigma = sqrt((1 - a_t) / a_t). Each sampler is a plain loop over a sigma schedule; the U-Net call is the
# one piece that runs as a CUDA graph, and every number it reads is a device tensor prepared before the loop.

SAMPLERS = ("ddim", "euler", "euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde")
SCHEDULERS = ("normal", "karras", "exponential")


def model_sigmas(model: LatentDiffusion) -> torch.Tensor:
    """[1000] float32 on the CPU: the noise level of each training timestep, sqrt((1 - a_t) / a_t)."""
    ac = model.alphas_cumprod.float().cpu()
    return ((1 - ac) / ac) ** 0.5


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each sigma, interpolated linearly in log sigma between the two training timesteps
    around it (k-diffusion's DiscreteSchedule without quantization; A1111's default)."""
    log_sigma = sigma.log()
    dists = log_sigma - log_sigmas[:, None]  # (1000, n)
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).view(sigma.shape)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The inverse of sigma_to_t: log sigma interpolated at fractional timesteps."""
    t = t.float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def get_sigmas(model: LatentDiffusion, steps: int, scheduler: str = "normal") -> torch.Tensor:
    """[steps + 1] float32 on the CPU, from the largest sigma down, with a final 0. normal: timesteps linear from
    999 to 0 (k-diffusion's default); karras: rho = 7 between the model's smallest and largest sigma; exponential:
    linear in log sigma between them."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; available: {', '.join(SCHEDULERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sigmas = model_sigmas(model)
    sigma_min, sigma_max = sigmas[0].item(), sigmas[-1].item()
    if scheduler == "normal":
        out = t_to_sigma(torch.linspace(len(sigmas) - 1, 0, steps), sigmas.log())
    elif scheduler == "karras":
        rho = 7.0
        ramp, lo, hi = torch.linspace(0, 1, steps), sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        out = (hi + ramp * (lo - hi)) ** rho
    else:
        out = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp()
    return torch.cat([out, out.new_zeros(1)])


def noise_draws(sampler: str, sigmas: torch.Tensor) -> int:
    """How many fresh noise tensors a sampler draws after the first latent: one per step that does not end at
    sigma 0 for the ancestral and SDE samplers (two for DPM++ SDE, which evaluates the model twice a step)."""
    live = int((sigmas[1:] > 0).sum())
    return {"euler_a": live, "dpmpp_2m_sde": live, "dpmpp_sde": 2 * live}.get(sampler, 0)


def k_denoiser(model: LatentDiffusion, guidance_scale: float, cuda_graph: bool, device: torch.device):
    """D(x, sigma, t, cond) -> x0 estimate: the U-Net (CFG on its output) fed x / sqrt(sigma^2 + 1) at the fractional
    timestep t; eps models give x0 = x - sigma eps, v models k-diffusion's c_skip x + c_out v with
    c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1). x and the result are float32; sigma and t are
    0-dim float32 device tensors and cond an argument too (a captured CUDA graph reads its inputs' buffers), so the
    call can be replayed as a CUDA graph."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                y: torch.Tensor = None) -> torch.Tensor:
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        out = guided_output(model, (x * c_in).to(model.dtype), t.expand(cond.shape[0]), cond, guidance_scale, y)
        out = out.float()
        if model.prediction_type == "v":
            return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x * (1 / (sigma ** 2 + 1))
        return x + out * -sigma

    return step_function(model, denoise, ("k", guidance_scale), cuda_graph, device)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """(sigma_down, sigma_up): the deterministic step's target and the noise added after it (k-diffusion)."""
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Linear multistep weights of the last `order` derivatives: the integral over [sigma_i, sigma_i+1] of each
    Lagrange basis polynomial through sigma_i, sigma_i-1, ... (exact polynomial integration, float64)."""
    nodes = [float(sigmas[i - j]) for j in range(order)]
    coeffs = []
    for j in range(order):
        basis = np.poly1d([1.0])
        for k in range(order):
            if k != j:
                basis *= np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
        integral = basis.integ()
        coeffs.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return coeffs


class SigmaSteps:
    """A sigma schedule on both sides: `cpu[i]` (0-dim float32 CPU tensors, for the update arithmetic and branches,
    which never wait on the device) and the denoiser's inputs as device tensors made before the loop: `D(x, i)`
    evaluates the denoiser at sigma_i, `D(x, i, mid=True)` at this step's midpoint sigma (DPM++ SDE)."""

    def __init__(self, denoise, cond: torch.Tensor, y: torch.Tensor, sigmas: torch.Tensor, log_sigmas: torch.Tensor,
                 device: torch.device, mid: torch.Tensor = None):
        self.denoise, self.cond, self.y, self.cpu = denoise, cond, y, sigmas
        points = sigmas if mid is None else torch.cat([sigmas, mid])
        self.sigma = points.to(device)
        self.t = sigma_to_t(points, log_sigmas).to(device)
        self.mid_at = len(sigmas)

    def __len__(self) -> int:
        return len(self.cpu) - 1

    def D(self, x: torch.Tensor, i: int, mid: bool = False) -> torch.Tensor:
        j = self.mid_at + i if mid else i
        return self.denoise(x, self.sigma[j], self.t[j], self.cond, self.y)


def sample_euler(s: SigmaSteps, x: torch.Tensor, noise, steps) -> torch.Tensor:
    for i in steps:
        d = (x - s.D(x, i)) / s.cpu[i]
        x = x + d * (s.cpu[i + 1] - s.cpu[i])
    return x


def sample_euler_a(s: SigmaSteps, x: torch.Tensor, noise, steps) -> torch.Tensor:
    for i in steps:
        sigma_down, sigma_up = ancestral_step(s.cpu[i], s.cpu[i + 1])
        d = (x - s.D(x, i)) / s.cpu[i]
        x = x + d * (sigma_down - s.cpu[i])
        if s.cpu[i + 1] > 0:
            x = x + next(noise) * sigma_up
    return x


def sample_heun(s: SigmaSteps, x: torch.Tensor, noise, steps) -> torch.Tensor:
    for i in steps:
        d = (x - s.D(x, i)) / s.cpu[i]
        dt = s.cpu[i + 1] - s.cpu[i]
        if s.cpu[i + 1] == 0:  # the last step: Euler
            x = x + d * dt
        else:  # the average of the slopes at both ends
            x_2 = x + d * dt
            d_2 = (x_2 - s.D(x_2, i + 1)) / s.cpu[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def sample_lms(s: SigmaSteps, x: torch.Tensor, noise, steps, order: int = 4) -> torch.Tensor:
    sigmas, ds = s.cpu.double().numpy(), []
    for i in steps:
        ds = (ds + [(x - s.D(x, i)) / s.cpu[i]])[-order:]
        coeffs = lms_coefficients(sigmas, i, len(ds))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def sample_dpmpp_2m(s: SigmaSteps, x: torch.Tensor, noise, steps) -> torch.Tensor:
    old = None
    for i in steps:
        denoised = s.D(x, i)
        t, t_next = -s.cpu[i].log(), -s.cpu[i + 1].log()
        h = t_next - t
        if old is not None and s.cpu[i + 1] > 0:  # second order: extrapolate from the last two x0 estimates
            r = (t - -s.cpu[i - 1].log()) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        else:
            denoised_d = denoised
        x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_d  # exp(-t) = sigma, as k-diffusion has it
        old = denoised
    return x


def sample_dpmpp_2m_sde(s: SigmaSteps, x: torch.Tensor, noise, steps, eta: float = 1.0) -> torch.Tensor:
    old = h_last = None
    for i in steps:
        denoised = s.D(x, i)
        if s.cpu[i + 1] == 0:
            x = denoised
        else:
            h = -s.cpu[i + 1].log() - -s.cpu[i].log()
            eta_h = eta * h
            x = s.cpu[i + 1] / s.cpu[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old is not None:  # midpoint second-order correction
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / (h_last / h)) * (denoised - old)
            x = x + next(noise) * s.cpu[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
            h_last = h
        old = denoised
    return x


def dpmpp_sde_midpoints(sigmas: torch.Tensor, r: float = 0.5) -> torch.Tensor:
    """DPM++ SDE's intermediate sigma of each step, exp(-(t + r h)) in t = -log sigma (0 where a step ends at 0)."""
    t, t_next = -sigmas[:-1].log(), -sigmas[1:].log()
    return torch.where(sigmas[1:] > 0, (-(t + (t_next - t) * r)).exp(), torch.zeros(()))


def sample_dpmpp_sde(s: SigmaSteps, x: torch.Tensor, noise, steps, r: float = 0.5) -> torch.Tensor:
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())  # sigma <-> t = -log sigma
    for i in steps:
        denoised = s.D(x, i)
        if s.cpu[i + 1] == 0:  # the last step: Euler
            x = x + (x - denoised) / s.cpu[i] * (s.cpu[i + 1] - s.cpu[i])
            continue
        t, t_next = t_fn(s.cpu[i]), t_fn(s.cpu[i + 1])
        t_mid = t + (t_next - t) * r
        sd, su = ancestral_step(sigma_fn(t), sigma_fn(t_mid))  # to the midpoint, with noise
        x_2 = (sigma_fn(t_fn(sd)) / sigma_fn(t)) * x - (t - t_fn(sd)).expm1() * denoised + next(noise) * su
        denoised_2 = s.D(x_2, i, mid=True)  # at sigma_fn(t_mid), made before the loop by dpmpp_sde_midpoints
        sd, su = ancestral_step(sigma_fn(t), sigma_fn(t_next))  # the whole step, from both estimates
        fac = 1 / (2 * r)
        x = (sigma_fn(t_fn(sd)) / sigma_fn(t)) * x - (t - t_fn(sd)).expm1() * ((1 - fac) * denoised + fac * denoised_2)
        x = x + next(noise) * su
    return x


K_SAMPLERS = {"euler": sample_euler, "euler_a": sample_euler_a, "heun": sample_heun, "lms": sample_lms,
              "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_sde": sample_dpmpp_2m_sde, "dpmpp_sde": sample_dpmpp_sde}


@torch.no_grad()
def k_sample(model: LatentDiffusion, x: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor, sampler: str, *,
             guidance_scale: float = 7.5, noise: torch.Tensor = None, y: torch.Tensor = None, progress: bool = True,
             cuda_graph: bool = True) -> torch.Tensor:
    """Denoise x [B, C, h, w] (float32, already at noise level sigmas[0]) down the schedule `sigmas` (CPU float32,
    ending in 0) with a k-diffusion sampler. cond: [uncond; cond] for CFG, as ddim_sample. noise: [draws, B, C, h, w],
    the sampler's later random draws in order (noise_draws says how many), each image's from its own generator.
    y: SDXL's conditioning vector, batched as cond. A schedule may end above 0 (a refiner takes over from there)."""
    device = x.device
    denoise = k_denoiser(model, guidance_scale, cuda_graph, device)
    mid = dpmpp_sde_midpoints(sigmas) if sampler == "dpmpp_sde" else None
    s = SigmaSteps(denoise, cond, y, sigmas, model_sigmas(model).log(), device, mid)
    draws = iter(noise.to(device) if noise is not None else ())
    steps = tqdm(range(len(s)), desc="sampling", disable=not progress, leave=False)
    return K_SAMPLERS[sampler](s, x.float(), draws, steps)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] images [B, 3, H, W] -> PIL, rounded as the reference pipelines round."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]


def image_grid(images: list[Image.Image], cols: int = 4, labels: list[str] = None) -> Image.Image:
    """Images of one size, row by row, `cols` to a row, on white; `labels` (e.g. the prompts of a sample grid) are
    written under their images, wrapped to the image's width."""
    cols = min(cols, len(images))
    w, h = images[0].size
    font = ImageFont.load_default(size=10)
    wrapped = [textwrap.wrap(label, max(1, int(w // font.getlength("n")))) or [""] for label in labels or []]
    line_h = 12
    strip = max((len(lines) for lines in wrapped), default=0) * line_h + (4 if wrapped else 0)
    grid = Image.new("RGB", (cols * w, -(-len(images) // cols) * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        grid.paste(im, (x, y))
        for k, line in enumerate(wrapped[i] if i < len(wrapped) else []):
            draw.text((x + 2, y + h + 2 + k * line_h), line, fill="black", font=font)
    return grid


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN/inf values; the message says what to try."""


def decode(model: LatentDiffusion, x: torch.Tensor, tile: int = None) -> torch.Tensor:
    """Latents -> images in [-1, 1], never NaN: a half-precision VAE that overflows is switched to float32 (for the
    rest of the model's life) and decodes again."""
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"the U-Net produced NaN/inf latents in {model.dtype}; try float32 or bfloat16")
    images = model.decode_latents(x, tile=tile)
    if not torch.isfinite(images).all() and next(model.vae.parameters()).dtype != torch.float32:
        print("warning: the VAE overflowed in half precision (NaN/inf pixels); decoding again with the VAE in "
              "float32, kept for the rest of this run", file=sys.stderr)
        model.vae.float()
        images = model.decode_latents(x, tile=tile)
    if not torch.isfinite(images).all():
        raise NonFiniteError("the VAE decoded NaN/inf pixels even in float32; no image written")
    return images


def sampling_memory(model: LatentDiffusion, batch: int, height: int, width: int, tile: int = None) -> int:
    """A rough estimate, in bytes, of what sampling one batch needs beyond the weights: the U-Net's CFG pass at the
    latent size, and the VAE decode at the image size (or of one tile of it). The decode dominates: SD's VAE decoder
    peaks near 4 KB per output pixel in float32 (measured on the CPU: about 8 x its 128 base channels x 4 bytes)."""
    f, unet_el = model.downsample_factor, model.dtype.itemsize
    vae_el = next(model.vae.parameters()).dtype.itemsize
    unet = 2 * batch * (height // f) * (width // f) * model.unet.cfg.model_channels * 16 * unet_el
    pixels = min(height, tile * f) * min(width, tile * f) if tile else height * width
    return unet + batch * pixels * 8 * model.vae.cfg.ch * vae_el


def _per_image(value, n: int, what: str) -> list:
    values = [value] * n if value is None or isinstance(value, (str, int)) else list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} prompts")
    return values


@dataclass
class Sizes:
    """SDXL's added conditioning (micro-conditioning on sizes): the size the image is to look as if it had before
    any resizing, the top-left corner of its crop, the size to make (base), or the aesthetic score (refiner; the
    negative prompt gets its own, low, score). None sizes mean the image's (height, width), as the reference does."""
    original_size: tuple[int, int] = None  # (height, width)
    crop: tuple[int, int] = (0, 0)  # (top, left)
    target_size: tuple[int, int] = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


def is_sdxl(model: LatentDiffusion) -> bool:
    """An SDXL base or refiner: its U-Net takes the conditioning vector y beside the context."""
    return model.unet.cfg.adm_in_channels is not None


def zero_empty(model: LatentDiffusion, texts: list, context: torch.Tensor, pooled: torch.Tensor):
    """(context, pooled) with the rows whose text is "" set to zero on an SDXL base: what it takes for no prompt
    (diffusers' force_zeros_for_empty_prompt; its training dropped captions that way). Other models: unchanged."""
    if pooled is None or model.text_encoder.clip_l is None:  # SD 1.x / 2.x, the refiner
        return context, pooled
    empty = torch.tensor([t == "" for t in texts], device=context.device)
    return context.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)


def added_conditioning(model: LatentDiffusion, pooled: torch.Tensor, original: torch.Tensor, crop: torch.Tensor,
                       target: torch.Tensor = None, score: torch.Tensor = None) -> torch.Tensor:
    """SDXL's conditioning vector y [B, P + 256 n], float32: the pooled text vector [B, P] and the 256-wide
    embeddings of original (h, w) [B, 2], crop (top, left) [B, 2], and target (h, w) [B, 2] (base) or the
    aesthetic score [B] (refiner)."""
    last = score.reshape(-1, 1) if model.text_encoder.clip_l is None else target
    rows = torch.cat([original, crop, last], dim=1).float().to(pooled.device)
    return unet_lib.adm_vector(pooled.float(), rows)


def conditioning(model: LatentDiffusion, prompts: list[str], negatives: list[str], *, use_cfg: bool, clip_skip: int,
                 height: int, width: int, sizes: Sizes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, y): what the U-Net attends to ([uncond; cond] with CFG) and, for SDXL, its conditioning vector
    y = [pooled text | size embeddings]: base (original h, w, crop top, left, target h, w), refiner (original h, w,
    crop top, left, aesthetic score). SDXL base gives an empty negative prompt zero embeddings, as diffusers
    (force_zeros_for_empty_prompt)."""
    texts = negatives + prompts if use_cfg else prompts
    if not is_sdxl(model):
        return model.encode_prompt(texts, clip_skip=clip_skip), None
    context, pooled = model.encode_prompt(texts, clip_skip=clip_skip, pooled=True)
    if use_cfg:
        context, pooled = zero_empty(model, negatives + [None] * len(prompts), context, pooled)
    n = len(texts)
    orig, target = sizes.original_size or (height, width), sizes.target_size or (height, width)
    scores = [sizes.negative_aesthetic_score] * len(negatives) * use_cfg + [sizes.aesthetic_score] * len(prompts)
    y = added_conditioning(model, pooled.float().cpu(), torch.tensor([orig] * n), torch.tensor([sizes.crop] * n),
                           torch.tensor([target] * n), torch.tensor(scores))
    return context, y.to(model.device, model.dtype)


def switch_step(model: LatentDiffusion, sampler: str, scheduler: str, steps: int, fraction: float) -> int:
    """How many steps of the schedule the base model runs before a refiner takes over at `fraction` of it: those at
    timesteps >= round(1000 (1 - fraction)), as diffusers' denoising_end / denoising_start split them."""
    cutoff = round(len(model.alphas_cumprod) * (1 - fraction))
    if sampler == "ddim":
        timesteps = torch.tensor(ddim_timesteps(steps, len(model.alphas_cumprod))[::-1], dtype=torch.float32)
    else:
        timesteps = sigma_to_t(get_sigmas(model, steps, scheduler)[:-1], model_sigmas(model).log())
    return int((timesteps >= cutoff).sum())


def denoise(model: LatentDiffusion, x: torch.Tensor, context: torch.Tensor, y: torch.Tensor, generators: list, *,
            sampler: str, scheduler: str, steps: int, start: int, end: int, guidance_scale: float, eta: float,
            progress: bool, cuda_graph: bool) -> torch.Tensor:
    """Steps start..end of the sampler's schedule on the latents x, already at step `start`'s noise level."""
    x = x.to(model.device)
    if sampler == "ddim":
        return ddim_sample(model, x.to(model.dtype), context, steps=steps, guidance_scale=guidance_scale, eta=eta,
                           generators=generators, start_step=start, end_step=end, y=y, progress=progress,
                           cuda_graph=cuda_graph)
    sigmas = get_sigmas(model, steps, scheduler)[start:end + 1]
    noise = draw_noise(generators, x.shape[1:], noise_draws(sampler, sigmas))
    return k_sample(model, x, context, sigmas, sampler, guidance_scale=guidance_scale, noise=noise, y=y,
                    progress=progress, cuda_graph=cuda_graph).to(model.dtype)


def start_latents(model: LatentDiffusion, noise: torch.Tensor, z0: torch.Tensor | None, sampler: str,
                  scheduler: str, steps: int, start: int) -> torch.Tensor:
    """The latents at step `start` of the schedule: noise at the first noise level, or img2img's image latent z0
    noised to step `start`'s."""
    if sampler == "ddim":
        if z0 is None:
            return noise
        t = ddim_timesteps(steps, len(model.alphas_cumprod))[steps - 1 - start] if start < steps else 0
        return model.add_noise(z0, noise, torch.tensor([t])) if start < steps else z0
    sigma = get_sigmas(model, steps, scheduler)[start]
    return noise * sigma if z0 is None else z0 + noise * sigma


@torch.no_grad()
def sample(model: LatentDiffusion, prompts: list[str], *, negative_prompts: list[str] = None, height: int = None,
           width: int = None, steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0,
           seed: int | list[int] = None, sampler: str = "ddim", scheduler: str = "normal", clip_skip: int = 1,
           init_image: torch.Tensor = None, strength: float = 0.75, sizes: Sizes = None,
           refiner: LatentDiffusion = None, refiner_switch: float = 0.8, progress: bool = True,
           output_type: str = "pil", cuda_graph: bool = True, tile: int = None):
    """Text-to-image (or image-to-image with `init_image` in [-1, 1], [B or 1, 3, H, W]). Image i's noise comes from
    its own torch.Generator("cpu").manual_seed(seed + i) (or seed[i] for a list): its first latent, then every later
    draw of an ancestral or SDE sampler, so a seed gives the same image on every device and in any batch.
    sampler: one of SAMPLERS (ddim on its own timestep grid, with eta; the others on the `scheduler`'s sigmas).
    Prompts take A1111's syntax (weights, BREAK, long prompts, embeddings; see encode_prompt), with clip_skip.
    img2img runs the last `strength` of the schedule from the image's latent noised to that point. SDXL: `sizes`
    (its added conditioning), and a `refiner` that runs the schedule from `refiner_switch` of the way on (diffusers'
    denoising_end / denoising_start). cuda_graph: replay the U-Net as a CUDA graph on a CUDA device; tile: decode in
    tiles of this many latent pixels. Returns PIL images, or a [B, 3, H, W] tensor in [-1, 1]."""
    f = model.downsample_factor
    prompts, seeds, negatives = _check_sample_args(model, prompts, negative_prompts, seed, sampler, scheduler,
                                                   init_image, strength, refiner_switch)
    height, width = height or model.resolution, width or model.resolution
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {width}x{height}")
    use_cfg, sizes = guidance_scale != 1.0, sizes or Sizes()
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = draw_noise(generators, (model.latent_channels, height // f, width // f), 1)[0]  # [B, C, h, w]
    z0 = None if init_image is None else model.encode_images(init_image.to(model.device)).float().cpu().expand(
        noise.shape)
    start = 0 if z0 is None else steps - min(int(steps * strength), steps)  # img2img runs the last int(s x steps)
    switch = steps if refiner is None else max(start, switch_step(model, sampler, scheduler, steps, refiner_switch))
    kw = dict(sampler=sampler, scheduler=scheduler, steps=steps, guidance_scale=guidance_scale, eta=eta,
              progress=progress, cuda_graph=cuda_graph)
    x = start_latents(model, noise, z0, sampler, scheduler, steps, start)
    for part, first, last in ((model, start, switch), (refiner, switch, steps)):
        if part is not None and first < last:
            context, y = conditioning(part, prompts, negatives, use_cfg=use_cfg, clip_skip=clip_skip,
                                      height=height, width=width, sizes=sizes)
            x = denoise(part, x, context, y, generators, start=first, end=last, **kw)
    images = decode(refiner or model, x.to((refiner or model).device), tile)
    return to_pil(images) if output_type == "pil" else images


def _check_sample_args(model, prompts, negative_prompts, seed, sampler, scheduler, init_image, strength,
                       refiner_switch) -> tuple[list[str], list[int], list[str]]:
    """(prompts, seeds, negative prompts) as lists, or a ValueError saying what is wrong."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")
    if sampler == "ddim" and scheduler != "normal":
        raise ValueError(f"ddim runs its own timestep grid; the scheduler ({scheduler}) is for the other samplers")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [n or "" for n in _per_image(negative_prompts, len(prompts), "negative prompts")]
    seed = random.randrange(2 ** 32) if seed is None else seed
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else _per_image(seed, len(prompts),
                                                                                             "seeds")
    if not all(0 <= s < 2 ** 64 for s in seeds):  # what torch.Generator.manual_seed takes
        raise ValueError(f"seeds must be in 0..2**64 - 1, got {seeds}")
    if init_image is not None and not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if not 0.0 < refiner_switch < 1.0:
        raise ValueError(f"refiner_switch must be in (0, 1), got {refiner_switch}")
    return prompts, seeds, negatives


# -----------------------------------------------------------------------------------------------------------------
# Building, loading and saving


def pick_device(name: str = None, *, mps: bool = True) -> torch.device:
    """None or 'auto': CUDA if present, else Apple's MPS (when `mps`), else the CPU; otherwise the named device."""
    if name not in (None, "auto"):
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Inference weights: float16 on CUDA (the public files' precision), float32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def build_model(preset: str | dict = "tiny", *, device=None, prediction_type: str = None) -> LatentDiffusion:
    """A LatentDiffusion with fresh weights from a preset name or a model_config() dict."""
    cfg = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    unet_cfg = _part_config(unet_lib.UNetConfig, unet_lib.PRESETS, cfg["unet"])
    vae_cfg = _part_config(vae_lib.AutoencoderConfig, vae_lib.PRESETS, cfg["vae"])
    if "scale_factor" in cfg:  # files written before the scale moved into the autoencoder's config
        vae_cfg = replace(vae_cfg, scale_factor=float(cfg["scale_factor"]))
    text_cfg = clip.text_config(cfg["text"])
    pad_id = cfg.get("pad_id", 0 if text_cfg.layout == "openclip" else 49407)  # SD 2.x pads with 0, SD 1.x with EOT
    with torch.device(device) if device is not None else contextlib.nullcontext():  # honours an outer meta context
        model = LatentDiffusion(unet_lib.UNetModel(unet_cfg), vae_lib.build_autoencoder(vae_cfg),
                                clip.build_text_encoder(text_cfg), clip.Tokenizer(pad_id=pad_id),
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


def _check_materialized(module: nn.Module):
    leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: tensors left on the meta device after loading: {leftover[:5]}")


def split_checkpoint(sd: dict[str, torch.Tensor], path) -> dict[str, dict[str, torch.Tensor]]:
    """Split a single-file SD state dict by PREFIXES; every key must either belong to a part or be ignored."""
    parts = {name: {} for name in PREFIXES}
    stray = []
    for key, value in sd.items():
        if checkpoint.is_ignored(key):
            continue
        name = next((n for n, p in PREFIXES.items() if key.startswith(p)), None)
        if name is None:
            stray.append(key)
        else:
            parts[name][key[len(PREFIXES[name]):]] = value
    if stray:
        raise CheckpointError(f"{path}: unexpected keys outside the known parts: {', '.join(stray[:5])}"
                              + (f" ... ({len(stray)} in all)" if len(stray) > 5 else ""))
    return parts


def detect_layout(sd: dict[str, torch.Tensor], path) -> str:
    """'sd1' | 'sd2' | 'vae' (standalone VAE / LDM first stage) from key names; anything else is an error."""
    keys = list(sd)
    if any(k.startswith(PREFIXES["unet"]) for k in keys):
        if any(k.startswith(PREFIXES["sdxl_g"]) for k in keys):
            return "sdxl"
        if any(k.startswith(PREFIXES["refiner_g"]) for k in keys):
            return "sdxl-refiner"
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
    if "ldm_config" in metadata:  # written by save_model: the config the weights cannot reveal
        cfg = checkpoint.json_metadata(metadata, "ldm_config", path, required=("unet", "vae", "text"))
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
    damaged = checkpoint.metadata_errors(path, "ldm_config") if "ldm_config" in metadata else contextlib.nullcontext()
    with damaged, torch.device("meta"):  # a damaged ldm_config fails in here, as one line
        model = build_model(cfg, prediction_type=cfg["prediction_type"] or "eps")
    parts = split_checkpoint(sd, path)
    checkpoint.load_strict(model.unet, parts["unet"], f"{path} (U-Net, {PREFIXES['unet']}*)")
    checkpoint.load_strict(model.vae, parts["vae"], f"{path} (VAE, {PREFIXES['vae']}*)")
    text, name_of = text_parts(model.text_encoder), {p: n for n, p in PREFIXES.items()}
    text_sd = {ours + k: v for ours, theirs in text.items() for k, v in parts[name_of[theirs]].items()}
    checkpoint.load_strict(model.text_encoder, text_sd, f"{path} (text encoder, {', '.join(text.values())}*)")
    leftover = [n for n in PREFIXES if n not in ("unet", "vae", *(name_of[p] for p in text.values())) and parts[n]]
    if leftover:
        raise CheckpointError(f"{path}: holds another text encoder too ({PREFIXES[leftover[0]]}*)")
    return model, cfg


def model_from_training_checkpoint(state: dict, path: Path, prediction_type: str = None,
                                   weights: str = "ema") -> tuple[LatentDiffusion, dict]:
    """A train.py ckpt-<step>.pt: its U-Net (the EMA weights by default), and the parts it did not train from where
    the run took them: the checkpoint itself (from-scratch runs), its --vae file, or its --ckpt base model."""
    if "lora" in state:  # a LoRA run: its base model with the LoRA merged in (EMA weights by default)
        args = state["args"] if isinstance(state.get("args"), dict) else {}
        if not args.get("ckpt") or not Path(args["ckpt"]).exists():
            raise CheckpointError(f"{path}: a LoRA of the base model {args.get('ckpt')}, which is not there; run from "
                                  "where training ran, or apply its lora.safetensors to the base model")
        model = load_model(args["ckpt"], device="cpu", dtype=torch.float32, prediction_type=prediction_type)
        weights = dict(state["lora"], **(state.get("ema", {}) if weights == "ema" else {}))
        model.apply_lora(weights, name=path.parent.name)
        return model, model.config
    if "unet" not in state:
        raise CheckpointError(f"{path}: a train_vae.py checkpoint (an autoencoder); pass it as --vae, or load it with "
                              "vae.load_autoencoder")
    cfg = checkpoint.json_metadata(state, "model_config", path, required=("unet", "vae", "text"))
    with checkpoint.metadata_errors(path, "model_config"), torch.device("meta"):
        cfg["prediction_type"] = prediction_type or cfg["prediction_type"]
        model = build_model(cfg)
    checkpoint.load_strict(model.unet, state["ema"] if weights == "ema" and "ema" in state else state["unet"],
                           f"{path} (U-Net)")
    args = state["args"] if isinstance(state.get("args"), dict) else {}
    base = None
    if "text_encoder" not in state or ("vae" not in state and not args.get("vae")):
        if not args.get("ckpt") or not Path(args["ckpt"]).exists():
            raise CheckpointError(f"{path}: its frozen parts come from the base model {args.get('ckpt')}, which is "
                                  "not there; run from where training ran, or load its final.safetensors")
        base = load_model(args["ckpt"], device="cpu", dtype=torch.float32)
    if "text_encoder" in state:
        checkpoint.load_strict(model.text_encoder, state["text_encoder"], f"{path} (text encoder)")
    else:
        model.text_encoder, model.tokenizer = base.text_encoder, base.tokenizer
    if "vae" in state:
        checkpoint.load_strict(model.vae, state["vae"], f"{path} (VAE)")
    else:
        model.vae = vae_lib.load_autoencoder(args["vae"], dtype=torch.float32) if args.get("vae") else base.vae
    return model, cfg


def _load_diffusers_folder(path: Path, prediction_type):
    """A diffusers pipeline folder: unet/, vae/, text_encoder/, tokenizer/ (+ scheduler/ for the prediction type);
    SDXL's has text_encoder_2/ too (its refiner's only that)."""
    def part(name: str):
        folder = path / name
        cfg_file = folder / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{path}: diffusers folder without {name}/config.json")
        config = checkpoint.read_json(cfg_file)
        for fname in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                      "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"):
            if (folder / fname).exists():
                return config, checkpoint.read_checkpoint(folder / fname)[0]
        raise CheckpointError(f"{path}: no weights file in {name}/ (looked for *.safetensors and *.bin)")

    unet_json, unet_sd = part("unet")
    vae_json, vae_sd = part("vae")
    sdxl = (path / "text_encoder_2").is_dir()  # SDXL: CLIP-L in text_encoder/ (not in the refiner), bigG in _2/
    text_json, text_sd = part("text_encoder") if not sdxl or (path / "text_encoder").is_dir() else (None, None)
    text_json_2, text_sd_2 = part("text_encoder_2") if sdxl else (None, None)
    with checkpoint.metadata_errors(path, "config.json"):  # a config.json that does not describe such a model
        unet_cfg = unet_lib.config_from_diffusers(unet_json)
        vae_cfg = vae_lib.config_from_diffusers(vae_json)  # its scale factor is the folder's scaling_factor
        text_cfg = clip.config_from_diffusers(text_json, text_json_2)
    scheduler = path / "scheduler" / "scheduler_config.json"
    sched = checkpoint.read_json(scheduler) if scheduler.exists() else {}
    pred = {"epsilon": "eps", "v_prediction": "v"}.get(sched.get("prediction_type", "epsilon"), "eps")
    folder = next((path / n for n in ("tokenizer", "tokenizer_2") if (path / n).is_dir()), None)  # refiner: _2 only
    tokenizer = clip.Tokenizer.from_diffusers(folder) if folder else None
    cfg = dict(unet=asdict(unet_cfg), vae=asdict(vae_cfg), text=asdict(text_cfg),
               prediction_type=prediction_type or pred,
               resolution=unet_cfg.image_size * 2 ** (len(vae_cfg.ch_mult) - 1),
               pad_id=tokenizer.pad_id if tokenizer else (0 if text_cfg.layout == "openclip" else 49407))
    with torch.device("meta"):
        model = build_model(cfg)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    checkpoint.load_strict(model.unet, unet_lib.convert_diffusers(unet_sd, unet_cfg), f"{path}/unet")
    checkpoint.load_strict(model.vae, vae_lib.convert_diffusers(vae_sd), f"{path}/vae")
    checkpoint.load_strict(model.text_encoder, clip.convert_diffusers(text_sd, text_cfg, text_sd_2),
                           f"{path}/text_encoder" + ("(_2)" if sdxl else ""))
    return model, cfg


def load_model(path: str | os.PathLike = None, *, device=None, dtype=None,
               prediction_type: str = None) -> LatentDiffusion:
    """Load an SD 1.x/2.x single file (.safetensors/.ckpt), a diffusers folder, a file save_model wrote, or a train.py
    run: its folder (final.safetensors, else the newest checkpoint) or one of its ckpt-<step>.pt (EMA weights).
    Weights are memory-mapped and assigned into modules built on the meta device: never two copies in memory.
    device: pick_device's choice by default; dtype: default_dtype(device). Without a path, the default weights
    (SD 1.5), downloaded into checkpoint.cache_dir() on first use."""
    path = Path(checkpoint.default_checkpoint() if path is None else path)
    if prediction_type not in (None, "eps", "v"):
        raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")
    if path.is_dir() and checkpoint.run_file(path):  # a train.py run folder
        path = checkpoint.run_file(path)
    if path.is_dir() and not (path / "unet").is_dir():
        raise CheckpointError(f"{path}: a folder that is neither a training run (no final.safetensors or "
                              "ckpt-*.pt in it) nor a diffusers pipeline (no unet/ in it); pass a checkpoint file")
    if path.is_dir():
        model, cfg = _load_diffusers_folder(path, prediction_type)
    elif not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; pass the path of an SD checkpoint")
    elif (state := checkpoint.read_training_checkpoint(path)) is not None:
        model, cfg = model_from_training_checkpoint(state, path, prediction_type)
    else:
        sd, metadata = checkpoint.read_checkpoint(path)
        model, cfg = model_from_state_dict(sd, metadata, path=path, prediction_type=prediction_type)
    device = pick_device(device, mps=False)
    _check_materialized(model)
    model.to(device=device, dtype=dtype or default_dtype(device))
    if is_sdxl(model) and model.dtype == torch.float16:  # SDXL's VAE overflows in float16: black or NaN images
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        model.vae.to(torch.bfloat16 if bf16 else torch.float32)
    model.alphas_cumprod = schedule_buffers(make_schedule())["alphas_cumprod"].to(device)  # float32 whatever dtype
    model.config = cfg
    if cfg.get("prediction_type") is None:
        model.prediction_type = probe_prediction_type(model)
        model.resolution = 768 if model.prediction_type == "v" else 512  # 2.x-768-v vs 2.x-base
        cfg.update(prediction_type=model.prediction_type, resolution=model.resolution)
        print(f"{path.name}: SD 2.x checkpoint, prediction type probed as {model.prediction_type!r} "
              "(pass prediction_type='eps' or 'v' to override)")
    return model.eval().requires_grad_(False)


def save_model(model: LatentDiffusion, path: str | os.PathLike, *, dtype: torch.dtype = None):
    """Write `model` as one .safetensors file in the public single-file SD layout (the keys and schedule buffers of
    the released files), with model_config() in its metadata so load_model rebuilds any size exactly. dtype (e.g.
    torch.float16 for a file half the size) casts the floating-point tensors; None keeps each tensor's own."""
    tensors = {k: v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()
               for k, v in model.checkpoint_state_dict().items()}
    checkpoint.save_safetensors(path, tensors, {"ldm_config": json.dumps(model.model_config())})
