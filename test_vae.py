"""Tests for vae.py: full-size key layouts vs checkpoint manifests, parity with diffusers golden tensors
(fixtures/gen_vae.py), conversion round trips, distribution maths and strict-loading errors."""
import json
import math

import pytest
import torch

import checkpoint
import vae
from testutil import (FIXTURES, MIN_INDEX_MARGIN, VAE_NARROW, index_margin, manifest as read_manifest, randomize_,
                      vae_diffusers_config, vae_to_diffusers)

MANIFESTS = {"sd": "sd-vae", "kl-f8": "ldm-kl-f8", "vq-f4": "ldm-vq-f4", "vq-f4-noattn": "ldm-vq-f4-noattn"}
FIX = torch.load(FIXTURES / "vae_parity.pt", weights_only=True)


def manifest(name: str) -> dict:
    """The autoencoder keys of a public first-stage file: what the loader keeps (not its loss.* or EMA entries)."""
    return {k: v for k, v in read_manifest(MANIFESTS[name]).items() if not checkpoint.is_ignored(k)}


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    # The goldens are diffusers' float32 outputs. Ours and theirs (and either on another CPU, whose vector kernels
    # sum in other orders) differ by float32 rounding accumulated through ~30 convolutions and GroupNorms: a few
    # 1e-6 of the output's scale. 1e-4 of the largest output keeps 10x headroom on any machine; a real mismatch
    # (padding, upsampling, attention scale) moves outputs by O(0.1).
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def model(name: str):
    return randomize_(vae.build_autoencoder(VAE_NARROW[name])).eval()


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("preset", list(MANIFESTS))
def test_full_size_layout_matches_manifest(preset):
    with torch.device("meta"):
        m = vae.build_autoencoder(vae.PRESETS[preset])
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    ref = manifest(preset)
    assert list(ours) == list(ref)  # same keys in the same order
    assert ours == ref


@pytest.mark.parametrize("preset", list(MANIFESTS))
def test_infer_config_from_manifest(preset):
    sd = {k: torch.empty(s, device="meta") for k, s in manifest(preset).items()}
    assert vae.infer_config(sd) == vae.PRESETS[preset]


@pytest.mark.parametrize("preset", [p for p in vae.PRESETS if p not in MANIFESTS])
def test_infer_config_round_trips_other_presets(preset):
    cfg = vae.PRESETS[preset]
    with torch.device("meta"):
        sd = vae.build_autoencoder(cfg).state_dict()
    got = vae.infer_config(sd, resolution=cfg.resolution)
    assert got == vae.replace(cfg, scale_factor=got.scale_factor)


@pytest.mark.parametrize("preset", ["tiny-kl", "tiny-vq"])
def test_tiny_presets_run(preset):
    m = vae.build_autoencoder(vae.PRESETS[preset]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        recon = m(x)[0]
        lat = m.encode(x)
    assert recon.shape == x.shape
    lat = lat.mode() if isinstance(lat, vae.DiagonalGaussianDistribution) else lat
    assert lat.shape == (2, vae.PRESETS[preset].embed_dim, 16, 16)


# ----------------------------------------------------------------------------- parity with diffusers

@pytest.mark.parametrize("name", ["kl", "klattn"])  # klattn: attention inside a level (kl-f16/kl-f32 style)
def test_kl_parity(name):
    m = model(name)
    with torch.no_grad():
        post = m.encode(FIX[f"{name}_x"])
        close(post.mean, FIX[f"{name}_mean"])
        close(post.logvar, FIX[f"{name}_logvar"])
        close(m.decode(FIX[f"{name}_z"]), FIX[f"{name}_dec"])


@pytest.mark.parametrize("name", ["vq", "vqna"])
def test_vq_parity(name):
    m = model(name)
    with torch.no_grad():
        h = m.encode(FIX[f"{name}_x"])
        close(h, FIX[f"{name}_h"])
        # exact indices are a fair demand only where no float32 rounding can swap the two nearest codes
        assert index_margin(FIX[f"{name}_h"], m.quantize.embedding.weight) > MIN_INDEX_MARGIN
        quant, loss, (_, _, idx) = m.quantize(FIX[f"{name}_h"])
        assert torch.equal(idx, FIX[f"{name}_indices"])
        close(quant, FIX[f"{name}_quant"])
        close(loss, FIX[f"{name}_loss"])
        close(m.decode(FIX[f"{name}_h"]), FIX[f"{name}_dec"])
        close(m.decode_code(idx.reshape(1, *h.shape[2:])), FIX[f"{name}_dec"])


@pytest.mark.parametrize("name", list(VAE_NARROW))
def test_config_from_diffusers(name):
    assert vae.config_from_diffusers(json.loads(FIX[f"{name}_config"])) == VAE_NARROW[name]


@pytest.mark.parametrize("name", ["kl", "vq", "vqna"])  # layouts diffusers' own single-file converter covers
def test_convert_diffusers_is_exact_inverse(name):
    sd = model(name).state_dict()
    dsd = vae_to_diffusers(sd, vae_diffusers_config(VAE_NARROW[name]))
    back = vae.convert_diffusers(dsd)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    m = vae.autoencoder_from_state_dict(back, vae.config_from_diffusers(json.loads(FIX[f"{name}_config"])))
    assert isinstance(m, vae.VQModel if VAE_NARROW[name].is_vq else vae.AutoencoderKL)


def test_convert_diffusers_legacy_attention_names():
    # Older diffusers folders name the VAE attention query/key/value/proj_attn.
    c = 64
    dsd = {f"encoder.mid_block.attentions.0.{n}.weight": torch.randn(c, c) for n in ("query", "key", "value")}
    dsd["encoder.mid_block.attentions.0.proj_attn.weight"] = torch.randn(c, c)
    dsd["decoder.up_blocks.0.resnets.2.conv_shortcut.bias"] = torch.randn(c)
    dsd["encoder.down_blocks.1.downsamplers.0.conv.weight"] = torch.randn(c, c, 3, 3)
    dsd["decoder.up_blocks.1.upsamplers.0.conv.weight"] = torch.randn(c, c, 3, 3)
    dsd["encoder.down_blocks.3.resnets.0.norm1.weight"] = torch.randn(c)
    out = vae.convert_diffusers(dsd)
    q = dsd["encoder.mid_block.attentions.0.query.weight"]
    assert torch.equal(out["encoder.mid.attn_1.q.weight"][:, :, 0, 0], q)
    assert out["encoder.mid.attn_1.proj_out.weight"].shape == (c, c, 1, 1)
    # 4 levels: diffusers up_blocks.0 is our up.3 (lowest resolution).
    assert "decoder.up.3.block.2.nin_shortcut.bias" in out
    assert "decoder.up.2.upsample.conv.weight" in out
    assert "encoder.down.1.downsample.conv.weight" in out
    # A name with no counterpart keeps its leaf, so a strict load names it.
    odd = vae.convert_diffusers({"encoder.down_blocks.0.resnets.0.time_emb_proj.weight": torch.zeros(1)})
    assert list(odd) == ["encoder.down.0.block.0.time_emb_proj.weight"]


# ----------------------------------------------------------------------------- maths

def test_distribution_maths():
    mean = torch.zeros(2, 4, 3, 3)
    std_normal = vae.DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], 1))
    assert torch.equal(std_normal.kl(), torch.zeros(2))
    assert torch.allclose(std_normal.kl(std_normal), torch.zeros(2))
    clamp = vae.DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, 100.0)], 1))
    assert clamp.logvar.max() == 20.0 and torch.allclose(clamp.var, torch.exp(torch.tensor(20.0)))
    clamp = vae.DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -100.0)], 1))
    assert clamp.logvar.min() == -30.0
    p = vae.DiagonalGaussianDistribution(torch.cat([torch.ones_like(mean), torch.zeros_like(mean)], 1))
    assert torch.allclose(p.kl(), torch.full((2,), 0.5 * 36))  # 0.5 * sum(mean^2) over 4*3*3 elements
    assert torch.equal(p.mode(), torch.ones_like(mean))
    a = p.sample(torch.Generator().manual_seed(3))
    b = p.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, p.mean)


def test_vq_straight_through_gradient_reaches_encoder():
    m = vae.build_autoencoder(vae.PRESETS["tiny-vq"])
    x = torch.randn(1, 3, 32, 32)
    recon, emb_loss = m(x)
    (recon.pow(2).mean() + emb_loss).backward()
    assert m.encoder.conv_in.weight.grad is not None and m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.quantize.embedding.weight.grad.abs().sum() > 0  # codebook term


def test_vq_loss_is_legacy_ordering():
    torch.manual_seed(0)
    q = vae.VectorQuantizer(4, 2, beta=0.25)
    z = torch.randn(1, 2, 3, 3, requires_grad=True)
    z_q, loss, (_, _, idx) = q(z)
    e = q.embedding.weight[idx].reshape(1, 3, 3, 2).permute(0, 3, 1, 2)
    torch.testing.assert_close(loss, 1.25 * (e - z).pow(2).mean())
    torch.testing.assert_close(z_q, e)  # z + (e - z): equal up to one rounding
    loss.backward()
    # d/dz of ||sg[e] - z||^2 (weight 1): the beta term only reaches the codebook.
    torch.testing.assert_close(z.grad, 2 * (z - e).detach() / z.numel())


# ----------------------------------------------------------------------------- loading

def test_from_state_dict_assigns_without_copy_and_ignores_loss_keys():
    src = model("kl")
    sd = dict(src.state_dict())
    sd["loss.logvar"] = torch.zeros(())
    sd["model_ema.decay"] = torch.tensor(0.999)
    m = vae.autoencoder_from_state_dict(sd)
    assert m.encoder.conv_in.weight.data_ptr() == sd["encoder.conv_in.weight"].data_ptr()
    assert isinstance(m, vae.AutoencoderKL) and m.scale_factor == 0.18215
    with torch.no_grad():
        close(m.encode(FIX["kl_x"]).mean, FIX["kl_mean"])


def test_from_state_dict_errors_name_keys():
    sd = dict(model("vq").state_dict())
    extra = dict(sd, **{"encoder.bogus.weight": torch.zeros(1)})
    with pytest.raises(checkpoint.CheckpointError, match=r"^autoencoder state dict does not fit the model; "
                                                         r"unexpected: encoder\.bogus\.weight$"):
        vae.autoencoder_from_state_dict(extra)
    missing = dict(sd)
    del missing["decoder.up.1.block.2.conv1.bias"]
    with pytest.raises(ValueError, match=r"; missing: decoder\.up\.1\.block\.2\.conv1\.bias$"):
        vae.autoencoder_from_state_dict(missing, VAE_NARROW["vq"])  # a CheckpointError is a ValueError
    bad = dict(sd, **{"quant_conv.bias": torch.zeros(5)})
    with pytest.raises(checkpoint.CheckpointError, match=r"; shape mismatch: quant_conv\.bias \(5,\) vs \(3,\)$"):
        vae.autoencoder_from_state_dict(bad)
    many = {k: v for k, v in sd.items() if not k.startswith("decoder.up.")}
    n = sum(k.startswith("decoder.up.") for k in sd)
    with pytest.raises(checkpoint.CheckpointError, match=rf"^my_vae.ckpt does not fit the model; missing: "
                                                         rf"decoder\.up\.0\.[^;]* \.\.\. \({n} in all\)$"):
        vae.autoencoder_from_state_dict(many, VAE_NARROW["vq"], what="my_vae.ckpt")


def test_load_autoencoder_files(tmp_path):
    import safetensors.torch as safetensors
    src = model("kl")
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    # Standalone VAE .safetensors with a scale_factor in its metadata.
    safetensors.save_file(sd, str(tmp_path / "vae.safetensors"), metadata={"format": "pt", "scale_factor": "0.5"})
    m = vae.load_autoencoder(str(tmp_path / "vae.safetensors"))
    assert m.scale_factor == 0.5
    # LDM first-stage checkpoint: Lightning wrapper plus loss.* keys.
    torch.save({"state_dict": dict(sd, **{"loss.logvar": torch.zeros(())}), "global_step": 1}, tmp_path / "model.ckpt")
    m2 = vae.load_autoencoder(str(tmp_path / "model.ckpt"))
    # Diffusers vae/ folder.
    folder = tmp_path / "vae"
    folder.mkdir()
    dconfig = vae_diffusers_config(VAE_NARROW["kl"])
    dsd = {k: v.contiguous() for k, v in vae_to_diffusers(sd, dconfig).items()}
    safetensors.save_file(dsd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(dconfig, scaling_factor=0.25)))
    m3 = vae.load_autoencoder(str(folder))
    assert m3.scale_factor == 0.25
    with torch.no_grad():
        for mm in (m, m2, m3):
            close(mm.encode(FIX["kl_x"]).mean, FIX["kl_mean"])


# ----------------------------------------------------------------------------- training helpers

def _quantizer(codes: list[list[float]]) -> vae.VectorQuantizer:
    q = vae.VectorQuantizer(len(codes), len(codes[0]))
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor(codes))
    return q


def _as_map(flat: torch.Tensor) -> torch.Tensor:
    """(4, C) vectors -> (1, C, 2, 2) map whose (h, w) raster order is the row order."""
    return flat.reshape(1, 2, 2, -1).permute(0, 3, 1, 2)


def test_codebook_stats_and_quantizer_perplexity():
    ppl, used = vae.codebook_stats(torch.arange(8), 8)
    assert ppl.item() == pytest.approx(8.0, rel=1e-5) and used.item() == 8
    ppl, used = vae.codebook_stats(torch.full((10,), 3), 8)
    assert ppl.item() == pytest.approx(1.0, rel=1e-5) and used.item() == 1
    ppl, _ = vae.codebook_stats(torch.tensor([1, 1, 5, 5]), 8)
    assert ppl.item() == pytest.approx(2.0, rel=1e-5)
    q = _quantizer([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    _, _, (ppl, _, idx) = q(_as_map(torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.2, 0.9], [0.0, -0.1]])))
    assert idx.tolist() == [0, 1, 2, 0]
    assert ppl.item() == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))), rel=1e-5)


def test_vqmodel_returns_indices_and_last_layer():
    m = vae.build_autoencoder(vae.PRESETS["tiny-vq"])
    recon, loss, idx = m(torch.randn(2, 3, 32, 32), return_pred_indices=True)
    assert idx.shape == (2 * 8 * 8,) and idx.dtype == torch.long and recon.shape == (2, 3, 32, 32)
    assert m.get_last_layer() is m.decoder.conv_out.weight


def test_codebook_ema_one_step_by_hand():
    codes = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]
    q = _quantizer(codes)
    ema = vae.CodebookEMA(q, decay=0.9, eps=1e-5)
    assert not q.embedding.weight.requires_grad  # EMA replaces the codebook's gradient step
    flat = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.2, 0.9], [0.0, -0.1]])
    _, _, (_, _, idx) = q(_as_map(flat))
    stats = ema.update(_as_map(flat), idx)
    # counts [2, 1, 1, 0]; cluster sizes 0.9 * 1 + 0.1 * counts; averages 0.9 * code + 0.1 * sum of assigned vectors.
    size = torch.tensor([1.1, 1.0, 1.0, 0.9])
    avg = 0.9 * torch.tensor(codes) + 0.1 * torch.tensor([[0.1, -0.1], [0.9, 0.1], [0.2, 0.9], [0.0, 0.0]])
    smoothed = (size + 1e-5) / (4.0 + 4e-5) * 4.0
    torch.testing.assert_close(q.embedding.weight, avg / smoothed[:, None])
    torch.testing.assert_close(q.embedding.weight[1], torch.tensor([0.99, 0.01]), atol=1e-4, rtol=0)
    # Each used code moved towards the mean of its assigned vectors; the unused one stayed (up to smoothing).
    means = torch.tensor([[0.05, -0.05], [0.9, 0.1], [0.2, 0.9]])
    assert ((q.embedding.weight[:3] - means).norm(dim=1) < (torch.tensor(codes[:3]) - means).norm(dim=1)).all()
    torch.testing.assert_close(q.embedding.weight[3], torch.tensor([5.0, 5.0]), atol=1e-3, rtol=0)
    assert stats["codes_used"].item() == 3 and stats["codes_restarted"].item() == 0
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    ema2 = vae.CodebookEMA(_quantizer(codes))
    ema2.load_state_dict(state)
    assert all(torch.equal(getattr(ema2, k), v) for k, v in state.items())


def test_dead_codes_restart_at_encoder_outputs():
    q = _quantizer([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [-10.0, -10.0]])
    helper = vae.CodebookEMA(q, ema=False, restart_after=2)
    assert q.embedding.weight.requires_grad  # without EMA the optimiser still trains the codebook
    flat = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.2, 0.1], [1.1, -0.1]])  # only codes 0 and 1 are ever nearest
    z = _as_map(flat)
    before = q.embedding.weight.detach().clone()
    stats = helper.update(z, q(z)[2][2], generator=torch.Generator().manual_seed(0))
    assert stats["codes_restarted"].item() == 0 and torch.equal(q.embedding.weight, before)
    stats = helper.update(z, q(z)[2][2], generator=torch.Generator().manual_seed(0))
    assert stats["codes_restarted"].item() == 2
    w = q.embedding.weight.detach()
    assert torch.equal(w[:2], before[:2])
    for row in (2, 3):
        assert not torch.equal(w[row], before[row])
        assert (w[row] == flat).all(dim=1).any()  # exactly one of the batch's encoder outputs
    assert helper.unused_steps.tolist() == [0, 0, 0, 0]


def test_codebook_ema_keeps_model_keys_and_trains():
    torch.manual_seed(0)
    m = vae.build_autoencoder(vae.PRESETS["tiny-vq"])
    keys = list(m.state_dict())
    helper = vae.CodebookEMA(m.quantize, restart_after=1)
    assert list(m.state_dict()) == keys  # EMA state lives outside the model
    x = torch.randn(2, 3, 32, 32)
    h = m.encode(x)
    quant, loss, (ppl, _, idx) = m.quantize(h)
    before = m.quantize.embedding.weight.clone()
    stats = helper.update(h, idx, generator=torch.Generator().manual_seed(0))
    assert stats["perplexity"].item() == pytest.approx(ppl.item())
    assert stats["codes_used"].item() + stats["codes_restarted"].item() == 64  # every unused code was restarted
    assert not torch.equal(m.quantize.embedding.weight, before)
    loss.backward()
    assert m.quantize.embedding.weight.grad is None and m.encoder.conv_in.weight.grad.abs().sum() > 0


def test_estimate_scale_factor_kl(monkeypatch):
    m = vae.build_autoencoder(vae.PRESETS["tiny-kl"])
    sigma, mu = 2.5, 0.3
    sizes = []

    def encode(x):
        sizes.append(x.shape[0])
        moments = torch.cat([torch.full((x.shape[0], 4, 16, 16), mu),
                             torch.full((x.shape[0], 4, 16, 16), math.log(sigma ** 2))], 1)
        return vae.DiagonalGaussianDistribution(moments)

    monkeypatch.setattr(m, "encode", encode)
    batches = [torch.zeros(4, 3, 64, 64) for _ in range(5)]
    got = vae.estimate_scale_factor(m, batches, max_images=10, generator=torch.Generator().manual_seed(1))
    assert sizes == [4, 4, 2]
    g = torch.Generator().manual_seed(1)
    z = torch.cat([mu + sigma * torch.randn(n, 4, 16, 16, generator=g) for n in sizes])
    assert got == pytest.approx(1.0 / z.flatten().double().std().item(), rel=1e-9)  # the same draws, pooled
    assert got == pytest.approx(1.0 / sigma, rel=0.03)


def test_estimate_scale_factor_vq_uses_continuous_latents(monkeypatch):
    m = vae.build_autoencoder(vae.PRESETS["tiny-vq"])
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(m, "encode", lambda x: 1.0 + 0.4 * torch.randn(x.shape[0], 3, 16, 16, generator=g))
    batches = [(torch.zeros(8, 3, 64, 64), "label") for _ in range(3)]  # (images, ...) tuples are accepted
    assert vae.estimate_scale_factor(m, batches) == pytest.approx(1 / 0.4, rel=0.03)


def test_estimate_scale_factor_is_deterministic():
    torch.manual_seed(0)
    m = vae.build_autoencoder(vae.PRESETS["tiny-kl"]).train()
    x = torch.randn(2, 3, 32, 32)
    a, b = vae.estimate_scale_factor(m, [x]), vae.estimate_scale_factor(m, x)
    assert a == b and math.isfinite(a) and a > 0 and m.training


# ----------------------------------------------------------------------------- tiled decode

LAT, TILE, OVERLAP = 48, 16, 4  # 48 x 48 latents in 3 x 3 tiles of 16, each decoded with 4 latents of context


def tiny(preset: str):
    return randomize_(vae.build_autoencoder(vae.PRESETS[preset])).eval()


def seam_ratio(out: torch.Tensor, ref: torch.Tensor, seams: list[int], strip: int) -> float:
    """Largest ratio, over seams and both axes, of the mean |pixel-to-pixel step| of `out` to that of `ref` at the same
    place: across the core edge (pixel s-1 -> s) and averaged over the blend strip s - strip .. s + strip."""
    ratios = []
    for dim in (2, 3):
        step_out, step_ref = (im.diff(dim=dim).abs().mean([a for a in range(4) if a != dim]) for im in (out, ref))
        for s in seams:
            ratios.append(step_out[s - 1] / step_ref[s - 1])
            band = slice(s - strip - 1, s + strip)
            ratios.append(step_out[band].mean() / step_ref[band].mean())
    return max(ratios).item()


@pytest.mark.parametrize("preset", ["tiny-kl", "tiny-vq"])
def test_tiled_decode_within_one_tile_is_the_plain_decode(preset):
    torch.manual_seed(0)
    m = tiny(preset)
    z = torch.randn(2, m.cfg.embed_dim, 20, 12)
    with torch.no_grad():
        ref = m.decode(z)
        assert torch.equal(m.decode(z, tile=20, overlap=4), ref)  # tile >= latent size
        assert torch.equal(m.decode(z, tile=12, overlap=4), ref)  # 20 <= 12 + 2 * 4: fits in one tile with its context


@pytest.mark.parametrize("shape, overlap", [((48, 48), 4), ((17, 40), 7), ((40, 33), 0)])
def test_tiles_cover_the_image_with_weights_summing_to_one(shape, overlap, monkeypatch):
    # A pixelwise stand-in for the up levels decodes every tile exactly, so any difference from the one-pass result
    # comes from where the tiles are written or how they are weighted. (17, 40): cores of 8 and 9 latents, narrower
    # than their 14-latent blend strips; overlap 0: hard cuts.
    torch.manual_seed(0)
    dec = tiny("tiny-kl").decoder
    h = torch.randn(2, 5, *shape)
    sizes = []

    def pixelwise(x):
        sizes.append(x.shape[-2:])
        return 2 * x.repeat_interleave(4, 2).repeat_interleave(4, 3) + 1  # f = 4

    monkeypatch.setattr(dec, "forward_up", pixelwise)
    out = dec.forward_up_tiled(h, TILE, overlap)
    torch.testing.assert_close(out, pixelwise(h), rtol=0, atol=1e-5)
    assert max(max(s) for s in sizes[:-1]) <= TILE + 2 * overlap  # what bounds the memory


@pytest.mark.parametrize("preset, mean_tol, far_tol", [("tiny-kl", 0.045, 0.35), ("tiny-vq", 0.05, 0.4)])
def test_tiled_decode_is_close_to_the_plain_decode(preset, mean_tol, far_tol):
    # Not equal: each tile's GroupNorms in the up levels normalise with that tile's statistics. Measured on this
    # stationary N(0, 1) latent (outputs have std ~0.6): mean |diff| 0.037 (kl) / 0.041 (vq); max |diff| outside the
    # blend strips 0.29 / 0.38. Cutting the same tiles without context or blending (overlap 0) gives 0.108 / 0.146.
    torch.manual_seed(0)
    m = tiny(preset)
    z = torch.randn(1, m.cfg.embed_dim, LAT, LAT)
    with torch.no_grad():
        ref, out, cut = m.decode(z), m.decode(z, tile=TILE, overlap=OVERLAP), m.decode(z, tile=TILE, overlap=0)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    diff = (out - ref).abs()
    px = torch.arange(LAT * 4) + 0.5  # output pixel centres, f = 4
    away = torch.stack([(px - s).abs() for s in (TILE * 4, 2 * TILE * 4)]).min(0).values > OVERLAP * 4
    assert diff.mean() < mean_tol
    assert diff[..., away[:, None] & away[None, :]].max() < far_tol
    assert (cut - ref).abs().mean() > 2 * diff.mean()  # the context and the blending are what keep it close


def test_tiled_decode_has_no_visible_seams():
    # On a smooth latent a seam would stand out against small pixel-to-pixel steps. Measured: the steps across the
    # seams are 1.26x those of the one-pass image at the same places (<= 1.31x over other draws); hard cuts give 8.2x.
    torch.manual_seed(0)
    m = tiny("tiny-kl")
    z = 2 * torch.nn.functional.interpolate(torch.randn(1, 4, 8, 8), size=(LAT, LAT), mode="bicubic")
    with torch.no_grad():
        ref, out, cut = m.decode(z), m.decode(z, tile=TILE, overlap=OVERLAP), m.decode(z, tile=TILE, overlap=0)
    seams = [TILE * 4, 2 * TILE * 4]
    assert seam_ratio(out, ref, seams, OVERLAP * 4) < 1.5
    assert seam_ratio(cut, ref, seams, 4) > 3  # the statistic does see a seam


def test_tiled_decode_keeps_dtype():
    # The blend adds no error beyond bfloat16 rounding: measured mean |bf16 - fp32| 0.0054 tiled, 0.0056 one-pass.
    torch.manual_seed(0)
    m = tiny("tiny-kl")
    z = torch.randn(1, 4, LAT, LAT - 8)
    with torch.no_grad():
        ref = m.decode(z, tile=TILE, overlap=OVERLAP)
        out = m.to(torch.bfloat16).decode(z.bfloat16(), tile=TILE, overlap=OVERLAP)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().mean() < 0.01


def test_attention_is_softmax_of_scaled_scores():
    # The block hands SDPA contiguous q/k/v (a fused kernel that never holds the (HW, HW) scores); same numbers as
    # the written-out formula.
    torch.manual_seed(0)
    attn = vae.AttnBlock(64)
    x = torch.randn(2, 64, 12, 10)
    with torch.no_grad():
        h = attn.norm(x)
        q, k, v = (m(h).flatten(2) for m in (attn.q, attn.k, attn.v))  # (B, C, HW)
        w = torch.softmax(q.transpose(1, 2) @ k / 64 ** 0.5, dim=-1)  # (B, HW, HW)
        ref = x + attn.proj_out((v @ w.transpose(1, 2)).reshape(x.shape))
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile, overlap, match", [(0, 0, "tile must be a positive int"),
                                                  (16.0, 4, "tile must be a positive int"),
                                                  (16, -1, "overlap must be an int >= 0"),
                                                  (16, 8, r"tile must be > 2 \* overlap"),
                                                  (64, 16.5, "overlap must be an int >= 0")])
def test_tile_argument_errors(tile, overlap, match):
    m = tiny("tiny-kl")
    with pytest.raises(ValueError, match=match) as err:
        m.decode(torch.zeros(1, 4, 8, 8), tile=tile, overlap=overlap)  # checked even where one tile would do
    assert "\n" not in str(err.value)
