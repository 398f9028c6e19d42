"""Tests for unet.py: full-size key layouts, timestep embedding and forward parity against diffusers goldens
(fixtures/gen_unet.py), the diffusers-layout conversion, and gradient checkpointing."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from unet import (PRESETS, CrossAttention, UNetConfig, UNetModel, config_from_diffusers, convert_diffusers,
                  diffusers_prefixes, infer_config, timestep_embedding)

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "model.diffusion_model."

# Reduced width, real structure: 4 levels (1, 2, 4, 4), 2 ResBlocks each, attention at 4, 2, 1.
SD1_NARROW = replace(PRESETS["sd1"], model_channels=32, context_dim=40)  # 8 heads of 4..16 channels, conv proj
SD2_NARROW = replace(PRESETS["sd2"], model_channels=32, num_head_channels=8, context_dim=48)  # linear proj
PARITY = {"sd1": SD1_NARROW, "sd2": SD2_NARROW}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic non-trivial weights (shared with fixtures/gen_unet.py): weights ~ N(0, 1/fan_in),
    norm scales 1 + 0.1 N, biases 0.02 N, filled in sorted key order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif p.ndim == 1:  # GroupNorm / LayerNorm scale
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model


def manifest_unet(name: str) -> dict[str, list]:
    manifest = json.loads((FIXTURES / "manifests" / name).read_text())
    return {k[len(PREFIX):]: v for k, v in manifest.items() if k.startswith(PREFIX)}


@pytest.mark.parametrize("preset,manifest", [("sd1", "sd15.json"), ("sd2", "sd21-768-v.json")])
def test_full_size_layout_matches_checkpoint(preset, manifest):
    ref = manifest_unet(manifest)
    with torch.device("meta"):
        model = UNetModel(PRESETS[preset])
    sd = model.state_dict()
    assert set(sd) == set(ref)
    for k, (shape, dtype) in ref.items():
        assert list(sd[k].shape) == shape, k
        assert str(sd[k].dtype) == f"torch.{dtype}", k
    # hyper-parameters read back from the real file's shapes
    shapes = {k: torch.empty(shape, device="meta") for k, (shape, _) in ref.items()}
    assert infer_config(shapes) == PRESETS[preset]


def test_timestep_embedding_matches_diffusers():
    ref = torch.load(FIXTURES / "unet_timestep.pt", weights_only=True)
    for dim in (320, 33):
        out = timestep_embedding(ref["t"], dim)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref[f"emb{dim}"], rtol=1e-5, atol=1e-5)
    assert timestep_embedding(torch.tensor(0.0), 8)[0, :4].tolist() == [1.0] * 4  # cos first: cos(0) = 1


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_forward_matches_diffusers(name):
    ref = torch.load(FIXTURES / f"unet_{name}.pt", weights_only=True)
    model = randomize_(UNetModel(PARITY[name])).eval()
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["context"])
    torch.testing.assert_close(out, ref["out"], rtol=1e-4, atol=1e-4 * ref["out"].abs().max().item())


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_channels_last_weights_give_the_same_output(name):
    """sample.py and train.py --channels-last convert the weights to NHWC; the numbers must not change."""
    ref = torch.load(FIXTURES / f"unet_{name}.pt", weights_only=True)
    model = randomize_(UNetModel(PARITY[name])).eval().to(memory_format=torch.channels_last)
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["context"])
    torch.testing.assert_close(out, ref["out"], rtol=1e-4, atol=1e-4 * ref["out"].abs().max().item())
    assert list(model.state_dict()) == list(randomize_(UNetModel(PARITY[name])).state_dict())


def test_scalar_timestep_broadcasts():
    model = randomize_(UNetModel(PRESETS["tiny"])).eval()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 500, ctx), model(x, torch.tensor([500, 500]), ctx))


def test_convert_diffusers_inverts_reference_converter():
    # unet_diffusers_keys.json: {diffusers key: original key} as diffusers' own single-file converter maps them
    mapping = json.loads((FIXTURES / "unet_diffusers_keys.json").read_text())
    for name, cfg in PARITY.items():
        sd = randomize_(UNetModel(cfg)).state_dict()
        theirs = {d: sd[o] for d, o in mapping.items()}
        assert len(theirs) == len(sd)
        ours = convert_diffusers(theirs, cfg)
        assert ours.keys() == sd.keys()
        assert all(ours[k] is sd[k] for k in sd)
        UNetModel(cfg).load_state_dict(ours, strict=True)


@pytest.mark.parametrize("preset", ["sd1", "sd2", "tiny"])
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
    for name, cfg in PARITY.items():
        assert config_from_diffusers(fixture_cfgs[name]) == replace(cfg, image_size=fixture_cfgs[name]["sample_size"])


def test_gradient_checkpointing_same_output_and_grads():
    cfg = replace(PRESETS["tiny"], dropout=0.1)
    model = randomize_(UNetModel(cfg)).train()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
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


def test_tiny_preset_is_fast_and_shaped():
    model = UNetModel(PRESETS["tiny"]).eval()
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 2]), torch.randn(2, 77, 32))
    assert out.shape == x.shape and isinstance(model.cfg, UNetConfig)


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
