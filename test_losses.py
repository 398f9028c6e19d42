"""Tests for losses.py: full-size `loss.*` layouts vs the LDM first-stage manifests, LPIPS loading from torchvision /
lpips / LDM layouts against a hand-written VGG pass, GAN helpers on known values, the KL and VQ autoencoder losses
end to end on tiny models, and psnr/ssim against hand-computed values."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import losses
import vae
from testutil import manifest, random_weights

CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision VGG16 `features` conv indices
TAPS = (3, 8, 15, 22, 29)  # ReLU outputs LPIPS compares
WIDTH = 8  # VGG channels 8, 16, 32, 64, 64 instead of 64 ... 512



def vgg_state_dict(width: int = WIDTH, seed: int = 0) -> dict:
    """torchvision-format VGG16 weights (features.N.*, plus a classifier entry loaders must skip), random."""
    shapes, c_in = {}, 3
    widths = [1, 1, 2, 2, 4, 4, 4, 8, 8, 8, 8, 8, 8]
    for idx, m in zip(CONV_IDX, widths):
        shapes[f"features.{idx}.weight"], shapes[f"features.{idx}.bias"] = (m * width, c_in, 3, 3), (m * width,)
        c_in = m * width
    shapes["classifier.0.weight"] = (4, 4)
    return random_weights(shapes, seed)


def lin_state_dict(width: int = WIDTH, seed: int = 1) -> dict:
    """The lpips package's vgg.pth layout: 1x1 weights, non-negative (the magnitudes of random weights)."""
    mults = (1, 2, 4, 8, 8)
    shapes = {f"lin{k}.model.1.weight": (1, m * width, 1, 1) for k, m in enumerate(mults)}
    return {k: v.abs() for k, v in random_weights(shapes, seed).items()}


def reference_lpips(x: torch.Tensor, y: torch.Tensor, vgg: dict, lin: dict) -> torch.Tensor:
    """LPIPS written out with F.conv2d on the torchvision weights: scale, VGG taps, unit-normalise, weight, average."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(h):
        out = []
        for i in range(30):
            if i in CONV_IDX:
                h = F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1)
            elif i in (4, 9, 16, 23):
                h = F.max_pool2d(h, 2)
            else:
                h = F.relu(h)
            if i in TAPS:
                out.append(h)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps((x - shift) / scale), taps((y - shift) / scale))):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total = total + ((a - b) ** 2 * lin[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total  # (B,)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    torch.save(vgg_state_dict(), d / "vgg16.pth")
    checkpoint.save_safetensors(d / "lin.safetensors", lin_state_dict())
    return str(d / "vgg16.pth"), str(d / "lin.safetensors")


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("preset,name", [("kl-f8", "ldm-kl-f8"), ("vq-f4", "ldm-vq-f4")])
def test_full_size_loss_layout_matches_manifest(preset, name):
    with torch.device("meta"):
        m = losses.build_loss(preset)
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    ref = manifest(name, prefix="loss.")
    assert list(ours) == list(ref)  # same keys in the same order
    assert ours == ref
    assert m.state_dict()["discriminator.main.3.num_batches_tracked"].dtype == torch.int64


# ----------------------------------------------------------------------------- LPIPS

def test_lpips_from_torchvision_and_lpips_files(lpips_files):
    p = losses.LPIPS.from_pretrained(*lpips_files)
    assert p.loaded and p.chns == [8, 16, 32, 64, 64]
    vgg, lin = vgg_state_dict(), lin_state_dict()
    assert torch.equal(p.state_dict()["net.slice3.12.weight"], vgg["features.12.weight"])
    assert not any(q.requires_grad for q in p.parameters())
    x, y = images(seed=1), images(seed=2)
    d = p(x, y)
    assert d.shape == (2, 1, 1, 1)
    torch.testing.assert_close(d.flatten(), reference_lpips(x, y, vgg, lin), rtol=1e-5, atol=1e-6)
    assert torch.equal(p(x, x), torch.zeros(2, 1, 1, 1))
    torch.testing.assert_close(p(y, x), d)  # symmetric
    assert (d > 0).all()
    p.train()
    assert not p.training and not p.lin0.model[0].training  # dropout stays off
    torch.testing.assert_close(p(x, y), d)


def test_lpips_from_ldm_checkpoint_and_errors(tmp_path, lpips_files):
    ref = losses.LPIPS.from_pretrained(*lpips_files)
    sd = {f"loss.perceptual_loss.{k}": v for k, v in ref.state_dict().items()}
    sd["encoder.conv_in.weight"] = torch.zeros(1)  # the autoencoder part of the file is ignored
    sd["loss.discriminator.main.0.bias"] = torch.zeros(4)
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "model.ckpt")
    p = losses.LPIPS.from_pretrained(tmp_path / "model.ckpt")
    x, y = images(seed=3), images(seed=4)
    torch.testing.assert_close(p(x, y), ref(x, y), rtol=0, atol=0)
    with pytest.raises(checkpoint.CheckpointError, match=r"^LPIPS weights does not fit the model; missing: "
                                                         r"lin0\.model\.1\.weight, lin1\.model\.1\.weight, .*"
                                                         r"lin4\.model\.1\.weight$"):
        losses.LPIPS.from_pretrained(lpips_files[0])  # VGG without the linear layers
    with pytest.raises(ValueError, match="no VGG16 weights"):
        losses.LPIPS.from_pretrained(lpips_files[1])
    with pytest.raises(RuntimeError, match="no weights"):
        losses.LPIPS(WIDTH)(x, y)
    zero = {k: torch.zeros_like(v) if k.startswith("loss.perceptual_loss.lin") else v for k, v in sd.items()}
    with pytest.raises(ValueError, match="all zero"):
        losses.LPIPS.from_pretrained(zero)


def test_lpips_gradient_reaches_input(lpips_files):
    p = losses.LPIPS.from_pretrained(*lpips_files)
    x = images(seed=5).requires_grad_(True)
    p(x, images(seed=6)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- GAN helpers

def test_discriminator_shape_and_init():
    torch.manual_seed(0)
    d = losses.NLayerDiscriminator()
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 32, 16, 8, then two stride-1 4x4 convs: 7, 6
    w = d.main[8].weight
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    assert abs(d.main[9].weight.mean().item() - 1.0) < 0.01 and torch.equal(d.main[9].bias, torch.zeros(512))
    assert d.main[2].bias is None and d.main[11].bias is not None


def test_gan_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1.5] -> 0.5 * (0.25 + 0.75)
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.5)) / 2)
    assert losses.vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert losses.adopt_weight(1.0, 4, threshold=5) == 0.0
    assert losses.adopt_weight(1.0, 5, threshold=5) == 1.0


def test_adaptive_weight_hand_computed():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    x = torch.tensor([1.0, 2.0])
    nll = (w @ x).pow(2).sum()  # d/dw = 2 (w x) x^T
    g = 3.0 * w.sum()  # d/dw = 3 everywhere
    wx = (w @ x).detach()
    expected = (2 * wx[:, None] * x[None, :]).norm() / (torch.full((2, 2), 3.0).norm() + 1e-4) * 0.5
    got = losses.calculate_adaptive_weight(nll, g, w, disc_weight=0.5)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
    huge = losses.calculate_adaptive_weight(nll * 1e9, g * 1e-9, w)
    assert huge.item() == 1e4  # clamped


# ----------------------------------------------------------------------------- autoencoder losses

def tiny_kl_setup(lpips, disc_start=3):
    torch.manual_seed(0)
    model = vae.build_autoencoder(vae.PRESETS["tiny-kl"])
    cfg = losses.LossConfig(disc_start=disc_start, kl_weight=1e-6, disc_weight=0.5, disc_ndf=8)
    return model, losses.LPIPSWithDiscriminator(cfg, lpips_weights=list(lpips) if lpips else None, lpips_width=WIDTH)


def test_kl_loss_terms_and_backward(lpips_files):
    model, loss_fn = tiny_kl_setup(lpips_files)
    assert loss_fn.perceptual_weight == 1.0
    x = images()
    recon, post = model(x, generator=torch.Generator().manual_seed(0))
    last = model.get_last_layer()

    loss0, log0 = loss_fn(x, recon, post, 0, global_step=0, last_layer=last)
    assert log0["d_weight"].item() == 0 and log0["disc_factor"].item() == 0
    p = loss_fn.perceptual_loss(x, recon)
    rec = (x - recon).abs() + p
    expected = rec.sum() / 2 + 1e-6 * post.kl().sum() / 2  # logvar 0: nll = rec
    torch.testing.assert_close(loss0, expected)
    assert all(torch.isfinite(v).all() for v in log0.values())

    loss1, log1 = loss_fn(x, recon, post, 0, global_step=3, last_layer=last)
    assert log1["disc_factor"].item() == 1.0 and log1["d_weight"].item() > 0
    gan = log1["d_weight"] * log1["g_loss"]
    assert gan.abs().item() > 0
    torch.testing.assert_close(loss1.detach(), expected.detach() + gan, rtol=1e-5, atol=1e-5)
    loss1.backward()
    for prm in (model.decoder.conv_out.weight, model.encoder.conv_in.weight, loss_fn.logvar):
        assert prm.grad is not None and torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0
    assert loss_fn.discriminator.main[0].weight.grad.abs().sum() > 0  # the generator term reaches D as well

    d_before, _ = loss_fn(x, recon, post, 1, global_step=0)
    assert d_before.item() == 0
    d_loss, dlog = loss_fn(x, recon, post, 1, global_step=3)
    with torch.no_grad():
        want = losses.hinge_d_loss(loss_fn.discriminator(x), loss_fn.discriminator(recon))
    torch.testing.assert_close(d_loss.detach(), want)
    assert set(dlog) == {"disc_loss", "logits_real", "logits_fake"}
    model.zero_grad()
    d_loss.backward()
    assert model.decoder.conv_out.weight.grad is None  # reconstructions are detached for D's step


def test_kl_loss_without_lpips_is_rec_plus_kl(capsys):
    model, loss_fn = tiny_kl_setup(None, disc_start=10)
    msg = capsys.readouterr().err.strip()
    assert msg.count("\n") == 0 and "perceptual (LPIPS) loss OFF" in msg
    assert loss_fn.perceptual_weight == 0.0
    x = images()
    recon, post = model(x, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss_fn.logvar.fill_(0.5)
    loss, log = loss_fn(x, recon, post, 0, global_step=0, last_layer=model.get_last_layer())
    rec = (x - recon).abs()
    expected = (rec / math.exp(0.5) + 0.5).sum() / 2 + 1e-6 * post.kl().sum() / 2
    torch.testing.assert_close(loss, expected)
    assert log["p_loss"].item() == 0
    with torch.no_grad():  # evaluation without a graph after disc_start: d_weight falls back to 0
        _, elog = loss_fn(x, recon, post, 0, global_step=20, last_layer=model.get_last_layer())
    assert elog["d_weight"].item() == 0
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn(x, recon, post, 0, global_step=20)


def test_vq_loss_terms_and_backward(lpips_files):
    torch.manual_seed(0)
    model = vae.build_autoencoder(vae.PRESETS["tiny-vq"])
    cfg = losses.LossConfig(kind="vq", disc_start=0, disc_weight=0.75, codebook_weight=1.0, disc_ndf=8)
    loss_fn = losses.build_loss(cfg, lpips_weights=list(lpips_files), lpips_width=WIDTH)
    assert isinstance(loss_fn, losses.VQLPIPSWithDiscriminator)
    x = images()
    recon, qloss, idx = model(x, return_pred_indices=True)
    assert idx.shape == (2 * 8 * 8,)
    loss, log = loss_fn(qloss, x, recon, 0, global_step=0, last_layer=model.get_last_layer())
    rec = ((x - recon).abs() + loss_fn.perceptual_loss(x, recon)).mean()
    assert log["d_weight"].item() > 0
    torch.testing.assert_close(loss.detach(), (rec + qloss + log["d_weight"] * log["g_loss"]).detach(),
                               rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    d_loss, _ = loss_fn(qloss, x, recon, 1, global_step=0)
    assert torch.isfinite(d_loss) and d_loss.item() > 0


def test_l2_weight_adds_squared_error():
    cfg = losses.LossConfig(kind="vq", l2_weight=2.0, disc_start=100, disc_ndf=8)
    loss_fn = losses.VQLPIPSWithDiscriminator(cfg)
    x, r = images(seed=1), images(seed=2)
    loss, _ = loss_fn(torch.tensor(0.0), x, r, 0, global_step=0)
    torch.testing.assert_close(loss, ((x - r).abs() + 2.0 * (x - r) ** 2).mean())


# ----------------------------------------------------------------------------- metrics

def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 10 log10(4 / 0.01)
    y[1] += 0.2  # MSE 0.04 -> 10 log10(100)
    per = losses.psnr(x, y, reduction="none")
    torch.testing.assert_close(per, torch.tensor([10 * math.log10(400), 20.0]))
    assert losses.psnr(x, y).item() == pytest.approx((10 * math.log10(400) + 20) / 2, rel=1e-6)
    assert losses.psnr(x, y, data_range=1.0).item() == pytest.approx((10 * math.log10(100) + 10 * math.log10(25)) / 2)
    assert math.isinf(losses.psnr(x, x).item())


def _ssim_one_window(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of one 11x11 window (the whole image) written out with numpy: Gaussian-weighted moments."""
    r = np.arange(11) - 5.0
    g = np.exp(-0.5 * (r / 1.5) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * a).sum(), (w * b).sum()
    vx, vy = (w * a * a).sum() - mx ** 2, (w * b * b).sum() - my ** 2
    cxy = (w * a * b).sum() - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def test_ssim_identities_and_hand_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert losses.ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert losses.ssim(x, y).item() == pytest.approx(losses.ssim(y, x).item(), abs=1e-7)
    assert losses.ssim(x, y).item() < 1.0
    # Constant images: sigmas and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.3, 0.7
    want = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    got = losses.ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert got.item() == pytest.approx(want, rel=1e-6)
    # 11x11 images: a single window per channel; the channels are averaged.
    s, t = torch.rand(1, 3, 11, 11, generator=g), torch.rand(1, 3, 11, 11, generator=g)
    want = np.mean([_ssim_one_window(s[0, c].double().numpy(), t[0, c].double().numpy()) for c in range(3)])
    assert losses.ssim(s, t).item() == pytest.approx(want, rel=1e-6)


def test_ssim_matches_skimage():
    import skimage.metrics as metrics
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = metrics.structural_similarity(x[0].numpy(), y[0].numpy(), channel_axis=0, data_range=1.0,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert losses.ssim(x, y).item() == pytest.approx(ref, rel=1e-5)


def test_overfit_one_batch_with_gan(lpips_files):
    """The two-optimiser loop train.py runs: autoencoder step (optimizer_idx 0), then discriminator step (1)."""
    torch.manual_seed(0)
    model, loss_fn = tiny_kl_setup(lpips_files, disc_start=20)
    opt_ae = torch.optim.Adam(list(model.parameters()) + [loss_fn.logvar], lr=2e-3)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=2e-3)
    x = F.interpolate(images(4, size=4, seed=7), size=32, mode="bilinear")  # smooth images: learnable in 30 steps
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        start = losses.psnr(x, model(x, sample_posterior=False)[0]).item()
    for step in range(30):
        recon, post = model(x, generator=g)
        loss, log = loss_fn(x, recon, post, 0, step, last_layer=model.get_last_layer())
        opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        opt_ae.step()
        d_loss, _ = loss_fn(x, recon, post, 1, step)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        assert torch.isfinite(loss) and torch.isfinite(d_loss)
        if step <= 20:  # D may separate this single batch perfectly (hinge 0) soon after it starts learning
            assert (d_loss.item() == 0) == (step < 20) and (log["g_loss"].item() != 0)
    with torch.no_grad():
        end = losses.psnr(x, model(x, sample_posterior=False)[0]).item()
    assert end > start + 3.0, (start, end)
