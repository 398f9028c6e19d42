"""The k-diffusion samplers and schedules against k-diffusion's own sampling.py and its CompVis denoiser wrappers
(k-diffusion 0.1.1.post1, a dev-only oracle installed with --no-deps; its package __init__ and utils pull in
torchvision and training packages, so its three modules are loaded under a bare package with torchvision stubbed).
Both sides run the same U-Net with the same injected noise, fp32 on the CPU."""

import importlib
import importlib.util
import sys
import types
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import ldm
from testutil import UNET_NARROW, randomize_


def load_k_diffusion() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external), imported from the installed wheel by path."""
    folder = Path(importlib.util.find_spec("k_diffusion").origin).parent
    saved = {name: sys.modules.get(name) for name in ("k_diffusion", "torchvision", "torchvision.transforms",
                                                      "torchvision.transforms.functional")}
    tv, tf, tff = (types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                                  "torchvision.transforms.functional"))
    tv.transforms, tf.functional = tf, tff
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    sys.modules.update({"k_diffusion": package, "torchvision": tv, "torchvision.transforms": tf,
                        "torchvision.transforms.functional": tff})
    try:
        return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")
    finally:
        for name, module in saved.items():  # no stub stays visible to other tests (diffusers probes torchvision)
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


K_SAMPLING, K_EXTERNAL = load_k_diffusion()
THEIR_SAMPLERS = {"euler": "sample_euler", "euler_a": "sample_euler_ancestral", "heun": "sample_heun",
                  "lms": "sample_lms", "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
                  "dpmpp_sde": "sample_dpmpp_sde"}
STOCHASTIC = ("euler_a", "dpmpp_2m_sde", "dpmpp_sde")


class Oracle(torch.nn.Module):
    """What k-diffusion's CompVisDenoiser / CompVisVDenoiser wrap: `alphas_cumprod` and `apply_model(x, t, cond)`,
    here the U-Net with classifier-free guidance on its output (written out here, not ldm's)."""

    def __init__(self, model: ldm.LatentDiffusion, scale: float):
        super().__init__()
        self.model, self.scale = model, scale
        self.alphas_cumprod = model.alphas_cumprod.float()

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        u, c = self.model.unet(torch.cat([x, x]), torch.cat([t, t]), cond).float().chunk(2)
        return u + self.scale * (c - u)


def k_model(model: ldm.LatentDiffusion, scale: float):
    wrapper = K_EXTERNAL.CompVisVDenoiser if model.prediction_type == "v" else K_EXTERNAL.CompVisDenoiser
    return wrapper(Oracle(model, scale), quantize=False)


MODELS = {}


def model_for(structure: str, prediction_type: str) -> ldm.LatentDiffusion:
    """The tiny preset, or the SD 1.x U-Net's structure (4 levels, 2 ResBlocks each, transformers at 3 levels) at
    reduced width; seeded weights, built once per module."""
    if (structure, prediction_type) not in MODELS:
        cfg = dict(ldm.PRESETS["tiny"], prediction_type=prediction_type)
        if structure == "sd":
            cfg["unet"] = asdict(UNET_NARROW["sd1"])
        MODELS[structure, prediction_type] = randomize_(ldm.build_model(cfg)).eval()
    return MODELS[structure, prediction_type]


def run_both(model, sampler: str, sigmas: torch.Tensor, x: torch.Tensor, cond: torch.Tensor, scale: float = 5.0):
    """(ours, k-diffusion's) from the same start x, schedule, guidance and noise."""
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(ldm.noise_draws(sampler, sigmas), *x.shape, generator=g)
    ours = ldm.k_sample(model, x, cond, sigmas, sampler, guidance_scale=scale, noise=noise, progress=False,
                        cuda_graph=False)
    draws = iter(noise)
    kw = {"noise_sampler": lambda sigma, sigma_next: next(draws)} if sampler in STOCHASTIC else {}
    theirs = getattr(K_SAMPLING, THEIR_SAMPLERS[sampler])(k_model(model, scale), x, sigmas, disable=True,
                                                          extra_args={"cond": cond}, **kw)
    assert next(draws, None) is None  # both sides drew exactly the noise ldm.noise_draws counts
    return ours, theirs


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor):
    """fp32 on both sides, the same operations in the same order up to the odd fused or reordered one: agreement
    to ~1e-6 of the latents' scale; 1e-5 of it keeps margin on any CPU and fails for any wrong coefficient."""
    assert torch.isfinite(ours).all() and theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def inputs(model: ldm.LatentDiffusion, sigmas: torch.Tensor, img2img: bool, batch: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(3)
    shape = (batch, model.latent_channels, size, size)
    cond = torch.randn(2 * batch, 77, model.unet.cfg.context_dim, generator=g)  # [uncond; cond]
    z = torch.randn(shape, generator=g)
    x = (torch.randn(shape, generator=g) * 0.8 + z * sigmas[0]) if img2img else z * sigmas[0]
    return x, cond


@pytest.mark.parametrize("scheduler", ldm.SCHEDULERS)
def test_schedules_equal_k_diffusion(scheduler):
    model = model_for("tiny", "eps")
    wrapped = k_model(model, 1.0)
    sigma_min, sigma_max = wrapped.sigmas[0].item(), wrapped.sigmas[-1].item()  # as A1111 takes them
    for n in (1, 10, 20, 37):
        theirs = {"normal": lambda: wrapped.get_sigmas(n),
                  "karras": lambda: K_SAMPLING.get_sigmas_karras(n, sigma_min, sigma_max),
                  "exponential": lambda: K_SAMPLING.get_sigmas_exponential(n, sigma_min, sigma_max)}[scheduler]()
        ours = ldm.get_sigmas(model, n, scheduler)
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), (scheduler, n)
    t = torch.tensor([0.0, 0.5, 37.25, 998.9, 999.0])
    log_sigmas = ldm.model_sigmas(model).log()
    assert torch.equal(ldm.t_to_sigma(t, log_sigmas), wrapped.t_to_sigma(t))
    sigmas = ldm.get_sigmas(model, 20, "karras")[:-1]
    assert torch.equal(ldm.sigma_to_t(sigmas, log_sigmas), wrapped.sigma_to_t(sigmas))


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("sampler", list(THEIR_SAMPLERS))
def test_samplers_match_k_diffusion_on_the_tiny_model(sampler, prediction_type):
    """Every schedule from pure noise, and image-to-image from the last part of a schedule."""
    model = model_for("tiny", prediction_type)
    for scheduler, img2img in [(s, False) for s in ldm.SCHEDULERS] + [("karras", True)]:
        sigmas = ldm.get_sigmas(model, 4, scheduler)[2 if img2img else 0:]
        x, cond = inputs(model, sigmas, img2img)
        assert_matches(*run_both(model, sampler, sigmas, x, cond))


@pytest.mark.slow  # ~9 s in all: 14 runs of a 4-level U-Net (CI runs the slow tests too)
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("sampler", list(THEIR_SAMPLERS))
def test_samplers_match_k_diffusion_on_the_sd_structure(sampler, prediction_type):
    model = model_for("sd", prediction_type)
    sigmas = ldm.get_sigmas(model, 4, "karras")
    x, cond = inputs(model, sigmas, img2img=False, batch=1)
    assert_matches(*run_both(model, sampler, sigmas, x, cond, scale=7.5))


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_sde", "dpmpp_2m"])
def test_a_seed_gives_the_same_image_alone_and_in_a_batch(sampler):
    """The first latent and every later draw come from each image's own CPU generator."""
    model = model_for("tiny", "eps")
    kw = dict(steps=4, sampler=sampler, scheduler="karras", output_type="tensor", progress=False)
    both = ldm.sample(model, ["a", "b"], seed=11, **kw)
    alone = torch.cat([ldm.sample(model, ["a"], seed=11, **kw), ldm.sample(model, ["b"], seed=12, **kw)])
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-5)  # batched float maths: rounding only
    assert (both[0] - both[1]).abs().mean() > 0.01


def test_img2img_with_a_k_sampler_starts_from_the_noised_image(monkeypatch):
    """strength s runs the schedule's last int(steps * s) steps, from z0 + sigma_start * (the seed's first draw)."""
    model = model_for("tiny", "eps")
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = {}

    def capture(model, x, cond, sigmas, sampler, **kw):
        seen.update(x=x.clone(), sigmas=sigmas.clone(), noise=kw["noise"])
        return x

    monkeypatch.setattr(ldm, "k_sample", capture)
    ldm.sample(model, ["a"], steps=10, sampler="euler_a", scheduler="karras", init_image=init, strength=0.35,
               seed=5, progress=False)
    z0 = model.encode_images(init)
    first = torch.randn((1, model.latent_channels, 16, 16), generator=torch.Generator().manual_seed(5))
    sigmas = ldm.get_sigmas(model, 10, "karras")[10 - 3:]  # int(10 * 0.35) = 3 steps
    assert torch.equal(seen["sigmas"], sigmas)
    torch.testing.assert_close(seen["x"], z0 + first * sigmas[0], rtol=0, atol=0)
    assert seen["noise"].shape == (2, 1, model.latent_channels, 16, 16)  # euler_a: a draw per step not ending at 0
