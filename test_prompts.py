"""Tests for the prompt side of clip.py and LatentDiffusion.encode_prompt: AUTOMATIC1111's attention syntax, chunks
of 75 tokens, "Original" emphasis, clip skip (against transformers) and textual-inversion embeddings, on SD 1.x / 2.x
and on SDXL's two text encoders (context and pooled vector)."""
import copy
import hashlib
import os
import warnings

import pytest
import torch

import checkpoint
import clip
import ldm
from testutil import (CLIP_NARROW, CLIP_PARITY_PROMPTS, CLIP_SDXL_NARROW, CLIP_SDXL_SEEDS, CLIP_SEEDS, FIXTURES,
                      random_weights, randomize_)

SOT, EOT, COMMA = 49406, 49407, 267


@pytest.fixture(scope="module")
def tok():
    return clip.Tokenizer()


@pytest.fixture(scope="module")
def model():
    """The tiny model (text encoder 32 wide, 2 layers) with seeded weights; tests must not change it."""
    return randomize_(ldm.build_model("tiny"))


def ids(tok, word: str) -> int:
    (i,) = tok.encode(word)  # the test words are one token each
    return i


# -------------------------------------------------------------------------------------------------------------------
# parse_prompt_attention


def test_parse_a1111_docstring_examples():
    P = clip.parse_prompt_attention
    assert P("normal text") == [("normal text", 1.0)]
    assert P("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert P("(unbalanced") == [("unbalanced", 1.1)]
    assert P("\\(literal\\]") == [("(literal]", 1.0)]
    assert P("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert P("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]


@pytest.mark.parametrize("text, expected", [
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),  # brackets around nothing leave nothing
    ("(a:0.5)", [("a", 0.5)]),
    ("(a:+1.25) b", [("a", 1.25), (" b", 1.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a: 1.5)", [("a: 1.5", 1.1)]),  # a space after ':' is no weight: text, closed by a plain ')'
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # ":1.2.3)" does not parse: all text, "(" left open (A1111 raises)
    ("a:b", [("a:b", 1.0)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[[a]]", [("a", (1 / 1.1) * (1 / 1.1))]),
    ("([a])", [("a", (1 / 1.1) * 1.1)]),
    ("((a:2) b)", [("a", 2 * 1.1), (" b", 1.1)]),
    ("[a (b:1.5)]", [("a ", 1 / 1.1), ("b", 1.5 * (1 / 1.1))]),
    ("(a [b", [("a ", 1.1), ("b", (1 / 1.1) * 1.1)]),  # unclosed: round brackets first, then square
    ("a) b]", [("a) b]", 1.0)]),  # closing brackets that close nothing are text
    ("a\\\\b", [("a\\b", 1.0)]),
    ("\\[x\\] \\(y\\)", [("[x] (y)", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before anything else is dropped
    ("(a\\)b)", [("a)b", 1.1)]),
    ("a (b) (c)", [("a ", 1.0), ("b", 1.1), (" ", 1.0), ("c", 1.1)]),
])
def test_parse_syntax(text, expected):
    assert clip.parse_prompt_attention(text) == expected


def test_parse_break():
    P = clip.parse_prompt_attention
    assert P("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert P("a BREAK") == [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]
    assert P("aBREAKb break") == [("aBREAKb break", 1.0)]  # a word of its own, upper case
    assert P("a\nBREAK\tb") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert P("(a) BREAK b") == [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]  # the empty piece stays
    assert P("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]  # inside brackets: only text


# -------------------------------------------------------------------------------------------------------------------
# Chunks


def row(content: list[int], pad: int = EOT) -> list[int]:
    """A chunk's 77 token ids: SOT, content, EOT, then `pad`."""
    return [SOT, *content, EOT] + [pad] * (75 - len(content))


@pytest.mark.parametrize("n, chunks", [(0, [0]), (1, [1]), (75, [75]), (76, [75, 1]), (150, [75, 75]),
                                       (151, [75, 75, 1])])
def test_chunks_of_75_tokens(tok, n, chunks):
    a = ids(tok, "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning any more
        p = clip.PromptChunker(tok)("a " * n)
    assert p.tokens.tolist() == [row([a] * m) for m in chunks]
    assert p.weights.shape == (len(chunks), 77) and (p.weights == 1).all()
    assert p.fixes == [[] for _ in chunks]


def test_chunks_break(tok):
    a, b, c = ids(tok, "a"), ids(tok, "b"), ids(tok, "c")
    chunker = clip.PromptChunker(tok)
    assert chunker("a BREAK b c").tokens.tolist() == [row([a]), row([b, c])]
    assert chunker("a BREAK").tokens.tolist() == [row([a])]
    assert chunker("BREAK a").tokens.tolist() == [row([]), row([a])]  # BREAK closes even an empty chunk
    assert chunker("a BREAK BREAK b").tokens.tolist() == [row([a]), row([]), row([b])]
    assert chunker("(a BREAK b)").tokens.tolist() == [row([a, ids(tok, "break"), b])]
    assert chunker("a " * 75 + "BREAK b").tokens.tolist() == [row([a] * 75), row([b])]


@pytest.mark.parametrize("comma_at, moves", [(55, True), (54, False), (74, True), (10, False)])
def test_comma_backtrack(tok, comma_at, moves):
    """A chunk that fills moves the tokens after its last comma to the next chunk if that comma is within 20 tokens
    of the 75 boundary (75 - position <= 20), else it is cut at 75."""
    a, b = ids(tok, "a"), ids(tok, "b")
    content = [a] * comma_at + [COMMA] + [b] * (100 - comma_at - 1)
    p = clip.PromptChunker(tok)(" ".join(tok.decoder[i].removesuffix("</w>") for i in content))
    if moves:
        expected = [row(content[:comma_at + 1]), row(content[comma_at + 1:])]
    else:
        expected = [row(content[:75]), row(content[75:])]
    assert p.tokens.tolist() == expected


def test_comma_backtrack_keeps_weights(tok):
    p = clip.PromptChunker(tok)("a " * 70 + ", (b:1.5) " * 2 + "c " * 10)
    # content: a x 70, ",", b, ",", b, c ...: the chunk fills at the first c, 3 after the last comma
    assert p.tokens[0, 71:75].tolist() == [COMMA, ids(tok, "b"), COMMA, EOT]
    assert p.weights[0, 72] == 1.5 and (p.weights[0, 73:] == 1).all()
    assert p.tokens[1, 1] == ids(tok, "b") and p.weights[1, 1] == 1.5


def test_sd2_pads_with_zero_after_the_first_eot():
    tok = clip.Tokenizer(pad_id=0)
    a = ids(tok, "a")
    p = clip.PromptChunker(tok).batch(["a " * 76, ""])
    assert p[0].tokens.tolist() == [row([a] * 75, 0), row([a], 0)]
    assert p[1].tokens.tolist() == [row([], 0), row([], 0)]


def test_batch_pads_to_the_same_chunk_count(tok):
    a = ids(tok, "a")
    short, long, empty = clip.PromptChunker(tok).batch(["(a:1.5)", "a " * 151, ""])
    assert long.tokens.tolist() == [row([a] * 75), row([a] * 75), row([a])]
    assert short.tokens.tolist() == [row([a]), row([]), row([])]
    assert empty.tokens.tolist() == [row([])] * 3
    assert short.weights[0, 1] == 1.5 and (short.weights[1:] == 1).all()
    assert len(short.fixes) == 3


# -------------------------------------------------------------------------------------------------------------------
# Encoding: plain prompts, long prompts, emphasis


def test_plain_prompt_is_exactly_the_text_encoder_output(model):
    prompts = ["a photo of an astronaut riding a horse on mars", "", "東京の夜景, 8k 🐱"]
    with torch.no_grad():
        expected = model.text_encoder(model.tokenizer(prompts))
        expected2 = model.text_encoder(model.tokenizer(prompts), clip_skip=2)
    assert torch.equal(model.encode_prompt(prompts), expected)
    assert torch.equal(model.encode_prompt(prompts, clip_skip=2), expected2)
    assert not torch.allclose(expected, expected2)


def test_plain_prompt_sd2_exact():
    tok = clip.Tokenizer(pad_id=0)
    te = randomize_(clip.build_text_encoder(CLIP_NARROW["sd2"]), seed=CLIP_SEEDS["sd2"]).eval()
    prompts = CLIP_PARITY_PROMPTS[:3]
    with torch.no_grad():
        z = clip.encode_chunks(te, clip.PromptChunker(tok).batch(prompts))
        assert torch.equal(z, te(tok(prompts)))


def test_long_prompt_chunks_are_encoded_separately(model):
    prompt = "a red apple on a wooden table " * 15  # 105 tokens, no comma
    z = model.encode_prompt([prompt, "a cat"])
    assert z.shape == (2, 154, 32)
    ids = model.tokenizer.encode(prompt)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        first = model.text_encoder(model.tokenizer([prompt]))  # the old cut at 75 tokens: the first chunk
        second = model.text_encoder(torch.tensor([row(ids[75:])]))
        cat, empty = model.text_encoder(model.tokenizer(["a cat", ""])).chunk(2)
    # one batch of 4 rows against batches of 1 and 2: equal up to how the CPU kernels block a batch
    for got, want in ((z[0, :77], first[0]), (z[0, 77:], second[0]), (z[1, :77], cat[0]), (z[1, 77:], empty[0])):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_emphasis_against_a_hand_computation(model):
    z = model.encode_prompt(["a (red:1.5) [apple] on ((a table)"])
    tokens = model.tokenizer(["a red apple on a table"])
    w = torch.ones(77)
    w[2], w[3], w[5:7] = 1.5, 1 / 1.1, 1.1 * 1.1  # "a red apple on a table": SOT a red apple on a table EOT
    with torch.no_grad():
        plain = model.text_encoder(tokens)[0]
    expected = plain * w[:, None]
    expected = expected * (plain.mean() / expected.mean())
    torch.testing.assert_close(z[0], expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(z.mean(), plain.mean(), rtol=1e-5) and not torch.allclose(z[0], plain, atol=1e-3)


def test_emphasis_mean_is_per_prompt(model):
    """A prompt's embedding does not depend on the other prompts of its batch (A1111 takes the mean over all)."""
    alone = model.encode_prompt(["a (cat:1.3) on a mat"])
    batch = model.encode_prompt(["a (cat:1.3) on a mat", "[[[a dog]]] " + "(x:0.2) " * 80])
    assert batch.shape == (2, 154, 32)
    torch.testing.assert_close(batch[0, :77], alone[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batch[0, 77:], model.encode_prompt([""])[0], rtol=1e-6, atol=1e-6)


def test_apply_emphasis_leaves_unweighted_rows_untouched():
    z = torch.randn(3, 77, 8, generator=torch.Generator().manual_seed(0)) + 1  # a mean well away from 0, as CLIP's
    w = torch.ones(3, 77)
    w[1, 5] = 2.0
    out = clip.apply_emphasis(z, w)
    assert torch.equal(out[0], z[0]) and torch.equal(out[2], z[2]) and not torch.equal(out[1], z[1])
    assert clip.apply_emphasis(z, torch.ones(3, 77)) is z
    half = clip.apply_emphasis(z.half(), w)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out, rtol=1e-2, atol=1e-2)


# -------------------------------------------------------------------------------------------------------------------
# Clip skip


@pytest.fixture(scope="module")
def parity():
    return torch.load(FIXTURES / "clip_parity.pt", weights_only=True)


def test_clip_skip_sd1_matches_transformers_hidden_states(tok):
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    c = CLIP_NARROW["sd1"]
    ours = clip.build_text_encoder(c).eval()
    sd = random_weights({k: v.shape for k, v in ours.state_dict().items()}, seed=CLIP_SEEDS["sd1"])
    ours.load_state_dict(sd)
    hf = HFCLIPTextModel(CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=4 * c.width, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, max_position_embeddings=77, hidden_act="quick_gelu",
        attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    chunks = clip.PromptChunker(tok).batch(CLIP_PARITY_PROMPTS)
    tokens = torch.cat([p.tokens for p in chunks])  # 2 chunks each: the long prompt has more than 75 tokens
    assert tokens.shape == (2 * len(chunks), 77)
    with torch.no_grad():
        hidden = hf(input_ids=tokens, output_hidden_states=True).hidden_states  # embeddings, then each layer
        for n in range(1, c.layers + 1):
            ref = getattr(hf, "text_model", hf).final_layer_norm(hidden[-n])  # transformers 5 has no text_model
            out = ours(tokens, clip_skip=n)
            # fp32 rounding over up to 12 layers, as test_clip.assert_parity; a wrong layer moves outputs by O(1)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            z = clip.encode_chunks(ours, chunks, clip_skip=n)
            assert torch.equal(z, out.reshape(len(chunks), 154, c.width))


def test_clip_skip_sd2_counts_from_the_penultimate_block(parity):
    te = randomize_(clip.build_text_encoder(CLIP_NARROW["sd2"]), seed=CLIP_SEEDS["sd2"]).eval()
    tokens = parity["tokens_sd2"]
    full = te.state_dict()
    kept = {k: v for k, v in full.items()
            if not k.startswith("transformer.resblocks.23.") and k not in ("text_projection", "logit_scale")}
    diffusers_like = clip.build_text_encoder(clip.TextConfig(layout="openclip", width=64, layers=23, heads=4,
                                                             act="gelu", layer="last")).eval()
    diffusers_like.load_state_dict(kept, strict=True)  # what a diffusers SD2 export keeps: 23 blocks, run to the end
    with torch.no_grad():
        torch.testing.assert_close(te(tokens, clip_skip=1), parity["sd2"], rtol=1e-4,
                                   atol=1e-4 * parity["sd2"].abs().max().item())
        for n in (1, 2, 5, 23):
            x = te.token_embedding(tokens) + te.positional_embedding
            for block in te.transformer.resblocks[:23 - (n - 1)]:
                x = block(x)
            out = te(tokens, clip_skip=n)
            assert torch.equal(out, te.ln_final(x)), n
            assert torch.equal(diffusers_like(tokens, clip_skip=n), out), n
        for bad in (24, 0):
            for m in (te, diffusers_like):
                with pytest.raises(ValueError, match="clip_skip must be an integer from 1 .* to 23"):
                    m(tokens, clip_skip=bad)


def test_clip_skip_validation(model):
    for bad in (0, 3, -1, True, 1.0, "2"):
        with pytest.raises(ValueError, match=r"clip_skip must be an integer from 1 \(the model's usual layer\) to 2"):
            model.encode_prompt(["a cat"], clip_skip=bad)
    assert model.encode_prompt(["a cat"], clip_skip=2).shape == (1, 77, 32)


# -------------------------------------------------------------------------------------------------------------------
# Textual-inversion embeddings


def write_a1111_pt(path, vectors: torch.Tensor):
    """What A1111's Embedding.save writes (a trained embedding still requires grad)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_()},
                "name": path.stem, "step": 1500, "sd_checkpoint": "4bdfc29c", "sd_checkpoint_name": "v1-5"}, path)
    return path


def vectors(n: int, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def with_vocab_rows(model, rows: torch.Tensor) -> torch.nn.Module:
    """A copy of the model's text encoder whose vocabulary has `rows` appended: ids 49408 ... stand for them."""
    te = copy.deepcopy(model.text_encoder)
    weight = te.embeddings.token_embedding.weight.detach()
    te.embeddings.token_embedding = torch.nn.Embedding.from_pretrained(torch.cat([weight, rows]))
    return te


def test_embeddings_replace_token_rows(tmp_path, model):
    model = copy.deepcopy(model)
    v_pt, v_st, v_bin = vectors(2, seed=1), vectors(3, seed=2), vectors(1, seed=3)
    write_a1111_pt(tmp_path / "my-style.pt", v_pt)
    checkpoint.save_safetensors(tmp_path / "cattoy.safetensors", {"emb_params": v_st})
    torch.save({"<sks>": v_bin[0]}, tmp_path / "learned_embeds.bin")  # diffusers: one [D] vector, named by the stem
    for name in ("my-style.pt", "cattoy.safetensors", "learned_embeds.bin"):
        assert model.load_embeddings(tmp_path / name) == [name.split(".")[0]]
    prompt = "a photo of (my-style:1.2), by cattoy and learned_embeds"
    z = model.encode_prompt([prompt, "a dog"])

    p = model.prompt_chunker()(prompt)
    tok = model.tokenizer
    head = tok.encode("a photo of")
    assert p.tokens[0, :14].tolist() == [SOT, *head, 0, 0, COMMA, ids(tok, "by"), 0, 0, 0, ids(tok, "and"), 0, EOT]
    assert [(at, e.name) for at, e in p.fixes[0]] == [(4, "my-style"), (8, "cattoy"), (12, "learned_embeds")]
    assert torch.equal(p.weights[0, 4:6], torch.tensor([1.2, 1.2])) and (p.weights[0, 6:] == 1).all()

    # by hand: the vectors as extra vocabulary rows, the placeholders as their ids, then the plain encoder
    te = with_vocab_rows(model, torch.cat([v_pt, v_st, v_bin]))
    tokens = p.tokens.clone()
    tokens[0, 4:6] = torch.tensor([49408, 49409])
    tokens[0, 8:11] = torch.tensor([49410, 49411, 49412])
    tokens[0, 12] = 49413
    with torch.no_grad():
        plain = te(tokens)[0]
        dog = model.text_encoder(tok(["a dog"]))[0]
    w = p.weights[0][:, None]
    expected = plain * w * (plain.mean() / (plain * w).mean())
    torch.testing.assert_close(z[0], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z[1], dog, rtol=1e-6, atol=1e-6)


def test_embedding_chunk_placement(tok):
    e3 = clip.Embedding("emb", vectors(3), "emb.pt", "0" * 64)
    chunker = clip.PromptChunker(tok, [e3])
    a, b = ids(tok, "a"), ids(tok, "b")
    fits = chunker("a " * 72 + "emb")  # 72 + 3 = 75: fits
    assert fits.tokens.tolist() == [row([a] * 72 + [0, 0, 0])] and [at for at, _ in fits.fixes[0]] == [73]
    moves = chunker("a " * 73 + "emb b")  # 73 + 3 > 75: the embedding starts the next chunk
    assert moves.tokens.tolist() == [row([a] * 73), row([0, 0, 0, b])]
    assert [[at for at, _ in c] for c in moves.fixes] == [[], [1]]
    # the comma rule moves an embedding with the tokens after the comma (A1111 leaves its vectors behind)
    after_comma = chunker("a " * 60 + ", emb " + "b " * 20)
    assert after_comma.tokens.tolist() == [row([a] * 60 + [COMMA]), row([0, 0, 0] + [b] * 20)]
    assert [[at for at, _ in c] for c in after_comma.fixes] == [[], [1]]
    longest = clip.PromptChunker(tok, [e3, clip.Embedding("emb b", vectors(1), "x", "1" * 64)])("emb b emb")
    assert [e.name for _, e in longest.fixes[0]] == ["emb b", "emb"]  # the longest name first
    assert longest.tokens[0, :6].tolist() == [SOT, 0, 0, 0, 0, EOT]


def test_embedding_width_mismatch_is_one_line(tmp_path, model):
    path = write_a1111_pt(tmp_path / "sd2-style.pt", vectors(4, width=1024))
    with pytest.raises(checkpoint.CheckpointError) as e:
        model.load_embeddings(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "1024 wide" in message and "32 wide" in message
    assert model.embeddings == {}


def test_embedding_folder_and_used_record(tmp_path, model):
    model = copy.deepcopy(model)
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    pt = write_a1111_pt(folder / "bad-hands.pt", vectors(2))
    checkpoint.save_safetensors(folder / "sub" / "style,a.safetensors", {"emb_params": vectors(1)})
    checkpoint.save_safetensors(folder / "noise.safetensors", {"emb_params": vectors(5)})
    (folder / "notes.txt").write_text("not an embedding")
    (folder / "empty.pt").write_bytes(b"")  # skipped, as A1111 does
    assert sorted(model.load_embeddings(folder)) == ["bad-hands", "noise", "style,a"]
    used = model.embeddings_used(["bad-hands, photo", "bad-hands and style,a", "plain"])
    assert [e.name for e in used] == ["bad-hands", "style,a"]
    sha = hashlib.sha256(pt.read_bytes()).hexdigest()
    assert used[0].sha256 == sha and used[0].shorthash == sha[:12]
    assert clip.ti_hashes(used) == f"bad-hands: {sha[:12]}, stylea: {used[1].shorthash}"
    assert model.embeddings_used(["a cat"]) == [] and clip.ti_hashes([]) == ""
    write_a1111_pt(folder / "bad-hands.pt", vectors(3, seed=9))  # loading again replaces
    model.load_embeddings(folder / "bad-hands.pt")
    assert model.embeddings["bad-hands"].vectors.shape == (3, 32)


def test_embedding_files_refused(tmp_path, model):
    def refused(path, match):
        with pytest.raises(checkpoint.CheckpointError, match=match) as e:
            model.load_embeddings(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)

    torch.save({"a": torch.zeros(2, 32), "b": torch.zeros(2, 32)}, tmp_path / "two.pt")
    refused(tmp_path / "two.pt", "not one embedding tensor")
    torch.save([1, 2], tmp_path / "list.pt")
    refused(tmp_path / "list.pt", "not a textual-inversion embedding")
    checkpoint.save_safetensors(tmp_path / "xl.safetensors", {"clip_l": torch.zeros(1, 768),
                                                              "clip_g": torch.zeros(1, 1280)})
    refused(tmp_path / "xl.safetensors", "SDXL")
    checkpoint.save_safetensors(tmp_path / "long.safetensors", {"emb_params": torch.zeros(76, 32)})
    refused(tmp_path / "long.safetensors", "76 vectors")
    refused(tmp_path / "missing.pt", "no such file")
    assert model.embeddings == {}


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_embedding_is_refused(tmp_path, model):
    marker = tmp_path / "ran"
    torch.save({"string_to_param": {"*": RunsACommand(marker)}, "name": "evil"}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load.*system"):
        model.load_embeddings(tmp_path / "evil.pt")
    assert not marker.exists() and model.embeddings == {}


# -------------------------------------------------------------------------------------------------------------------
# SDXL: every prompt feature on both encoders, the pooled vector of the first chunk, SDXL embedding files


def with_text_encoder(text_encoder: torch.nn.Module, pad_id: int = EOT) -> ldm.LatentDiffusion:
    """The tiny model with `text_encoder` in place of its own (encode_prompt uses nothing else of the U-Net's)."""
    model = ldm.build_model("tiny")
    model.text_encoder, model.tokenizer = text_encoder.eval(), clip.Tokenizer(pad_id=pad_id)
    return model


@pytest.fixture(scope="module")
def xl():
    """The tiny SDXL text side (CLIP-L 32 wide + bigG 48 wide, pooled 40) with seeded weights; tests must not change
    it."""
    return with_text_encoder(randomize_(clip.build_text_encoder(clip.PRESETS["tiny-sdxl"]), seed=7))


def xl_parts(model, tokens: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CLIP-L context, bigG context, pooled) of 77-token rows, each encoder run on its own, padded its own way."""
    te = model.text_encoder
    with torch.no_grad():
        context_l = te.clip_l(clip.pad_after_eot(tokens, EOT), clip_skip)
        context_g, pooled = te.clip_g(clip.pad_after_eot(tokens, 0), clip_skip, pooled=True)
    return context_l, context_g, pooled


def test_sdxl_plain_prompt_is_exactly_the_encoders(xl):
    prompts = ["a photo of an astronaut riding a horse on mars", "", "東京の夜景, 8k 🐱"]
    context, pooled = xl.encode_prompt(prompts, pooled=True)
    assert context.shape == (3, 77, 32 + 48) and pooled.shape == (3, 40)
    for pad in (EOT, 0):  # either tokenizer's rows: each encoder re-pads them
        context_l, context_g, expected = xl_parts(xl, clip.Tokenizer(pad_id=pad)(prompts))
        assert torch.equal(context, torch.cat([context_l, context_g], dim=-1)) and torch.equal(pooled, expected)
    assert torch.equal(xl.encode_prompt(prompts), context)
    sd1 = ldm.build_model("tiny")
    context1, none = sd1.encode_prompt(prompts, pooled=True)  # SD 1.x / 2.x: no pooled vector
    assert none is None and torch.equal(context1, sd1.encode_prompt(prompts))


def test_sdxl_emphasis_is_rescaled_per_encoder(xl):
    z, pooled = xl.encode_prompt(["a (red:1.5) [apple] on ((a table)"], pooled=True)
    w = torch.ones(77)
    w[2], w[3], w[5:7] = 1.5, 1 / 1.1, 1.1 * 1.1  # SOT a red apple on a table EOT
    context_l, context_g, plain_pooled = xl_parts(xl, xl.tokenizer(["a red apple on a table"]))
    parts = [plain[0] * w[:, None] * (plain[0].mean() / (plain[0] * w[:, None]).mean())
             for plain in (context_l, context_g)]
    torch.testing.assert_close(z[0], torch.cat(parts, dim=-1), rtol=1e-6, atol=1e-6)
    plain = torch.cat([context_l, context_g], dim=-1)[0]
    one_mean = plain * w[:, None] * (plain.mean() / (plain * w[:, None]).mean())  # a rescale over both: not A1111's
    assert not torch.allclose(z[0], one_mean, atol=1e-4)
    assert torch.equal(pooled, plain_pooled)  # the pooled vector takes no emphasis


def test_sdxl_long_prompt_pools_the_first_chunk(xl):
    prompt = "a red apple on a wooden table " * 15  # 105 tokens, no comma: chunks of 75 + 30
    context, pooled = xl.encode_prompt(["", prompt, "a cat"], pooled=True)  # e.g. a negative line, then prompts
    assert context.shape == (3, 154, 80) and pooled.shape == (3, 40)
    ids = xl.tokenizer.encode(prompt)
    rows = torch.tensor([row(ids[:75]), row(ids[75:]), row([]), row(xl.tokenizer.encode("a cat"))])
    context_l, context_g, pools = xl_parts(xl, rows)
    expected = torch.cat([context_l, context_g], dim=-1)
    # one batch of 6 rows against one of 4: equal up to how the CPU kernels block a batch
    for got, want in ((context[1, :77], expected[0]), (context[1, 77:], expected[1]), (context[0, :77], expected[2]),
                      (context[0, 77:], expected[2]), (context[2, :77], expected[3]), (context[2, 77:], expected[2])):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for got, want in ((pooled[1], pools[0]), (pooled[0], pools[2]), (pooled[2], pools[3])):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(pools[0], pools[1], atol=1e-3)  # the second chunk would pool to something else
    alone, alone_pooled = xl.encode_prompt(["a cat"], pooled=True)  # the same line without padding chunks
    torch.testing.assert_close(alone_pooled[0], pooled[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alone[0], context[2, :77], rtol=1e-6, atol=1e-6)


def test_sdxl_clip_skip_matches_transformers_hidden_states():
    """Clip skip 2 on SDXL = one layer before SDXL's own (hidden_states[-3]) in both encoders, against the goldens."""
    sdxl = torch.load(FIXTURES / "clip_sdxl.pt", weights_only=True)
    model = with_text_encoder(randomize_(clip.build_text_encoder(CLIP_SDXL_NARROW), seed=CLIP_SDXL_SEEDS["ours"]))
    prompts = CLIP_PARITY_PROMPTS[:3]  # up to 75 tokens: one chunk each, the goldens' rows
    for clip_skip, name in ((1, "context"), (2, "context_skip2")):
        z, pooled = model.encode_prompt(prompts, clip_skip=clip_skip, pooled=True)
        for got, ref in zip(z.split([64, 80], dim=-1), (sdxl[f"l_{name}"][:3], sdxl[f"g_{name}"][:3])):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        torch.testing.assert_close(pooled, sdxl["g_pooled"][:3], rtol=1e-4, atol=1e-4)  # all blocks, either way
    with pytest.raises(ValueError, match="clip_skip must be an integer from 1"):
        model.encode_prompt(["a cat"], clip_skip=12)


def write_sdxl_embedding(path, n: int, widths=(32, 48), seed: int = 0):
    vectors_l, vectors_g = vectors(n, widths[0], seed), vectors(n, widths[1], seed + 1)
    checkpoint.save_safetensors(path, {"clip_g": vectors_g, "clip_l": vectors_l})  # A1111's SDXL embedding file
    return vectors_l, vectors_g


def with_rows_at(encoder: torch.nn.Module, ids: list[int], rows: torch.Tensor) -> torch.nn.Module:
    """A copy of a text encoder whose token embedding rows `ids` are `rows` (ids below EOT, so pooling still finds
    the EOT)."""
    encoder = copy.deepcopy(encoder)
    table = encoder.embeddings.token_embedding if isinstance(encoder, clip.CLIPTextModel) else encoder.token_embedding
    with torch.no_grad():
        table.weight[ids] = rows
    return encoder


def test_sdxl_embedding_gives_each_encoder_its_vectors(tmp_path, xl):
    model = copy.deepcopy(xl)
    vectors_l, vectors_g = write_sdxl_embedding(tmp_path / "xl-style.safetensors", 2)
    assert model.load_embeddings(tmp_path / "xl-style.safetensors") == ["xl-style"]
    assert torch.equal(model.embeddings["xl-style"].vectors, torch.cat([vectors_l, vectors_g], dim=1))
    prompt = "a photo of (xl-style:1.2)"
    z, pooled = model.encode_prompt([prompt], pooled=True)
    p = model.prompt_chunker()(prompt)
    assert [(at, e.name) for at, e in p.fixes[0]] == [(4, "xl-style")]
    # by hand: the vectors as token rows 1000, 1001 of each encoder, then the encoders run on their own
    tokens = p.tokens.clone()
    tokens[0, 4:6] = torch.tensor([1000, 1001])
    te = copy.copy(model.text_encoder)
    te.clip_l = with_rows_at(te.clip_l, [1000, 1001], vectors_l)
    te.clip_g = with_rows_at(te.clip_g, [1000, 1001], vectors_g)
    by_hand = with_text_encoder(te)
    context_l, context_g, expected_pooled = xl_parts(by_hand, tokens)
    w = p.weights[0][:, None]
    parts = [c[0] * w * (c[0].mean() / (c[0] * w).mean()) for c in (context_l, context_g)]
    torch.testing.assert_close(z[0], torch.cat(parts, dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-6, atol=1e-6)
    assert model.embeddings_used([prompt])[0].name == "xl-style"

    refiner = with_text_encoder(randomize_(clip.build_text_encoder(clip.PRESETS["tiny-sdxl-refiner"]), seed=8), 0)
    refiner.load_embeddings(tmp_path / "xl-style.safetensors")  # the refiner (bigG only) takes clip_g
    assert torch.equal(refiner.embeddings["xl-style"].vectors, vectors_g)
    assert refiner.encode_prompt([prompt], pooled=True)[0].shape == (1, 77, 48)


def test_sdxl_embedding_for_another_model_is_one_line(tmp_path, xl, model):
    def refused(target, path, *words):
        with pytest.raises(checkpoint.CheckpointError) as e:
            target.load_embeddings(path)
        message = str(e.value)
        assert "\n" not in message and str(path) in message and all(w in message for w in words), message
        assert target.embeddings == {}

    sd1_file = write_a1111_pt(tmp_path / "sd1-style.pt", vectors(2, width=768))
    refused(xl, sd1_file, "768 wide", "fits SD 1.x models", "needs an SDXL embedding")
    refused(xl, write_a1111_pt(tmp_path / "tiny-style.pt", vectors(2, width=32)), "32 wide", "SDXL embedding")
    write_sdxl_embedding(tmp_path / "real-xl.safetensors", 1, widths=(768, 1280))
    refused(xl, tmp_path / "real-xl.safetensors", "clip_l is 768 wide", "32 wide")
    write_sdxl_embedding(tmp_path / "xl.safetensors", 1)
    refused(model, tmp_path / "xl.safetensors", "SDXL", "fits SDXL models", "32 wide")
    checkpoint.save_safetensors(tmp_path / "uneven.safetensors", {"clip_l": vectors(2), "clip_g": vectors(3, 48)})
    refused(xl, tmp_path / "uneven.safetensors", "unequal vector counts")
