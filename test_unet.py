"""Tests for unet.py: full-size key layouts, the timestep embedding against diffusers and a float64 evaluation,
forward parity against diffusers goldens (fixtures/gen_unet.py) and, for the SDXL structures, against diffusers run
live, the diffusers-layout conversion, and gradient checkpointing."""
import json
import math
from dataclasses import replace

import pytest
import torch

import ldm
from testutil import (FIXTURES, UNET_NARROW, UNET_NARROW_XL, UNET_PREFIX, manifest, manifest_state_dict, randomize_,
                      unet_diffusers_config, unet_diffusers_twin)
from unet import (PRESETS, BasicTransformerBlock, CrossAttention, ResBlock, UNetConfig, UNetModel, adm_vector,
                  compile_blocks, config_from_diffusers, convert_diffusers, diffusers_prefixes, infer_config,
                  timestep_embedding)

PREFIX = ldm.PREFIXES["unet"]


def parity_tolerance(ref: torch.Tensor) -> dict:
    """The U-Net goldens are diffusers' float32 outputs on a narrow SD1/SD2 structure. Our forward and diffusers'
    (and the same code on another CPU, whose vector kernels sum in other orders) differ by float32 rounding
    accumulated over ~100 layers: a few 1e-6 of the output's scale. 1e-4 of the largest output keeps 10x headroom
    on any machine and still fails for any real mismatch (a wrong head split or norm moves outputs by O(1))."""
    return dict(rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("preset,manifest", [("sd1", "sd15"), ("sd2", "sd21-768-v")])
def test_full_size_layout_matches_checkpoint(preset, manifest):
    ref = manifest_state_dict(manifest, prefix=PREFIX)
    with torch.device("meta"):
        model = UNetModel(PRESETS[preset])
    sd = model.state_dict()
    assert set(sd) == set(ref)
    for k, t in ref.items():
        assert sd[k].shape == t.shape, k
        assert sd[k].dtype == t.dtype, k
    # hyper-parameters read back from the real file's shapes
    assert infer_config(ref) == PRESETS[preset]


def embedding_float64(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """The sinusoidal embedding of the original (and diffusers with flip_sin_to_cos=True, downscale_freq_shift=0),
    evaluated in float64: [cos | sin] of t * max_period^(-i/half), one zero column for an odd dim."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.nn.functional.pad(torch.cat([torch.cos(args), torch.sin(args)], -1), (0, dim % 2))


def embedding_tolerance(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Per element, what a float32 evaluation may lose against the exact value. With u = 2^-24 (float32 unit
    roundoff): the exponent x_i = -ln(P) i / half takes three roundings (ln P, the product, the division), an
    absolute error of 3 u |x_i| that exp turns into a relative one; exp and the product t * f_i add ~2 u more. So
    the argument t * f_i is off by up to (3 |x_i| + 3) u of itself, and cos and sin (slope <= 1) pass that on, plus
    their own ~1 u. Arguments reach 999 (i = 0, t = 999), where one float32 ulp is 6.1e-5: two CPUs' float32
    cos(999 f) may differ by ~1e-4, which no fixed atol near 1e-5 can cover, while small arguments stay at ~1e-7.
    Doubled, since two float32 evaluations (ours and diffusers') may each be that far off in opposite directions
    (measured here: at most 0.3 of it against float64). A real error (a frequency, the order of cos and sin, the
    shift) moves elements by O(1)."""
    half = dim // 2
    x = math.log(max_period) * torch.arange(half, dtype=torch.float64) / half
    args = t.double()[:, None] * torch.exp(-x)[None]
    u = 2.0 ** -24
    tol = 2 * ((3 * x + 3) * u * args.abs() + u)
    return torch.nn.functional.pad(torch.cat([tol, tol], -1), (0, dim % 2), value=0.0)  # the pad column is exact


def test_timestep_embedding_matches_diffusers_and_float64():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0.0, 1.0, 37.0, 250.5, 999.0])
    for dim in (320, 33):
        out = timestep_embedding(t, dim)
        assert out.dtype == torch.float32 and out.shape == (5, dim)
        tol = embedding_tolerance(t, dim)
        theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)  # on this machine
        assert ((out.double() - theirs.double()).abs() <= tol).all()
        assert ((out.double() - embedding_float64(t, dim)).abs() <= tol).all()
    assert timestep_embedding(torch.tensor(0.0), 8)[0, :4].tolist() == [1.0] * 4  # cos first: cos(0) = 1
    assert timestep_embedding(torch.tensor([5.0]), 7)[0, -1] == 0  # odd dim: one trailing zero


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_forward_matches_diffusers(name):
    ref = torch.load(FIXTURES / f"unet_{name}.pt", weights_only=True)
    model = randomize_(UNetModel(UNET_NARROW[name])).eval()
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["context"])
    torch.testing.assert_close(out, ref["out"], **parity_tolerance(ref["out"]))


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_channels_last_weights_give_the_same_output(name):
    """sample.py and train.py --channels-last convert the weights to NHWC; the numbers must not change."""
    ref = torch.load(FIXTURES / f"unet_{name}.pt", weights_only=True)
    model = randomize_(UNetModel(UNET_NARROW[name])).eval().to(memory_format=torch.channels_last)
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["context"])
    torch.testing.assert_close(out, ref["out"], **parity_tolerance(ref["out"]))
    assert list(model.state_dict()) == list(randomize_(UNetModel(UNET_NARROW[name])).state_dict())


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_sizes_that_do_not_halve_evenly_match_diffusers(name):
    """A latent side that is not a multiple of 8 (sample.py --height 520 -> 65 -> 33 -> 17 -> 9): each Upsample goes
    to its skip connection's size, as diffusers' forward_upsample_size does. diffusers (a dev dependency) runs here
    on the same weights, put into its layout by its own converter's key map (unet_diffusers_keys.json)."""
    from diffusers import UNet2DConditionModel
    config = json.loads((FIXTURES / "unet_diffusers_configs.json").read_text())[name]
    mapping = json.loads((FIXTURES / "unet_diffusers_keys.json").read_text())
    ours = randomize_(UNetModel(UNET_NARROW[name])).eval()
    theirs = UNet2DConditionModel(**config).eval()
    theirs.load_state_dict({d: ours.state_dict()[o] for d, o in mapping.items()}, strict=True)
    g = torch.Generator().manual_seed(3)
    H, W = (17, 13) if name == "sd1" else (9, 21)  # odd at every level, or at some
    x = torch.randn(1, UNET_NARROW[name].in_channels, H, W, generator=g)
    t, ctx = torch.tensor([37.0]), torch.randn(1, 77, UNET_NARROW[name].context_dim, generator=g)
    with torch.no_grad():
        out, ref = ours(x, t, ctx), theirs(x, t, encoder_hidden_states=ctx).sample
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, **parity_tolerance(ref))


def test_scalar_timestep_broadcasts():
    model = randomize_(UNetModel(PRESETS["tiny"])).eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 500, ctx), model(x, torch.tensor([500, 500]), ctx))


def test_convert_diffusers_inverts_reference_converter():
    # unet_diffusers_keys.json: {diffusers key: original key} as diffusers' own single-file converter maps them
    mapping = json.loads((FIXTURES / "unet_diffusers_keys.json").read_text())
    for name, cfg in UNET_NARROW.items():
        sd = randomize_(UNetModel(cfg)).state_dict()
        theirs = {d: sd[o] for d, o in mapping.items()}
        assert len(theirs) == len(sd)
        ours = convert_diffusers(theirs, cfg)
        assert ours.keys() == sd.keys()
        assert all(ours[k] is sd[k] for k in sd)
        UNetModel(cfg).load_state_dict(ours, strict=True)


@pytest.mark.parametrize("preset", ["sd1", "sd2", "tiny", "sdxl", "sdxl-refiner"])
def test_diffusers_prefix_table_covers_every_key(preset):
    with torch.device("meta"):
        sd = UNetModel(PRESETS[preset]).state_dict()
    table = diffusers_prefixes(PRESETS[preset])
    assert all(sum(k.startswith(ours) for ours, _, _ in table) == 1 for k in sd)


def test_config_from_diffusers():
    # the unet/config.json fields of the public SD 1.5 and SD 2.1 (768-v) folders
    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
            "cross_attention_dim": 768, "in_channels": 4, "out_channels": 4, "sample_size": 64,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
    sd21 = dict(sd15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                sample_size=96)
    assert config_from_diffusers(sd15) == PRESETS["sd1"]
    assert config_from_diffusers(sd21) == PRESETS["sd2"]
    fixture_cfgs = json.loads((FIXTURES / "unet_diffusers_configs.json").read_text())
    for name, cfg in UNET_NARROW.items():
        assert config_from_diffusers(fixture_cfgs[name]) == replace(cfg, image_size=fixture_cfgs[name]["sample_size"])


@pytest.mark.parametrize("size", [(16, 16), (9, 13)])  # (9, 13): the Upsample's size outside the recomputation
def test_gradient_checkpointing_same_output_and_grads(size):
    cfg = replace(PRESETS["tiny"], dropout=0.1)
    model = randomize_(UNetModel(cfg)).train()
    x, ctx = torch.randn(2, 4, *size), torch.randn(2, 5, 32)
    results = []
    for use_checkpoint in (False, True):
        model.cfg.use_checkpoint = use_checkpoint
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks; checkpointing replays the RNG state on recompute
        out = model(x, torch.tensor([3, 700]), ctx)
        out.square().mean().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    assert all(g0[k].abs().sum() > 0 for k in ("time_embed.0.weight", "input_blocks.0.0.weight"))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", pytest.param("tiny-sdxl", marks=pytest.mark.slow)])
def test_block_by_block_compilation_gives_the_eager_numbers(preset):
    """compile_blocks through dynamo with a backend that runs the captured graphs as they are (the capture, guards and
    recompiles, no code generation): output and gradients equal the plain U-Net's bit for bit, with gradient
    checkpointing too; blocks of one shape share a graph; names stay."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    u = randomize_(ldm.build_model(preset).unet, 3).train()
    adm = u.cfg.adm_in_channels
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 900]), torch.randn(2, 77, u.cfg.context_dim,
                                                                                          generator=g)
    y = torch.randn(2, adm, generator=g) if adm else None

    def run():
        out = u(x, t, ctx, y)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in u.named_parameters()}
        u.zero_grad(set_to_none=True)
        return out.detach(), grads

    out0, g0 = run()
    keys = list(u.state_dict())
    compile_blocks(u, backend=backend)
    blocks = sum(isinstance(m, (ResBlock, BasicTransformerBlock)) for m in u.modules())
    for use_checkpoint in (False, True):
        u.cfg.use_checkpoint = use_checkpoint
        out1, g1 = run()
        assert torch.equal(out1, out0) and all(torch.equal(g1[k], g0[k]) for k in g0)
    assert 0 < len(graphs) < blocks and list(u.state_dict()) == keys
    torch._dynamo.reset()


def test_tiny_preset_starts_at_zero_and_conditions_on_t_and_context():
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([1, 700])
    fresh = UNetModel(PRESETS["tiny"]).eval()
    assert isinstance(fresh.cfg, UNetConfig)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, ctx), torch.zeros_like(x))  # zero-initialised output conv, as the original
    model = randomize_(UNetModel(PRESETS["tiny"])).eval()
    with torch.no_grad():
        out = model(x, t, ctx)
        assert out.shape == x.shape and out.abs().mean() > 0.1
        # each sample's output is its own: the same as running it alone
        torch.testing.assert_close(model(x[1:], t[1:], ctx[1:]), out[1:], rtol=1e-5, atol=1e-5)
        # the timestep and the context both reach the output
        assert (model(x, t.flip(0), ctx) - out).abs().max() > 0.01
        assert (model(x, t, ctx.flip(0)) - out).abs().max() > 0.01


def test_attention_scores_beyond_fp16_range_stay_finite():
    attn = CrossAttention(64, 64, 1, 64)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(64))
        attn.to_k.weight.copy_(torch.eye(64))
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(2, 64, 64, generator=g).sign() * 40 + torch.randn(2, 64, 64, generator=g)).half()
        assert (x.float() @ x.float().transpose(1, 2)).abs().max() > 65504  # q.k overflows fp16 if formed there
        ref = attn(x.float())
        out = attn.half()(x).float()
    assert out.isfinite().all()
    assert (out - ref).abs().max() < 2e-3 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_tracks_fp32(dtype):
    model = randomize_(UNetModel(PRESETS["tiny"])).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref = model(x, torch.tensor([1, 999]), ctx)
        out = model.to(dtype)(x.to(dtype), torch.tensor([1, 999]), ctx.to(dtype))
    assert out.dtype == dtype and out.isfinite().all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ----------------------------------------------------------------------------------------------------------------------
# SDXL base and refiner

XL_MANIFESTS = {"sdxl": "sdxl-base", "sdxl-refiner": "sdxl-refiner"}

# the unet/config.json fields of the public SDXL 1.0 base and refiner diffusers folders that describe the structure
SDXL_DIFFUSERS = {
    "sdxl": {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "attention_head_dim": [5, 10, 20],
             "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816, "class_embed_type": None, "in_channels": 4,
             "out_channels": 4, "sample_size": 128,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]},
    "sdxl-refiner": {"block_out_channels": [384, 768, 1536, 1536], "layers_per_block": 2,
                     "attention_head_dim": [6, 12, 24, 24], "transformer_layers_per_block": 4,
                     "cross_attention_dim": 1280, "use_linear_projection": True, "addition_embed_type": "text_time",
                     "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2560,
                     "class_embed_type": None, "in_channels": 4, "out_channels": 4, "sample_size": 128,
                     "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]},
}
# SDXL's size numbers: base (orig_h, orig_w, crop_top, crop_left, target_h, target_w), refiner (orig_h, orig_w,
# crop_top, crop_left, aesthetic_score); one row per batch element
SDXL_TIME_IDS = {"sdxl": [[1024, 1024, 0, 0, 1024, 1024], [832, 1216, 64, 0, 1024, 1024]],
                 "sdxl-refiner": [[1024, 1024, 0, 0, 6.0], [768, 1344, 32, 16, 2.5]]}


@pytest.mark.parametrize("preset", ["sdxl", "sdxl-refiner"])
def test_sdxl_full_size_layout_matches_checkpoint(preset):
    ref = manifest(XL_MANIFESTS[preset], prefix=UNET_PREFIX)  # the public files store fp16; we build fp32
    with torch.device("meta"):
        sd = UNetModel(PRESETS[preset]).state_dict()
    assert len(sd) == {"sdxl": 1680, "sdxl-refiner": 1220}[preset]
    assert [(k, tuple(t.shape)) for k, t in sd.items()] == list(ref.items())  # same keys, order and shapes
    assert infer_config(manifest_state_dict(XL_MANIFESTS[preset], prefix=UNET_PREFIX)) == PRESETS[preset]


@pytest.mark.parametrize("preset", ["sdxl", "sdxl-refiner"])
def test_sdxl_config_from_diffusers(preset):
    published = SDXL_DIFFUSERS[preset]
    assert config_from_diffusers(published) == PRESETS[preset]
    # diffusers derives the same fields from the original yaml (whose base depth [1, 2, 10] has an unused entry)
    yaml_cfg = replace(PRESETS[preset], transformer_depth=(1, 2, 10)) if preset == "sdxl" else PRESETS[preset]
    derived = unet_diffusers_config(yaml_cfg)
    assert {k: derived.get(k) for k in published} == published
    assert config_from_diffusers(derived) == PRESETS[preset]


@pytest.mark.parametrize("preset", ["sdxl", "sdxl-refiner"])
def test_convert_diffusers_inverts_reference_converter_full_size_sdxl(preset):
    """On the manifests' meta tensors: diffusers' own single-file converter, then ours back, gives every original
    key its own tensor again."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    sd = manifest_state_dict(XL_MANIFESTS[preset], prefix=UNET_PREFIX)
    ckpt = {UNET_PREFIX + k: v for k, v in sd.items()}
    theirs = convert_ldm_unet_checkpoint(ckpt, unet_diffusers_config(PRESETS[preset]))
    assert len(theirs) == len(sd) and {"add_embedding.linear_1.weight", "add_embedding.linear_2.bias"} <= set(theirs)
    ours = convert_diffusers(theirs, PRESETS[preset])
    assert ours.keys() == sd.keys()
    assert all(ours[k] is sd[k] for k in sd)


def test_adm_vector_matches_diffusers_add_time_proj():
    """y = [pooled | 256-channel embedding of each number]: diffusers' add_time_proj (Timesteps(256,
    flip_sin_to_cos=True, downscale_freq_shift=0)) on the flattened time_ids, reshaped to (B, -1)."""
    from diffusers.models.embeddings import Timesteps
    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor(SDXL_TIME_IDS["sdxl"], dtype=torch.float32)
    y = adm_vector(pooled, ids)
    assert y.shape == (2, 2816) and torch.equal(y[:, :1280], pooled)
    for i in range(6):
        torch.testing.assert_close(y[:, 1280 + 256 * i:1280 + 256 * (i + 1)], timestep_embedding(ids[:, i], 256),
                                   rtol=0, atol=0)
    theirs = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(ids.flatten()).reshape(2, -1)
    tol = embedding_tolerance(ids.flatten(), 256).reshape(2, -1)
    assert ((y[:, 1280:].double() - theirs.double()).abs() <= tol).all()
    assert adm_vector(pooled, torch.tensor(SDXL_TIME_IDS["sdxl-refiner"])).shape == (2, 2560)


@pytest.mark.parametrize("name,size", [("sdxl", (16, 16)), ("sdxl", (9, 13)), ("sdxl-refiner", (16, 16))])
def test_sdxl_forward_matches_diffusers(name, size):
    """Reduced-width SDXL base / refiner structures against diffusers' UNet2DConditionModel with the same weights
    (moved there by diffusers' own converter) and its text_time conditioning; (9, 13) halves unevenly."""
    cfg = UNET_NARROW_XL[name]
    ours, theirs, config, ours_sd, theirs_sd = unet_diffusers_twin(cfg)
    assert config["addition_embed_type"] == "text_time"
    assert config_from_diffusers(config) == cfg
    back = convert_diffusers(theirs_sd, cfg)
    assert back.keys() == ours_sd.keys() and all(back[k] is ours_sd[k] for k in ours_sd)  # the exact inverse
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, cfg.in_channels, *size, generator=g)
    t, ctx = torch.tensor([999.0, 250.5]), torch.randn(2, 77, cfg.context_dim, generator=g)
    pooled, time_ids = torch.randn(2, 1280, generator=g), torch.tensor(SDXL_TIME_IDS[name])
    with torch.no_grad():
        out = ours(x, t, ctx, adm_vector(pooled, time_ids))
        ref = theirs(x, t, encoder_hidden_states=ctx,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, **parity_tolerance(ref))


def test_y_is_required_checked_and_used():
    cfg = replace(PRESETS["tiny"], adm_in_channels=24)
    model = randomize_(UNetModel(cfg)).eval()
    assert [k for k in model.state_dict() if k.startswith("label_emb")] == [
        "label_emb.0.0.weight", "label_emb.0.0.bias", "label_emb.0.2.weight", "label_emb.0.2.bias"]
    g = torch.Generator().manual_seed(0)
    x, ctx, t, y = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g), 500, torch.randn(2, 24)
    with torch.no_grad():
        with pytest.raises(ValueError, match="needs y"):
            model(x, t, ctx)
        for bad in (torch.randn(2, 23), torch.randn(1, 24), torch.randn(24)):
            with pytest.raises(ValueError, match=r"\[2, 24\]"):
                model(x, t, ctx, bad)
        with pytest.raises(ValueError, match="takes no vector y"):
            randomize_(UNetModel(PRESETS["tiny"]))(x, t, ctx, y)
        out = model(x, t, ctx, y)
        assert (model(x, t, ctx, y.flip(0)) - out).abs().max() > 0.01  # y reaches the output
        # emb = time_embed(t) + label_emb(y): with label_emb's last layer giving zero, y drops out
        model.label_emb[0][2].weight.zero_()
        model.label_emb[0][2].bias.zero_()
        plain = UNetModel(PRESETS["tiny"]).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("label_emb")})
        torch.testing.assert_close(model(x, t, ctx, y), plain(x, t, ctx), rtol=0, atol=0)


def test_infer_config_reads_depths_and_adm():
    """Per-level and middle depths and the y width come back from the keys of a model of each form; the head split
    and image_size are not in the file (infer_config's documented guesses), so they are left out here."""
    guessed = ("num_heads", "num_head_channels", "image_size")
    cases = [*PRESETS.values(), *UNET_NARROW.values(), *UNET_NARROW_XL.values(),
             replace(PRESETS["tiny"], transformer_depth_middle=3),
             replace(PRESETS["small"], transformer_depth=(0, 1, 2), transformer_depth_middle=3),
             replace(PRESETS["small"], transformer_depth=(0, 3, 2)),
             replace(PRESETS["small"], adm_in_channels=40)]
    for cfg in cases:
        with torch.device("meta"):
            got = infer_config(UNetModel(cfg).state_dict())
        assert replace(got, **{k: getattr(cfg, k) for k in guessed}) == cfg, cfg
    # where the depths are uniform, the int form comes back, whatever form went in
    with torch.device("meta"):
        assert infer_config(UNetModel(replace(PRESETS["small"], transformer_depth=(5, 1, 1))).state_dict()) == \
            replace(PRESETS["small"], transformer_depth=1, num_heads=8, num_head_channels=-1, image_size=64)


def test_depth_config_errors():
    for bad in (dict(transformer_depth=(1, 2, 3)), dict(transformer_depth=(1, 0)), dict(transformer_depth_middle=0)):
        with pytest.raises(ValueError, match="transformer_depth"):
            UNetModel(replace(PRESETS["tiny"], **bad))
    model = UNetModel(replace(PRESETS["tiny"], transformer_depth=(0, 2)))  # level 0 has no attention: 0 is fine
    assert len(model.middle_block[1].transformer_blocks) == 2  # the middle takes the last level's depth


def test_config_from_diffusers_refuses_other_conditioning():
    base = SDXL_DIFFUSERS["sdxl"]
    for extra in (dict(class_embed_type="projection"), dict(addition_embed_type="image"), dict(num_class_embeds=10),
                  dict(addition_time_embed_dim=128), dict(reverse_transformer_layers_per_block=[[10, 10, 10]]),
                  dict(transformer_layers_per_block=[1, [2, 1], 10])):
        with pytest.raises(ValueError):
            config_from_diffusers(dict(base, **extra))
