"""LoRA: low-rank updates of a model's weights, W' = W + m (alpha / r) up @ down, as the community shares them.

Reading (`read_lora`) brings every file to one form, {kohya module name: Pair(down, up, alpha)}:
- kohya (AUTOMATIC1111, ComfyUI, sd-scripts): `lora_unet_<module path, "." -> "_">` + `.lora_down.weight`
  [r, in(, kh, kw)], `.lora_up.weight` [out, r(, 1, 1)], `.alpha` (0-d; none means alpha = r). SD 1.x / 2.x files
  name U-Net modules by their diffusers paths (`lora_unet_down_blocks_0_attentions_0_..._attn1_to_q`), SDXL files
  by the original ones (`lora_unet_input_blocks_4_1_..._attn1_to_q`); text encoders `lora_te_` (SD 1.x / 2.x),
  `lora_te1_` / `lora_te2_` (SDXL's CLIP-L / bigG), by transformers' names (`text_model_encoder_layers_0_self_attn_
  q_proj`). Convolutions (LoCon: ResBlock 3x3 convs, shortcuts, down / up samplers) as well as linear layers.
- diffusers / PEFT: `unet.<diffusers path>.lora_A.weight` (down) / `.lora_B.weight` (up), or `.lora.down.weight`
  / `.lora.up.weight` (`.lora_linear_layer.down.weight` / `.up.weight` for text encoders), as diffusers' training
  scripts write them; `text_encoder.` / `text_encoder_2.` for the text encoders, by transformers' names (with or
  without the `text_model.` level, which transformers 5's CLIPTextModel drops). Alphas come from the adapter configs
  diffusers keeps in the file's metadata (`peft_alpha`); none means alpha = r.

`targets(model)` names every weight a LoRA can change, under every name a file may use, with loop-built tables
(the U-Net's come from the diffusers-folder conversion table). Applying merges the update into the weights, in
place (captured CUDA graphs and compiled code keep reading the same tensors), after keeping a copy of each
original: `remove` restores them bit for bit, so one loaded model switches LoRAs between images. Training uses
`LoRANetwork`: trainable down / up pairs beside frozen modules, added to their outputs by forward hooks.
"""

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import checkpoint
import unet as unet_lib
from checkpoint import CheckpointError


@dataclass
class Target:
    """A weight a LoRA module updates: model.<part>.<module>.<param>, or rows [lo, hi) of it (q / k / v of a fused
    in_proj_weight)."""
    part: str  # "unet" or "text_encoder"
    module: str
    param: str = "weight"
    rows: tuple[int, int] | None = None

    def tensor(self, model: nn.Module) -> torch.Tensor:
        w = getattr(getattr(model, self.part).get_submodule(self.module), self.param)
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]


@dataclass
class Pair:
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size, scale: float) -> torch.Tensor:
        """scale (alpha / r) up @ down in float32, in the weight's shape."""
        d = self.up.flatten(1).float() @ self.down.flatten(1).float()  # [out, in * kh * kw]
        return (d * (scale * self.alpha / self.rank)).reshape(shape)


# -----------------------------------------------------------------------------------------------------------------
# Names: every LoRA-able weight of a model under each name a file may give it


def diffusers_module_name(name: str, table: list[tuple[str, str, bool]]) -> str | None:
    """Our U-Net module path -> its diffusers path, by the diffusers-folder conversion table."""
    for ours, theirs, is_resnet in table:
        if (name + ".").startswith(ours):
            rest = name[len(ours):]
            return (theirs + (unet_lib.RESNET_NAMES[rest] if is_resnet else rest)).rstrip(".")
    return None


def unet_names(u: nn.Module) -> dict[str, tuple[str, str]]:
    """{kohya name: (our module path, "original" | "diffusers")} for every Linear / Conv2d of the U-Net, under both
    namings (the original one of SDXL files, the diffusers one of SD 1.x / 2.x files)."""
    table = unet_lib.diffusers_prefixes(u.cfg)
    out = {}
    for name, module in u.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out["lora_unet_" + name.replace(".", "_")] = name, "original"
            theirs = diffusers_module_name(name, table)
            if theirs is not None:
                out["lora_unet_" + theirs.replace(".", "_")] = name, "diffusers"
    return out


def text_names(encoder: nn.Module, prefix: str, path: str = "") -> dict[str, Target]:
    """{kohya name: Target} of one text transformer (at `path` inside model.text_encoder) under transformers'
    names, which kohya uses for every encoder: separate q / k / v projections become rows of OpenCLIP's fused
    in_proj_weight, and its c_fc / c_proj are transformers' fc1 / fc2."""
    cfg, out = encoder.cfg, {}
    for i in range(cfg.layers):
        name = f"{prefix}text_model_encoder_layers_{i}_"
        if cfg.layout == "clip":
            layer = f"{path}encoder.layers.{i}."
            for p in ("q", "k", "v", "out"):
                out[f"{name}self_attn_{p}_proj"] = Target("text_encoder", f"{layer}self_attn.{p}_proj")
            for fc in ("fc1", "fc2"):
                out[f"{name}mlp_{fc}"] = Target("text_encoder", f"{layer}mlp.{fc}")
        else:
            block, w = f"{path}transformer.resblocks.{i}.", cfg.width
            for k, p in enumerate("qkv"):
                out[f"{name}self_attn_{p}_proj"] = Target("text_encoder", f"{block}attn", "in_proj_weight",
                                                          (k * w, (k + 1) * w))
            out[f"{name}self_attn_out_proj"] = Target("text_encoder", f"{block}attn.out_proj")
            out[f"{name}mlp_fc1"] = Target("text_encoder", f"{block}mlp.c_fc")
            out[f"{name}mlp_fc2"] = Target("text_encoder", f"{block}mlp.c_proj")
    return out


def text_encoder_parts(te: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """[(kohya prefix, transformer, its path in model.text_encoder)]: lora_te_ for SD 1.x / 2.x; SDXL's lora_te1_
    (CLIP-L) and lora_te2_ (bigG)."""
    if te.cfg.layout != "sdxl":
        return [("lora_te_", te, "")]
    parts = [("lora_te2_", te.clip_g, "clip_g.")]
    return ([("lora_te1_", te.clip_l, "clip_l.")] if te.clip_l is not None else []) + parts


def targets(model: nn.Module) -> dict[str, Target]:
    """{kohya name: Target} for everything a LoRA file may name in `model` (a LatentDiffusion)."""
    out = {name: Target("unet", path) for name, (path, _) in unet_names(model.unet).items()}
    for prefix, encoder, path in text_encoder_parts(model.text_encoder):
        out.update(text_names(encoder, prefix, path))
        if prefix == "lora_te1_":  # diffusers' SDXL files call CLIP-L plain text_encoder.
            out.update(text_names(encoder, "lora_te_", path))
    return out


# -----------------------------------------------------------------------------------------------------------------
# Reading


_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
             ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
             ".lora_linear_layer.up.weight": "up", ".alpha": "alpha"}
_PEFT_PARTS = {"unet.": "lora_unet_", "text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}
_OTHER_KINDS = ("hada_", "lokr_", "lora_mid", "dora_scale", "lora_magnitude_vector", "oft_", "boft_")
_OTHER_SUFFIXES = (".diff", ".diff_b")  # LyCORIS' full weight differences (a substring would match .diffusion_model)


def kohya_name(base: str) -> str | None:
    """A file's module name in kohya's form: kohya names as they are, diffusers / PEFT paths (`unet.down_blocks.0.
    ...`, `text_encoder.text_model...` or transformers 5's `text_encoder.encoder...`) with their part's kohya
    prefix; None for neither."""
    if base.startswith("lora_"):
        return base
    for theirs, prefix in _PEFT_PARTS.items():
        if base.startswith(theirs):
            path = base[len(theirs):]
            if prefix != "lora_unet_" and path.startswith("encoder."):  # a CLIPTextModel without text_model.
                path = "text_model." + path
            return prefix + path.replace(".", "_")
    return None


def peft_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """{part ("unet", "text_encoder", "text_encoder_2"): its adapter config} from the metadata diffusers writes
    into a PEFT-format file: `lora_adapter_metadata`, the JSON of every part's peft LoraConfig fields under its
    prefix ({"unet.lora_alpha": 8, "unet.alpha_pattern": {"to_k": 2}, "unet.use_rslora": false, "text_encoder.r":
    4, ...}); {} for none (diffusers then reads alpha = r)."""
    try:
        meta = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        return {}
    out = {}
    for key, value in meta.items() if isinstance(meta, dict) else ():
        part, _, field = key.partition(".")
        out.setdefault(part, {})[field] = value
    return out


def peft_alpha(config: dict, module: str, rank: int) -> float:
    """The kohya alpha (scale alpha / r) of PEFT module `module` (its path inside its part) of rank `rank` under
    its part's adapter config: the first alpha_pattern entry matching the end of the path, as peft matches them,
    else lora_alpha; rsLoRA (use_rslora) scales by alpha / sqrt(r), which is alpha sqrt(r) / r. No config: r."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)


def read_lora(source, path: str | os.PathLike = None) -> tuple[dict[str, Pair], dict[str, str]]:
    """({kohya name: Pair}, metadata) of a LoRA file (or an already loaded state dict `source`). A weight of
    another kind (LyCORIS LoHa / LoKr, DoRA, Tucker mid weights), a down without its up, or a key that is neither
    are one-line CheckpointErrors."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        sd, metadata = checkpoint.read_checkpoint(path)
    else:
        sd, metadata = dict(source), {}
    path = path or "LoRA"
    parts, stray, peft = {}, [], {}  # peft: {kohya name: (part, module path)} of the diffusers / PEFT names
    for key, value in sd.items():
        if any(k in key for k in _OTHER_KINDS) or key.endswith(_OTHER_SUFFIXES):
            raise CheckpointError(f"{path}: {key} is a LyCORIS / DoRA weight, not plain LoRA; only LoRA and LoCon "
                                  "files (lora_down / lora_up) are supported")
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        name = kohya_name(key[:-len(suffix)]) if suffix else None
        if name is None:
            stray.append(key)
            continue
        parts.setdefault(name, {})[_SUFFIXES[suffix]] = value
        if not key.startswith("lora_"):
            peft[name] = tuple(key[:-len(suffix)].split(".", 1))
    if stray:
        raise CheckpointError(f"{path}: not LoRA weights: {', '.join(stray[:5])}"
                              + (f" ... ({len(stray)} in all)" if len(stray) > 5 else ""))
    if not parts:
        raise CheckpointError(f"{path}: holds no LoRA weights")
    configs = peft_configs(metadata)
    out = {}
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            raise CheckpointError(f"{path}: {name} has {'a lora_down' if 'down' in p else 'a lora_up'} weight "
                                  "without its pair")
        r = p["down"].shape[0]
        if "alpha" in p:
            alpha = float(p["alpha"])
        elif name in peft:
            part, module = peft[name]
            alpha = peft_alpha(configs.get(part, {}), module, r)
        else:
            alpha = float(r)
        out[name] = Pair(p["down"], p["up"], alpha)
    return out, metadata


def _model_kind(context_dim: int) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}.get(
        context_dim, f"a model with {context_dim}-wide text states")


def guess_model(pairs: dict[str, Pair]) -> str:
    """Which model a LoRA seems to be for: SDXL by its names, else by the width its text-side modules read."""
    names = list(pairs)
    if any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks",
                         "lora_unet_middle_block")) for n in names):
        return "SDXL"
    for n, p in pairs.items():  # these read the text width (fc2 reads 4x it)
        if (n.startswith("lora_te_") and not n.endswith("_fc2")) or n.endswith("attn2_to_k"):
            return _model_kind(p.down.flatten(1).shape[1])
    return "another model"


def resolve(model: nn.Module, pairs: dict[str, Pair], path) -> list[tuple[Target, Pair]]:
    """Each pair with the weight it updates, or one CheckpointError naming the modules that match nothing and the
    shapes that do not fit (with the model the file seems to be for)."""
    table = targets(model)
    here = _model_kind(model.unet.cfg.context_dim)
    unknown = [n for n in pairs if n not in table]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} of its {len(pairs)} LoRA modules match nothing in this "
                              f"model ({here}): {', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}; it "
                              f"looks like a LoRA for {guess_model(pairs)}")
    out, bad = [], []
    for name, pair in pairs.items():
        target = table[name]
        w = target.tensor(model)
        fits = (pair.up.shape[0] == w.shape[0] and pair.up.flatten(1).shape[1] == pair.rank
                and pair.up.shape[0] * pair.down.flatten(1).shape[1] == w.numel())
        if not fits:
            bad.append(f"{name} ({tuple(pair.up.shape)} x {tuple(pair.down.shape)} for a {tuple(w.shape)} weight)")
        out.append((target, pair))
    if bad:
        raise CheckpointError(f"{path}: LoRA shapes that do not fit this model ({here}): {', '.join(bad[:3])}"
                              + (f" ... ({len(bad)} in all)" if len(bad) > 3 else "")
                              + f"; it looks like a LoRA for {guess_model(pairs)}")
    return out


# -----------------------------------------------------------------------------------------------------------------
# Applying (merged into the weights) and removing


@dataclass
class Applied:
    """A LoRA merged into a model: what sample.py records (A1111's `Lora hashes`) and what removal undoes."""
    name: str
    multiplier: float
    path: Path | None
    modules: int
    unet_multiplier: float | None = None  # the U-Net's own, where it differs from the text encoders' `multiplier`


@torch.no_grad()
def apply(model: nn.Module, source, multiplier: float = 1.0, name: str = None,
          unet_multiplier: float = None) -> Applied:
    """Merge a LoRA (a file, or a state dict in either format) into `model` in place at `multiplier`, its U-Net
    modules at `unet_multiplier` when given (A1111's <lora:NAME:TE:UNET>). All its modules are checked before any
    weight changes. Returns what was applied (also appended to model.loras)."""
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    pairs, _ = read_lora(source)
    resolved = resolve(model, pairs, path or "LoRA")
    backup = model.__dict__.setdefault("_lora_backup", {})
    for target, pair in resolved:
        key = (target.part, target.module, target.param)
        full = getattr(getattr(model, target.part).get_submodule(target.module), target.param)
        if key not in backup:
            backup[key] = full.detach().to("cpu", copy=True)  # kept off the accelerator
        w = target.tensor(model)
        m = unet_multiplier if target.part == "unet" and unet_multiplier is not None else multiplier
        w.copy_((w.float() + pair.delta(w.shape, m).to(w.device)).to(w.dtype))
    applied = Applied(name or (path.stem if path else "lora"), multiplier, path, len(resolved), unet_multiplier)
    model.__dict__.setdefault("_loras", []).append(applied)
    return applied


@torch.no_grad()
def remove(model: nn.Module):
    """Restore every weight a LoRA changed to its value before the first apply, bit for bit."""
    for (part, module, param), original in model.__dict__.pop("_lora_backup", {}).items():
        getattr(getattr(model, part).get_submodule(module), param).copy_(original)
    model.__dict__.pop("_loras", None)


# -----------------------------------------------------------------------------------------------------------------
# Training: down / up pairs beside frozen modules, exported in the kohya format


# Which U-Net modules a trained LoRA covers: attention projections; + the rest of each transformer (kohya's
# default: proj_in / proj_out and the feed-forward); + every convolution and linear layer of the ResBlocks and
# samplers (LoCon)
TARGET_SETS = ("attn", "attn+ff", "all")
_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def _trains(path: str, which: str) -> bool:
    if path.endswith(_ATTN):
        return True
    if path.endswith(_FF):
        return which != "attn"
    return which == "all" and not path.startswith(("time_embed", "label_emb", "out.", "input_blocks.0."))


class LoRAModule(nn.Module):
    """(alpha / r) up(down(x)) beside a Linear or Conv2d: down shaped like the base (a conv keeps its kernel,
    stride and padding), up a 1x1; down random (kohya's kaiming init), up zero, so training starts at the base."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator = None):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down, self.up = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features,
                                                                                          bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


class LoRANetwork(nn.Module):
    """Trainable LoRA modules on `model`'s U-Net (and, text_encoder=True, its CLIP text encoder), each added to its
    base module's output by a forward hook. Names are the kohya ones the export writes: diffusers paths for SD 1.x /
    2.x, original paths for SDXL, as sd-scripts writes them."""

    def __init__(self, model: nn.Module, rank: int, alpha: float = None, which: str = "attn+ff",
                 text_encoder: bool = False, seed: int = 0):
        super().__init__()
        if which not in TARGET_SETS:
            raise ValueError(f"LoRA targets must be one of {', '.join(TARGET_SETS)}, got {which!r}")
        alpha = float(rank if alpha is None else alpha)
        self.rank, self.alpha, self.which = rank, alpha, which
        style = "original" if model.unet.cfg.adm_in_channels is not None else "diffusers"
        chosen = {path: name for name, (path, s) in unet_names(model.unet).items() if s == style}
        modules = {name: ("unet", path) for path, name in chosen.items() if _trains(path, which)}
        if text_encoder:
            te = model.text_encoder
            if te.cfg.layout != "clip":
                raise ValueError("a text-encoder LoRA trains the SD 1.x (CLIP ViT-L) text encoder only")
            modules.update({name: ("text_encoder", t.module) for name, t in text_names(te, "lora_te_").items()})
        self.loras = nn.ModuleDict()
        self._hooks, self.active = [], True
        g = torch.Generator().manual_seed(seed)  # the same start for every run of a seed, whatever ran before
        for name, (part, path) in modules.items():
            base = getattr(model, part).get_submodule(path)
            self.loras[name] = lm = LoRAModule(base, rank, alpha, g).to(next(base.parameters()).device)
            self._hooks.append(base.register_forward_hook(self._hook(lm)))

    def _hook(self, lm: LoRAModule):
        def add(module, args, out):
            return out + lm(args[0]) if self.active else out
        return add

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @contextmanager
    def merged(self, model: nn.Module):
        """The network's weights merged into `model`'s, hooks off, as `apply` merges its exported file: samples
        drawn inside equal, bit for bit, those of the base model with the file applied (train.py's sample grids)."""
        self.active = False
        try:
            apply(model, self.kohya_state_dict(), name="training")
            yield
        finally:
            remove(model)
            self.active = True

    @torch.no_grad()
    def load_kohya_state_dict(self, state: dict[str, torch.Tensor]):
        """The inverse of kohya_state_dict, strictly: every module's down, up and alpha, and nothing else."""
        own = self.kohya_state_dict()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise CheckpointError(f"the LoRA state does not fit this network (other rank or targets?); missing: "
                                  f"{', '.join(missing[:3]) or '-'}; unexpected: {', '.join(extra[:3]) or '-'}")
        for name, lm in self.loras.items():
            for key, t in ((".lora_down.weight", lm.down.weight), (".lora_up.weight", lm.up.weight),
                           (".alpha", lm.alpha)):
                if state[name + key].shape != t.shape:
                    raise CheckpointError(f"the LoRA state does not fit this network: {name + key} "
                                          f"{tuple(state[name + key].shape)} vs {tuple(t.shape)}")
                t.copy_(state[name + key])

    def kohya_state_dict(self, dtype: torch.dtype = None) -> dict[str, torch.Tensor]:
        """{name.lora_down.weight, name.lora_up.weight, name.alpha} for every module, as A1111 and ComfyUI read."""
        out = {}
        for name, lm in self.loras.items():
            for key, t in ((".lora_down.weight", lm.down.weight), (".lora_up.weight", lm.up.weight),
                           (".alpha", lm.alpha)):
                t = t.detach()
                out[name + key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def base_model_version(model: nn.Module) -> str:
    """kohya's ss_base_model_version of a model: SDXL base or refiner by its conditioning, SD 2.x by its text
    width."""
    if model.unet.cfg.adm_in_channels is not None:
        return "sdxl_base_v1-0" if model.text_encoder.clip_l is not None else "sdxl_refiner_v1-0"
    return "sd_v2" if model.unet.cfg.context_dim == 1024 else "sd_v1"


def save(network: LoRANetwork, model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] = None):
    """Write `network` as a kohya LoRA .safetensors (atomically), with sd-scripts' ss_* metadata so A1111 and
    ComfyUI list and load it; `metadata` adds or overrides entries."""
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(network.rank),
            "ss_network_alpha": str(network.alpha), "ss_base_model_version": base_model_version(model),
            "ss_v2": str(base_model_version(model) == "sd_v2"),
            "ss_v_parameterization": str(model.prediction_type == "v"), "ss_network_args": json.dumps(
                {"conv_dim": str(network.rank), "conv_alpha": str(network.alpha)} if network.which == "all" else {}),
            "ss_lora_targets": network.which, "format": "pt"}
    meta.update(metadata or {})
    checkpoint.save_safetensors(path, network.kohya_state_dict(), meta)
