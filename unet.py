"""The Stable Diffusion U-Net: the "openaimodel" UNetModel with SpatialTransformer cross-attention blocks.

Module names and nesting equal the `model.diffusion_model.` keys of the original single-file checkpoints
(SD 1.x: 1x1-conv transformer projections, 8 heads, context 768; SD 2.x: Linear projections, 64-channel heads,
context 1024; SDXL base / refiner: per-level transformer depths, no attention at the top level, context 2048 / 1280
and a vector `y` of pooled text and size embeddings), so a checkpoint loads with a strict `load_state_dict`. The
diffusers `unet/` folder layout (UNet2DConditionModel) converts at the bottom of this file.

    x (B, in_channels, H, W) latents, timesteps (B,) or scalar, context (B, N, context_dim),
    y (B, adm_in_channels) for SDXL only  ->  (B, out_channels, H, W)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsample factors (1 = full latent size) with attention
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8  # -1 when num_head_channels sets the head width instead
    num_head_channels: int = -1  # -1 when num_heads sets the head count instead
    # transformer blocks per SpatialTransformer: one int for every level, or one entry per level of channel_mult
    # (levels without attention hold 0, unused; SDXL: (0, 2, 10))
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None  # the middle block's depth; None: the last level's
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD2, SDXL: Linear proj_in/proj_out instead of 1x1 convs
    # SDXL: width of the vector y (pooled text embedding + 256 per size/crop/score number) added to the time
    # embedding through label_emb; None: no y
    adm_in_channels: int | None = None
    dropout: float = 0.0  # ResBlocks only; the original never passes it to the transformer blocks
    use_checkpoint: bool = False  # gradient checkpointing of every block while training
    image_size: int = 64  # latent size the model was trained at; informational

    def heads(self, ch: int) -> tuple[int, int]:
        """(n_heads, dim_head) of the transformer at width `ch`: a fixed head count or a fixed head width."""
        if self.num_head_channels == -1:
            return self.num_heads, ch // self.num_heads
        return ch // self.num_head_channels, self.num_head_channels

    def level_depth(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at encoder/decoder level `level` (0 = full latent size)."""
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]

    def middle_depth(self) -> int:
        return self.level_depth(-1) if self.transformer_depth_middle is None else self.transformer_depth_middle

    def check_depths(self) -> None:
        """A depth tuple needs one entry per level, and every transformer at least one block."""
        levels = len(self.channel_mult)
        if not isinstance(self.transformer_depth, int) and len(self.transformer_depth) != levels:
            raise ValueError(f"transformer_depth {self.transformer_depth} needs one entry per level ({levels})")
        used = [self.level_depth(i) for i in range(levels) if 2 ** i in self.attention_resolutions]
        if min(used + [self.middle_depth()]) < 1:
            raise ValueError(f"transformer_depth {self.transformer_depth} (middle {self.transformer_depth_middle}) "
                             f"leaves a transformer with no blocks; attention at {self.attention_resolutions}")


PRESETS: dict[str, UNetConfig] = {
    "sd1": UNetConfig(),
    "sd2": UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True,
                      image_size=96),
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                       num_heads=-1, num_head_channels=8, context_dim=32, image_size=16),
    # 24M parameters: a step up from tiny for small images on a GPU; pairs with the tiny text encoder
    "small": UNetConfig(model_channels=64, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_res_blocks=2,
                        num_heads=-1, num_head_channels=32, context_dim=32, image_size=16),
    # SDXL 1.0 base: 3 levels, attention at levels 1 and 2 only (2 and 10 blocks; middle 10), 64-channel heads,
    # context = CLIP-L 768 + OpenCLIP-bigG 1280, y = pooled bigG 1280 + 6 x 256 (original size, crop, target size)
    "sdxl": UNetConfig(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64,
                       transformer_depth=(0, 2, 10), context_dim=2048, use_linear_in_transformer=True,
                       adm_in_channels=2816, image_size=128),
    # SDXL 1.0 refiner: 4 levels of 384 x (1, 2, 4, 4), attention at levels 1 and 2 (4 blocks; middle 4),
    # context = bigG 1280, y = pooled bigG 1280 + 5 x 256 (original size, crop, aesthetic score)
    "sdxl-refiner": UNetConfig(model_channels=384, attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64,
                               transformer_depth=4, context_dim=1280, use_linear_in_transformer=True,
                               adm_in_channels=2560, image_size=128),
    # The SDXL structure (no attention at level 0, a y vector) at toy size, for tests and small experiments; pairs
    # with the tiny-sdxl text encoders: context 32 + 48, y = pooled 40 + 6 x 256 (refiner: 48, 40 + 5 x 256)
    "tiny-sdxl": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(4, 2), num_res_blocks=1,
                            num_heads=-1, num_head_channels=8, transformer_depth=(0, 1, 2), context_dim=80,
                            use_linear_in_transformer=True, adm_in_channels=1576, image_size=16),
    "tiny-sdxl-refiner": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(4, 2),
                                    num_res_blocks=1, num_heads=-1, num_head_channels=8, context_dim=48,
                                    use_linear_in_transformer=True, adm_in_channels=1320, image_size=16),
}


# ----------------------------------------------------------------------------------------------------------------------
# leaf blocks


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in float32: [cos | sin] of t * max_period^(-i/half)."""
    t = torch.as_tensor(t).reshape(-1).float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one trailing zero


def adm_vector(pooled: torch.Tensor, values: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """SDXL's y: the pooled text embedding (B, P) followed by timestep_embedding(v, 256) of each of the n numbers
    in `values` (B, n), in order -> (B, P + 256 n), float32. Base: (orig_h, orig_w, crop_top, crop_left, target_h,
    target_w), 1280 + 6 x 256 = 2816; refiner: (orig_h, orig_w, crop_top, crop_left, aesthetic_score) = 2560.
    diffusers' add_time_proj (flip_sin_to_cos, no shift) on time_ids gives the same [cos | sin] blocks. The U-Net
    casts y to its own dtype."""
    B = pooled.shape[0]
    sizes = timestep_embedding(torch.as_tensor(values, device=pooled.device).reshape(-1), dim)  # (B * n, dim)
    return torch.cat([pooled.float(), sizes.reshape(B, -1)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so fp16/bf16 activations keep exact statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def zero_(module: nn.Module) -> nn.Module:
    """Zero-init a block's last layer (as the original) so every residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))  # [2] is the conv
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))  # [1] is the linear
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1)))  # [3]: conv
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C) time embedding added per channel
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """2x nearest, or to `size`: the skip connection's (H, W) when an odd size was halved on the way down."""
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, query_dim) over context (B, M, context_dim); self-attention without one."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))  # [0]: the original's index

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        # (B, N, heads * d) -> (B, heads, N, d)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        # SDPA scales inside and accumulates q.k and the softmax in float32 (GPU kernels and the CPU path), so fp16
        # scores beyond 65504 do not overflow: the reason the original upcasts its einsum.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, heads * d) -> (B, N, query_dim)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)  # value and gate halves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))  # [0], [2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)  # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)  # cross-attention to the text
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Norm, project, transformer blocks over the H*W tokens, project back, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(32, channels, eps=1e-6)  # transformer norms use 1e-6; ResBlocks 1e-5
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = zero_(nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, HW, inner)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, -1, H, W)  # (B, inner or C, H, W)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                layers: slice = slice(None), size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in list(self)[layers]:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# model


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.check_depths()
        self.cfg = replace(cfg)  # own copy: toggling use_checkpoint must not edit a shared preset
        mc, nrb, emb_dim = cfg.model_channels, cfg.num_res_blocks, 4 * cfg.model_channels
        last = len(cfg.channel_mult) - 1

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:
            # the original's `num_classes: sequential`: an MLP on y inside a one-entry Sequential, keys label_emb.0.*
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        # encoder: conv_in, then per level nrb x (ResBlock [+ transformer]) and a Downsample except at the bottom
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ch, ds = [mc], mc, 1  # skip_chans: width of every encoder output, consumed by the decoder
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(nrb):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, cfg.dropout)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, cfg.level_depth(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        # the middle always has a transformer, whatever attention_resolutions says
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch, cfg.dropout),
                                                    transformer(ch, cfg.middle_depth()),
                                                    ResBlock(ch, emb_dim, ch, cfg.dropout))

        # decoder: per level (deepest first) nrb + 1 x (ResBlock on [h, skip] [+ transformer]), then an Upsample
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(nrb + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mult * mc, cfg.dropout)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, cfg.level_depth(level)))
                if level and i == nrb:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(),
                                 zero_(nn.Conv2d(mc, cfg.out_channels, 3, padding=1)))  # [2] is the conv

    def _run(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor,
             context: torch.Tensor | None, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Gradient checkpointing: recompute in backward, keep no activations. A lone conv (conv_in, Downsample) would
        # only run twice (its backward needs just its input, kept either way), and an Upsample's conv, the costliest
        # layer to recompute, stays outside at the price of keeping its 4x-sized input.
        if not (self.cfg.use_checkpoint and torch.is_grad_enabled() and isinstance(block[0], ResBlock)):
            return block(h, emb, context, size=size)
        up = isinstance(block[-1], Upsample)
        h = checkpoint(block, h, emb, context, slice(-1) if up else slice(None), use_reentrant=False)
        return block[-1](h, size) if up else h

    def _label_embedding(self, y: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """label_emb(y) (B, 4 * model_channels) for an SDXL U-Net, after checking that y fits; None otherwise."""
        adm = self.cfg.adm_in_channels
        if adm is None:
            if y is not None:
                raise ValueError("this U-Net takes no vector y (its config has no adm_in_channels)")
            return None
        if y is None:
            raise ValueError(f"this U-Net needs y, a [B, {adm}] vector of the pooled text embedding and the size "
                             "embeddings (adm_vector)")
        if tuple(y.shape) != (batch, adm):
            raise ValueError(f"y must be [B, adm_in_channels] = [{batch}, {adm}], got {list(y.shape)}")
        return self.label_emb(y.to(self.label_emb[0][0].weight.dtype))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(B)  # scalar or (B,) -> (B,)
        t_emb = timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)  # (B, 4 * model_channels)
        label = self._label_embedding(y, B)
        if label is not None:
            emb = emb + label
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # where an odd size was halved on the way down (65 -> 33), an Upsample goes to the next skip's size
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(block, h, emb, context, None if size == (2 * h.shape[-2], 2 * h.shape[-1]) else size)
        return self.out(h)


def compile_blocks(unet: nn.Module, **kwargs) -> nn.Module:
    """Regional compilation: torch.compile each ResBlock and transformer block in place (kwargs go to torch.compile),
    not the U-Net as one graph. Blocks of one class and input shape share their compiled code (SD 1.5's 16
    transformer blocks are 4 compiles, SDXL's 70 are 4), so compiling takes a fraction of the whole-model time while
    the blocks, where the time goes, run fused. Names and the state dict stay as they are."""
    # one compile per distinct (class, shape) is more than dynamo's default of 8 entries per code object, past which
    # it would silently run the block eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for module in unet.modules():
        if isinstance(module, (ResBlock, BasicTransformerBlock)):
            module.compile(**kwargs)
    return unet


# ----------------------------------------------------------------------------------------------------------------------
# loading / conversion


def infer_config(state_dict: dict[str, torch.Tensor]) -> UNetConfig:
    """Read the hyper-parameters from key names and tensor shapes (keys without the `model.diffusion_model.` prefix).

    Depths count each level's (and the middle's) transformer_blocks; a `label_emb.0.0` Linear gives adm_in_channels.
    The head split is invisible in the shapes, so it follows the projections: conv ones are taken as SD1 (8 heads),
    Linear ones as SD2 and SDXL (64-channel heads; both use those). image_size is not stored either: 128 for SDXL
    (a y vector with a 2048 or 1280 context, as diffusers tells SDXL apart), else 96 with Linear projections (SD2)
    and 64 with conv ones (SD1)."""
    sd = state_dict
    mc, in_ch = sd["input_blocks.0.0.weight"].shape[:2]
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    levels = 1 + sum(f"input_blocks.{i}.0.op.weight" in sd for i in range(n_in))
    nrb = (n_in - levels) // levels  # n_in = 1 + levels * nrb + (levels - 1)
    mult, attn, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (nrb + 1)  # first ResBlock of the level
        mult.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // mc)
        depths.append(_count_blocks(sd, f"input_blocks.{first}.1."))
        if depths[-1]:
            attn.append(2 ** level)
    linear = sd["middle_block.1.proj_in.weight"].ndim == 2
    context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    adm = sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None
    heads = dict(num_heads=-1, num_head_channels=64) if linear else dict(num_heads=8, num_head_channels=-1)
    xl = adm is not None and context_dim in (2048, 1280)
    return UNetConfig(in_channels=in_ch, out_channels=sd["out.2.weight"].shape[0], model_channels=mc,
                      attention_resolutions=tuple(sorted(attn, reverse=True)), num_res_blocks=nrb,
                      channel_mult=tuple(mult), **_depth_fields(depths, _count_blocks(sd, "middle_block.1.")),
                      context_dim=context_dim, use_linear_in_transformer=linear, adm_in_channels=adm,
                      image_size=128 if xl else 96 if linear else 64, **heads)


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """How many transformer_blocks the SpatialTransformer at `prefix` holds (0: none there)."""
    prefix += "transformer_blocks."
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _depth_fields(depths: list[int], middle: int) -> dict:
    """transformer_depth / transformer_depth_middle in the presets' form, from per-level depths (0 where a level has
    no attention) and the middle's: one int when all levels with attention agree, else the per-level tuple; the
    middle only where it differs from what None would give."""
    used = {d for d in depths if d}
    if len(used) <= 1:
        depth = used.pop() if used else middle
        return dict(transformer_depth=depth, transformer_depth_middle=None if middle == depth else middle)
    return dict(transformer_depth=tuple(depths), transformer_depth_middle=None if middle == depths[-1] else middle)


# ResBlock sub-layer names: ours -> diffusers ResnetBlock2D
RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def diffusers_prefixes(cfg: UNetConfig) -> list[tuple[str, str, bool]]:
    """(our prefix, diffusers prefix, is_resnet) for every block; transformer internals share names."""
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    has_attn = [2 ** level in cfg.attention_resolutions for level in range(levels)]
    table = [("time_embed.0.", "time_embedding.linear_1.", False), ("time_embed.2.", "time_embedding.linear_2.", False),
             ("input_blocks.0.0.", "conv_in.", False), ("middle_block.0.", "mid_block.resnets.0.", True),
             ("middle_block.1.", "mid_block.attentions.0.", False), ("middle_block.2.", "mid_block.resnets.1.", True),
             ("out.0.", "conv_norm_out.", False), ("out.2.", "conv_out.", False)]
    if cfg.adm_in_channels is not None:  # SDXL's y MLP: diffusers' add_embedding (its add_time_proj has no weights)
        table += [(f"label_emb.0.{i}.", f"add_embedding.linear_{n}.", False) for i, n in ((0, 1), (2, 2))]
    for i in range(levels):
        for j in range(n):  # encoder level i: input_blocks 1 + i * (n + 1) + j, then its Downsample
            table.append((f"input_blocks.{1 + i * (n + 1) + j}.0.", f"down_blocks.{i}.resnets.{j}.", True))
            if has_attn[i]:
                table.append((f"input_blocks.{1 + i * (n + 1) + j}.1.", f"down_blocks.{i}.attentions.{j}.", False))
        if i < levels - 1:
            table.append((f"input_blocks.{(i + 1) * (n + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", False))
        level = levels - 1 - i  # up_blocks.i decodes level `levels - 1 - i`: output_blocks i * (n + 1) + j
        for j in range(n + 1):
            table.append((f"output_blocks.{i * (n + 1) + j}.0.", f"up_blocks.{i}.resnets.{j}.", True))
            if has_attn[level]:
                table.append((f"output_blocks.{i * (n + 1) + j}.1.", f"up_blocks.{i}.attentions.{j}.", False))
        if level > 0:  # the Upsample sits after the transformer when there is one
            table.append((f"output_blocks.{i * (n + 1) + n}.{2 if has_attn[level] else 1}.conv.",
                          f"up_blocks.{i}.upsamplers.0.conv.", False))
    return table


def convert_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict (`unet/` folder) -> our (original checkpoint) key layout."""
    table = diffusers_prefixes(cfg)
    resnet_names = {v: k for k, v in RESNET_NAMES.items()}
    out, unknown = {}, []
    for key, value in state_dict.items():
        for ours, theirs, is_resnet in table:
            if key.startswith(theirs):
                rest = key[len(theirs):]
                if is_resnet:
                    module, param = rest.rsplit(".", 1)
                    rest = f"{resnet_names[module]}.{param}"
                out[ours + rest] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"diffusers U-Net keys with no counterpart: {unknown[:10]} ({len(unknown)} in all)")
    return out


def config_from_diffusers(config_json: dict) -> UNetConfig:
    """A diffusers `unet/config.json` dict -> UNetConfig.

    diffusers stores the number of heads under `attention_head_dim` (8 for SD1, [5, 10, 20, 20] for SD2, [5, 10, 20]
    for SDXL); equal counts mean a fixed head count, counts growing with width mean a fixed head width.
    `transformer_layers_per_block` (an int or one per level; the mid block takes the last) gives the depths, and
    SDXL's `addition_embed_type: "text_time"` the width of y (`projection_class_embeddings_input_dim`)."""
    c = config_json
    widths = list(c["block_out_channels"])
    mc = widths[0]
    has_attn = ["CrossAttn" in t for t in c["down_block_types"]]

    def uniform(v: int | list[int], name: str) -> int:
        if isinstance(v, int):
            return v
        if len(set(v)) != 1:
            raise ValueError(f"per-level {name} {v} is not supported")
        return v[0]

    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=mc,
        attention_resolutions=tuple(sorted((2 ** i for i, a in enumerate(has_attn) if a), reverse=True)),
        num_res_blocks=uniform(c.get("layers_per_block", 2), "layers_per_block"),
        channel_mult=tuple(w // mc for w in widths), **_diffusers_depths(c, has_attn),
        context_dim=c["cross_attention_dim"], use_linear_in_transformer=bool(c.get("use_linear_projection", False)),
        adm_in_channels=_diffusers_adm(c), image_size=c.get("sample_size", 64), **_diffusers_heads(c, widths))


def _diffusers_heads(c: dict, widths: list[int]) -> dict:
    """num_heads / num_head_channels from diffusers' per-level head counts."""
    heads = c.get("num_attention_heads") or c["attention_head_dim"]
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    if len(set(heads)) == 1:
        return dict(num_heads=heads[0], num_head_channels=-1)
    head_width = {w // h for w, h in zip(widths, heads)}
    if len(head_width) != 1:
        raise ValueError(f"head counts {heads} fit neither a fixed count nor a fixed width")
    return dict(num_heads=-1, num_head_channels=head_width.pop())


def _diffusers_depths(c: dict, has_attn: list[bool]) -> dict:
    """transformer_depth(_middle) from transformer_layers_per_block; entries at levels without attention are unused
    (SDXL's published [1, 2, 10] -> (0, 2, 10))."""
    if c.get("reverse_transformer_layers_per_block") is not None:
        raise ValueError("reverse_transformer_layers_per_block (decoder depths unlike the encoder's) is not supported")
    per_level = c.get("transformer_layers_per_block", 1)
    per_level = [per_level] * len(has_attn) if isinstance(per_level, int) else list(per_level)
    if not all(isinstance(d, int) for d in per_level):
        raise ValueError(f"transformer_layers_per_block {per_level}: depths per ResBlock are not supported")
    return _depth_fields([d if a else 0 for d, a in zip(per_level, has_attn)], per_level[-1])


def _diffusers_adm(c: dict) -> int | None:
    """adm_in_channels: the add_embedding input width of SDXL's "text_time" conditioning; other extra
    conditionings (class labels, image embeddings) have no counterpart here."""
    kind, classes = c.get("addition_embed_type"), (c.get("class_embed_type"), c.get("num_class_embeds"))
    if classes != (None, None) or kind not in (None, "text_time"):
        raise ValueError(f"diffusers U-Net conditioning not supported: class_embed_type / num_class_embeds {classes}, "
                         f"addition_embed_type {kind}")
    if kind is None:
        return None
    if c.get("addition_time_embed_dim", 256) != 256:  # adm_vector embeds each number in 256 channels, as SDXL
        raise ValueError(f"addition_time_embed_dim {c['addition_time_embed_dim']}: only SDXL's 256 is supported")
    return c["projection_class_embeddings_input_dim"]
