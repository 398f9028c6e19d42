"""Tests for lora.py: parity of merged kohya and diffusers / PEFT LoRAs with diffusers + peft (golden outputs of
fixtures/gen_lora.py), the merge formula and OpenCLIP's fused q / k / v rows checked with plain torch, exact removal,
stacking, the one-line refusals of files that do not fit, and the training side (LoRANetwork and its kohya
export)."""
from dataclasses import replace

import pytest
import torch

import checkpoint
import clip
import ldm
import lora
from checkpoint import CheckpointError
from testutil import FIXTURES, LORA_RUNS, random_lora, random_weights, randomize_

GOLDEN = torch.load(FIXTURES / "lora_parity.pt")


def parity_tolerance(ref: torch.Tensor) -> dict:
    """The goldens are diffusers' float32 outputs with the LoRA beside each layer (peft computes x A^T B^T next to
    the base layer; we merge it into W): they differ from ours by float32 rounding through a tiny model's layers,
    measured at 5e-7 .. 4.3e-6 of the output's largest value. 2e-5 of it leaves headroom for another CPU's
    summation order, while a wrong module, alpha, row or multiplier moves outputs by a large fraction of it."""
    return dict(rtol=1e-5, atol=2e-5 * ref.abs().max().item())


def build(preset: str, seed: int) -> ldm.LatentDiffusion:
    return randomize_(ldm.build_model(preset), seed).eval()


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, before: dict[str, torch.Tensor]):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"


def outputs(model, case: dict) -> dict[str, torch.Tensor]:
    """Our U-Net's and text encoder's outputs on a golden case's inputs, in the golden's terms."""
    with torch.no_grad():
        out = {"unet": model.unet(case["x"], case["t"], case["context"], case.get("y"))}
        if "pooled" in case:
            out["text"], out["pooled"] = model.text_encoder(case["tokens"], pooled=True)
        else:
            out["text"] = model.text_encoder(case["tokens"])
    return out


def assert_parity(model, case: dict, base: dict[str, torch.Tensor]):
    ours = outputs(model, case)
    for key, value in ours.items():
        tol = parity_tolerance(case[key])
        torch.testing.assert_close(value, case[key], **tol, msg=lambda m: f"{key}: {m}")
        # the LoRA matters: the base model is far outside the tolerance
        assert (base[key] - case[key]).abs().max() > 1000 * tol["atol"], key


# -----------------------------------------------------------------------------------------------------------------
# Parity with diffusers + peft


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_kohya_lora_matches_diffusers(name):
    """Every linear layer and convolution of the U-Net (SD 1.x: diffusers paths; SDXL: original paths) and of each
    text encoder (lora_te_; lora_te1_ / lora_te2_, bigG's q / k / v into its fused in_proj_weight), merged at the
    run's multiplier, against diffusers' load_lora_weights + set_adapters."""
    run, case = LORA_RUNS[name], GOLDEN[name]
    model = build(run["preset"], run["seed"])
    base = outputs(model, case)
    sd = random_lora(model, run["lora_seed"], alpha=name == "sd1")
    applied = model.apply_lora(sd, run["multiplier"])
    assert applied.multiplier == run["multiplier"]
    assert applied.modules == len({k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_down.weight")})
    assert_parity(model, case, base)


@pytest.mark.parametrize("name,run", [("peft", "sd1"), ("peft_diffusers", "sd1"), ("peft_sdxl", "sdxl")])
def test_diffusers_file_matches_diffusers(name, run, tmp_path):
    """Files diffusers wrote itself: PEFT names with the adapter configs in the metadata (lora_alpha != r,
    alpha_patterns, rsLoRA, transformers 5's text-encoder names; SDXL: text_encoder. = CLIP-L, text_encoder_2. =
    bigG), and its training scripts' converted names (`.lora.down`, `.lora_linear_layer.down`) without metadata
    (alpha = r)."""
    run, case = LORA_RUNS[run], GOLDEN[name]
    path = tmp_path / "pytorch_lora_weights.safetensors"
    path.write_bytes(case["file"].numpy().tobytes())
    model = build(run["preset"], run["seed"])
    base = outputs(model, case)
    model.apply_lora(path)
    assert_parity(model, case, base)
    if name != "peft_diffusers":  # the metadata's alphas are what makes it match: the bare tensors read alpha = r
        model.remove_loras()
        model.apply_lora(checkpoint.read_checkpoint(path)[0])
        assert not torch.allclose(outputs(model, case)["unet"], case["unet"], **parity_tolerance(case["unet"]))


def test_peft_text_encoder_names():
    """transformers 5's CLIPTextModel has no text_model. level; older files have it: both name the same module."""
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert lora.kohya_name("text_encoder.encoder.layers.0.self_attn.q_proj") == name
    assert lora.kohya_name("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == name
    assert lora.kohya_name("text_encoder_2.text_model.encoder.layers.1.mlp.fc2") == \
        "lora_te2_text_model_encoder_layers_1_mlp_fc2"
    assert lora.kohya_name("unet.down_blocks.0.attentions.0.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert lora.kohya_name("model.diffusion_model.out.2") is None


def test_peft_alphas_from_metadata():
    """alpha_pattern entries match the end of a module's path (peft's rule, first match wins), rsLoRA scales by
    alpha / sqrt(r), and no config means alpha = r."""
    meta = {"lora_adapter_metadata": '{"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_k": 2, "conv": 3}, '
                                     '"text_encoder.lora_alpha": 6, "text_encoder.use_rslora": true}'}
    configs = lora.peft_configs(meta)
    assert set(configs) == {"unet", "text_encoder"}
    unet = configs["unet"]
    assert lora.peft_alpha(unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 4) == 2
    assert lora.peft_alpha(unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 4) == 8
    assert lora.peft_alpha(unet, "down_blocks.0.downsamplers.0.conv", 4) == 3
    assert lora.peft_alpha(unet, "down_blocks.0.resnets.0.conv1", 4) == 8  # "conv" must match a whole name
    assert lora.peft_alpha(configs["text_encoder"], "encoder.layers.0.mlp.fc1", 4) == 6 * 2  # 6 / sqrt(4) = 12 / 4
    assert lora.peft_alpha({}, "to_q", 4) == 4
    assert lora.peft_configs({}) == {} and lora.peft_configs({"lora_adapter_metadata": "not json"}) == {}


# -----------------------------------------------------------------------------------------------------------------
# The merge, checked with plain torch


def test_merge_formula():
    """W' = W + m (alpha / r) up @ down for every module, in the weight's shape (3x3 and 1x1 convolutions, linear
    layers), alpha = r where the file has none; every other tensor untouched."""
    run = LORA_RUNS["sd1"]
    model = build(run["preset"], run["seed"])
    before = weights(model)
    sd = random_lora(model, 7, alpha=False)
    names = sorted({k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_down.weight")})
    alphas = {}
    for i, name in enumerate(names):  # cycle through: no alpha, alpha = r, smaller, larger, a 1-element tensor
        r = sd[f"{name}.lora_down.weight"].shape[0]
        alphas[name] = [None, r, 1.0, 3.5 * r, 0.5][i % 5]
        if alphas[name] is not None:
            sd[f"{name}.alpha"] = torch.tensor([alphas[name]]) if i % 5 == 4 else torch.tensor(alphas[name])
    table = lora.targets(model)
    kinds = {tuple(table[n].tensor(model).shape[2:]) for n in names}
    assert kinds == {(), (1, 1), (3, 3)}  # linear, 1x1 (SD 1.x's proj_in / proj_out) and 3x3 convolutions
    m = -0.7
    model.apply_lora(sd, m)
    after = model.state_dict()
    touched = set()
    for name in names:
        target = table[name]
        key = f"{target.part}.{target.module}.{target.param}"
        down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
        r = down.shape[0]
        alpha = r if alphas[name] is None else alphas[name]
        w0 = before[key].double()
        expected = w0 + m * alpha / r * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
        torch.testing.assert_close(after[key].double(), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(after[key], before[key], atol=1e-3)
        touched.add(key)
    assert_same_weights_except(after, before, touched)


def assert_same_weights_except(after: dict, before: dict, touched: set):
    for k in before:
        if k not in touched:
            assert torch.equal(after[k], before[k]), k


def openclip_config() -> clip.TextConfig:
    """A small SD 2.x-style (OpenCLIP, fused in_proj) text encoder, without the text projection."""
    return clip.TextConfig(layout="openclip", width=32, layers=2, heads=2, act="gelu", layer="penultimate")


def test_sd2_text_lora_fills_fused_in_proj_rows():
    """SD 2.x's lora_te_ files name transformers' separate q / k / v projections; merged into OpenCLIP's fused
    in_proj_weight they must give what merging into the separate weights and then fusing them (clip.py's diffusers
    converter) gives."""
    cfg = openclip_config()
    model = ldm.build_model(dict(unet="tiny", vae="tiny-kl", text=cfg, prediction_type="v", resolution=64))
    hf_cfg = replace(cfg, layout="clip")  # our "clip" layout has transformers' names and shapes
    hf = random_weights({k: v.shape for k, v in clip.CLIPTextModel(hf_cfg).state_dict().items()}, seed=3)
    model.text_encoder.load_state_dict(clip.convert_diffusers(hf, cfg), strict=True)
    before = weights(model)
    g = torch.Generator().manual_seed(4)
    sd, expected, m = {}, dict(hf), 0.8
    for i in range(cfg.layers):
        for path in [f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")] + ["mlp.fc1", "mlp.fc2"]:
            module = f"encoder.layers.{i}.{path}"
            w = hf[f"{module}.weight"]
            name = "lora_te_text_model_" + module.replace(".", "_")
            down, up = torch.randn(3, w.shape[1], generator=g), torch.randn(w.shape[0], 3, generator=g)
            sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                       f"{name}.alpha": torch.tensor(2.0)})
            expected[f"{module}.weight"] = w + m * 2.0 / 3 * (up @ down)
    model.apply_lora(sd, m)
    fused = clip.convert_diffusers(expected, cfg)
    after = model.text_encoder.state_dict()
    assert after.keys() == fused.keys()
    for k in fused:
        torch.testing.assert_close(after[k], fused[k], rtol=0, atol=1e-6, msg=lambda msg: f"{k}: {msg}")
    assert not torch.allclose(after["transformer.resblocks.0.attn.in_proj_weight"],
                              before["text_encoder.transformer.resblocks.0.attn.in_proj_weight"], atol=1e-2)
    model.remove_loras()
    assert_same_weights(model, before)


# -----------------------------------------------------------------------------------------------------------------
# Removing and stacking


@pytest.mark.parametrize("preset,dtype", [("tiny", torch.float32), ("tiny", torch.bfloat16),
                                          ("tiny-sdxl", torch.float32)])
def test_remove_restores_every_weight_bitwise(preset, dtype):
    model = build(preset, 1).to(dtype)
    before = weights(model)
    a, b = random_lora(model, 2), random_lora(model, 3, rank=2, conv_rank=1)
    model.apply_lora(a, 0.7, name="a")
    model.apply_lora(b, -1.3, name="b")
    assert [(x.name, x.multiplier) for x in model.loras] == [("a", 0.7), ("b", -1.3)]
    targets = {f"{t.part}.{t.module}.{t.param}" for t, _ in lora.resolve(model, lora.read_lora(a)[0], "a")}
    after = model.state_dict()
    assert {k for k in before if not torch.equal(after[k], before[k])} == targets
    model.remove_loras()
    assert_same_weights(model, before)
    assert model.loras == []
    model.remove_loras()  # nothing applied: a no-op
    assert_same_weights(model, before)


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_stacked_loras_add_their_deltas(preset):
    model = build(preset, 1)
    w0 = weights(model)
    a, b = random_lora(model, 2), random_lora(model, 3, rank=2, conv_rank=1)
    deltas = []
    for sd, m in ((a, 0.7), (b, -1.3)):
        model.apply_lora(sd, m)
        deltas.append({k: v.double() - w0[k].double() for k, v in model.state_dict().items()
                       if not torch.equal(v, w0[k])})
        model.remove_loras()
    model.apply_lora(a, 0.7)
    model.apply_lora(b, -1.3)
    for k, v in model.state_dict().items():
        if k in deltas[0] or k in deltas[1]:
            torch.testing.assert_close(v.double() - w0[k].double(), deltas[0].get(k, 0) + deltas[1].get(k, 0),
                                       rtol=0, atol=1e-6, msg=lambda msg: f"{k}: {msg}")
        else:
            assert torch.equal(v, w0[k]), k


def test_a_unet_multiplier_of_its_own_leaves_the_text_encoders_at_theirs():
    """A1111's <lora:NAME:TE:UNET>: apply_lora(sd, TE, unet_multiplier=UNET) changes the U-Net as apply_lora(sd, UNET)
    does and the text encoder as apply_lora(sd, TE) does, bit for bit."""
    model = build("tiny", 1)
    sd = random_lora(model, 2)
    merged = {}
    for m in (0.4, 1.5):
        model.apply_lora(sd, m)
        merged[m] = {k: v.clone() for k, v in model.state_dict().items()}
        model.remove_loras()
    applied = model.apply_lora(sd, 0.4, unet_multiplier=1.5)
    assert (applied.multiplier, applied.unet_multiplier) == (0.4, 1.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged[1.5 if k.startswith("unet.") else 0.4][k]), k
    assert not torch.equal(merged[0.4]["unet.out.2.weight"], merged[1.5]["unet.out.2.weight"])


# -----------------------------------------------------------------------------------------------------------------
# Files that do not fit, or are not plain LoRA


@pytest.fixture(scope="module")
def untouched():
    """{preset: model} for the refusals, which leave every weight as it was (and check that they do)."""
    return {preset: build(preset, 1) for preset in ("tiny", "tiny-sdxl")}


def refusal(model, source, *patterns: str) -> str:
    """apply's CheckpointError: one line, matching every pattern, and no weight changed."""
    before = weights(model)
    with pytest.raises(CheckpointError) as e:
        model.apply_lora(source)
    message = str(e.value)
    assert "\n" not in message
    for p in patterns:
        assert p in message, (p, message)
    assert_same_weights(model, before)
    assert model.loras == []
    return message


def test_lora_for_another_model_is_refused(untouched):
    sd1, sdxl = untouched["tiny"], untouched["tiny-sdxl"]
    # SDXL's lora_te1_ / lora_te2_ modules exist in no SD 1.x model
    refusal(sd1, random_lora(sdxl, 2), "match nothing in this model", "lora_te1_text_model_encoder_layers_0_",
            "looks like a LoRA for SDXL")
    # an SD 1.x file's U-Net names exist in the SDXL structure too, with other shapes (its cross-attention reads a
    # 32-wide context, not 80)
    refusal(sdxl, random_lora(sd1, 2), "LoRA shapes that do not fit this model (a model with 80-wide text states)",
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k ((64, 4) x (4, 32) for a (64, 80) "
            "weight)", "; it looks like a LoRA for a model with 32-wide text states")


def test_guess_model_by_names_and_widths():
    def pairs(*named: tuple[str, int]) -> dict:
        return {n: lora.Pair(torch.empty(4, w, device="meta"), torch.empty(8, 4, device="meta"), 4.0) for n, w in named}
    te = "lora_te_text_model_encoder_layers_0_"
    assert lora.guess_model(pairs((te + "mlp_fc2", 3072), (te + "mlp_fc1", 768))) == "SD 1.x"  # fc2 reads 4x
    assert lora.guess_model(pairs((te + "self_attn_q_proj", 1024))) == "SD 2.x"
    assert lora.guess_model(pairs(("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 2048))) \
        == "SDXL"
    assert lora.guess_model(pairs(("lora_unet_input_blocks_4_1_proj_in", 640))) == "SDXL"
    assert lora.guess_model(pairs(("lora_unet_down_blocks_0_resnets_0_conv1", 320))) == "another model"


def test_unknown_module_is_named(untouched):
    model = untouched["tiny"]
    sd = random_lora(model, 2)
    sd.update({"lora_unet_no_such_module.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_no_such_module.lora_up.weight": torch.zeros(8, 4)})
    refusal(model, sd, "1 of its", "lora_unet_no_such_module")


@pytest.mark.parametrize("key", ["lora_unet_x.hada_w1_a", "lora_unet_x.lokr_w1", "lora_unet_x.dora_scale",
                                 "unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector"])
def test_other_kinds_are_refused(key, tmp_path, untouched):
    model = untouched["tiny"]
    sd = random_lora(model, 2)
    sd[key] = torch.ones(4)
    path = tmp_path / "lycoris.safetensors"
    checkpoint.save_safetensors(path, sd, {"format": "pt"})
    refusal(model, path, str(path), key, "LyCORIS / DoRA")


@pytest.mark.parametrize("drop", [".lora_up.weight", ".lora_down.weight"])
def test_half_pair_is_refused(drop, untouched):
    model = untouched["tiny"]
    sd = random_lora(model, 2)
    name = "lora_unet_mid_block_attentions_0_proj_in"
    del sd[name + drop]
    refusal(model, sd, name, "without its pair")


def test_not_lora_keys_are_refused(untouched):
    model = untouched["tiny"]
    refusal(model, {"model.diffusion_model.out.2.weight": torch.zeros(4)}, "not LoRA weights",
            "model.diffusion_model.out.2.weight")
    refusal(model, {}, "holds no LoRA weights")


def test_file_and_state_dict_read_the_same(tmp_path):
    """A kohya .safetensors (fp16, as kohya saves, with its ss_* metadata) read from disk, and the same tensors as
    a state dict."""
    model = build("tiny", 1)
    sd = {k: v.half() for k, v in random_lora(model, 2).items()}
    path = tmp_path / "style.safetensors"
    checkpoint.save_safetensors(path, sd, {"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    from_file, metadata = lora.read_lora(path)
    from_dict, _ = lora.read_lora(sd)
    assert metadata["ss_network_dim"] == "4"
    assert from_file.keys() == from_dict.keys() and len(from_file) == len(sd) // 3
    for name, p in from_file.items():
        q = from_dict[name]
        assert torch.equal(p.down, q.down) and torch.equal(p.up, q.up) and p.alpha == q.alpha, name
    twin = build("tiny", 1)
    assert model.apply_lora(path).name == "style"
    twin.apply_lora(sd)
    assert_same_weights(model, twin.state_dict())


# -----------------------------------------------------------------------------------------------------------------
# Training: LoRANetwork and its kohya export


def unet_inputs(model, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    cfg = model.unet.cfg
    y = None if cfg.adm_in_channels is None else torch.randn(2, cfg.adm_in_channels, generator=g)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 37.0]),
            torch.randn(2, 77, cfg.context_dim, generator=g), y)


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_network_hooks_match_its_merged_export(preset):
    """At init (up = 0) the hooked model is the base model exactly; with trained (random) ups, merging its kohya
    export with apply_lora gives what the hooks compute; remove_hooks restores the plain forward."""
    model = build(preset, 1)
    text = preset == "tiny"  # text-encoder LoRAs train SD 1.x's CLIP only
    inputs, tokens = unet_inputs(model), model.tokenizer(["a red apple", "a cat"])

    def run():
        with torch.no_grad():
            return model.unet(*inputs), model.text_encoder(tokens, pooled=not text)

    base_unet, base_text = run()
    net = lora.LoRANetwork(model, rank=4, alpha=2.0, which="all", text_encoder=text)
    assert any(n.startswith("lora_te_") for n in net.loras) == text
    hooked_unet, hooked_text = run()
    assert torch.equal(hooked_unet, base_unet)
    if text:
        assert torch.equal(hooked_text, base_text)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for lm in net.loras.values():
            lm.up.weight.copy_(torch.randn(lm.up.weight.shape, generator=g) / 2)
    hooked_unet, hooked_text = run()
    assert (hooked_unet - base_unet).abs().max() > 0.1
    net.remove_hooks()
    plain_unet, plain_text = run()
    assert torch.equal(plain_unet, base_unet)
    if text:
        assert torch.equal(plain_text, base_text)
    model.apply_lora(net.kohya_state_dict())
    merged_unet, merged_text = run()
    torch.testing.assert_close(merged_unet, hooked_unet, rtol=0, atol=1e-5 * hooked_unet.abs().max().item())
    if text:
        assert (hooked_text - base_text).abs().max() > 0.1
        torch.testing.assert_close(merged_text, hooked_text, rtol=0, atol=1e-5 * hooked_text.abs().max().item())


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_network_export_names_resolve(preset):
    """kohya_state_dict's names are ones lora.resolve finds in the same model, on the very modules the network
    hooks: diffusers U-Net paths for SD 1.x, original ones for SDXL (as sd-scripts writes them); each target set
    holds the smaller one."""
    model = build(preset, 1)
    sizes = []
    for which in lora.TARGET_SETS:
        net = lora.LoRANetwork(model, rank=2, which=which, text_encoder=preset == "tiny")
        state = net.kohya_state_dict()
        assert set(state) == {n + s for n in net.loras for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
        pairs, _ = lora.read_lora(state)
        resolved = lora.resolve(model, pairs, "export")
        assert len(resolved) == len(net.loras)
        hooked = {id(m) for m in model.modules() if m._forward_hooks}
        found = set()
        for (target, pair), lm in zip(resolved, net.loras.values()):
            module = getattr(model, target.part).get_submodule(target.module)
            assert target.rows is None and pair.alpha == 2.0
            assert pair.down.shape == lm.down.weight.shape and pair.up.shape == lm.up.weight.shape
            assert module.weight.shape[0] == lm.up.weight.shape[0]
            found.add(id(module))
        assert found == hooked and len(found) == len(net.loras)
        unet_names = [n for n in net.loras if n.startswith("lora_unet_")]
        style = ("input_blocks", "middle_block", "output_blocks") if preset == "tiny-sdxl" else (
            "down_blocks", "mid_block", "up_blocks")
        assert all(any(s in n for s in style) for n in unet_names)
        net.remove_hooks()
        sizes.append(set(net.loras))
    assert sizes[0] < sizes[1] < sizes[2]
