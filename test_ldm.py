"""Tests for ldm.py: the schedule, sampling (DDIM + CFG, per-image seeds) against diffusers' pipeline, loading of
full-size layouts with strict errors, save/load round trips and diffusers folders. CPU only, tiny presets; golden
tensors come from fixtures/gen_ldm.py (reference implementations). Checkpoint file formats: test_checkpoint.py."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

import checkpoint
import clip
import ldm
import unet as unet_lib
from checkpoint import CheckpointError
from testutil import (FIXTURES, PIPELINE_NEGATIVE, PIPELINE_PROMPTS, PIPELINE_RUNS, PIPELINE_SEED, SDXL_NARROW,
                      SDXL_PROMPTS, SDXL_RUNS, SDXL_SEED, SDXL_SEEDS, manifest_state_dict, randomize_)


# -----------------------------------------------------------------------------------------------------------------
# schedule and DDIM grid


def test_schedule_matches_original_float64_formula():
    # Both sides are float64 arithmetic rounded once to float32 (numpy's and torch's float64 log/sqrt may differ in
    # the last float64 bit, which can move the float32 result by one ulp): rtol 1e-6 is 8 float32 ulps.
    golden = torch.load(FIXTURES / "ldm_schedule.pt", weights_only=True)
    buffers = ldm.schedule_buffers(ldm.make_schedule())
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        torch.testing.assert_close(buffers[name], golden[name], rtol=1e-6, atol=0)
    assert abs(buffers["alphas_cumprod"][0].item() - 0.99915) < 1e-6
    assert abs(buffers["alphas_cumprod"][999].item() - 0.0046601) < 1e-6
    # diffusers computes the betas and their cumulative product in float32: 1000 roundings of relative 6e-8 each,
    # measured 9.5e-7 relative at worst
    torch.testing.assert_close(buffers["alphas_cumprod"], golden["diffusers_alphas_cumprod"], rtol=1e-5, atol=0)


def test_ignored_keys_are_the_schedule_buffers_and_training_scalars():
    # the loader drops exactly what ldm recomputes (the schedule) and what only training uses
    assert checkpoint.IGNORED_KEYS == set(ldm.schedule_buffers(ldm.make_schedule(10))) | {
        "logvar", "lvlb_weights", "scale_factor", "denoiser.sigmas"}  # the last: sgm's SDXL schedule buffer
    assert len(ldm.schedule_buffers(ldm.make_schedule(10))) == 12


def test_ddim_grid_matches_diffusers():
    golden = torch.load(FIXTURES / "ldm_schedule.pt", weights_only=True)
    assert list(reversed(ldm.ddim_timesteps(50))) == golden["diffusers_timesteps_50"].tolist()
    assert ldm.ddim_timesteps(50)[:3] == [1, 21, 41]
    with pytest.raises(ValueError):
        ldm.ddim_timesteps(0)


# -----------------------------------------------------------------------------------------------------------------
# whole pipeline: DDIM + CFG against diffusers' StableDiffusionPipeline


@pytest.mark.parametrize("run", list(PIPELINE_RUNS))
def test_sampling_matches_diffusers_pipeline(run):
    # The golden images: diffusers' StableDiffusionPipeline on the same weights, image i seeded with its own
    # generator (PIPELINE_SEED + i) for its initial latent and its DDIM noise. Both sides run in float32 with
    # different operation orders; on the machine that made the golden they differ by at most 5e-6 (of 1) after 10
    # steps of CFG 7.5. Another CPU's float32 kernels reorder the sums in the same way, so atol 1e-4 leaves 20x room
    # and still fails for any real difference (a wrong seed or schedule moves pixels by O(0.1)).
    golden = torch.load(FIXTURES / "ldm_pipeline.pt", weights_only=True)
    prediction_type, eta, steps, cfg = PIPELINE_RUNS[run]
    model = randomize_(ldm.build_model("tiny", prediction_type=prediction_type))
    images = ldm.sample(model, PIPELINE_PROMPTS, negative_prompts=PIPELINE_NEGATIVE, steps=steps, guidance_scale=cfg,
                        eta=eta, seed=PIPELINE_SEED, output_type="tensor", progress=False)
    ref = golden[run]
    torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), ref, rtol=1e-4, atol=1e-4)
    assert ref.std() > 0.05  # the reference image is not flat, so the comparison means something


# -----------------------------------------------------------------------------------------------------------------
# SDXL base and refiner against diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline


@pytest.fixture(scope="module")
def sdxl():
    """(base, refiner, golden): the reduced-width SDXL models of the golden file, with its seeded weights."""
    base = randomize_(ldm.build_model(SDXL_NARROW["sdxl"]), SDXL_SEEDS["sdxl"]).eval()
    refiner = randomize_(ldm.build_model(SDXL_NARROW["sdxl-refiner"]), SDXL_SEEDS["sdxl-refiner"]).eval()
    return base, refiner, torch.load(FIXTURES / "ldm_sdxl.pt", weights_only=True)


@pytest.mark.parametrize("run", list(SDXL_RUNS))
def test_sdxl_sampling_matches_diffusers_pipeline(sdxl, run):
    # DDIM and Euler on the base, size conditioning, and the base handing over to the refiner at 0.8 of the
    # schedule; diffusers got the same weights through its own single-file converters. Measured <= 4.6e-6 (of 1);
    # atol 1e-4 as for SD 1.x (a wrong size embedding, zeroing or handoff step moves pixels by O(0.01..0.1)).
    base, refiner, golden = sdxl
    kw = dict(SDXL_RUNS[run])
    kw["sizes"] = ldm.Sizes(**kw.get("sizes", {}))
    images = ldm.sample(base, SDXL_PROMPTS, seed=SDXL_SEED, refiner=refiner if "refiner_switch" in kw else None,
                        output_type="tensor", progress=False, **kw)
    torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1), golden[run], rtol=1e-4, atol=1e-4)
    assert golden[run].std() > 0.05


def test_sdxl_conditioning_matches_diffusers(sdxl):
    """The CFG batch's context ([uncond; cond]: CLIP-L | bigG penultimate layers; zeros for no negative prompt on
    the base) and y ([pooled bigG | 256-wide embeddings of sizes, crop and target size or aesthetic score])."""
    base, refiner, golden = sdxl
    sizes = dict(original_size=(96, 128), crop=(16, 8))
    for key, model, negatives, extra in (("base", base, ["", ""], dict(target_size=(48, 80))),
                                         ("refiner", refiner, ["blurry", "grainy"],
                                          dict(aesthetic_score=7.0, negative_aesthetic_score=2.0))):
        context, y = ldm.conditioning(model, SDXL_PROMPTS, negatives, use_cfg=True, clip_skip=1, height=64,
                                      width=64, sizes=ldm.Sizes(**sizes, **extra))
        # fp32, different operation orders: measured <= 2e-5 on values of size ~20 (sin/cos of sizes up to 128)
        torch.testing.assert_close(context, golden[f"{key}_context"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(y, golden[f"{key}_y"], rtol=1e-5, atol=1e-4)
    assert golden["base_context"][:2].abs().max() == 0 and golden["base_y"][:2, :48].abs().max() == 0


def test_sdxl_vae_decodes_with_its_scale(sdxl):
    base, _, golden = sdxl
    assert base.scale_factor == 0.13025 and ldm.build_model("sdxl", device="meta").scale_factor == 0.13025
    torch.testing.assert_close(base.decode_latents(golden["latents"]), golden["decoded"], rtol=1e-4, atol=1e-4)


def test_sdxl_diffusers_folders_load_same_weights(sdxl, tmp_path):
    """Folders written by diffusers' own save_pretrained (base: text_encoder/ + text_encoder_2/, refiner: _2/ only)
    load into the same tensors."""
    from bench import diffusers_sdxl_pipeline
    base, refiner, _ = sdxl
    for model, pipe in zip((base, refiner), diffusers_sdxl_pipeline(base, "euler", refiner, tokenizer_dir=tmp_path)):
        pipe.save_pretrained(tmp_path / "folder")
        loaded = ldm.load_model(tmp_path / "folder", device="cpu", dtype=torch.float32)
        assert loaded.text_encoder.cfg == model.text_encoder.cfg and loaded.unet.cfg == model.unet.cfg
        assert loaded.scale_factor == 0.13025 and loaded.resolution == 64 and loaded.prediction_type == "eps"
        # transformers 5 writes tokenizer.json alone (no vocab.json / merges.txt)
        assert (loaded.tokenizer.encoder, loaded.tokenizer.ranks) == (model.tokenizer.encoder, model.tokenizer.ranks)
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert set(ours) == set(theirs)
        for k in ours:
            if not k.endswith("logit_scale"):  # diffusers does not keep it (CLIP's initial value stands in)
                assert torch.equal(ours[k], theirs[k]), k
        shutil.rmtree(tmp_path / "folder")


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_batch_images_equal_single_prompt_calls_with_consecutive_seeds(eta):
    model = tiny_model()
    kw = dict(steps=3, eta=eta, output_type="tensor", progress=False)
    batch = ldm.sample(model, ["a", "b"], seed=0, **kw)
    singles = torch.cat([ldm.sample(model, ["a"], seed=0, **kw), ldm.sample(model, ["b"], seed=1, **kw)])
    # Batched and single U-Net passes sum in other orders (float32, measured <= 2.3e-6 on outputs of size ~3); an
    # image drawn from the wrong generator (e.g. one generator for the batch) differs by O(1).
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-4)
    assert torch.equal(ldm.sample(model, ["a", "b"], seed=[0, 1], **kw), batch)  # explicit per-image seeds
    wrong_seed = ldm.sample(model, ["b"], seed=0, **kw)
    assert (wrong_seed - singles[1:]).abs().max() > 1.0


# -----------------------------------------------------------------------------------------------------------------
# loading: full-size layouts, strictness, round trips, diffusers folders


@pytest.mark.parametrize("names,layout,text_prefix", [
    (("sd15",), "sd1", "cond_stage_model.transformer.text_model."),
    (("sd15", "sd15-nonpruned-extra"), "sd1", "cond_stage_model.transformer.text_model."),
    (("sd21-768-v",), "sd2", "cond_stage_model.model."),
])
def test_full_size_checkpoints_load_strictly(names, layout, text_prefix):
    sd = manifest_state_dict(*names)
    assert ldm.detect_layout(sd, "x") == layout
    model, cfg = ldm.model_from_state_dict(sd, {}, prediction_type="eps")
    loaded = model.checkpoint_state_dict()
    # every tensor of the file that is not knowingly dropped is now a model tensor (assigned, not copied)
    kept = {k for k in sd if not checkpoint.is_ignored(k)}
    assert kept == {k for k in loaded if k not in ldm.schedule_buffers(ldm.make_schedule())}
    assert all(loaded[k].shape == sd[k].shape for k in kept)
    dropped = set(sd) - kept
    assert all(k.startswith("model_ema.") or k.endswith("position_ids") or k in checkpoint.IGNORED_KEYS
               for k in dropped)
    assert model.text_encoder.cfg == clip.PRESETS[layout]
    assert {k[len(text_prefix):] for k in kept if k.startswith(text_prefix)} == set(model.text_encoder.state_dict())
    # exported files carry exactly the public keys (EMA copies aside)
    assert set(loaded) == {k for k in manifest_state_dict(names[0]) if not k.endswith("position_ids")}


@pytest.mark.parametrize("name,layout", [("sdxl-base", "sdxl"), ("sdxl-refiner", "sdxl-refiner")])
def test_full_size_sdxl_files_load_strictly(name, layout):
    """The public SDXL base / refiner files (their every key and shape, on the meta device) are detected, load
    strictly into the SDXL presets and export back to exactly their keys."""
    sd = manifest_state_dict(name)
    assert ldm.detect_layout(sd, "x") == layout
    model, cfg = ldm.model_from_state_dict(sd, {})
    assert ldm.is_sdxl(model) and model.text_encoder.cfg == clip.PRESETS[layout]
    assert replace(model.unet.cfg, image_size=128) == unet_lib.PRESETS[layout]
    assert model.scale_factor == 0.13025 and model.resolution == 1024 and model.prediction_type == "eps"
    loaded = model.checkpoint_state_dict()
    kept = {k for k in sd if not checkpoint.is_ignored(k)}
    assert set(loaded) == kept and all(loaded[k].shape == sd[k].shape for k in kept)
    assert all(k.endswith("position_ids") or k in checkpoint.IGNORED_KEYS for k in set(sd) - kept)


def test_layout_mismatch_names_the_keys():
    sd = manifest_state_dict("sd15")
    sd["model.diffusion_model.extra.weight"] = torch.empty(3, device="meta")
    del sd["first_stage_model.decoder.conv_out.bias"]
    sd["model.diffusion_model.out.2.weight"] = torch.empty(4, 320, 3, 1, device="meta")
    with pytest.raises(CheckpointError) as e:
        ldm.model_from_state_dict(sd, {}, path="bad.ckpt")
    # the first part that does not fit is named, with every problem it has, in one line
    assert str(e.value) == ("bad.ckpt (U-Net, model.diffusion_model.*) does not fit the model; unexpected: "
                            "extra.weight; shape mismatch: out.2.weight (4, 320, 3, 1) vs (4, 320, 3, 3)")
    with pytest.raises(CheckpointError, match="unexpected: extra.weight$"):
        ldm.model_from_state_dict({k: v for k, v in sd.items() if "out.2" not in k or "diffusion" not in k}
                                  | {"model.diffusion_model.out.2.weight": torch.empty(4, 320, 3, 3, device="meta")},
                                  {}, path="bad.ckpt")
    sd = manifest_state_dict("sd15")
    del sd["first_stage_model.decoder.conv_out.bias"]
    with pytest.raises(CheckpointError, match=r"^bad.ckpt \(VAE, first_stage_model.\*\) does not fit the model; "
                                              "missing: decoder.conv_out.bias$"):
        ldm.model_from_state_dict(sd, {}, path="bad.ckpt")
    sd = manifest_state_dict("sd15")
    sd["model.diffusion_model.out.2.weight"] = torch.empty(4, 320, 3, 1, device="meta")
    with pytest.raises(CheckpointError, match=r"shape mismatch: out.2.weight \(4, 320, 3, 1\) vs \(4, 320, 3, 3\)$"):
        ldm.model_from_state_dict(sd, {}, path="bad.ckpt")
    # many keys: the first five, then the count
    sd = {k: v for k, v in manifest_state_dict("sd15").items() if not k.startswith("first_stage_model.decoder.")}
    with pytest.raises(CheckpointError, match=r"missing: decoder.conv_in.weight, decoder.conv_in.bias, "
                                              r"[^,]+, [^,]+, [^,]+ \.\.\. \(138 in all\)$"):
        ldm.model_from_state_dict(sd, {}, path="bad.ckpt")
    sd = manifest_state_dict("sd15")
    sd["some_adapter.weight"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError, match="outside the known parts: some_adapter.weight"):
        ldm.model_from_state_dict(sd, {}, path="bad.ckpt")


def test_unknown_and_vae_only_files_are_clear_errors(tmp_path):
    path = tmp_path / "lora.safetensors"
    checkpoint.save_safetensors(path, {"lora_unet_down.alpha": torch.ones(1), "lora_te_x.weight": torch.ones(2)})
    with pytest.raises(CheckpointError, match="unknown checkpoint layout.*lora_te_x, lora_unet_down"):
        ldm.load_model(path)
    sd = manifest_state_dict("sd-vae")
    with pytest.raises(CheckpointError, match="autoencoder only; load it with vae.load_autoencoder"):
        ldm.model_from_state_dict(sd, {}, path="vae.ckpt")
    with pytest.raises(CheckpointError, match="no such file"):
        ldm.load_model(tmp_path / "missing.safetensors")


def tiny_model(prediction_type="eps"):
    return randomize_(ldm.build_model("tiny", prediction_type=prediction_type))


def sample_tensor(model, **kw):
    return ldm.sample(model, ["a red apple", "a cat"], steps=4, seed=7, output_type="tensor", progress=False, **kw)


def test_save_model_load_model_round_trip(tmp_path):
    model = tiny_model("v")
    model.vae.scale_factor = 0.4321  # kept in the autoencoder's config, so the file carries it
    path = tmp_path / "tiny.safetensors"
    ldm.save_model(model, path)
    loaded = ldm.load_model(path, device="cpu")
    assert loaded.prediction_type == "v" and loaded.resolution == 64 and loaded.scale_factor == 0.4321
    assert loaded.dtype == torch.float32 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(sample_tensor(loaded), sample_tensor(model), rtol=0, atol=0)


@pytest.mark.parametrize("damage, expect", [
    (lambda cfg: "{not json", "not JSON"),
    (lambda cfg: json.dumps({**cfg, "unet": {**cfg["unet"], "bogus_field": 1}}), "TypeError"),
    (lambda cfg: json.dumps({k: v for k, v in cfg.items() if k != "vae"}), "no vae"),
    (lambda cfg: json.dumps({k: v for k, v in cfg.items() if k != "prediction_type"}), "KeyError"),
    (lambda cfg: json.dumps([1, 2]), "not a JSON object"),
])
def test_damaged_ldm_config_metadata_is_one_line(tmp_path, damage, expect):
    model = tiny_model()
    tensors = {k: v.detach() for k, v in model.checkpoint_state_dict().items()}
    path = tmp_path / "damaged.safetensors"
    checkpoint.save_safetensors(path, tensors, {"ldm_config": damage(model.model_config())})
    with pytest.raises(CheckpointError) as e:
        ldm.load_model(path, device="cpu")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: damaged metadata ldm_config")
    assert expect in message and "re-export the model" in message


def test_a_folder_of_something_else_says_what_it_looked_for(tmp_path):
    with pytest.raises(CheckpointError, match="neither a training run .* nor a diffusers pipeline"):
        ldm.load_model(tmp_path, device="cpu")


def test_damaged_diffusers_config_json_is_one_line(tmp_path):
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "unet" / "config.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match=r"unet/config.json: not a JSON file"):
        ldm.load_model(tmp_path / "pipe", device="cpu")


def test_save_model_half_precision_round_trips(tmp_path):
    model = tiny_model()
    path, full = tmp_path / "tiny-fp16.safetensors", tmp_path / "tiny.safetensors"
    ldm.save_model(model, path, dtype=torch.float16)
    ldm.save_model(model, full)
    tensors, metadata = checkpoint.read_safetensors(path)
    assert {t.dtype for t in tensors.values()} == {torch.float16} and "ldm_config" in metadata
    assert path.stat().st_size < 0.55 * full.stat().st_size  # half the bytes, plus the same header
    weights = model.state_dict()
    for dtype in (torch.float32, torch.float16):
        loaded = ldm.load_model(path, device="cpu", dtype=dtype)
        assert loaded.dtype == dtype and loaded.prediction_type == "eps" and loaded.resolution == 64
        assert loaded.scale_factor == model.scale_factor
        sd = loaded.state_dict()
        assert set(sd) == set(weights)
        for k, v in weights.items():  # exactly the float16 rounding of each weight, in the dtype asked for
            assert sd[k].dtype == dtype and torch.equal(sd[k], v.half().to(dtype)), k


def test_sdxl_vae_stays_out_of_float16(tmp_path):
    """SDXL's VAE overflows in float16 (black or NaN images): a float16 SDXL load keeps it in float32 (bfloat16 on a
    CUDA device that has it), the rest in float16. SD 1.x keeps its VAE in the model's dtype (test above)."""
    path = tmp_path / "xl.safetensors"
    ldm.save_model(ldm.build_model("tiny-sdxl"), path, dtype=torch.float16)
    loaded = ldm.load_model(path, device="cpu", dtype=torch.float16)
    assert loaded.dtype == torch.float16 and loaded.text_encoder.clip_g.ln_final.weight.dtype == torch.float16
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.float32}
    images = ldm.sample(loaded, ["a cat"], steps=2, sampler="euler", seed=0, output_type="tensor", progress=False)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_lightning_ckpt_round_trip(tmp_path):
    model = tiny_model("v")
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": model.checkpoint_state_dict(), "global_step": 1}, path)
    # A pickle carries no config, and shapes cannot name the tiny sizes: read as an SD 1.x file, it does not fit.
    with pytest.raises(CheckpointError, match=r"\(VAE, first_stage_model.\*\) does not fit the model"):
        ldm.load_model(path, device="cpu")
    # With the config the weights cannot tell (what save_model writes beside them), the same tensors load back.
    sd, metadata = checkpoint.read_checkpoint(path)
    assert metadata == {"global_step": "1"}
    loaded, cfg = ldm.model_from_state_dict(sd, {"ldm_config": json.dumps(model.model_config())}, path=path)
    assert cfg["prediction_type"] == "v" and loaded.prediction_type == "v"
    own = loaded.state_dict()
    assert set(own) == set(model.state_dict())
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(sample_tensor(loaded.eval()), sample_tensor(model), rtol=0, atol=0)


def test_diffusers_folder_loads_same_weights(tmp_path):
    model = tiny_model()
    layout = json.loads((FIXTURES / "ldm_diffusers_layout.json").read_text())
    ckpt = model.checkpoint_state_dict()
    folder = tmp_path / "pipe"
    for part, config_key, fname in (("unet", "unet_config", "diffusion_pytorch_model.safetensors"),
                                    ("vae", "vae_config", "diffusion_pytorch_model.safetensors"),
                                    ("text_encoder", "text_config", "model.safetensors")):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(layout[config_key]))
        tensors = {}
        for theirs, ours in layout[part].items():
            t = ckpt[ours]
            if part == "vae" and t.ndim == 4 and "attentions" in theirs:
                t = t[:, :, 0, 0]  # diffusers keeps VAE attention as Linear
            tensors[theirs] = t
        checkpoint.save_safetensors(folder / part / fname, tensors)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    loaded = ldm.load_model(folder, device="cpu")
    assert loaded.prediction_type == "eps" and loaded.resolution == 64
    torch.testing.assert_close(sample_tensor(loaded), sample_tensor(model), rtol=0, atol=0)


def test_prediction_type_probe(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(model.unet, "forward", lambda x, t, c: x)  # eps-model at t=999: returns its (noise) input
    assert ldm.probe_prediction_type(model) == "eps"
    monkeypatch.setattr(model.unet, "forward", lambda x, t, c: -2 * x)  # v ~ -x0: far below the input
    assert ldm.probe_prediction_type(model) == "v"


# -----------------------------------------------------------------------------------------------------------------
# maths identities


def test_eps_v_x0_conversions_agree():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for t in (1, 500, 999):
        a = model.alphas_cumprod[t]
        xt = model.add_noise(x0, eps, torch.tensor([t] * 3))
        for kind in ("eps", "v"):
            model.prediction_type = kind
            target = model.training_target(x0, eps, torch.tensor([t] * 3))
            eps_hat, x0_hat = ldm.predict_eps_x0(model, target, xt, a)
            torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(x0_hat, x0, rtol=1e-3, atol=1e-3)


def test_batched_cfg_equals_two_passes():
    model = tiny_model()
    context, uncond = model.encode_prompt(["a cat"]), model.encode_prompt([""])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    batched = ldm.ddim_sample(model, x, torch.cat([uncond, context]), steps=3, guidance_scale=4.0, progress=False)
    # by hand: two separate U-Net passes per step
    xs = x.clone()
    ts = list(reversed(ldm.ddim_timesteps(3)))
    for i, t in enumerate(ts):
        tt = torch.tensor([t])
        e_u, e_c = model.unet(xs, tt, uncond), model.unet(xs, tt, context)
        eps = e_u + 4.0 * (e_c - e_u)
        a = model.alphas_cumprod[t]
        a_prev = model.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else model.alphas_cumprod[0]
        x0 = (xs - (1 - a).sqrt() * eps) / a.sqrt()
        xs = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(batched, xs, rtol=1e-4, atol=1e-4)


def test_sample_input_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiples of 4"):
        ldm.sample(model, ["x"], height=30, width=64, steps=2, progress=False)
    with pytest.raises(ValueError, match="unknown sampler 'plms'; available: ddim, euler, euler_a"):
        ldm.sample(model, ["x"], steps=2, sampler="plms", progress=False)
    with pytest.raises(ValueError, match="unknown scheduler 'beta'"):
        ldm.sample(model, ["x"], steps=2, sampler="euler", scheduler="beta", progress=False)
    with pytest.raises(ValueError, match="ddim runs its own timestep grid"):
        ldm.sample(model, ["x"], steps=2, scheduler="karras", progress=False)
    with pytest.raises(ValueError, match="negative prompts"):
        ldm.sample(model, ["x", "y"], negative_prompts=["a", "b", "c"], steps=2, progress=False)


def test_img2img_runs_strength_fraction_of_steps_and_keeps_the_image():
    model = tiny_model()
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    calls = []
    forward = model.unet.forward
    model.unet.forward = lambda x, t, c: calls.append(int(t[0])) or forward(x, t, c)
    low = ldm.sample(model, ["a"], steps=10, seed=1, init_image=init, strength=0.3, output_type="tensor",
                     progress=False)
    assert calls == [201, 101, 1]  # int(10 * 0.3) steps, from the matching point of the 10-step grid
    calls.clear()
    full = ldm.sample(model, ["a"], steps=10, seed=1, output_type="tensor", progress=False)
    assert len(calls) == 10
    recon = model.decode_latents(model.encode_images(init))
    assert (low - recon).abs().mean() < (full - recon).abs().mean()
