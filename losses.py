"""Training losses and image metrics for the first-stage autoencoders (KL VAE and VQ models).

Module names mirror the `loss.*` keys of CompVis latent-diffusion first-stage checkpoints (`logvar`,
`perceptual_loss.net.slice3.12.weight`, `perceptual_loss.lin2.model.1.weight`, `discriminator.main.6.running_var`),
so the loss state of a public `model.ckpt` loads strictly and ours saves in the same layout:
- LPIPS: VGG16 features (torchvision `features` indices grouped into slice1..slice5), unit-normalised per channel,
  squared differences weighted by 1x1 `lin` layers, averaged over space and summed over the five levels.
- NLayerDiscriminator: the PatchGAN of pix2pix with BatchNorm (taming-transformers).
- LPIPSWithDiscriminator (KL) and VQLPIPSWithDiscriminator (VQ): L1 + perceptual reconstruction, KL or codebook
  term, and a hinge GAN whose generator term is scaled by the adaptive weight ||grad nll|| / ||grad g||.
- psnr / ssim for evaluation.

LPIPS needs trained weights (ImageNet VGG16 + the LPIPS linear layers); they are never downloaded. Without them the
perceptual term is switched off and the constructor says so.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Dict, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint

# ----------------------------------------------------------------------------- config + presets

WeightSource = Union[str, os.PathLike, Dict[str, torch.Tensor]]  # a checkpoint file or an in-memory state dict

@dataclass
class LossConfig:
    """Field names follow the `lossconfig.params` of the latent-diffusion yaml files."""
    disc_start: int = 0               # global step at which the GAN terms switch on
    kind: str = "kl"                  # "kl" (LPIPSWithDiscriminator) | "vq" (VQLPIPSWithDiscriminator)
    logvar_init: float = 0.0          # learned output log-variance of the KL model's nll
    kl_weight: float = 1.0
    codebook_weight: float = 1.0
    pixelloss_weight: float = 1.0     # weight of |x - x_rec| (the reference stores it unused; 1.0 matches it)
    l2_weight: float = 0.0            # optional extra (x - x_rec)^2 term (not in the reference; 0 = off)
    perceptual_weight: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_ndf: int = 64
    disc_factor: float = 1.0
    disc_weight: float = 1.0          # multiplies the adaptive weight
    disc_loss: str = "hinge"          # "hinge" | "vanilla"


# From CompVis/latent-diffusion models/first_stage_models/*/config.yaml.
PRESETS: dict[str, LossConfig] = {
    "kl-f8": LossConfig(disc_start=50001, kl_weight=1e-6, disc_weight=0.5),
    "vq-f4": LossConfig(kind="vq", disc_start=0, disc_weight=0.75, codebook_weight=1.0),
}


# ----------------------------------------------------------------------------- GAN helpers

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_rec))): the non-saturating BCE GAN loss on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` (0) before `threshold`, `weight` from then on: the GAN warm-up switch."""
    return value if global_step < threshold else weight


def calculate_adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              disc_weight: float = 1.0) -> torch.Tensor:
    """Balance the GAN term against reconstruction at the decoder's last layer (VQGAN eq. 7):
    ||d nll / d w|| / (||d g / d w|| + 1e-4), clamped to [0, 1e4], detached, times disc_weight."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


# ----------------------------------------------------------------------------- LPIPS

# torchvision VGG16 `features`: conv widths in units of 64 ("M" = max-pool); LPIPS taps the ReLU after the last conv
# of each stage, so slice k ends just before the k-th pool: indices [0,4) [4,9) [9,16) [16,23) [23,30).
_VGG16 = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8)
_SLICE_ENDS = (4, 9, 16, 23, 30)


def _vgg16_layers(width: int) -> list[nn.Module]:
    layers, c_in = [], 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v * width, 3, padding=1), nn.ReLU()]
            c_in = v * width
    return layers


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the ImageNet-normalised input VGG was trained on (LPIPS' constants)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])  # (1, 3, 1, 1)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Features(nn.Module):
    """VGG16 conv trunk as `slice1..slice5` whose children keep their torchvision `features` indices."""

    def __init__(self, width: int = 64):
        super().__init__()
        layers, start = _vgg16_layers(width), 0
        for k, end in enumerate(_SLICE_ENDS, 1):
            block = nn.Sequential()
            for i in range(start, end):
                block.add_module(str(i), layers[i])
            setattr(self, f"slice{k}", block)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        return feats


class NetLinLayer(nn.Module):
    """1x1 conv (C -> 1, no bias) behind a Dropout, so the weight is stored as `model.1.weight`."""

    def __init__(self, chn_in: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018, VGG variant). forward(x, y) on [-1, 1] images -> (B, 1, 1, 1).
    `width` scales the VGG channels (64 = real); smaller widths keep the key layout for tests. Built without weights
    (`loaded` False) the parameters are zero and forward refuses to run: load them with `load_weights`."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.chns = [width * m for m in (1, 2, 4, 8, 8)]
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features(width)
        for k, c in enumerate(self.chns):
            setattr(self, f"lin{k}", NetLinLayer(c))
        self.loaded = False
        for p in self.parameters():
            p.requires_grad_(False)
            nn.init.zeros_(p)  # an untrained LPIPS must never pass for a perceptual loss
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # Always in eval mode: the reference enables the lin-layer dropout whenever the parent model trains, which
        # makes the loss stochastic; a metric should not be.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.loaded:
            raise RuntimeError("LPIPS has no weights; call load_weights(...) or LPIPS.from_pretrained(...)")
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        out = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            d = (_normalize_channels(a) - _normalize_channels(b)) ** 2  # (B, C_k, H_k, W_k)
            out = out + getattr(self, f"lin{k}")(d).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        return out

    def load_weights(self, *sources: WeightSource) -> LPIPS:
        """Load from one or more files/state dicts, merged: a torchvision VGG16 state dict (`features.N.*`, the
        `classifier.*` part is ignored) plus the lpips package's linear layers (`lin0.model.1.weight` ..., its
        `vgg.pth`), or an LDM first-stage checkpoint (`loss.perceptual_loss.*`), or our own layout."""
        merged: dict[str, torch.Tensor] = {}
        for src in sources:
            sd = src if isinstance(src, dict) else checkpoint.read_checkpoint(src)[0]
            merged.update(convert_lpips_state_dict(sd))
        expected = self.state_dict()
        merged.setdefault("scaling_layer.shift", expected["scaling_layer.shift"])  # constants, often not stored
        merged.setdefault("scaling_layer.scale", expected["scaling_layer.scale"])
        if all(k in merged and not merged[k].any() for k in (f"lin{k}.model.1.weight" for k in range(5))):
            raise ValueError("LPIPS linear layers are all zero (saved from a run with the perceptual loss off)")
        checkpoint.load_strict(self, merged, "LPIPS weights")
        self.loaded = True
        return self

    @classmethod
    def from_pretrained(cls, *sources: WeightSource) -> LPIPS:
        """LPIPS with weights from `sources` (see load_weights); the VGG width is read from the first conv."""
        sds = [s if isinstance(s, dict) else checkpoint.read_checkpoint(s)[0] for s in sources]
        convs = [v for sd in sds for k, v in convert_lpips_state_dict(sd).items() if k == "net.slice1.0.weight"]
        if not convs:
            raise ValueError("no VGG16 weights (features.0.weight / perceptual_loss.net.slice1.0.weight) given")
        return cls(width=convs[0].shape[0]).load_weights(*sds)


def convert_lpips_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the LPIPS part of a state dict, in our layout: strips `loss.perceptual_loss.` / `perceptual_loss.`,
    maps torchvision `features.N.*` to `net.slice{k}.N.*`; every other key (autoencoder, discriminator,
    VGG classifier) is dropped."""
    out = {}
    for key, value in sd.items():
        for prefix in ("loss.perceptual_loss.", "perceptual_loss."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith("features."):
            idx = int(key.split(".")[1])
            if idx >= _SLICE_ENDS[-1]:
                continue  # past relu5_3: not part of LPIPS
            key = f"net.slice{next(k for k, end in enumerate(_SLICE_ENDS, 1) if idx < end)}.{key[len('features.'):]}"
        if key.startswith(("net.slice", "scaling_layer.")) or (key.startswith("lin") and ".model.1." in key):
            out[key] = value
    return out


# ----------------------------------------------------------------------------- discriminator

def weights_init(m: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02) (biases keep PyTorch's default), BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, input_nc, H, W) -> (B, 1, H/8 - 2, W/8 - 2) logits for n_layers 3. `main` indices as stored:
    conv, lrelu, then (conv, BN, lrelu) per layer, and the output conv (0, 2/3, 5/6, 8/9, 11 for n_layers 3)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),  # BN has a shift
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# ----------------------------------------------------------------------------- autoencoder losses

class _GANLoss(nn.Module):
    """Shared parts: perceptual + pixel reconstruction, discriminator, generator/discriminator GAN terms."""

    def __init__(self, cfg: LossConfig, lpips_weights: WeightSource | list[WeightSource] | None, lpips_width: int):
        super().__init__()
        assert cfg.disc_loss in ("hinge", "vanilla"), cfg.disc_loss
        self.cfg = cfg
        self.perceptual_loss = LPIPS(lpips_width)
        if lpips_weights is not None:
            sources = lpips_weights if isinstance(lpips_weights, (list, tuple)) else [lpips_weights]
            self.perceptual_loss.load_weights(*sources)
        self.perceptual_weight = cfg.perceptual_weight if self.perceptual_loss.loaded else 0.0
        if cfg.perceptual_weight > 0 and not self.perceptual_loss.loaded:
            print(f"{type(self).__name__}: perceptual (LPIPS) loss OFF: no VGG16/LPIPS weights given "
                  "(pass lpips_weights=...)", file=sys.stderr)
        self.discriminator = NLayerDiscriminator(cfg.disc_in_channels, cfg.disc_ndf, cfg.disc_num_layers)
        self.disc_loss = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss

    def reconstruction_loss(self, inputs: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel (B, C, H, W) loss and the (B, 1, 1, 1) LPIPS term (zeros when off), broadcast as the reference."""
        diff = inputs.contiguous() - recon.contiguous()
        rec = self.cfg.pixelloss_weight * diff.abs()
        if self.cfg.l2_weight > 0:
            rec = rec + self.cfg.l2_weight * diff.pow(2)
        p_loss = torch.zeros(inputs.shape[0], 1, 1, 1, device=inputs.device, dtype=rec.dtype)
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), recon.contiguous())
            rec = rec + self.perceptual_weight * p_loss
        return rec, p_loss

    def generator_term(self, nll_loss: torch.Tensor, recon: torch.Tensor, global_step: int,
                       last_layer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(weighted GAN term, g_loss, d_weight, disc_factor). Before disc_start the discriminator is only
        evaluated for the log, without a graph, and the term is exactly 0."""
        disc_factor = adopt_weight(self.cfg.disc_factor, global_step, threshold=self.cfg.disc_start)
        zero = torch.zeros((), device=recon.device)
        if disc_factor == 0:
            with torch.no_grad():
                g_loss = -self.discriminator(recon.contiguous()).mean()
            return zero, g_loss, zero, disc_factor
        g_loss = -self.discriminator(recon.contiguous()).mean()
        if not (torch.is_grad_enabled() and nll_loss.requires_grad):  # evaluation: the reference logs 0 here
            d_weight = zero
        elif last_layer is None:
            raise ValueError("the GAN term needs last_layer=model.get_last_layer() once global_step >= disc_start")
        else:
            d_weight = calculate_adaptive_weight(nll_loss, g_loss, last_layer, self.cfg.disc_weight)
        return d_weight * disc_factor * g_loss, g_loss, d_weight, disc_factor

    def discriminator_loss(self, inputs: torch.Tensor, recon: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """optimizer_idx 1: GAN loss of the discriminator on detached real and reconstructed images."""
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(recon.contiguous().detach())
        disc_factor = adopt_weight(self.cfg.disc_factor, global_step, threshold=self.cfg.disc_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        return d_loss, {"disc_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}


class LPIPSWithDiscriminator(_GANLoss):
    """KL autoencoder loss. Keys: `logvar`, `perceptual_loss.*`, `discriminator.*` (the `loss.*` of kl-f8).
    optimizer_idx 0 (autoencoder):
        nll = rec / exp(logvar) + logvar, summed over pixels and averaged over the batch,
        loss = nll + kl_weight * KL + d_weight * disc_factor * (-mean D(x_rec));
    optimizer_idx 1 (discriminator): disc_factor * hinge(D(x), D(x_rec))."""

    def __init__(self, cfg: LossConfig | None = None, lpips_weights: WeightSource | list[WeightSource] | None = None,
                 lpips_width: int = 64):
        super().__init__(cfg if cfg is not None else LossConfig(), lpips_weights, lpips_width)
        self.logvar = nn.Parameter(torch.full((), float(self.cfg.logvar_init)))

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors, optimizer_idx: int,
                global_step: int, last_layer: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, reconstructions, global_step)
        rec_loss, p_loss = self.reconstruction_loss(inputs, reconstructions)
        nll = rec_loss / torch.exp(self.logvar) + self.logvar  # (B, C, H, W)
        weighted = nll if weights is None else weights * nll
        weighted_nll_loss = weighted.sum() / weighted.shape[0]
        nll_loss = nll.sum() / nll.shape[0]
        kl = posteriors.kl()
        kl_loss = kl.sum() / kl.shape[0]
        gan, g_loss, d_weight, disc_factor = self.generator_term(nll_loss, reconstructions, global_step, last_layer)
        loss = weighted_nll_loss + self.cfg.kl_weight * kl_loss + gan
        log = {"total_loss": loss.detach(), "logvar": self.logvar.detach(), "kl_loss": kl_loss.detach(),
               "nll_loss": nll_loss.detach(), "rec_loss": rec_loss.detach().mean(), "p_loss": p_loss.detach().mean(),
               "d_weight": d_weight.detach(), "disc_factor": torch.tensor(float(disc_factor)),
               "g_loss": g_loss.detach()}
        return loss, log


class VQLPIPSWithDiscriminator(_GANLoss):
    """VQ autoencoder loss. Keys: `perceptual_loss.*`, `discriminator.*` (the `loss.*` of vq-f4).
    optimizer_idx 0: mean(rec) + codebook_weight * codebook_loss + d_weight * disc_factor * (-mean D(x_rec));
    optimizer_idx 1: as the KL loss."""

    def __init__(self, cfg: LossConfig | None = None, lpips_weights: WeightSource | list[WeightSource] | None = None,
                 lpips_width: int = 64):
        super().__init__(cfg if cfg is not None else LossConfig(kind="vq"), lpips_weights, lpips_width)

    def forward(self, codebook_loss: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int,
                last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, reconstructions, global_step)
        rec_loss, p_loss = self.reconstruction_loss(inputs, reconstructions)
        nll_loss = rec_loss.mean()
        gan, g_loss, d_weight, disc_factor = self.generator_term(nll_loss, reconstructions, global_step, last_layer)
        loss = nll_loss + gan + self.cfg.codebook_weight * codebook_loss.mean()
        log = {"total_loss": loss.detach(), "quant_loss": codebook_loss.detach().mean(),
               "nll_loss": nll_loss.detach(), "rec_loss": rec_loss.detach().mean(), "p_loss": p_loss.detach().mean(),
               "d_weight": d_weight.detach(), "disc_factor": torch.tensor(float(disc_factor)),
               "g_loss": g_loss.detach()}
        return loss, log


def build_loss(cfg: LossConfig | str, lpips_weights: WeightSource | list[WeightSource] | None = None,
               lpips_width: int = 64) -> LPIPSWithDiscriminator | VQLPIPSWithDiscriminator:
    """Loss module for a config or preset name ("kl-f8", "vq-f4"); lpips_weights as LPIPS.load_weights takes them
    (a path, a state dict, or a list of them; None switches the perceptual term off)."""
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    cls = VQLPIPSWithDiscriminator if cfg.kind == "vq" else LPIPSWithDiscriminator
    return cls(cfg, lpips_weights, lpips_width)


# ----------------------------------------------------------------------------- metrics

def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    assert reduction in ("mean", "none"), reduction
    return per_image.mean() if reduction == "mean" else per_image


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(range^2 / MSE), per image (B, C, H, W) then averaged.
    data_range 2.0 for [-1, 1] images; identical images give inf."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)  # (B,)
    return _reduce((10.0 * torch.log10(data_range ** 2 / mse)).float(), reduction)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()  # (size,), separable 1-D factor of the 2-D window


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of (B, C, H, W) images in [0, data_range]: Gaussian-weighted local
    statistics over valid 11x11 windows (no padding), the SSIM map averaged over channels and pixels per image,
    then over the batch. Matches skimage structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=...)."""
    B, C, H, W = x.shape
    assert H >= win_size and W >= win_size, f"images must be at least {win_size}x{win_size}"
    g = _gaussian_window(win_size, sigma, x.device)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:  # depthwise separable filter, (B, C, H-10, W-10)
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(C, 1, 1, win_size), groups=C)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(C, 1, win_size, 1), groups=C)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return _reduce(s.flatten(1).mean(1).float(), reduction)
