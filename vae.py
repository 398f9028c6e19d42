"""First-stage autoencoders of latent diffusion: the KL VAE of Stable Diffusion and the LDM VQ models.

Module names mirror the CompVis latent-diffusion single-file keys (`encoder.down.1.block.0.nin_shortcut`,
`decoder.up.3.upsample.conv`, `encoder.mid.attn_1.q`, `quant_conv`, `quantize.embedding`), so a standalone VAE file
or the `first_stage_model.*` part of an SD checkpoint loads with a strict `load_state_dict`. Diffusers `vae/` folders
are converted by short loop-built tables at the bottom of this file.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import checkpoint


# ----------------------------------------------------------------------------- config + presets

@dataclass
class AutoencoderConfig:
    embed_dim: int = 4              # channels of the latent the diffusion model sees
    n_embed: int | None = None      # codebook size; None/0 -> KL autoencoder
    double_z: bool = True           # encoder predicts mean and logvar (KL) or a single map (VQ)
    z_channels: int = 4
    resolution: int = 256           # training resolution; attn_resolutions are relative to it
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    attn_type: str = "vanilla"      # "vanilla" | "none" (no attention anywhere, as vq-f4-noattn)
    scale_factor: float = 1.0       # latent scale used by the diffusion stage

    @property
    def is_vq(self) -> bool:
        return bool(self.n_embed)


def _kl(embed_dim: int, ch_mult: tuple[int, ...], attn: tuple[int, ...] = (), scale: float = 1.0) -> AutoencoderConfig:
    return AutoencoderConfig(embed_dim=embed_dim, z_channels=embed_dim, ch_mult=ch_mult, attn_resolutions=attn,
                             scale_factor=scale)


def _vq(embed_dim: int, n_embed: int, ch_mult: tuple[int, ...], attn: tuple[int, ...] = (),
        attn_type: str = "vanilla") -> AutoencoderConfig:
    return AutoencoderConfig(embed_dim=embed_dim, n_embed=n_embed, double_z=False, z_channels=embed_dim,
                             ch_mult=ch_mult, attn_resolutions=attn, attn_type=attn_type)


# From CompVis/latent-diffusion models/first_stage_models/*/config.yaml. LDM trains its diffusion models on these
# latents unscaled (scale_factor 1.0) except the kl-f8 text-to-image models, which use 0.18215 (1/std of SD-VAE
# latents), the value Stable Diffusion inherited.
PRESETS: dict[str, AutoencoderConfig] = {
    "kl-f4": _kl(3, (1, 2, 4)),
    "kl-f8": _kl(4, (1, 2, 4, 4), scale=0.18215),
    "kl-f16": _kl(16, (1, 1, 2, 2, 4), (16,)),
    "kl-f32": _kl(64, (1, 1, 2, 2, 4, 4), (16, 8)),
    "vq-f4": _vq(3, 8192, (1, 2, 4)),
    "vq-f4-noattn": _vq(3, 8192, (1, 2, 4), attn_type="none"),
    "vq-f8": _vq(4, 16384, (1, 2, 2, 4), (32,)),
    "vq-f16": _vq(8, 16384, (1, 1, 2, 2, 4), (16,)),
    # CPU-sized models for tests and smoke runs (f4: 64x64 -> 16x16 latents).
    "tiny-kl": AutoencoderConfig(embed_dim=4, z_channels=4, resolution=64, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
    "tiny-vq": AutoencoderConfig(embed_dim=3, n_embed=64, double_z=False, z_channels=3, resolution=64, ch=32,
                                 ch_mult=(1, 2, 2), num_res_blocks=1),
}
PRESETS["sd"] = replace(PRESETS["kl-f8"])  # SD 1.x/2.x VAE is the kl-f8 autoencoder
PRESETS["sdxl"] = replace(PRESETS["kl-f8"], scale_factor=0.13025)  # the same architecture, retrained: its latent scale


# ----------------------------------------------------------------------------- leaf blocks

def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)  # 32 groups, eps 1e-6 as the CompVis VAE


class ResnetBlock(nn.Module):
    """Two 3x3 convs with pre-norm + SiLU; a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs ([C, C, 1, 1]) as stored."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, 1, HW, C), made contiguous: strided views send SDPA to its math kernel, which holds the (HW, HW) scores
        # (16 GiB in fp32 for a 256 x 256 latent); contiguous ones reach a fused kernel that never does
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(2, 3).contiguous() for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


def make_attn(channels: int, attn_type: str) -> nn.Module:
    if attn_type == "vanilla":
        return AttnBlock(channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"unsupported attn_type {attn_type!r} (expected 'vanilla' or 'none')")


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric pad (right/bottom only) as the original: H -> H/2 exactly for even H.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------- encoder / decoder

def _check_tiles(tile: int, overlap: int) -> None:
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int (latent pixels), got {tile!r}")
    if not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be an int >= 0 (latent pixels), got {overlap!r}")
    if tile <= 2 * overlap:
        raise ValueError(f"tile must be > 2 * overlap, got tile={tile}, overlap={overlap}")


def _tile_spans(size: int, tile: int, overlap: int, f: int) -> list[tuple[int, int, torch.Tensor]]:
    """One latent axis of `size` -> (start, stop, weight) per tile: ceil(size / tile) near-equal cores, each widened
    by `overlap` on both sides (clipped to the axis). weight ((stop - start) * f,) is per output pixel: 1 inside the
    core, a linear ramp across the 2 * overlap strip shared with each neighbour, normalised to sum to 1 over tiles."""
    n = -(-size // tile)
    cuts = [i * size // n for i in range(n + 1)]
    ramp = max(2 * overlap * f, 1)  # output pixels; overlap 0 -> a one-pixel step, i.e. hard cuts at the core edges
    x = torch.arange(size * f, dtype=torch.float64) + 0.5  # output pixel centres
    weights = []
    for i in range(n):
        w = torch.ones_like(x)
        if i > 0:  # ~0 at this tile's first pixel, 1/2 at its core edge cuts[i]
            w = w.minimum((x - cuts[i] * f) / ramp + 0.5)
        if i < n - 1:
            w = w.minimum((cuts[i + 1] * f - x) / ramp + 0.5)
        weights.append(w.clamp(0, 1))
    total = torch.stack(weights).sum(0)  # 1, except where a core is narrower than 2 * overlap
    spans = []
    for i, w in enumerate(weights):
        lo, hi = max(cuts[i] - overlap, 0), min(cuts[i + 1] + overlap, size)
        spans.append((lo, hi, (w / total)[lo * f:hi * f].float()))
    return spans


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, 2*z or z, H/f, W/f) with f = 2**(len(ch_mult)-1)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        widths = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)]
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in = widths[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, widths[i + 1], cfg.dropout))
                block_in = widths[i + 1]
                if res in cfg.attn_resolutions:
                    level.attn.append(make_attn(block_in, cfg.attn_type))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = make_attn(block_in, cfg.attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> (B, out_ch, h*f, w*f). `up.{i}` is indexed like `down.{i}` (0 = full res) and
    run from the last index to 0, with num_res_blocks + 1 blocks per level."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = make_attn(block_in, cfg.attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        levels = []
        for i in reversed(range(n)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[i], cfg.dropout))
                block_in = cfg.ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(make_attn(block_in, cfg.attn_type))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor, tile: int | None = None, overlap: int = 16) -> torch.Tensor:
        """tile=None decodes in one pass; an int decodes the up levels tile by tile (see forward_up_tiled), except
        for a latent that fits in one tile with its context, which takes the one-pass path."""
        if tile is not None:
            _check_tiles(tile, overlap)
        tiled = tile is not None and max(z.shape[-2:]) > tile + 2 * overlap
        h = self.mid.block_1(self.conv_in(z))
        h = self.mid.block_2(self.mid.attn_1(h))  # the mid block stays global: exact attention, cheap at 1/f resolution
        return self.forward_up_tiled(h, tile, overlap) if tiled else self.forward_up(h)

    def forward_up(self, h: torch.Tensor) -> torch.Tensor:
        """Mid-block output (B, C, h, w) -> image (B, out_ch, h*f, w*f): the up levels, norm_out, conv_out."""
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward_up_tiled(self, h: torch.Tensor, tile: int, overlap: int = 16) -> torch.Tensor:
        """forward_up in pieces, so that peak memory follows the tile and not the image: the mid-block output is cut
        into a grid of cores of at most `tile` latent pixels, each decoded with `overlap` extra latent pixels of
        context on every inner side, and the pieces are blended with linear ramps (weights summing to 1) into one
        preallocated image. Not bit-equal to forward_up: the up levels' GroupNorms (and attention) see one tile."""
        _check_tiles(tile, overlap)
        B, C, H, W = h.shape
        f = 2 ** (len(self.up) - 1)
        out = None
        for y0, y1, wy in _tile_spans(H, tile, overlap, f):
            for x0, x1, wx in _tile_spans(W, tile, overlap, f):
                piece = self.forward_up(h[:, :, y0:y1, x0:x1])  # (B, out_ch, (y1-y0)*f, (x1-x0)*f)
                if out is None:  # dtype of what the convs return (autocast may differ from h)
                    out = piece.new_zeros(B, piece.shape[1], H * f, W * f)
                weight = (wy[:, None] * wx[None, :]).to(piece.device, piece.dtype)
                out[:, :, y0 * f:y1 * f, x0 * f:x1 * f] += piece * weight
        return out


# ----------------------------------------------------------------------------- KL autoencoder

class DiagonalGaussianDistribution:
    """Posterior N(mean, exp(logvar)) from the encoder's (B, 2*z, h, w) moments, split on channels."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite in fp32
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Noise drawn on the generator's device, then moved, so a CPU generator gives the same latents anywhere.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over (C, H, W); `other` defaults to N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean) ** 2 / self.var, dim=dims)


class _FirstStage(nn.Module):
    cfg: AutoencoderConfig

    @property
    def scale_factor(self) -> float:
        """The latent scale the diffusion stage multiplies encodings by; it lives in (and is saved with) the config."""
        return self.cfg.scale_factor

    @scale_factor.setter
    def scale_factor(self, value: float):
        self.cfg = replace(self.cfg, scale_factor=float(value))

    def get_last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight: where the GAN loss balances its gradient against reconstruction."""
        return self.decoder.conv_out.weight


class AutoencoderKL(_FirstStage):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        assert cfg.double_z, "a KL autoencoder predicts mean and logvar (double_z=True)"
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, tile: int | None = None, overlap: int = 16) -> torch.Tensor:
        """Latent (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f). tile (latent pixels, e.g. 64) bounds memory
        for large images by decoding in overlapping tiles (Decoder.forward_up_tiled); None decodes in one pass."""
        return self.decoder(self.post_quant_conv(z), tile, overlap)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


# ----------------------------------------------------------------------------- VQ autoencoder

def codebook_stats(indices: torch.Tensor, n_embed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity, number of codes used) of a batch of code indices. Perplexity exp(H(p)) of the code frequencies
    is n_embed when all codes are used equally and 1 when a single code is used."""
    p = torch.bincount(indices.flatten(), minlength=n_embed).float() / indices.numel()
    return torch.exp(-(p * torch.log(p + 1e-10)).sum()), (p > 0).sum()


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser with a straight-through gradient (taming-transformers VectorQuantizer2, legacy
    loss: ||sg[z_q] - z||^2 + beta ||z_q - sg[z]||^2)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, None, torch.Tensor]]:
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
        flat = z.reshape(-1, self.embed_dim)  # (BHW, C)
        indices = self.nearest(flat)  # (BHW,)
        z_q = self.embedding(indices).view(z.shape)
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()  # forward value z_q, gradient of identity back to z
        # As the reference's (perplexity, one-hot encodings, indices), without the one-hots; indices flat (B*H*W,).
        perplexity = codebook_stats(indices, self.n_embed)[0]
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (perplexity, None, indices)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, C) vectors -> (N,) index of the nearest code."""
        e = self.embedding.weight
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, computed for every code.
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * flat @ e.t()
        return d.argmin(dim=1)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        """indices (B, H, W) or flat with shape=(B, H, W) -> codes (B, embed_dim, H, W)."""
        if shape is not None:
            indices = indices.reshape(shape)
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()


class VQModel(_FirstStage):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        assert cfg.n_embed and not cfg.double_z, "a VQ model needs n_embed and double_z=False"
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25)  # registered first, as the original
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # Continuous latent before quantisation: LDM diffuses in this space and quantises in decode().
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, tile: int | None = None,
               overlap: int = 16) -> torch.Tensor:
        """Continuous latent -> image; tile/overlap as AutoencoderKL.decode."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant), tile, overlap)

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, H, W) long -> image (B, out_ch, H*f, W*f)."""
        return self.decoder(self.post_quant_conv(self.quantize.get_codebook_entry(indices)))

    def forward(self, x: torch.Tensor, return_pred_indices: bool = False):
        """-> (reconstruction, codebook loss), plus the flat (B*h*w,) code indices with return_pred_indices."""
        quant, emb_loss, (_, _, indices) = self.quantize(self.encode(x))
        dec = self.decoder(self.post_quant_conv(quant))
        return (dec, emb_loss, indices) if return_pred_indices else (dec, emb_loss)


# ----------------------------------------------------------------------------- loading / conversion

def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL | VQModel:
    return VQModel(cfg) if cfg.is_vq else AutoencoderKL(cfg)


def infer_config(state_dict: dict[str, torch.Tensor], resolution: int = 256) -> AutoencoderConfig:
    """Read every structural hyper-parameter from key names and shapes (values are never touched, so meta tensors
    work). attn_resolutions are expressed relative to `resolution` (256 for all LDM first stages)."""
    sd = state_dict
    ch = sd["encoder.conv_in.weight"].shape[0]
    n_levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels))
    num_res_blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    attn_res = tuple(resolution // 2 ** i for i in range(n_levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
    z_channels = sd["decoder.conv_in.weight"].shape[1]
    embed_dim = sd["post_quant_conv.weight"].shape[1]
    double_z = sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels
    n_embed = sd["quantize.embedding.weight"].shape[0] if "quantize.embedding.weight" in sd else None
    return AutoencoderConfig(
        embed_dim=embed_dim, n_embed=n_embed, double_z=double_z, z_channels=z_channels, resolution=resolution,
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_ch=sd["decoder.conv_out.weight"].shape[0], ch=ch,
        ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_res,
        attn_type="vanilla" if "encoder.mid.attn_1.q.weight" in sd else "none",
        # Shapes cannot reveal the latent scale: the kl-f8 structure is SD's VAE (0.18215), LDM's others use 1.0.
        scale_factor=0.18215 if (not n_embed and embed_dim == 4 and ch_mult == (1, 2, 4, 4)) else 1.0)


def autoencoder_from_state_dict(state_dict: dict[str, torch.Tensor], cfg: AutoencoderConfig | None = None,
                                what: str = "autoencoder state dict") -> AutoencoderKL | VQModel:
    """Strictly load a first-stage state dict (our/CompVis layout; training-loss and EMA keys are ignored). The model
    is built on the meta device and the given tensors are assigned, not copied, so the weights exist once in memory."""
    sd = {k: v for k, v in state_dict.items() if not checkpoint.is_ignored(k)}
    with torch.device("meta"):
        model = build_autoencoder(cfg if cfg is not None else infer_config(sd))
    return checkpoint.load_strict(model, sd, what)


# Diffusers names inside a resnet / attention block -> ours (old diffusers folders use query/key/value/proj_attn).
_RESNET_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "conv_shortcut": "nin_shortcut"}
_ATTN_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _diffusers_prefix_table(n_levels: int, n_blocks: int) -> dict[str, str]:
    """Block prefixes, diffusers -> ours. Diffusers' up_blocks run from the lowest resolution, ours from the highest."""
    table = {}
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        table[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        table[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        table[f"{part}.conv_norm_out."] = f"{part}.norm_out."
    for i in range(n_levels):
        up = n_levels - 1 - i
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{up}.upsample.conv."
        for j in range(n_blocks + 1):
            table[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            table[f"encoder.down_blocks.{i}.attentions.{j}."] = f"encoder.down.{i}.attn.{j}."
            table[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{up}.block.{j}."
            table[f"decoder.up_blocks.{i}.attentions.{j}."] = f"decoder.up.{up}.attn.{j}."
    return table


def convert_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL / VQModel state dict -> our (CompVis) layout. Attention Linear [C, C] weights become
    1x1 conv weights [C, C, 1, 1] (a view, no copy)."""
    levels = [int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))]
    blocks = [int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.\d+\.resnets\.(\d+)\.", k))]
    table = _diffusers_prefix_table(max(levels, default=-1) + 1, max(blocks, default=0))
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in table if key.startswith(p)), None)
        if prefix is None:  # conv_in, conv_out, quant_conv, post_quant_conv, quantize.embedding keep their names
            out[key] = value
            continue
        leaf, _, param = key[len(prefix):].rpartition(".")
        # An unknown leaf keeps its name so that the strict load reports it as unexpected.
        if ".resnets." in prefix:
            leaf = _RESNET_LEAVES.get(leaf, leaf)
        elif ".attentions." in prefix:
            leaf = _ATTN_LEAVES.get(leaf, leaf)
            if param == "weight" and value.ndim == 2:
                value = value[:, :, None, None]  # Linear [C, C] -> conv [C, C, 1, 1]
        out[table[prefix] + (leaf + "." if leaf else "") + param] = value
    return out


def config_from_diffusers(config: dict) -> AutoencoderConfig:
    """Diffusers AutoencoderKL / VQModel config.json -> AutoencoderConfig (attention levels from `Attn*` block types,
    expressed relative to resolution 256 like the LDM configs)."""
    widths = list(config["block_out_channels"])
    down_types = config.get("down_block_types", ["DownEncoderBlock2D"] * len(widths))
    is_vq = "num_vq_embeddings" in config
    z = config.get("latent_channels", 4)
    return AutoencoderConfig(
        embed_dim=(config.get("vq_embed_dim") or z) if is_vq else z,
        n_embed=config["num_vq_embeddings"] if is_vq else None, double_z=not is_vq, z_channels=z, resolution=256,
        in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3), ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=config.get("layers_per_block", 2),
        attn_resolutions=tuple(256 // 2 ** i for i, t in enumerate(down_types) if "Attn" in t),
        attn_type="vanilla" if config.get("mid_block_add_attention", True) else "none",
        scale_factor=float(config.get("scaling_factor", 0.18215)))


def config_from_dict(fields: dict) -> AutoencoderConfig:
    """An AutoencoderConfig from its asdict() form as stored in JSON (lists back to tuples)."""
    return AutoencoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_autoencoder(path: str | os.PathLike, *, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> AutoencoderKL | VQModel:
    """Load a standalone VAE file (.safetensors/.ckpt), the first stage of an LDM/SD checkpoint, a diffusers `vae/`
    folder, or a train_vae.py run (its folder, or one of its ckpt-<step>.pt). A final.safetensors that train_vae.py
    wrote carries its exact config and latent scale factor in its metadata."""
    path = Path(path)
    cfg = None
    if path.is_dir() and checkpoint.run_file(path):  # a train_vae.py run folder
        path = checkpoint.run_file(path)
    if (state := checkpoint.read_training_checkpoint(path)) is not None:  # a train_vae.py ckpt-<step>.pt
        if "autoencoder" not in state:
            raise checkpoint.CheckpointError(f"{path}: a train.py checkpoint (a U-Net run), not an autoencoder's")
        with checkpoint.metadata_errors(path, "vae_config"):
            cfg = config_from_dict(checkpoint.json_metadata(state, "vae_config", path))
        return autoencoder_from_state_dict(state["autoencoder"], cfg, what=str(path)).to(device=device, dtype=dtype)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise checkpoint.CheckpointError(f"{path}: a folder without config.json; pass a VAE file or a diffusers "
                                             "vae/ folder")
        with checkpoint.metadata_errors(path, "config.json"):
            cfg = config_from_diffusers(checkpoint.read_json(path / "config.json"))
        files = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                 if (path / n).exists()]
        if not files:
            raise checkpoint.CheckpointError(f"{path}: no diffusion_pytorch_model.safetensors/.bin in the folder")
        state_dict, metadata = checkpoint.read_checkpoint(files[0])
        state_dict = convert_diffusers(state_dict)
    else:
        state_dict, metadata = checkpoint.read_checkpoint(path)
        if any(k.startswith("first_stage_model.") for k in state_dict):  # a full LDM/SD file: take its VAE
            state_dict = {k[len("first_stage_model."):]: v for k, v in state_dict.items()
                          if k.startswith("first_stage_model.")}
    if cfg is None and "vae_config" in metadata:  # written by train_vae.py: exact sizes and scale
        with checkpoint.metadata_errors(path, "vae_config"):
            cfg = config_from_dict(checkpoint.json_metadata(metadata, "vae_config", path))
    model = autoencoder_from_state_dict(state_dict, cfg, what=str(path))
    if "scale_factor" in metadata:
        model.scale_factor = float(metadata["scale_factor"])
    del state_dict
    return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- training helpers

class CodebookEMA:
    """Codebook maintenance while training a VQModel; held by the trainer, so the model's state dict keeps exactly
    the public keys (save `state_dict()` of this object beside the optimiser to resume exactly).

    ema: codes follow an exponential moving average of the encoder outputs assigned to them (VQ-VAE / taming's
    EMAVectorQuantizer: decay 0.99, Laplace-smoothed cluster sizes with eps 1e-5) instead of gradients; the codebook
    weight is frozen for the optimiser.
    restart_after: a code that no encoder output chose for that many consecutive updates is moved onto a random
    encoder output of the current batch (its EMA statistics restart there too).
    Under torch.distributed the counts and sums are all-reduced and restarted codes come from rank 0, so every rank
    keeps the same codebook."""

    def __init__(self, quantizer: VectorQuantizer, ema: bool = True, decay: float = 0.99, eps: float = 1e-5,
                 restart_after: int | None = None):
        self.quantizer, self.ema, self.decay, self.eps, self.restart_after = quantizer, ema, decay, eps, restart_after
        w = quantizer.embedding.weight
        # Cluster sizes start at 1 with the average equal to the code (not 0 as taming), so a code keeps its value
        # until data reaches it instead of being divided by eps on the first update.
        self.cluster_size = torch.ones(w.shape[0], device=w.device)
        self.embed_avg = w.detach().float().clone()
        self.unused_steps = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
        if ema:
            w.requires_grad_(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"cluster_size": self.cluster_size, "embed_avg": self.embed_avg, "unused_steps": self.unused_steps}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)

    @torch.no_grad()
    def update(self, z: torch.Tensor, indices: torch.Tensor,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One step after the forward pass: z is the quantiser input (B, C, h, w) (VQModel.encode), indices its flat
        (B*h*w,) codes. Returns perplexity, codes used in the batch and codes restarted."""
        w = self.quantizer.embedding.weight
        n_embed = w.shape[0]
        for name, value in self.state_dict().items():  # follow the model when it moved after construction
            setattr(self, name, value.to(w.device))
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, w.shape[1]).float()  # (N, C)
        counts = torch.bincount(indices, minlength=n_embed).float()  # (K,)
        sums = torch.zeros(n_embed, w.shape[1], device=w.device).index_add_(0, indices, flat)  # (K, C)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        if self.ema:
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + n_embed * self.eps) * total  # Laplace smoothing
            w.copy_(self.embed_avg / smoothed[:, None])
        n_restarted = 0
        if self.restart_after:
            self.unused_steps = torch.where(counts > 0, 0, self.unused_steps + 1)
            dead = torch.nonzero(self.unused_steps >= self.restart_after).squeeze(1)
            n_restarted = dead.numel()
            if n_restarted:
                gen_device = generator.device if generator is not None else "cpu"
                pick = torch.randint(flat.shape[0], (n_restarted,), generator=generator, device=gen_device)
                new = flat[pick.to(flat.device)]
                if distributed:
                    dist.broadcast(new, 0)
                w[dead] = new.to(w.dtype)
                self.embed_avg[dead] = new
                self.cluster_size[dead] = 1.0
                self.unused_steps[dead] = 0
        perplexity, used = codebook_stats(indices, n_embed)
        return {"perplexity": perplexity, "codes_used": used, "codes_restarted": torch.tensor(n_restarted)}


@torch.no_grad()
def estimate_scale_factor(model: AutoencoderKL | VQModel, images, max_images: int = 1024,
                          generator: torch.Generator | None = None) -> float:
    """1 / std of the latents the diffusion model will see, pooled over up to max_images images (B, C, H, W) in
    [-1, 1] from `images` (an iterable of batches, or of (images, ...) tuples): posterior samples for KL models,
    the continuous encoder output before quantisation for VQ models (as LDM's scale_by_std, which uses
    1 / z.flatten().std() of its first batch). Deterministic: samples use `generator` (default seed 0)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    total = sq = torch.zeros((), dtype=torch.float64)
    count = seen = 0
    for batch in ([images] if isinstance(images, torch.Tensor) else images):
        if seen >= max_images:
            break
        x = (batch[0] if isinstance(batch, (tuple, list)) else batch)[: max_images - seen]
        latent = model.encode(x.to(param.device, param.dtype))
        z = latent.sample(generator) if isinstance(latent, DiagonalGaussianDistribution) else latent
        z = z.double().cpu()
        total, sq = total + z.sum(), sq + z.pow(2).sum()
        count, seen = count + z.numel(), seen + x.shape[0]
    model.train(was_training)
    if count < 2:
        raise ValueError("estimate_scale_factor needs at least one image")
    var = (sq - total * total / count) / (count - 1)  # unbiased, as torch.std
    return float(1.0 / var.sqrt())
