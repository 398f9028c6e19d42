"""What the tests and the fixture generators (fixtures/gen_*.py) share, so that each exists once: seeded random
weights with one rule, the checkpoint manifests (fixtures/manifests/*.json), and the reduced-width models, prompts
and runs the golden fixtures were made with. Dev only: no runtime module imports it.

The golden fixtures hold inputs and reference outputs only; a test rebuilds the same weights with `randomize_` (or
`random_weights`) and the same seed, so changing the rule below means regenerating every fixture:
    python fixtures/gen_clip.py; python fixtures/gen_unet.py; python fixtures/gen_vae.py; python fixtures/gen_ldm.py
    python fixtures/gen_lora.py
"""

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch

import clip
import lora
import unet
import vae
from bench import unet_diffusers_config, unet_original_yaml  # noqa: F401  (shared with bench's diffusers twins)

ROOT = Path(__file__).resolve().parent
FIXTURES = ROOT / "fixtures"

# -----------------------------------------------------------------------------------------------------------------
# Seeded random weights


def random_weights(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for a {name: shape} layout, filled in sorted name order from one
    torch.Generator seeded with `seed` (one standard-normal draw N per tensor):
        names ending in "bias"            0.02 N
        1-D tensors named "...weight"     1 + 0.1 N   (norm scales: near the identity, but not exactly it)
        everything else                   N / sqrt(numel / shape[0])   (fan-in scaling; a 0-d scalar is plain N)
    so activations keep unit scale through deep stacks of random layers and every parameter matters. (torch's CPU
    normal draws are the same on every machine up to the last bit of its vectorised log/cos; the golden
    comparisons' tolerances absorb that.)"""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        noise = torch.randn(shape, generator=g)
        if name.endswith("bias"):
            out[name] = 0.02 * noise
        elif len(shape) == 1 and name.endswith("weight"):
            out[name] = 1 + 0.1 * noise
        else:
            out[name] = noise / math.sqrt(math.prod(shape[1:]))  # prod(()) = 1 for 1-D and 0-d tensors
    return out


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every floating-point tensor of `module`'s state dict in place with random_weights(seed); integer
    buffers (BatchNorm counters) keep their values."""
    sd = module.state_dict()
    weights = random_weights({k: v.shape for k, v in sd.items() if v.is_floating_point()}, seed)
    with torch.no_grad():
        for name, value in weights.items():
            sd[name].copy_(value)
    return module


# -----------------------------------------------------------------------------------------------------------------
# Checkpoint manifests: fixtures/manifests/<name>.json maps each key of a public checkpoint to [shape, dtype name]


def manifest(name: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{key without `prefix`: shape} for the keys of manifest `name` (e.g. "sd15") that start with `prefix`, in the
    file's order."""
    entries = json.loads((FIXTURES / "manifests" / f"{name}.json").read_text())
    return {k[len(prefix):]: tuple(shape) for k, (shape, _) in entries.items() if k.startswith(prefix)}


def manifest_state_dict(*names: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Meta tensors with the exact keys (without `prefix`), shapes and dtypes of the public checkpoints `names`
    (merged in order): a full-size state dict that costs no memory."""
    sd = {}
    for name in names:
        entries = json.loads((FIXTURES / "manifests" / f"{name}.json").read_text())
        for key, (shape, dtype) in entries.items():
            if key.startswith(prefix):
                sd[key[len(prefix):]] = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    return sd


# -----------------------------------------------------------------------------------------------------------------
# Text encoders (fixtures/gen_clip.py -> clip_tokens.json, clip_parity.pt)

CLIP_LONG_PROMPT = (
    "a highly detailed matte painting of a sprawling cyberpunk city at night, neon signs, rain soaked streets, "
    "flying cars, towering skyscrapers, volumetric lighting, god rays, cinematic composition, by greg rutkowski "
    "and alphonse mucha, trending on artstation, octane render, unreal engine 5, 8k, ultra wide angle, "
    "dramatic clouds, reflections in puddles, crowded markets, holographic advertisements, steam vents")
# Tokenizer goldens: case, accents, scripts, emoji (ZWJ, flags), HTML entities, whitespace, numbers, punctuation,
# contractions, and prompts longer than 77 tokens.
CLIP_PROMPTS = [
    "", " ", "a photo of a cat", "A Photo Of A CAT", "a photo of a cat.", "an astronaut riding a horse on mars",
    "Café crème brûlée", "naïve résumé façade jalapeño", "Ångström Øresund Straße ß", "déjà vu",
    "東京の夜景", "一只可爱的猫", "서울의 밤", "Москва зимой", "Αθήνα", "مرحبا بالعالم", "नमस्ते दुनिया",
    "a cat 🐱 and a dog 🐶", "🔥🔥🔥", "👩‍🚀 astronaut emoji with zwj", "flags 🇯🇵🇫🇷",
    "salt &amp; pepper", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp; double escaped", "&quot;quoted&quot; &#39;single&#39;",
    "&nbsp;non&nbsp;breaking", "  leading and trailing spaces  ", "multiple    inner     spaces",
    "new\nlines\n\nhere", "tabs\tand\ttabs", "\r\nwindows line end\r\n", "mixed \t\n whitespace \u3000 ideographic",
    "1234567890", "3.14159 pi", "year 2024, 4k, 8K, 1080p", "$100 & 50% off!!!", "v1.5 vs v2.1",
    "hello,world", "(masterpiece:1.2), [bad hands]", "cat-like", "end.", "wow!!!", "what?!", "a...b",
    "it's", "don't", "you're", "we've", "I'm", "they'll", "he'd", "IT'S DON'T", "rock'n'roll", "o'clock",
    "trending on artstation", "portrait of a woman, oil on canvas, by rembrandt", "snake_case_name", "#hashtag @user",
    "email me: a.b@c.com", "https://example.com/path?q=1", "C++ and C#", "mojibake: cafÃ©", "\u00e9 vs e\u0301",
    "supercalifragilisticexpialidocious", "ALLCAPS SHOUTING PROMPT", "MiXeD cAsE",
    CLIP_LONG_PROMPT, CLIP_LONG_PROMPT + " " + CLIP_LONG_PROMPT, "word " * 100,
]
CLIP_PARITY_PROMPTS = ["a photo of an astronaut riding a horse on mars", "東京の夜景, 8k 🐱", "", CLIP_LONG_PROMPT]

# Reduced width, real structure: 12 quick_gelu layers (SD1); 24 gelu blocks, penultimate output (SD2).
CLIP_NARROW = {
    "sd1": clip.TextConfig(layout="clip", width=64, layers=12, heads=4, act="quick_gelu", layer="last"),
    "sd2": clip.TextConfig(layout="openclip", width=64, layers=24, heads=4, act="gelu", layer="penultimate",
                           embed_dim=64),
}
CLIP_SEEDS = {"sd1": 1, "sd2": 2, "sd2_diffusers": 3}  # random_weights seed of each parity model

# --- SDXL text encoders (test_clip.py, test_prompts.py; fixtures/gen_clip.py -> clip_sdxl.pt) ---
# Reduced width, real structure: CLIP-L's 12 quick_gelu layers and bigG's 32 gelu blocks, each conditioning on the
# raw penultimate output; bigG 80 wide (not CLIP-L's 64, so swapped parts show) with a non-square projection (so a
# transposed one shows).
CLIP_SDXL_NARROW = clip.SDXLTextConfig(
    clip_l=clip.TextConfig(layout="clip", width=64, layers=12, heads=4, act="quick_gelu", layer="penultimate",
                           final_norm=False),
    clip_g=clip.TextConfig(layout="openclip", width=80, layers=32, heads=5, act="gelu", layer="penultimate",
                           embed_dim=48, final_norm=False),
)
# random_weights seeds: our SDXLTextEncoder (randomize_), and diffusers' text_encoder/ and text_encoder_2/ in their
# own names
CLIP_SDXL_SEEDS = {"ours": 21, "text_encoder": 22, "text_encoder_2": 23}


# -----------------------------------------------------------------------------------------------------------------
# U-Nets (fixtures/gen_unet.py -> unet_sd1.pt, unet_sd2.pt, unet_diffusers_keys.json, unet_diffusers_configs.json)

# Reduced width, real structure: 4 levels (1, 2, 4, 4), 2 ResBlocks each, attention at 4, 2, 1.
UNET_NARROW = {
    "sd1": replace(unet.PRESETS["sd1"], model_channels=32, context_dim=40),  # 8 heads of 4..16 channels, conv proj
    "sd2": replace(unet.PRESETS["sd2"], model_channels=32, num_head_channels=8, context_dim=48),  # linear proj
}

# --- SDXL U-Nets and the diffusers twin of a U-Net (test_unet.py, fixtures/gen_unet.py) ---

# Reduced width, real SDXL structure: no attention at level 0, per-level depths (fewer blocks than 2 / 10), Linear
# projections, 16-channel heads. The context widths stay the real ones, as diffusers' yaml reader tells SDXL apart
# by them, and so do the y widths (pooled 1280 + 256 per size / crop / score number).
UNET_NARROW_XL = {
    "sdxl": replace(unet.PRESETS["sdxl"], model_channels=32, num_head_channels=16, transformer_depth=(0, 2, 3)),
    "sdxl-refiner": replace(unet.PRESETS["sdxl-refiner"], model_channels=32, num_head_channels=16,
                            transformer_depth=2),
}
UNET_PREFIX = "model.diffusion_model."  # the U-Net's prefix in a single-file checkpoint (ldm.PREFIXES["unet"])


def unet_diffusers_twin(cfg: unet.UNetConfig, seed: int = 0, image_size: int = None):
    """(ours, theirs, config, ours_sd, theirs_sd): our U-Net with randomize_(seed) weights, and a diffusers
    UNet2DConditionModel holding the same tensors, moved by diffusers' own single-file converter into the model
    built from unet_diffusers_config (config: that model's full config.json dict). ours_sd / theirs_sd share their
    tensors (the converter moves, never copies). Needs diffusers."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    ours = randomize_(unet.UNetModel(cfg), seed).eval()
    ours_sd = ours.state_dict()
    config = unet_diffusers_config(cfg, image_size)
    theirs_sd = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ours_sd.items()}, config)
    theirs = UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(theirs_sd, strict=True)
    config = {k: v for k, v in theirs.config.items() if not k.startswith("_")}  # "_" keys: unordered sets
    return ours, theirs, config, ours_sd, theirs_sd


# -----------------------------------------------------------------------------------------------------------------
# Autoencoders (fixtures/gen_vae.py -> vae_parity.pt)

# Reduced-width configs keeping the real structure: SD/kl-f8 (4 levels, 2 blocks, mid attention), vq-f4, noattn.
VAE_NARROW = {
    "kl": vae.AutoencoderConfig(embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                                scale_factor=0.18215),
    "vq": vae.AutoencoderConfig(embed_dim=3, n_embed=256, double_z=False, z_channels=3, ch=32, ch_mult=(1, 2, 4),
                                num_res_blocks=2),
    "vqna": vae.AutoencoderConfig(embed_dim=3, n_embed=256, double_z=False, z_channels=3, ch=32, ch_mult=(1, 2, 4),
                                  num_res_blocks=2, attn_type="none"),
    # Attention inside a resolution level (kl-f16 / kl-f32 / vq-f8 style): level 2 of 3 runs at 256 / 4 = 64.
    "klattn": vae.AutoencoderConfig(embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                                    attn_resolutions=(64,), scale_factor=1.0),
}
VAE_IMAGE_SIZE = {"kl": 64, "vq": 32, "vqna": 32, "klattn": 32}  # side of each parity input image


# VQ parity compares code indices exactly, so each latent vector's runner-up code must lie farther than its nearest
# code by many times what fp32 rounding can change a squared distance: the quantiser sums ||z||^2 + ||e||^2 - 2 z.e,
# whose rounding is a few units of 2^-24 times the size of those terms.
MIN_INDEX_MARGIN = 50


def index_margin(z: torch.Tensor, codebook: torch.Tensor) -> float:
    """min over the latent vectors of z (B, C, h, w) of (second-smallest - smallest squared distance to the codes),
    in units of 2^-24 (||z||^2 + max ||e||^2): how many fp32 roundings apart the two nearest codes are. float64."""
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, codebook.shape[1]).double()
    e = codebook.detach().double()
    d2 = torch.cdist(flat, e).square()
    top2 = d2.topk(2, largest=False).values
    scale = flat.square().sum(1) + e.square().sum(1).max()
    return ((top2[:, 1] - top2[:, 0]) / (2.0 ** -24 * scale)).min().item()


def vae_diffusers_config(cfg: vae.AutoencoderConfig) -> dict:
    """The diffusers AutoencoderKL / VQModel config.json of the architecture `cfg` describes."""
    n = len(cfg.ch_mult)
    attn = ["Attn" if cfg.resolution // 2 ** i in cfg.attn_resolutions else "" for i in range(n)]
    out = dict(in_channels=cfg.in_channels, out_channels=cfg.out_ch,
               down_block_types=[a + "DownEncoderBlock2D" for a in attn],
               up_block_types=[a + "UpDecoderBlock2D" for a in reversed(attn)],
               block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
               layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=32,
               sample_size=cfg.resolution, scaling_factor=cfg.scale_factor,
               mid_block_add_attention=cfg.attn_type != "none")
    if cfg.is_vq:
        out.update(num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim)
    return out


def vae_to_diffusers(state_dict: dict, config: dict) -> dict:
    """Our (CompVis) autoencoder state dict in diffusers' names, by diffusers' own single-file converter (needs
    diffusers, requirements-dev.txt)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    if any("Attn" in t for t in config["down_block_types"]):
        # diffusers' converter has no table for attention inside levels: invert our convert_diffusers key by key
        # over the names of a freshly built diffusers model (the parity of the outputs checks the mapping).
        from diffusers import AutoencoderKL, VQModel
        with torch.device("meta"):
            ref = (VQModel if "num_vq_embeddings" in config else AutoencoderKL)(**config)
        theirs = ref.state_dict()
        ours = vae.convert_diffusers(theirs)  # one key out per key in, in the same order
        return {k: state_dict[o].reshape(p.shape) for (k, p), o in zip(theirs.items(), ours)}
    out = convert_ldm_vae_checkpoint(dict(state_dict), config)
    if "quantize.embedding.weight" in state_dict:  # the KL-oriented converter skips the codebook
        out["quantize.embedding.weight"] = state_dict["quantize.embedding.weight"]
    return out


# -----------------------------------------------------------------------------------------------------------------
# Whole pipeline and checkpoint files (fixtures/gen_ldm.py -> ldm_pipeline.pt, ldm_diffusers_layout.json,
# ldm_reference.safetensors, ldm_schedule.pt)

PIPELINE_PROMPTS = ["a red apple on a table", "an emoji of a cat"]
PIPELINE_NEGATIVE = ["", "blurry"]
PIPELINE_SEED = 1234  # image i: torch.Generator("cpu").manual_seed(PIPELINE_SEED + i)
PIPELINE_RUNS = {  # name: (prediction_type, eta, steps, guidance_scale); "tiny" model, random_weights seed 0
    "eps": ("eps", 0.0, 10, 7.5), "eps_eta": ("eps", 0.5, 8, 5.0), "v": ("v", 0.0, 10, 7.5),
    "nocfg": ("eps", 0.0, 5, 1.0),
}


# --- SDXL: base and refiner against diffusers' StableDiffusionXL(Img2Img)Pipeline (fixtures/gen_ldm.py -> ldm_sdxl.pt)

# Reduced width, real structure: the SDXL U-Nets of UNET_NARROW_XL, the text encoders of CLIP_SDXL_NARROW, SD's
# 4-level VAE at 32 channels with SDXL's scale; the context and y widths follow the narrow text encoders (base:
# 64 + 80 and 48 + 6 x 256; refiner: 80 and 48 + 5 x 256). 64x64 images, 8x8 latents.
SDXL_NARROW = {
    "sdxl": dict(unet=asdict(replace(UNET_NARROW_XL["sdxl"], context_dim=144, adm_in_channels=48 + 6 * 256,
                                     image_size=8)),
                 vae=asdict(replace(VAE_NARROW["kl"], scale_factor=0.13025)), text=CLIP_SDXL_NARROW,
                 prediction_type="eps", resolution=64),
    "sdxl-refiner": dict(unet=asdict(replace(UNET_NARROW_XL["sdxl-refiner"], context_dim=80,
                                             adm_in_channels=48 + 5 * 256, image_size=8)),
                         vae=asdict(replace(VAE_NARROW["kl"], scale_factor=0.13025)),
                         text=replace(CLIP_SDXL_NARROW, clip_l=None), prediction_type="eps", resolution=64),
}
SDXL_SEEDS = {"sdxl": 31, "sdxl-refiner": 32}  # randomize_ seed of each whole model
SDXL_PROMPTS = ["a red apple on a table", "an emoji of a smiling cat"]
SDXL_SEED = 1234  # image i: torch.Generator("cpu").manual_seed(SDXL_SEED + i)
SDXL_RUNS = {  # ldm.sample's arguments; negative_prompts None = diffusers' zeros for no negative prompt
    "ddim": dict(sampler="ddim", steps=10, guidance_scale=5.0, negative_prompts=None),
    "euler": dict(sampler="euler", steps=10, guidance_scale=7.0, negative_prompts=["blurry", "ugly, lowres"]),
    "sizes": dict(sampler="euler", steps=4, guidance_scale=6.0, negative_prompts=None,
                  sizes=dict(original_size=(96, 128), crop=(16, 8), target_size=(48, 80))),
    "refiner": dict(sampler="euler", steps=10, guidance_scale=5.0, negative_prompts=["blurry", "grainy"],
                    refiner_switch=0.8, sizes=dict(aesthetic_score=7.0, negative_aesthetic_score=2.0)),
}


def reference_tensors() -> dict[str, torch.Tensor]:
    """What ldm_reference.safetensors holds (written by the `safetensors` library): one small tensor per dtype,
    a scalar and an empty tensor, with values a test can rebuild."""
    out = {}
    for i, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]):
        out[f"t{i}.{str(dtype)[6:]}"] = (torch.arange(2 * 3 * (i + 1)) - 5).reshape(2, 3, i + 1).to(dtype)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


# -----------------------------------------------------------------------------------------------------------------
# LoRAs against diffusers + peft (fixtures/gen_lora.py -> lora_parity.pt)

# randomize_ seed of each model, random_lora seed of its LoRA, and the multiplier it is applied at; "tiny" and
# "tiny-sdxl" models (ldm.PRESETS). The PEFT-format cases reuse the SD 1.x model.
LORA_RUNS = {"sd1": dict(preset="tiny", seed=41, lora_seed=51, multiplier=0.7),
             "sdxl": dict(preset="tiny-sdxl", seed=42, lora_seed=52, multiplier=-0.6)}
LORA_PROMPTS = ["a red apple on a table", "an emoji of a smiling cat"]


def random_lora(model, seed: int, alpha: bool = True, rank: int = 4, conv_rank: int = 2) -> dict[str, torch.Tensor]:
    """A kohya LoRA (LoCon) of every weight a file can name in `model` (a LatentDiffusion): the U-Net's linear
    layers and convolutions under the names its kohya files use (diffusers paths for SD 1.x / 2.x, original ones
    for SDXL) and every text encoder's under its prefix (lora_te_; SDXL lora_te1_ / lora_te2_). Rank `rank`, and
    `conv_rank` for 3x3 convolutions (LoCon's separate conv_dim); down N / sqrt(fan-in) and up 0.5 N / sqrt(rank),
    so each update is about half its weight's size, drawn in sorted name order from one generator seeded with
    `seed`. alpha=True writes `.alpha` = rank for every module (scale 1), alpha=False none (which reads the same)."""
    style = "original" if model.unet.cfg.adm_in_channels is not None else "diffusers"
    weights = {name: model.unet.get_submodule(path).weight for name, (path, s) in lora.unet_names(model.unet).items()
               if s == style}
    for prefix, encoder, path in lora.text_encoder_parts(model.text_encoder):
        weights.update({name: t.tensor(model) for name, t in lora.text_names(encoder, prefix, path).items()})
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(weights):
        shape = weights[name].shape
        r = conv_rank if len(shape) == 4 and shape[-1] > 1 else rank
        fan_in = math.prod(shape[1:])
        out[f"{name}.lora_down.weight"] = torch.randn(r, *shape[1:], generator=g) / math.sqrt(fan_in)
        up = torch.randn(shape[0], r, generator=g) * (0.5 / math.sqrt(r))
        out[f"{name}.lora_up.weight"] = up[..., None, None] if len(shape) == 4 else up
        if alpha:
            out[f"{name}.alpha"] = torch.tensor(float(r))
    return out
