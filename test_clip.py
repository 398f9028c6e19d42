"""Tests for clip.py: tokenizer golden ids, full-size key layouts, parity with transformers / open_clip.
Golden data: fixtures/clip_tokens.json, fixtures/clip_parity.pt (regenerate with fixtures/gen_clip.py)."""
import json
import os
import warnings

import pytest
import torch

import clip

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")

LONG = ("a highly detailed matte painting of a sprawling cyberpunk city at night, neon signs, rain soaked streets, "
        "flying cars, towering skyscrapers, volumetric lighting, god rays, cinematic composition, by greg rutkowski "
        "and alphonse mucha, trending on artstation, octane render, unreal engine 5, 8k, ultra wide angle, "
        "dramatic clouds, reflections in puddles, crowded markets, holographic advertisements, steam vents")
PROMPTS = [
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
    LONG, LONG + " " + LONG, "word " * 100,
]
PARITY_PROMPTS = ["a photo of an astronaut riding a horse on mars", "東京の夜景, 8k 🐱", "", LONG]

# Reduced width, real structure: 12 quick_gelu layers (SD1); 24 gelu blocks, penultimate output (SD2).
SD1_NARROW = clip.TextConfig(layout="clip", width=64, layers=12, heads=4, act="quick_gelu", layer="last")
SD2_NARROW = clip.TextConfig(layout="openclip", width=64, layers=24, heads=4, act="gelu", layer="penultimate",
                             embed_dim=64)


def seeded_weights(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights for a {name: shape} layout (shared with fixtures/gen_clip.py): matrices
    randn / sqrt(fan_in), 1-D weights (LayerNorm) 1 + 0.1 randn, biases and scalars 0.02 randn / randn."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        t = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            t = t / shape[-1] ** 0.5
        elif len(shape) == 1:
            t = 1 + 0.1 * t if name.endswith("weight") else 0.02 * t
        out[name] = t
    return out


@pytest.fixture(scope="module")
def tok():
    return clip.Tokenizer()


@pytest.fixture(scope="module")
def golden_tokens():
    with open(os.path.join(FIXTURES, "clip_tokens.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def parity():
    return torch.load(os.path.join(FIXTURES, "clip_parity.pt"), weights_only=True)


def sd1_padding(rows: torch.Tensor) -> torch.Tensor:
    """open_clip pads with 0; SD1's tokenizer fills every position after EOT with EOT (49407)."""
    eot_pos = (rows == 49407).int().argmax(1, keepdim=True)
    return torch.where(torch.arange(rows.shape[1])[None] > eot_pos, torch.full_like(rows, 49407), rows)


# -------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_golden_prompts_cover_the_brief(golden_tokens):
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


def manifest_part(name: str, prefix: str) -> dict:
    with open(os.path.join(FIXTURES, "manifests", name)) as f:
        entries = json.load(f)
    return {k[len(prefix):]: v[0] for k, v in entries.items() if k.startswith(prefix)}


@pytest.mark.parametrize("preset, manifest, prefix", [
    ("sd1", "sd15.json", "cond_stage_model.transformer.text_model."),
    ("sd2", "sd21-768-v.json", "cond_stage_model.model."),
])
def test_full_size_layout_matches_manifest(preset, manifest, prefix):
    expected = manifest_part(manifest, prefix)
    expected.pop("embeddings.position_ids", None)  # stored int64 [1, 77]; dropped by the loader, arange used
    with torch.device("meta"):
        model = clip.build_text_encoder(clip.PRESETS[preset])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)  # same names, same order
    assert got == expected


def test_tiny_preset_runs(tok):
    model = clip.build_text_encoder(clip.PRESETS["tiny"])
    out = model(tok(["a cat", "a dog"]))
    assert out.shape == (2, 77, 32) and torch.isfinite(out).all()


# -------------------------------------------------------------------------------------------------------------------
# Parity (fp32) against transformers / open_clip golden hidden states


def assert_parity(out: torch.Tensor, ref: torch.Tensor):
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
    model.load_state_dict(seeded_weights({k: v.shape for k, v in model.state_dict().items()}, seed=1), strict=True)
    assert_parity(run(model, parity["tokens_sd1"]), parity["sd1"])


def test_sd2_parity_with_open_clip_penultimate(parity):
    model = clip.build_text_encoder(SD2_NARROW)
    model.load_state_dict(seeded_weights({k: v.shape for k, v in model.state_dict().items()}, seed=2), strict=True)
    assert_parity(run(model, parity["tokens_sd2"]), parity["sd2"])
    model.cfg.layer = "last"  # running all 24 blocks must give something else
    assert not torch.allclose(run(model, parity["tokens_sd2"]), parity["sd2"], atol=1e-2)


def test_sd2_without_last_block_equals_penultimate(parity):
    """What a diffusers SD2 export keeps (blocks 0..22, no projection) run to the end == SD2's penultimate output."""
    full = clip.build_text_encoder(SD2_NARROW).state_dict()
    weights = seeded_weights({k: v.shape for k, v in full.items()}, seed=2)
    kept = {k: v for k, v in weights.items()
            if not k.startswith("transformer.resblocks.23.") and k not in ("text_projection", "logit_scale")}
    cfg = clip.TextConfig(layout="openclip", width=64, layers=23, heads=4, act="gelu", layer="last")
    model = clip.build_text_encoder(cfg)
    model.load_state_dict(kept, strict=True)
    assert_parity(run(model, parity["tokens_sd2"]), parity["sd2"])


def test_sd1_diffusers_folder_layouts(parity):
    """transformers < 5 saves `text_model.` + a persistent position_ids; both must convert to our names."""
    shapes = {k: v.shape for k, v in clip.build_text_encoder(SD1_NARROW).state_dict().items()}
    weights = seeded_weights(shapes, seed=1)
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
    sd = seeded_weights(parity["sd2_diffusers_shapes"], seed=3)
    model = clip.build_text_encoder(cfg)
    model.load_state_dict(clip.convert_diffusers(sd, cfg), strict=True)
    assert_parity(run(model, parity["tokens_sd2"]), parity["sd2_diffusers"])
    with pytest.raises(AssertionError, match="unexpected keys"):
        clip.convert_diffusers({**sd, "text_projection.weight": torch.zeros(64, 64)}, cfg)
