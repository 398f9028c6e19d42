"""Tests for clip.py: tokenizer golden ids, full-size key layouts, parity with transformers / open_clip, SDXL's two
text encoders. Golden data: fixtures/clip_tokens.json, fixtures/clip_parity.pt, fixtures/clip_sdxl.pt (regenerate
with fixtures/gen_clip.py)."""
import json
import os
import warnings
from dataclasses import asdict, replace

import pytest
import torch

import clip
from testutil import (CLIP_LONG_PROMPT as LONG, CLIP_NARROW, CLIP_PARITY_PROMPTS as PARITY_PROMPTS,
                      CLIP_PROMPTS as PROMPTS, CLIP_SDXL_NARROW, CLIP_SDXL_SEEDS, CLIP_SEEDS, FIXTURES, manifest,
                      random_weights, randomize_)

SD1_NARROW, SD2_NARROW = CLIP_NARROW["sd1"], CLIP_NARROW["sd2"]


@pytest.fixture(scope="module")
def tok():
    return clip.Tokenizer()


@pytest.fixture(scope="module")
def golden_tokens():
    return json.loads((FIXTURES / "clip_tokens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def parity():
    return torch.load(FIXTURES / "clip_parity.pt", weights_only=True)


def sd1_padding(rows: torch.Tensor) -> torch.Tensor:
    """open_clip pads with 0; SD1's tokenizer fills every position after EOT with EOT (49407)."""
    eot_pos = (rows == 49407).int().argmax(1, keepdim=True)
    return torch.where(torch.arange(rows.shape[1])[None] > eot_pos, torch.full_like(rows, 49407), rows)


# -------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_golden_prompts_are_the_shared_list(golden_tokens):
    assert golden_tokens["prompts"] == PROMPTS and len(PROMPTS) >= 50
    assert any(len(ids) > 75 for ids in golden_tokens["encode"])


def test_encode_matches_open_clip(tok, golden_tokens):
    for prompt, ids in zip(golden_tokens["prompts"], golden_tokens["encode"]):
        assert tok.encode(prompt) == ids, prompt


def test_rows_match_open_clip_pad0_and_sd1_pad49407(tok, golden_tokens):
    rows = torch.tensor(golden_tokens["rows"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd2 = clip.Tokenizer(pad_id=0)(golden_tokens["prompts"])
        sd1 = tok(golden_tokens["prompts"])
    assert sd2.dtype == torch.long and sd2.shape == (len(PROMPTS), 77)
    assert torch.equal(sd2, rows)
    assert torch.equal(sd1, sd1_padding(rows))
    assert (sd1[0] == torch.tensor([49406] + [49407] * 76)).all()  # empty prompt: SOT then EOT everywhere
    assert (sd2[0, 2:] == 0).all() and sd2[0, :2].tolist() == [49406, 49407]


def test_truncation_warns_once_and_keeps_eot_last(tok):
    n = len(tok.encode(LONG)) + 2
    assert n > 77
    with pytest.warns(UserWarning, match=f"{n - 77} tokens dropped") as record:
        rows = tok([LONG, "a cat", LONG])
    assert len(record) == 1
    assert rows[0, -1] == 49407 and rows[0, 0] == 49406
    assert rows[0, 1:76].tolist() == tok.encode(LONG)[:75]
    assert torch.equal(rows[0], rows[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # short prompts must not warn
        tok("a cat")


def test_decode_round_trip(tok):
    assert tok.decode(tok.encode("A  Photo of a CAT!")) == "a photo of a cat !"
    assert tok.decode(tok("東京の夜景 🐱")[0]) == "東京の夜景 🐱"


def write_diffusers_tokenizer(folder, tok, pad_token, config_file="special_tokens_map.json"):
    """A transformers-style tokenizer folder derived from the shipped BPE file."""
    import gzip
    with gzip.open(clip.BPE_PATH) as f:
        merges = f.read().decode("utf-8").split("\n")[1:clip.N_MERGES + 1]
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(tok.encoder, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    if pad_token is not None:
        with open(os.path.join(folder, config_file), "w") as f:
            json.dump({"bos_token": clip.SOT_TOKEN, "eos_token": clip.EOT_TOKEN, "pad_token": pad_token}, f)


def test_from_diffusers(tmp_path, tok, golden_tokens):
    cases = [(None, 49407, "special_tokens_map.json"), ("<|endoftext|>", 49407, "special_tokens_map.json"),
             ("!", 0, "special_tokens_map.json"),
             ({"__type": "AddedToken", "content": "!"}, 0, "tokenizer_config.json")]
    for i, (pad_token, pad_id, config_file) in enumerate(cases):
        folder = str(tmp_path / f"tokenizer{i}")
        write_diffusers_tokenizer(folder, tok, pad_token, config_file)
        hf = clip.Tokenizer.from_diffusers(folder)
        assert hf.pad_id == pad_id
        for prompt, ids in zip(golden_tokens["prompts"][:40], golden_tokens["encode"][:40]):
            assert hf.encode(prompt) == ids, prompt
        assert torch.equal(hf(PARITY_PROMPTS[:3]), clip.Tokenizer(pad_id=pad_id)(PARITY_PROMPTS[:3]))


# -------------------------------------------------------------------------------------------------------------------
# Full-size layouts against the checkpoint manifests


@pytest.mark.parametrize("preset, manifest_name, prefix", [
    ("sd1", "sd15", "cond_stage_model.transformer.text_model."),
    ("sd2", "sd21-768-v", "cond_stage_model.model."),
])
def test_full_size_layout_matches_manifest(preset, manifest_name, prefix):
    expected = manifest(manifest_name, prefix)
    expected.pop("embeddings.position_ids", None)  # stored int64 [1, 77]; dropped by the loader, arange used
    with torch.device("meta"):
        model = clip.build_text_encoder(clip.PRESETS[preset])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)  # same names, same order
    assert got == expected


def test_tiny_preset_runs(tok):
    model = clip.build_text_encoder(clip.PRESETS["tiny"])
    out = model(tok(["a cat", "a dog"]))
    assert out.shape == (2, 77, 32) and torch.isfinite(out).all()


# -------------------------------------------------------------------------------------------------------------------
# Parity (fp32) against transformers / open_clip golden hidden states


def assert_parity(out: torch.Tensor, ref: torch.Tensor):
    # The goldens are transformers' / open_clip's float32 outputs. Ours and theirs (and either on another CPU, whose
    # vector kernels sum in other orders) differ by float32 rounding accumulated over 12-24 blocks: a few 1e-6 of
    # the output's scale (the golden's own 23-layer cross-check measured 2.7e-6 of ~4). 1e-4 of the largest output
    # keeps 10x headroom on any machine; a real mismatch (activation, layer, mask) moves outputs by O(0.1) or more.
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def run(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


def test_tokens_of_parity_inputs(parity):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(clip.Tokenizer()(PARITY_PROMPTS), parity["tokens_sd1"])
        assert torch.equal(clip.Tokenizer(pad_id=0)(PARITY_PROMPTS), parity["tokens_sd2"])


def test_sd1_parity_with_transformers(parity):
    model = clip.build_text_encoder(SD1_NARROW)
    randomize_(model, seed=CLIP_SEEDS["sd1"])
    assert_parity(run(model, parity["tokens_sd1"]), parity["sd1"])


def test_sd2_parity_with_open_clip_penultimate(parity):
    model = clip.build_text_encoder(SD2_NARROW)
    randomize_(model, seed=CLIP_SEEDS["sd2"])
    assert_parity(run(model, parity["tokens_sd2"]), parity["sd2"])
    # running all 24 blocks must give something else; set on a copy, since the config is testutil's, shared
    model.cfg = replace(model.cfg, layer="last")
    assert not torch.allclose(run(model, parity["tokens_sd2"]), parity["sd2"], atol=1e-2)


def test_sd2_without_last_block_equals_penultimate(parity):
    """What a diffusers SD2 export keeps (blocks 0..22, no projection) run to the end == SD2's penultimate output."""
    full = clip.build_text_encoder(SD2_NARROW).state_dict()
    weights = random_weights({k: v.shape for k, v in full.items()}, seed=CLIP_SEEDS["sd2"])
    kept = {k: v for k, v in weights.items()
            if not k.startswith("transformer.resblocks.23.") and k not in ("text_projection", "logit_scale")}
    cfg = clip.TextConfig(layout="openclip", width=64, layers=23, heads=4, act="gelu", layer="last")
    model = clip.build_text_encoder(cfg)
    model.load_state_dict(kept, strict=True)
    assert_parity(run(model, parity["tokens_sd2"]), parity["sd2"])


def test_sd1_diffusers_folder_layouts(parity):
    """transformers < 5 saves `text_model.` + a persistent position_ids; both must convert to our names."""
    shapes = {k: v.shape for k, v in clip.build_text_encoder(SD1_NARROW).state_dict().items()}
    weights = random_weights(shapes, seed=CLIP_SEEDS["sd1"])
    old = {"text_model." + k: v for k, v in weights.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    hf_config = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4,
                     hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
    cfg = clip.config_from_diffusers(hf_config)
    assert cfg == SD1_NARROW
    for sd in (old, weights):
        model = clip.build_text_encoder(cfg)
        model.load_state_dict(clip.convert_diffusers(sd, cfg), strict=True)
        assert_parity(run(model, parity["tokens_sd1"]), parity["sd1"])


def test_sd2_diffusers_conversion(parity):
    cfg = clip.config_from_diffusers(parity["sd2_diffusers_config"])
    assert (cfg.layout, cfg.layers, cfg.layer, cfg.act, cfg.embed_dim) == ("openclip", 23, "last", "gelu", None)
    sd = random_weights(parity["sd2_diffusers_shapes"], seed=CLIP_SEEDS["sd2_diffusers"])
    model = clip.build_text_encoder(cfg)
    model.load_state_dict(clip.convert_diffusers(sd, cfg), strict=True)
    assert_parity(run(model, parity["tokens_sd2"]), parity["sd2_diffusers"])
    with pytest.raises(AssertionError, match="unexpected keys"):
        clip.convert_diffusers({**sd, "text_projection.weight": torch.zeros(64, 64)}, cfg)


# -------------------------------------------------------------------------------------------------------------------
# SDXL: CLIP-L + OpenCLIP bigG


@pytest.fixture(scope="module")
def sdxl():
    return torch.load(FIXTURES / "clip_sdxl.pt", weights_only=True)


@pytest.fixture(scope="module")
def sdxl_te():
    """The reduced-width SDXL text side with the goldens' weights; tests must not change it."""
    return randomize_(clip.build_text_encoder(CLIP_SDXL_NARROW), seed=CLIP_SDXL_SEEDS["ours"]).eval()


SDXL_PREFIXES = {"l": "conditioner.embedders.0.transformer.text_model.", "g": "conditioner.embedders.1.model.",
                 "refiner_g": "conditioner.embedders.0.model."}


def test_sdxl_full_size_layouts_match_manifests():
    clip_l = manifest("sdxl-base", SDXL_PREFIXES["l"])
    clip_l.pop("embeddings.position_ids")  # stored int64 [1, 77]; checkpoint.is_ignored drops it, arange is used
    clip_g = manifest("sdxl-base", SDXL_PREFIXES["g"])
    assert list(manifest("sdxl-refiner", SDXL_PREFIXES["refiner_g"]).items()) == list(clip_g.items())
    with torch.device("meta"):
        base = clip.build_text_encoder(clip.PRESETS["sdxl"])
        refiner = clip.build_text_encoder(clip.PRESETS["sdxl-refiner"])
        sd1 = clip.build_text_encoder(clip.PRESETS["sd1"])
    expected = {**{"clip_l." + k: v for k, v in clip_l.items()}, **{"clip_g." + k: v for k, v in clip_g.items()}}
    for model, want in ((base, expected), (refiner, {k: v for k, v in expected.items() if k.startswith("clip_g.")})):
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert list(got) == list(want)  # same names, same order
        assert got == want
        assert "clip_g.logit_scale" in dict(model.named_parameters())  # a strict load consumes the file's
    assert refiner.clip_l is None and isinstance(base.clip_l, clip.CLIPTextModel)
    assert list(base.clip_l.state_dict()) == list(sd1.state_dict())  # CLIP-L is SD 1.x's text encoder
    assert (base.widths, refiner.widths) == ([768, 1280], [1280])


def test_sdxl_config_round_trips():
    for name in ("sd1", "sd2", "tiny", "sdxl", "sdxl-refiner", "tiny-sdxl"):
        cfg = clip.PRESETS[name]
        assert clip.text_config(name) is cfg and clip.text_config(cfg) is cfg
        assert clip.text_config(json.loads(json.dumps(asdict(cfg)))) == cfg  # model metadata is JSON
    cfg = clip.build_text_encoder(clip.PRESETS["tiny-sdxl"]).cfg
    assert (cfg.layout, cfg.clip_l, cfg.clip_g) == ("sdxl", clip.PRESETS["tiny-sdxl-l"], clip.PRESETS["tiny-sdxl-g"])
    assert asdict(clip.PRESETS["sd1"])["final_norm"] is True
    with pytest.raises(TypeError):
        clip.text_config({**asdict(clip.PRESETS["sdxl"]), "extra": 1})
    with pytest.raises(ValueError, match="embed_dim"):
        clip.SDXLTextEncoder(None, clip.PRESETS["sd1"])


def test_pad_after_eot():
    rows = torch.tensor([[49406, 5, 49407, 49407, 49407], [49406, 49407, 7, 49407, 0], [49406, 5, 6, 7, 8]])
    assert clip.pad_after_eot(rows, 0).tolist() == [[49406, 5, 49407, 0, 0], [49406, 49407, 0, 0, 0],
                                                     [49406, 5, 6, 7, 8]]  # the first EOT counts; no EOT: as is
    assert clip.pad_after_eot(rows, 49407)[0].tolist() == [49406, 5, 49407, 49407, 49407]


def test_sdxl_tokens_of_the_goldens(sdxl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(clip.Tokenizer()(PARITY_PROMPTS), sdxl["tokens_l"])
        assert torch.equal(clip.Tokenizer(pad_id=0)(PARITY_PROMPTS), sdxl["tokens_g"])


def test_sdxl_parity_with_transformers(sdxl, sdxl_te):
    """CLIP-L's context = transformers' hidden_states[-2]; bigG's = CLIPTextModelWithProjection's hidden_states[-2]
    and pooled = its text_embeds, that model filled from our weights by diffusers' single-file converter (and
    matched against open_clip in fixtures/gen_clip.py); clip skip 2 = hidden_states[-3] (diffusers' clip_skip=1)."""
    with torch.no_grad():
        context, pooled = sdxl_te(sdxl["tokens_l"], pooled=True)
        either_pad = sdxl_te(sdxl["tokens_g"], pooled=True)  # each encoder pads the rows its own way
        skip2 = sdxl_te(sdxl["tokens_l"], clip_skip=2)
        l_pooled = sdxl_te.clip_l(sdxl["tokens_l"], pooled=True)[1]
    assert context.shape == (4, 77, 64 + 80) and pooled.shape == (4, 48)
    assert torch.equal(either_pad[0], context) and torch.equal(either_pad[1], pooled)
    for name, out in (("context", context), ("context_skip2", skip2)):
        out_l, out_g = out.split([64, 80], dim=-1)
        assert_parity(out_l, sdxl[f"l_{name}"])
        assert_parity(out_g, sdxl[f"g_{name}"])
    assert_parity(pooled, sdxl["g_pooled"])
    assert_parity(l_pooled, sdxl["l_pooled"])  # transformers' pooler_output (SDXL does not use CLIP-L's)
    assert torch.equal(sdxl_te(sdxl["tokens_l"]), context)


def test_sdxl_pooled_runs_every_block_whatever_clip_skip(sdxl_te, sdxl):
    tokens = sdxl["tokens_g"]
    with torch.no_grad():
        _, pooled = sdxl_te(tokens, pooled=True)
        _, pooled_skip = sdxl_te(tokens, clip_skip=5, pooled=True)
        g = sdxl_te.clip_g
        x, _ = clip.run_blocks(g.transformer.resblocks, g.token_embedding(tokens) + g.positional_embedding, 32)
        by_hand = g.ln_final(x)[torch.arange(4), tokens.argmax(dim=-1)] @ g.text_projection
    assert torch.equal(pooled, pooled_skip)
    torch.testing.assert_close(pooled, by_hand, rtol=1e-6, atol=1e-6)
    # CLIP-L's range is the smaller one, and it decides
    with pytest.raises(ValueError, match=r"to 11 \(the first block.s output\) for this 11-block"):
        sdxl_te(tokens, clip_skip=12)
    with pytest.raises(ValueError, match="no text_projection"):
        clip.build_text_encoder(clip.TextConfig(layout="openclip", width=32, layers=2, heads=2))(tokens, pooled=True)


def sdxl_diffusers_weights(sdxl) -> tuple[dict, dict]:
    return tuple(random_weights(sdxl[f"diffusers_{name}_shapes"], seed=CLIP_SDXL_SEEDS[name])
                 for name in ("text_encoder", "text_encoder_2"))


def test_sdxl_diffusers_conversion(sdxl):
    """A diffusers SDXL folder's text_encoder/ + text_encoder_2/ (and a refiner's text_encoder_2/ alone) convert into
    an SDXLTextEncoder that reproduces transformers' outputs: all 32 bigG layers and the transposed projection."""
    config_l, config_g = sdxl["diffusers_text_encoder_config"], sdxl["diffusers_text_encoder_2_config"]
    cfg = clip.config_from_diffusers(config_l, config_g)
    assert cfg == CLIP_SDXL_NARROW
    sd_l, sd_g = sdxl_diffusers_weights(sdxl)
    hub_l = {"text_model." + k: v for k, v in sd_l.items()}  # transformers < 5 names, as the hub's folders have
    hub_l["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    for text_encoder in (sd_l, hub_l):
        model = clip.build_text_encoder(cfg).eval()
        model.load_state_dict(clip.convert_diffusers(text_encoder, cfg, sd_g), strict=True)
        with torch.no_grad():
            context, pooled = model(sdxl["tokens_l"], pooled=True)
        assert_parity(context, sdxl["diffusers_context"])
        assert_parity(pooled, sdxl["diffusers_pooled"])
    assert torch.equal(model.clip_g.text_projection, sd_g["text_projection.weight"].T)

    refiner_cfg = clip.config_from_diffusers(None, config_g)
    assert refiner_cfg == clip.SDXLTextConfig(None, CLIP_SDXL_NARROW.clip_g)
    refiner = clip.build_text_encoder(refiner_cfg).eval()
    refiner.load_state_dict(clip.convert_diffusers(None, refiner_cfg, sd_g), strict=True)
    with torch.no_grad():
        context, pooled = refiner(sdxl["tokens_g"], pooled=True)
    assert_parity(context, sdxl["diffusers_context"][..., 64:])
    assert_parity(pooled, sdxl["diffusers_pooled"])
    with pytest.raises(ValueError, match="text_encoder_2/ of an SDXL folder must be OpenCLIP bigG"):
        clip.config_from_diffusers(config_l, config_l)


def test_sdxl_diffusers_round_trip_with_diffusers_converter(sdxl_te):
    """Ours -> diffusers' names by diffusers' own single-file converters -> ours again: every tensor comes back (but
    logit_scale, which diffusers drops: CLIP's initial value stands in)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    ours = sdxl_te.state_dict()
    file = {SDXL_PREFIXES[k[5]] + k[7:]: v for k, v in ours.items()}  # clip_l.* / clip_g.* -> the single file's keys
    text_encoder = convert_ldm_clip_checkpoint(file, SDXL_PREFIXES["l"])
    g = CLIP_SDXL_NARROW.clip_g
    with torch.device("meta"):
        hf_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=g.width, intermediate_size=4 * g.width, num_hidden_layers=g.layers, num_attention_heads=g.heads,
            hidden_act="gelu", projection_dim=g.embed_dim))
    text_encoder_2 = convert_open_clip_checkpoint(hf_g, file, SDXL_PREFIXES["g"])
    assert set(text_encoder_2) == set(hf_g.state_dict())  # every one of the 32 layers and text_projection
    back = clip.convert_diffusers(text_encoder, CLIP_SDXL_NARROW, text_encoder_2)
    assert set(back) == set(ours)
    for k, v in ours.items():
        if k != "clip_g.logit_scale":
            assert torch.equal(back[k], v), k
