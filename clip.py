"""CLIP text side of Stable Diffusion: the BPE tokenizer and the two text encoders.

Tokenizer: OpenAI CLIP's byte-level BPE (ftfy + html clean-up, lowercase, `</w>` word ends, merges by rank),
SOT 49406 / EOT 49407, 77 positions. SD1 pads with EOT (49407), SD2 with 0, so the pad id is a setting.

Text encoders, parameter names mirroring the public single-file checkpoints:
- `CLIPTextModel` (SD1, OpenAI ViT-L/14 text tower): keys of an SD1 file minus
  `cond_stage_model.transformer.text_model.` (transformers' CLIPTextModel names).
- `OpenCLIPTextModel` (SD2, OpenCLIP ViT-H/14 text tower): keys of an SD2 file minus `cond_stage_model.model.`,
  fused `in_proj_weight` attention, conditioning taken from the penultimate block.
`convert_diffusers` maps a diffusers `text_encoder/` state dict (transformers layout) onto these names.
"""
import gzip
import html
import json
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

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
        """Read a diffusers/transformers `tokenizer/` folder (vocab.json, merges.txt, optional pad_token)."""
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            encoder = json.load(f)
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n") if line and not line.startswith("#version")]
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
    layer: str = "last"  # "last" | "penultimate": which block's output feeds the final LayerNorm
    embed_dim: int | None = None  # text_projection width; openclip only, None -> no projection/logit_scale


PRESETS = {
    "sd1": TextConfig(layout="clip", width=768, layers=12, heads=12, act="quick_gelu", layer="last"),
    "sd2": TextConfig(layout="openclip", width=1024, layers=24, heads=16, act="gelu", layer="penultimate",
                      embed_dim=1024),
    "tiny": TextConfig(layout="clip", width=32, layers=2, heads=2, act="quick_gelu", layer="last"),
}

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


def n_blocks_run(cfg: TextConfig) -> int:
    assert cfg.layer in ("last", "penultimate"), cfg.layer
    return cfg.layers - (cfg.layer == "penultimate")  # SD2 conditions on the output of the second-to-last block


# -------------------------------------------------------------------------------------------------------------------
# Text encoders


class CLIPTextModel(nn.Module):
    """SD1 text encoder. forward(tokens [B, 77]) -> final_layer_norm(hidden states) [B, 77, width]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleDict(dict(
            token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
            position_embedding=nn.Embedding(cfg.context_length, cfg.width),
        ))  # no position_ids buffer: positions are arange(L); checkpoint loaders drop the stored copy
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))))
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, tokens: torch.LongTensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embeddings.token_embedding(tokens) + self.embeddings.position_embedding(positions)  # (B, L, C)
        for layer in self.encoder.layers[:n_blocks_run(self.cfg)]:
            x = layer(x)
        return self.final_layer_norm(x)


class OpenCLIPTextModel(nn.Module):
    """SD2 text encoder. forward(tokens [B, 77]) -> ln_final(penultimate block output) [B, 77, width].
    text_projection / logit_scale are never used for conditioning; they exist so a full SD2 file loads strictly."""

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

    def forward(self, tokens: torch.LongTensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]  # (B, L, C)
        for block in self.transformer.resblocks[:n_blocks_run(self.cfg)]:
            x = block(x)
        return self.ln_final(x)


def build_text_encoder(cfg: TextConfig) -> nn.Module:
    return {"clip": CLIPTextModel, "openclip": OpenCLIPTextModel}[cfg.layout](cfg)


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


def config_from_diffusers(config_json: dict) -> TextConfig:
    """TextConfig from a transformers CLIPTextConfig dict (a diffusers `text_encoder/config.json`).
    quick_gelu -> SD1 "clip" layout; gelu -> SD2, whose diffusers export is OpenCLIP's first 23 blocks, so the
    last of them is the penultimate layer and layer="last" reproduces SD2's conditioning."""
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


def convert_diffusers(state_dict: dict[str, torch.Tensor], cfg: TextConfig) -> dict[str, torch.Tensor]:
    """diffusers `text_encoder/` state dict (transformers CLIPTextModel, with or without the `text_model.` level)
    -> our names for `cfg.layout`."""
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
    assert used == set(sd), f"unexpected keys in diffusers text encoder: {sorted(set(sd) - used)}"
    return out
