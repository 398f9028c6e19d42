"""CLIP text side of Stable Diffusion: the BPE tokenizer and the two text encoders.

Tokenizer: OpenAI CLIP's byte-level BPE (ftfy + html clean-up, lowercase, `</w>` word ends, merges by rank),
SOT 49406 / EOT 49407, 77 positions. SD1 pads with EOT (49407), SD2 with 0, so the pad id is a setting.

Text encoders, parameter names mirroring the public single-file checkpoints:
- `CLIPTextModel` (SD1, OpenAI ViT-L/14 text tower): keys of an SD1 file minus
  `cond_stage_model.transformer.text_model.` (transformers' CLIPTextModel names).
- `OpenCLIPTextModel` (SD2, OpenCLIP ViT-H/14 text tower): keys of an SD2 file minus `cond_stage_model.model.`,
  fused `in_proj_weight` attention, conditioning taken from the penultimate block.
- `SDXLTextEncoder` (SDXL): `clip_l`, a CLIPTextModel (CLIP ViT-L; absent from the refiner), and `clip_g`, an
  OpenCLIPTextModel (OpenCLIP ViT-bigG, with its text_projection). Context = the two penultimate layers' raw hidden
  states (no final LayerNorm) side by side, [B, 77, 768 + 1280]; pooled = bigG's projected EOT vector [B, 1280].
`convert_diffusers` maps a diffusers `text_encoder/` (and for SDXL `text_encoder_2/`) state dict (transformers layout)
onto these names. All take `clip_skip` (A1111's "Clip skip": N = the hidden states N - 1 blocks before the usual
layer, then the final LayerNorm, which SDXL's context goes without) and `fixes` (vectors that replace token embedding
rows: textual-inversion embeddings).

Prompts, as AUTOMATIC1111's web UI reads them with its "Original" emphasis:
- `parse_prompt_attention`: "(text)" x1.1, "[text]" /1.1, "(text:1.3)", nesting multiplies, "\\(" etc. literal,
  BREAK starts a new chunk;
- `PromptChunker`: text -> PromptChunks (tokens [k, 77], weights [k, 77], embedding fixes), 75 prompt tokens per
  chunk, the comma rule at a chunk's end, textual-inversion names matched on token sequences; `.batch` pads a list
  of prompts to one chunk count with empty-prompt chunks;
- `encode_chunks`: all chunks through the text encoder, `apply_emphasis` (weights, then each chunk rescaled to its
  unweighted mean, per prompt; for SDXL per encoder), concatenated to [B, 77 k, D] (SDXL: and the pooled vector of
  each prompt's first chunk, as A1111);
- `read_embedding` / `Embedding` / `ti_hashes`: A1111 .pt, .safetensors (emb_params; SDXL: clip_l + clip_g) and
  diffusers learned_embeds files, read with checkpoint's restricted readers; the sha256 shorthash A1111 writes as
  "TI hashes".
The Tokenizer's own __call__ still cuts at 77 tokens (with a warning): training captions use it.
"""
import gzip
import hashlib
import html
import json
import math
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint

# -------------------------------------------------------------------------------------------------------------------
# Tokenizer

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49408 - 2 * 256 - 2  # vocab = 256 bytes + 256 bytes with </w> + merges + SOT/EOT
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character. Printable latin-1 bytes stand for themselves; the other 68 bytes (whitespace,
    control) are moved to chr(256 + n) so BPE never sees a space. Order = vocab order of the first 256 ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clean_text(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))  # twice: scraped captions are often double-escaped ("&amp;amp;")
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP BPE tokenizer. `tok(["a cat"])` -> LongTensor [B, context_length]: SOT, ids, EOT, then pad_id."""

    def __init__(self, bpe_path: str | None = None, pad_id: int = 49407, context_length: int = 77):
        with gzip.open(bpe_path or BPE_PATH) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is a version header
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self._setup({t: i for i, t in enumerate(vocab)}, merges, pad_id, context_length)

    def _setup(self, encoder: dict[str, int], merges: list[tuple[str, str]], pad_id: int, context_length: int):
        self.encoder = encoder
        self.decoder = {i: t for t, i in encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_id, self.eot_id = encoder[SOT_TOKEN], encoder[EOT_TOKEN]
        self.pad_id, self.context_length = pad_id, context_length
        self.cache = {SOT_TOKEN: [SOT_TOKEN], EOT_TOKEN: [EOT_TOKEN]}  # specials are never split

    @classmethod
    def from_diffusers(cls, folder: str, context_length: int = 77) -> "Tokenizer":
        """Read a diffusers/transformers `tokenizer/` folder: vocab.json + merges.txt, or the tokenizer.json that
        transformers 5 writes alone; the pad token from its config."""
        if os.path.exists(os.path.join(folder, "vocab.json")):
            with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
                encoder = json.load(f)
            with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
                merges = [tuple(line.split()) for line in f.read().split("\n")
                          if line and not line.startswith("#version")]
        else:
            with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
                bpe = json.load(f)["model"]  # {"type": "BPE", "vocab": {token: id}, "merges": ["a b"] or [[a, b]]}
            encoder = bpe["vocab"]
            merges = [tuple(m.split() if isinstance(m, str) else m) for m in bpe["merges"]]
        pad_token = EOT_TOKEN  # transformers' CLIPTokenizer default
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # either may name it; public SD folders agree
            path = os.path.join(folder, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    pad = json.load(f).get("pad_token")
                pad = pad.get("content") if isinstance(pad, dict) else pad
                pad_token = pad or pad_token
        tok = cls.__new__(cls)
        tok._setup(encoder, merges, encoder[pad_token], context_length)  # SD1: EOT -> 49407, SD2: "!" -> 0
        return tok

    def bpe(self, token: str) -> list[str]:
        """Merge the characters of one pre-token (already byte-mapped) by merge rank, lowest rank first."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of `best`, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without SOT/EOT."""
        ids = []
        for piece in PATTERN.findall(clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece))
        return ids

    def decode(self, ids) -> str:
        """Text of `ids` (list or 1-D tensor); skips SOT and stops at the first EOT, so a padded row reads back."""
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(self.eot_id)] if self.eot_id in ids else ids
        text = "".join(self.decoder[i] for i in ids if i != self.sot_id)
        data = bytes(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str]) -> torch.LongTensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = self.context_length
        out = torch.full((len(texts), n), self.pad_id, dtype=torch.long, device="cpu")  # (B, 77)
        cut = []
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > n:
                cut.append(f"prompt {row}: {len(ids) - n} tokens dropped")
                ids = ids[:n - 1] + [self.eot_id]  # EOT stays last: the text encoder pools/conditions up to it
            out[row, :len(ids)] = torch.tensor(ids, device="cpu")
        if cut:
            warnings.warn(f"prompt longer than {n} tokens was truncated ({'; '.join(cut)})", stacklevel=2)
        return out


# -------------------------------------------------------------------------------------------------------------------
# Config + presets


@dataclass
class TextConfig:
    layout: str = "clip"  # "clip": SD1 transformers names; "openclip": SD2 OpenCLIP names
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) | "gelu" (OpenCLIP ViT-H)
    layer: str = "last"  # "last" | "penultimate": which block's output is the context (through the final LayerNorm)
    embed_dim: int | None = None  # text_projection width; openclip only, None -> no projection/logit_scale
    final_norm: bool = True  # False: the context is that block's raw output (SDXL); the pooled vector keeps the norm


@dataclass
class SDXLTextConfig:
    """SDXL's text side: `clip_l` (a "clip" TextConfig; None for the refiner, which has OpenCLIP bigG only) and
    `clip_g` (an "openclip" TextConfig with embed_dim, for the pooled vector). `layout` marks it in model metadata;
    asdict() of it is what text_config reads back."""
    clip_l: TextConfig | None
    clip_g: TextConfig
    layout: str = "sdxl"


_SDXL = dict(layer="penultimate", final_norm=False)  # SDXL conditions on the raw penultimate hidden states
PRESETS = {
    "sd1": TextConfig(layout="clip", width=768, layers=12, heads=12, act="quick_gelu", layer="last"),
    "sd2": TextConfig(layout="openclip", width=1024, layers=24, heads=16, act="gelu", layer="penultimate",
                      embed_dim=1024),
    "tiny": TextConfig(layout="clip", width=32, layers=2, heads=2, act="quick_gelu", layer="last"),
    # SDXL: CLIP ViT-L exactly as SD 1.x's, and OpenCLIP ViT-bigG (SD 2.x's layout at 1280 wide, 32 blocks)
    "sdxl-l": TextConfig(layout="clip", width=768, layers=12, heads=12, act="quick_gelu", **_SDXL),
    "sdxl-g": TextConfig(layout="openclip", width=1280, layers=32, heads=20, act="gelu", embed_dim=1280, **_SDXL),
    # test-sized SDXL text encoders: two widths that differ, so a swapped part cannot go unnoticed
    "tiny-sdxl-l": TextConfig(layout="clip", width=32, layers=2, heads=2, act="quick_gelu", **_SDXL),
    "tiny-sdxl-g": TextConfig(layout="openclip", width=48, layers=2, heads=2, act="gelu", embed_dim=40, **_SDXL),
}
PRESETS.update({  # whole SDXL text sides (build_text_encoder builds an SDXLTextEncoder from these)
    "sdxl": SDXLTextConfig(PRESETS["sdxl-l"], PRESETS["sdxl-g"]),
    "sdxl-refiner": SDXLTextConfig(None, PRESETS["sdxl-g"]),
    "tiny-sdxl": SDXLTextConfig(PRESETS["tiny-sdxl-l"], PRESETS["tiny-sdxl-g"]),
    "tiny-sdxl-refiner": SDXLTextConfig(None, PRESETS["tiny-sdxl-g"]),
})


def text_config(value) -> "TextConfig | SDXLTextConfig":
    """The text side's config from a PRESETS name, a config, or a config's asdict() (model metadata, read back from
    JSON): a dict with layout "sdxl" is an SDXLTextConfig, any other a TextConfig. Unknown fields are a TypeError."""
    if isinstance(value, str):
        return PRESETS[value]
    if isinstance(value, (TextConfig, SDXLTextConfig)):
        return value
    value = dict(value)
    if value.get("layout") != "sdxl":
        return TextConfig(**value)
    parts = {k: None if value.get(k) is None else TextConfig(**value[k]) for k in ("clip_l", "clip_g")}
    return SDXLTextConfig(**{**value, **parts})

# -------------------------------------------------------------------------------------------------------------------
# Leaf blocks


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's sigmoid approximation of GELU


ACTS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}  # nn.GELU is exact (erf) GELU


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, C = q.shape
    q, k, v = (t.view(B, L, heads, C // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, C/heads)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token i sees tokens 0..i
    return out.transpose(1, 2).reshape(B, L, C)


class CLIPAttention(nn.Module):
    """SD1 attention: separate q/k/v projections (declared in the file's k, v, q order)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.q_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.act = ACTS[act]()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = CLIPMLP(cfg.width, cfg.act)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pre-norm residual block
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class FusedAttention(nn.Module):
    """OpenCLIP (nn.MultiheadAttention) layout: q, k, v stacked in one [3C, C] in_proj, split at run time."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, C)
        return self.out_proj(causal_attention(q, k, v, self.heads))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.attn = FusedAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(cfg.width, 4 * cfg.width), gelu=ACTS[cfg.act](), c_proj=nn.Linear(4 * cfg.width, cfg.width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def n_blocks_run(cfg: TextConfig, clip_skip: int = 1) -> int:
    """How many blocks run before the final LayerNorm. clip_skip (A1111's "Clip skip") counts back from the
    model's usual layer: 1 = that layer (SD1: the last block, as transformers' hidden_states[-1]; SD2: the
    penultimate one; SDXL: each encoder's penultimate one, transformers' hidden_states[-2]), N = N - 1 blocks earlier
    (SD1: hidden_states[-N]; SDXL: hidden_states[-N - 1], diffusers' clip_skip=N - 1). At least one block must run."""
    assert cfg.layer in ("last", "penultimate"), cfg.layer
    usual = cfg.layers - (cfg.layer == "penultimate")  # SD2 conditions on the output of the second-to-last block
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= usual:
        raise ValueError(f"clip_skip must be an integer from 1 (the model's usual layer) to {usual} (the first "
                         f"block's output) for this {usual}-block text encoder, got {clip_skip!r}")
    return usual - (clip_skip - 1)


def replace_rows(x: torch.Tensor, fixes: list[list[tuple[int, torch.Tensor]]] | None) -> torch.Tensor:
    """Token embeddings x [B, L, C] with rows replaced in place: fixes[b] lists (position, vectors [n, C]) pairs
    whose n vectors become rows position .. position + n - 1 of prompt b (textual-inversion embeddings, put in
    before the position embeddings are added, as A1111 does). None or empty lists: x unchanged."""
    for b, row in enumerate(fixes or ()):
        for position, vectors in row:
            if not 0 <= position <= x.shape[1] - len(vectors):
                raise ValueError(f"{len(vectors)} vectors at position {position} do not fit {x.shape[1]} tokens")
            x[b, position:position + len(vectors)] = vectors.to(x)
    return x


# -------------------------------------------------------------------------------------------------------------------
# Text encoders


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, n: int, to_end: bool = False):
    """(output of blocks[:n], output of all blocks if to_end else None): the context comes from block n, a pooled
    vector from the last block whatever clip_skip says (as A1111 and diffusers take it). x: [B, L, C]."""
    for block in blocks[:n]:
        x = block(x)
    if not to_end:
        return x, None
    last = x
    for block in blocks[n:]:
        last = block(last)
    return x, last


def eot_rows(x: torch.Tensor, tokens: torch.LongTensor) -> torch.Tensor:
    """x [B, L, C] at each row's EOT token: the highest id (49407), its first occurrence (pads are 0 or EOT)."""
    return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # [B, C]


class CLIPTextModel(nn.Module):
    """SD1 text encoder (and SDXL's CLIP-L). forward(tokens [B, 77]) -> final_layer_norm(hidden states) [B, 77, width]
    (without the norm when cfg.final_norm is False); pooled=True -> (that, pooled [B, width]), transformers'
    pooler_output: the final-normed last layer at EOT (no projection). clip_skip and fixes: see n_blocks_run and
    replace_rows."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleDict(dict(
            token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
            position_embedding=nn.Embedding(cfg.context_length, cfg.width),
        ))  # no position_ids buffer: positions are arange(L); checkpoint loaders drop the stored copy
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))))
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, tokens: torch.LongTensor, clip_skip: int = 1, fixes=None, pooled: bool = False):
        n = n_blocks_run(self.cfg, clip_skip)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = replace_rows(self.embeddings.token_embedding(tokens), fixes)
        x = x + self.embeddings.position_embedding(positions)  # (B, L, C)
        x, last = run_blocks(self.encoder.layers, x, n, to_end=pooled)
        context = self.final_layer_norm(x) if self.cfg.final_norm else x
        return (context, self.final_layer_norm(eot_rows(last, tokens))) if pooled else context


class OpenCLIPTextModel(nn.Module):
    """SD2 text encoder (and SDXL's bigG). forward(tokens [B, 77]) -> ln_final(penultimate block output) [B, 77, width]
    (without ln_final when cfg.final_norm is False); pooled=True -> (that, pooled [B, embed_dim]) = ln_final(last
    block)[EOT] @ text_projection, as open_clip's encode_text. clip_skip and fixes: see n_blocks_run and replace_rows.
    SD2 never uses text_projection / logit_scale (they exist so a full SD2 file loads strictly); nothing uses
    logit_scale."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        if cfg.embed_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))  # used as x @ P
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
            nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)
        self.transformer = nn.ModuleDict(dict(
            resblocks=nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))))
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.ln_final = nn.LayerNorm(cfg.width, eps=1e-5)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.LongTensor, clip_skip: int = 1, fixes=None, pooled: bool = False):
        n = n_blocks_run(self.cfg, clip_skip)
        if pooled and self.cfg.embed_dim is None:
            raise ValueError("this text encoder has no text_projection, so no pooled vector (set embed_dim)")
        x = replace_rows(self.token_embedding(tokens), fixes) + self.positional_embedding[:tokens.shape[1]]  # (B, L, C)
        x, last = run_blocks(self.transformer.resblocks, x, n, to_end=pooled)
        context = self.ln_final(x) if self.cfg.final_norm else x
        return (context, self.ln_final(eot_rows(last, tokens)) @ self.text_projection) if pooled else context


EOT_ID = 49407  # the last id of CLIP's vocabulary: both SDXL tokenizers end a prompt with it


def pad_after_eot(tokens: torch.LongTensor, pad_id: int) -> torch.LongTensor:
    """tokens [B, L] with every position after each row's first EOT set to pad_id (rows without EOT unchanged):
    the same chunks padded as SD 1.x / CLIP-L (EOT) or as open_clip / bigG (0) expect."""
    is_eot = tokens == EOT_ID
    first = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), tokens.shape[1])  # [B]
    after = torch.arange(tokens.shape[1], device=tokens.device)[None] > first[:, None]
    return tokens.masked_fill(after, pad_id)


def split_fixes(fixes, widths: list[int]) -> list:
    """Per-encoder fixes from fixes whose vectors hold every encoder's part side by side ([n, sum(widths)], in
    context order): one list like `fixes` per width, or None for each when fixes is None."""
    if fixes is None:
        return [None] * len(widths)
    for row in fixes:
        for _, vectors in row:
            if vectors.shape[-1] != sum(widths):
                raise ValueError(f"embedding vectors {vectors.shape[-1]} wide for text encoders "
                                 f"{' + '.join(map(str, widths))} = {sum(widths)} wide")
    return [[[(at, vectors.split(widths, dim=-1)[i]) for at, vectors in row] for row in fixes]
            for i in range(len(widths))]


class SDXLTextEncoder(nn.Module):
    """SDXL's two text encoders: `clip_l` (CLIPTextModel, CLIP ViT-L; None in the refiner) and `clip_g`
    (OpenCLIPTextModel, OpenCLIP ViT-bigG with its text_projection), built from SDXLTextEncoder(cfg_l, cfg_g); `cfg`
    is their SDXLTextConfig.
    forward(tokens [B, 77]) -> context [B, 77, 768 + 1280]: each encoder's (clip_skip-chosen) raw penultimate hidden
    states, CLIP-L first (the refiner: bigG's 1280 alone); pooled=True -> (context, pooled [B, 1280]): bigG's
    projected EOT vector after all its blocks. Each encoder gets the rows padded its own way (pad_after_eot: CLIP-L
    EOT, bigG 0), so any CLIP tokenizer's rows will do. fixes: vectors [n, sum(widths)], the parts side by side.
    State dict: clip_l.<SD 1.x text_model names> and clip_g.<OpenCLIP names>; a single file holds them under
    conditioner.embedders.0.transformer.text_model. and conditioner.embedders.1.model. (refiner:
    conditioner.embedders.0.model.)."""

    PAD_L, PAD_G = EOT_ID, 0

    def __init__(self, cfg_l: TextConfig | None, cfg_g: TextConfig):
        super().__init__()
        if cfg_l is not None and cfg_l.layout != "clip":
            raise ValueError(f"SDXL's CLIP-L needs the 'clip' layout, got {cfg_l.layout!r}")
        if cfg_g.layout != "openclip" or cfg_g.embed_dim is None:
            raise ValueError("SDXL's bigG needs the 'openclip' layout with embed_dim (its pooled projection)")
        self.cfg = SDXLTextConfig(cfg_l, cfg_g)
        self.clip_l = None if cfg_l is None else CLIPTextModel(cfg_l)  # registered first: the file's order
        self.clip_g = OpenCLIPTextModel(cfg_g)

    @property
    def cfg_l(self) -> TextConfig | None:
        return self.cfg.clip_l

    @property
    def cfg_g(self) -> TextConfig:
        return self.cfg.clip_g

    @property
    def embedding_widths(self) -> dict[str, int]:
        """{part: width} in context order, as SDXL embedding files name the parts: clip_l 768, clip_g 1280."""
        parts = {"clip_l": self.clip_l, "clip_g": self.clip_g}
        return {name: m.cfg.width for name, m in parts.items() if m is not None}

    @property
    def widths(self) -> list[int]:
        return list(self.embedding_widths.values())

    def forward(self, tokens: torch.LongTensor, clip_skip: int = 1, fixes=None, pooled: bool = False):
        *fixes_l, fixes_g = split_fixes(fixes, self.widths)
        for cfg in (self.cfg_l, self.cfg_g):  # a bad clip_skip fails before either encoder runs
            if cfg is not None:
                n_blocks_run(cfg, clip_skip)
        contexts = []  # fixes_l: [] for the refiner, else [CLIP-L's fixes]
        if self.clip_l is not None:
            contexts.append(self.clip_l(pad_after_eot(tokens, self.PAD_L), clip_skip, fixes_l[0]))
        out = self.clip_g(pad_after_eot(tokens, self.PAD_G), clip_skip, fixes_g, pooled=pooled)
        context_g, vector = out if pooled else (out, None)
        context = torch.cat([*contexts, context_g], dim=-1)  # [B, 77, 768 + 1280]
        return (context, vector) if pooled else context


def build_text_encoder(cfg: "TextConfig | SDXLTextConfig") -> nn.Module:
    if isinstance(cfg, SDXLTextConfig):
        return SDXLTextEncoder(cfg.clip_l, cfg.clip_g)
    return {"clip": CLIPTextModel, "openclip": OpenCLIPTextModel}[cfg.layout](cfg)


def embedding_width(text_encoder: nn.Module) -> "int | dict[str, int]":
    """What read_embedding checks a file against: the text encoder's width, or SDXL's {part: width}."""
    if isinstance(text_encoder, SDXLTextEncoder):
        return text_encoder.embedding_widths
    return text_encoder.cfg.width


# -------------------------------------------------------------------------------------------------------------------
# diffusers / transformers layout

# transformers CLIPTextModel name -> OpenCLIP name, per encoder layer (q/k/v are fused separately)
OPENCLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
OPENCLIP_TOP_NAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
}


def config_from_diffusers(config_json: dict | None, config_2: dict = None) -> "TextConfig | SDXLTextConfig":
    """TextConfig from a transformers CLIPTextConfig dict (a diffusers `text_encoder/config.json`).
    quick_gelu -> SD1 "clip" layout; gelu -> SD2, whose diffusers export is OpenCLIP's first 23 blocks, so the
    last of them is the penultimate layer and layer="last" reproduces SD2's conditioning.
    With config_2 (an SDXL folder's `text_encoder_2/config.json`, CLIPTextModelWithProjection): the SDXLTextConfig of
    both (config_json None: the refiner, which has no `text_encoder/`). SDXL's exports keep every layer, and SDXL
    conditions on the raw penultimate ones (diffusers' hidden_states[-2]); bigG's projection is projection_dim wide."""
    if config_2 is not None:
        return _sdxl_config_from_diffusers(config_json, config_2)
    act = config_json["hidden_act"]
    width = config_json["hidden_size"]
    assert config_json.get("intermediate_size", 4 * width) == 4 * width, "MLP width must be 4 x hidden_size"
    return TextConfig(
        layout="clip" if act == "quick_gelu" else "openclip",
        vocab_size=config_json.get("vocab_size", 49408),
        context_length=config_json.get("max_position_embeddings", 77),
        width=width, layers=config_json["num_hidden_layers"], heads=config_json["num_attention_heads"],
        act=act, layer="last", embed_dim=None,
    )


def _sdxl_config_from_diffusers(config_l: dict | None, config_g: dict) -> SDXLTextConfig:
    cfg_l = None if config_l is None else replace(config_from_diffusers(config_l), **_SDXL)
    cfg_g = replace(config_from_diffusers(config_g), embed_dim=config_g.get("projection_dim", config_g["hidden_size"]),
                    **_SDXL)
    if cfg_l is not None and cfg_l.layout != "clip":
        raise ValueError(f"text_encoder/ of an SDXL folder must be CLIP ViT-L (quick_gelu), got {cfg_l.act}")
    if cfg_g.layout != "openclip":
        raise ValueError(f"text_encoder_2/ of an SDXL folder must be OpenCLIP bigG (gelu), got {cfg_g.act}")
    return SDXLTextConfig(cfg_l, cfg_g)


def convert_diffusers(state_dict: dict[str, torch.Tensor] | None, cfg: "TextConfig | SDXLTextConfig",
                      state_dict_2: dict[str, torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """diffusers `text_encoder/` state dict (transformers CLIPTextModel, with or without the `text_model.` level)
    -> our names for `cfg.layout`. For an SDXLTextConfig: state_dict is `text_encoder/`'s (None for the refiner),
    state_dict_2 `text_encoder_2/`'s (CLIPTextModelWithProjection), and the result SDXLTextEncoder's state dict."""
    if isinstance(cfg, SDXLTextConfig):
        parts = [("clip_g.", state_dict_2, cfg.clip_g)]
        if cfg.clip_l is not None:
            parts.insert(0, ("clip_l.", state_dict, cfg.clip_l))
        return {prefix + k: v for prefix, sd, part in parts for k, v in convert_diffusers(sd, part).items()}
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    if cfg.layout == "clip":
        return sd  # SD1 names are transformers' names
    out, used = {}, set()
    for a, b in OPENCLIP_TOP_NAMES.items():
        out[b] = sd[a]
        used.add(a)
    for i in range(cfg.layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            for a, b in OPENCLIP_LAYER_NAMES.items():
                out[dst + f"{b}.{p}"] = sd[src + f"{a}.{p}"]
                used.add(src + f"{a}.{p}")
            qkv = [src + f"self_attn.{n}_proj.{p}" for n in "qkv"]  # stacked q, k, v as nn.MultiheadAttention does
            out[dst + f"attn.in_proj_{p}"] = torch.cat([sd[k] for k in qkv])
            used.update(qkv)
    if cfg.embed_dim is not None and "text_projection.weight" in sd:  # SDXL's text_encoder_2
        projection = sd["text_projection.weight"]  # nn.Linear weight [embed_dim, width] = P transposed
        out["text_projection"] = projection.t().contiguous()
        # unused, and diffusers does not keep it; CLIP's initial temperature stands in so a strict load succeeds
        out["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=projection.dtype, device=projection.device)
        used.add("text_projection.weight")
    assert used == set(sd), f"unexpected keys in diffusers text encoder: {sorted(set(sd) - used)}"
    return out


# -------------------------------------------------------------------------------------------------------------------
# Prompts, as AUTOMATIC1111's web UI reads them ("Original" emphasis): the attention syntax, chunks of 75 tokens,
# per-token weights and textual-inversion embeddings.

CHUNK_TOKENS = 75  # prompt tokens per chunk; with SOT and EOT a chunk fills the 77 positions
COMMA_BACKTRACK = 20  # a chunk that fills moves the tokens after a comma this close to its end into the next one
ROUND_WEIGHT = 1.1  # "(text)" multiplies the weight by this, "[text]" by its inverse

# One token of the attention syntax. Alternatives are tried in order, so the escapes come before the lone backslash
# (which is dropped) and ":<number>)" before ":" (which is plain text).
_ATTENTION_TOKEN = re.compile(r"""
      \\[()\[\]\\]                    # \( \) \[ \] \\ : the character itself
    | \\                              # a backslash before anything else: dropped
    | [(\[]                           # opens a bracket
    | :(?P<weight>[+-]?[.\d]+)\)      # ":1.3)" closes a round bracket with that weight
    | [)\]]                           # closes a bracket
    | [^\\()\[\]:]+                   # plain text
    | :                               # a colon that closes nothing: plain text
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")  # BREAK as a word of its own, with the whitespace around it
BREAK_WEIGHT = -1.0  # ("BREAK", -1.0) in parse_prompt_attention's output marks a chunk break


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """`text` as (piece, weight) pairs in order, adjacent pieces of equal weight merged: "(x)" multiplies the weights
    inside by 1.1, "[x]" by 1 / 1.1, "(x:1.3)" by 1.3, nested brackets multiply, "\\(" "\\)" "\\[" "\\]" "\\\\" are
    the characters themselves, brackets left open run to the end. A BREAK word becomes ("BREAK", -1.0); inside
    brackets its weight is multiplied like any other, and then it is only text (as in A1111). Never empty: "" ->
    [("", 1.0)]. A ":<number>)" whose number does not parse (":1.2.3)") is plain text."""
    pieces: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    open_round, open_square = [], []  # where each open bracket's pieces start

    def scale(start: int, factor: float):
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _ATTENTION_TOKEN.finditer(text):
        token, weight = m.group(0), _number(m.group("weight"))
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in "([":
            (open_round if token == "(" else open_square).append(len(pieces))
        elif weight is not None and open_round:
            scale(open_round.pop(), weight)
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND_WEIGHT)
        elif token == "]" and open_square:
            scale(open_square.pop(), 1 / ROUND_WEIGHT)
        else:
            _add_text(pieces, token)
    for start in open_round:
        scale(start, ROUND_WEIGHT)
    for start in open_square:
        scale(start, 1 / ROUND_WEIGHT)
    return _merge_equal(pieces or [["", 1.0]])


def _number(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:  # "[.\d]+" also matches "." and "1.2.3"
        return None


def _add_text(pieces: list[list], text: str):
    """Plain text, with a ("BREAK", -1.0) marker for each BREAK word in it."""
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            pieces.append(["BREAK", BREAK_WEIGHT])
        pieces.append([part, 1.0])


def _merge_equal(pieces: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


# Textual-inversion embeddings


@dataclass(eq=False)
class Embedding:
    """A textual-inversion embedding: `vectors` [n, width] (float32, CPU) replace the tokens of `name` in a prompt.
    sha256: of the whole file; shorthash (its first 12 hex digits) is what A1111 writes as "TI hashes"."""
    name: str
    vectors: torch.Tensor
    path: str
    sha256: str

    @property
    def shorthash(self) -> str:
        return self.sha256[:12]


EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


def embedding_files(path: str | os.PathLike) -> list[Path]:
    """`path` itself if it is a file; for a folder, the .pt / .bin / .safetensors files in it and its subfolders
    (sorted; empty files skipped, as A1111 does)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file()
                      and p.stat().st_size > 0)
    if not path.exists():
        raise checkpoint.CheckpointError(f"{path}: no such file or folder; pass an embedding file or a folder of them")
    return [path]


FAMILY_WIDTHS = {768: "SD 1.x models", 1024: "SD 2.x models"}  # a single-encoder embedding's width -> its models
SDXL_PARTS = "clip_l [n, 768] + clip_g [n, 1280]"  # what an SDXL embedding file holds


def read_embedding(path: str | os.PathLike, width: "int | dict[str, int] | None" = None) -> Embedding:
    """One embedding file, named by its stem: A1111's .pt ({"string_to_param": {"*": [n, D]}, ...}), a .safetensors
    with "emb_params" [n, D], the diffusers form {token: [D] or [n, D]} (.bin or .safetensors), or an SDXL file
    {"clip_l": [n, 768], "clip_g": [n, 1280]}. Pickles go through checkpoint's restricted unpickler.
    width: the model's (embedding_width): an int for SD 1.x / 2.x, for SDXL the {part: width} of its encoders in
    context order, whose parts the vectors then hold side by side ([n, 768 + 1280]; the refiner: clip_g's [n, 1280]);
    None: no check (an SDXL file gives clip_l and clip_g side by side). A file that is none of these, or does not fit
    the model, is a one-line CheckpointError."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        data, _ = checkpoint.read_safetensors(path)
    else:
        data = checkpoint.read_pickle_checkpoint(path)
    parts = width if isinstance(width, dict) else None
    if isinstance(data, dict) and "clip_l" in data and "clip_g" in data:
        vectors = _sdxl_vectors(data, path, parts or {"clip_l": None, "clip_g": None}, width)
    else:
        vectors = _embedding_vectors(data, path)
        _check_width(path, vectors.shape[1], width)
    n = len(vectors)
    if not 1 <= n <= CHUNK_TOKENS:
        raise checkpoint.CheckpointError(f"{path}: an embedding of {n} vectors; 1 to {CHUNK_TOKENS} fit in a prompt")
    return Embedding(path.stem, vectors, str(path), _sha256(path))


def _check_width(path: Path, found: int, width):
    """A single-encoder embedding [n, found] against the model's width (an int, SDXL's parts, or None)."""
    if isinstance(width, dict):
        fits = FAMILY_WIDTHS.get(found, f"{found}-wide text encoders")
        raise checkpoint.CheckpointError(
            f"{path}: a textual-inversion embedding {found} wide, which fits {fits}; this SDXL model needs an SDXL "
            f"embedding ({SDXL_PARTS})")
    if width is not None and found != width:
        raise checkpoint.CheckpointError(
            f"{path}: a textual-inversion embedding {found} wide, and this model's text encoder is {width} wide; "
            f"use an embedding made for this model family (SD 1.x: 768, SD 2.x: 1024, SDXL: {SDXL_PARTS})")


def _sdxl_vectors(data: dict, path: Path, parts: dict, width) -> torch.Tensor:
    """An SDXL file's vectors for the model's parts ({name: width or None}), side by side: [n, sum of widths]."""
    if width is not None and not isinstance(width, dict):
        raise checkpoint.CheckpointError(
            f"{path}: an SDXL textual-inversion embedding ({SDXL_PARTS}), which fits SDXL models; this model's text "
            f"encoder is {width} wide (SD 1.x: 768, SD 2.x: 1024)")
    tensors = [_as_vectors(data[name], path, name) for name in parts]
    for name, t in zip(parts, tensors):
        if parts[name] is not None and t.shape[1] != parts[name]:
            raise checkpoint.CheckpointError(f"{path}: an SDXL embedding whose {name} is {t.shape[1]} wide; this "
                                             f"model's {name} text encoder is {parts[name]} wide")
    if len({len(t) for t in tensors}) > 1:
        counts = ", ".join(f"{name} {len(t)}" for name, t in zip(parts, tensors))
        raise checkpoint.CheckpointError(f"{path}: an SDXL embedding with unequal vector counts ({counts})")
    return torch.cat(tensors, dim=1)


def _refusal(path: Path, what: str) -> checkpoint.CheckpointError:
    return checkpoint.CheckpointError(f"{path}: {what}; pass an A1111 (.pt, .safetensors) or diffusers "
                                      f"(learned_embeds) textual-inversion embedding")


def _embedding_vectors(data, path: Path) -> torch.Tensor:
    """The [n, D] float32 vectors of a single-encoder embedding file's contents, copied out of the file's memory
    map."""
    if not isinstance(data, dict):
        raise _refusal(path, f"not a textual-inversion embedding (it holds a {type(data).__name__})")
    terms = data.get("string_to_param")
    terms = terms if isinstance(terms, dict) else {"emb_params": data["emb_params"]} if "emb_params" in data else data
    tensors = [v for v in terms.values() if isinstance(v, torch.Tensor)]
    if len(terms) != 1 or len(tensors) != 1:
        keys = ", ".join(sorted(map(str, terms)))[:120]
        raise _refusal(path, f"not one embedding tensor (keys: {keys or 'none'})")
    return _as_vectors(tensors[0], path, "embedding")


def _as_vectors(t, path: Path, what: str) -> torch.Tensor:
    """A file's tensor as [n, D] float32 vectors ([D] -> [1, D]), copied out of the file's memory map."""
    if not isinstance(t, torch.Tensor):
        raise _refusal(path, f"its {what} is a {type(t).__name__}, not a tensor")
    v = t[None] if t.dim() == 1 else t
    if v.dim() != 2 or not v.is_floating_point() or v.numel() == 0:
        raise _refusal(path, f"its {what} tensor has shape {list(t.shape)} and dtype {t.dtype}, not [n, width]")
    return v.detach().to(torch.float32, copy=True).contiguous()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def ti_hashes(embeddings: list[Embedding]) -> str:
    """A1111's "TI hashes" infotext value: "name: shorthash, name: shorthash" (':' and ',' removed from names)."""
    return ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {e.shorthash}" for e in embeddings)


# Chunks


@dataclass(eq=False)
class PromptChunks:
    """One prompt as k chunks: tokens [k, 77] (SOT, 75 prompt tokens or EOT, EOT, pad_id after the first EOT),
    weights [k, 77] float32 (1 for SOT/EOT/padding), fixes[i]: (position in chunk i's row, Embedding) pairs whose
    vectors replace that row's token embeddings from that position on (their tokens there are placeholders, 0)."""
    tokens: torch.LongTensor
    weights: torch.Tensor
    fixes: list[list[tuple[int, Embedding]]]

    @property
    def embeddings(self) -> list[Embedding]:
        """The embeddings used, in order of first use, each once."""
        return list({id(e): e for chunk in self.fixes for _, e in chunk}.values())


class _Chunks:
    """The chunk being filled (prompt tokens only, at most 75) and the finished ones, as A1111's tokenize_line
    builds them."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.rows: list[tuple[list[int], list[float], list[tuple[int, Embedding]]]] = []
        self.tokens, self.weights, self.fixes = [], [], []
        self.last_comma = -1  # index in self.tokens of the last comma in this chunk

    def close(self):
        """Finish the current chunk: SOT + tokens + EOT, EOT up to 77, then pad_id after the first EOT."""
        pad = CHUNK_TOKENS - len(self.tokens)
        tokens = [self.tok.sot_id, *self.tokens] + [self.tok.eot_id] * (pad + 1)
        if self.tok.pad_id != self.tok.eot_id:  # SD2: 0 after the first EOT (a literal EOT in the text included)
            first = tokens.index(self.tok.eot_id)
            tokens[first + 1:] = [self.tok.pad_id] * (len(tokens) - first - 1)
        weights = [1.0, *self.weights] + [1.0] * (pad + 1)
        self.rows.append((tokens, weights, [(at + 1, e) for at, e in self.fixes]))  # + 1: after SOT
        self.tokens, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def before(self, token: int, comma_id: int | None):
        """What happens before each prompt token is placed: a comma is remembered; a full chunk is closed, first
        handing the tokens after its last comma to the next chunk when that comma is within 20 of the end."""
        n = len(self.tokens)
        if token == comma_id:
            self.last_comma = n
        elif n == CHUNK_TOKENS and self.last_comma != -1 and n - self.last_comma <= COMMA_BACKTRACK:
            cut = self.last_comma + 1
            tail = self.tokens[cut:], self.weights[cut:], [(at - cut, e) for at, e in self.fixes if at >= cut]
            self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
            self.fixes = [(at, e) for at, e in self.fixes if at < cut]
            self.close()
            self.tokens, self.weights, self.fixes = (list(part) for part in tail)
        if len(self.tokens) == CHUNK_TOKENS:
            self.close()

    def add(self, token: int, weight: float):
        self.tokens.append(token)
        self.weights.append(weight)

    def add_embedding(self, embedding: Embedding, weight: float):
        """An embedding's n placeholder tokens, in a new chunk if they do not fit in this one."""
        n = len(embedding.vectors)
        if len(self.tokens) + n > CHUNK_TOKENS:
            self.close()
        self.fixes.append((len(self.tokens), embedding))
        self.tokens += [0] * n
        self.weights += [weight] * n

    def result(self) -> PromptChunks:
        tokens, weights, fixes = zip(*self.rows)
        return PromptChunks(torch.tensor(tokens, dtype=torch.long), torch.tensor(weights, dtype=torch.float32),
                            list(fixes))


class PromptChunker:
    """Turns prompts into PromptChunks the way A1111's web UI does: parse_prompt_attention, each piece tokenized on
    its own, chunks of 75 tokens (BREAK and a full chunk start the next; the comma rule of _Chunks.before), and
    textual-inversion embeddings matched on token sequences (the longest name first), as its EmbeddingDatabase.

        chunker = PromptChunker(tokenizer, embeddings)
        chunker("a (red:1.2) apple")        # one prompt: PromptChunks
        chunker.batch([negative, prompt])   # several, padded with empty chunks to the same chunk count
    """

    def __init__(self, tokenizer: Tokenizer, embeddings=()):
        self.tok = tokenizer
        self.comma_id = tokenizer.encoder.get(",</w>")
        by_ids = {tuple(tokenizer.encode(e.name)): e for e in embeddings}  # a later one wins for the same tokens
        self.lookup: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}  # first token -> longest first
        for ids, e in sorted(by_ids.items(), key=lambda item: -len(item[0])):
            if ids:
                self.lookup.setdefault(ids[0], []).append((ids, e))

    def match(self, ids: list[int], at: int) -> tuple[Embedding | None, int]:
        """The embedding whose name's tokens start at ids[at], and how many tokens the name has."""
        for name_ids, e in self.lookup.get(ids[at], ()):
            if tuple(ids[at:at + len(name_ids)]) == name_ids:
                return e, len(name_ids)
        return None, 1

    def __call__(self, text: str) -> PromptChunks:
        chunks = _Chunks(self.tok)
        for piece, weight in parse_prompt_attention(text):
            if piece == "BREAK" and weight == BREAK_WEIGHT:
                chunks.close()
                continue
            ids, at = self.tok.encode(piece), 0
            while at < len(ids):
                chunks.before(ids[at], self.comma_id)
                embedding, n = self.match(ids, at)
                if embedding is None:
                    chunks.add(ids[at], weight)
                else:
                    chunks.add_embedding(embedding, weight)
                at += n
        if chunks.tokens or not chunks.rows:  # a prompt without tokens is one empty chunk
            chunks.close()
        return chunks.result()

    def batch(self, texts: list[str]) -> list[PromptChunks]:
        """Each text's chunks, the shorter ones padded with empty-prompt chunks to the largest chunk count."""
        out = [self(text) for text in texts]
        k = max((len(p.tokens) for p in out), default=1)
        empty = self("")
        return [PromptChunks(torch.cat([p.tokens, empty.tokens.expand(k - len(p.tokens), -1)]),
                             torch.cat([p.weights, empty.weights.expand(k - len(p.weights), -1)]),
                             p.fixes + [[] for _ in range(k - len(p.fixes))]) for p in out]


# Encoding


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis, per row: z [N, L, C] hidden states times weights [N, L], rescaled so that each
    row's mean stays the unweighted mean (A1111 takes one mean over its whole batch; per row, a prompt's embedding
    does not depend on what it is batched with). Computed in float32; rows whose weights are all 1 are returned
    untouched, bit for bit."""
    rows = (weights != 1).any(dim=1).nonzero().flatten()
    if len(rows) == 0:
        return z
    before = z[rows].float()
    weighted = before * weights[rows].float()[..., None]
    weighted = weighted * (before.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
    out = z.clone()
    out[rows] = weighted.to(z.dtype)
    return out


def encode_chunks(text_encoder: nn.Module, prompts: list[PromptChunks], clip_skip: int = 1, pooled: bool = False):
    """[B, 77 k, D]: every chunk of every prompt (all k chunks each, see PromptChunker.batch) through the text
    encoder in one batch, embeddings put in, emphasis applied per chunk (SDXL: per encoder, as A1111 wraps each
    encoder on its own), each prompt's chunks concatenated along the token axis. On the text encoder's device, in its
    dtype. pooled=True: (that, pooled [B, P]), SDXL's pooled vector of each prompt's FIRST chunk (as A1111 takes it;
    no emphasis), or None for a text encoder without one (SD 1.x / 2.x)."""
    if len({len(p.tokens) for p in prompts}) > 1:
        raise ValueError("prompts encoded together need the same chunk count: use PromptChunker.batch")
    param = next(text_encoder.parameters())
    tokens = torch.cat([p.tokens for p in prompts]).to(param.device)  # [B k, 77]
    fixes = [[(at, e.vectors) for at, e in chunk] for p in prompts for chunk in p.fixes]
    sdxl = isinstance(text_encoder, SDXLTextEncoder)
    out = text_encoder(tokens, clip_skip=clip_skip, fixes=fixes if any(fixes) else None,
                       **({"pooled": True} if pooled and sdxl else {}))
    z, vector = out if pooled and sdxl else (out, None)  # [B k, 77, D], [B k, P]
    weights = torch.cat([p.weights for p in prompts]).to(param.device)
    if sdxl:
        z = torch.cat([apply_emphasis(part, weights) for part in z.split(text_encoder.widths, dim=-1)], dim=-1)
    else:
        z = apply_emphasis(z, weights)
    z = z.reshape(len(prompts), -1, z.shape[-1])
    if not pooled:
        return z
    return z, None if vector is None else vector.reshape(len(prompts), -1, vector.shape[-1])[:, 0]
