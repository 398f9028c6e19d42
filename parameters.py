"""An image's generation settings as the text AUTOMATIC1111's web UI writes into its PNGs (the `parameters` text
chunk), which ComfyUI, SD.Next and image sites read too:

    a red apple on a table
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: ...

`format_parameters` writes it for a Job, `parse_parameters` reads ours and A1111's back into a Job (the older
"Sampler: DPM++ 2M Karras" form too). A setting that would change the pixels and that this project does not have
(hires fix, another emphasis mode, a schedule it lacks) is an error naming it, never silently dropped.

A1111's LoRA syntax lives here too: `<lora:NAME:WEIGHT>` tags in a prompt (`lora_tags` reads them and gives the
prompt without them, as it is encoded; the recorded prompt keeps them), and the "Lora hashes" field.
Standard library only.
"""

import json
import math
import re
from dataclasses import dataclass

from cli import UserError

# our name -> A1111's (the sampler names of its UI; A1111 >= 1.9 writes the schedule as its own field)
SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "lms": "LMS",
                 "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE"}
SCHEDULE_NAMES = {"normal": "Normal", "karras": "Karras", "exponential": "Exponential"}
# A1111's "Automatic" schedule: the sampler's own default; "Uniform" and "Normal" both space t evenly from 999 to 0
AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential"}
SCHEDULE_ALIASES = {"Uniform": "normal", "Normal": "normal", "Karras": "karras", "Exponential": "exponential"}
ANCESTRAL = ("euler_a", "dpmpp_sde", "dpmpp_2m_sde")  # A1111 runs these at eta 1 unless its Eta field says otherwise
# Fields that say where an image came from but not how its pixels were computed
INFORMATIONAL = {"Model hash", "Model", "VAE hash", "VAE", "Version", "TI hashes", "Lora hashes", "RNG", "Refiner",
                 "Emphasis", "Eta", "Denoising strength", "Schedule type", "Clip skip", "Refiner switch at",
                 "Original size", "Target size", "Crop top-left", "Aesthetic score"}
READ = {"Steps", "Sampler", "CFG scale", "Seed", "Size"}


@dataclass
class Job:
    """One image: everything that decides its pixels besides the weights, embeddings and the init image."""
    prompt: str
    negative: str
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    sampler: str = "ddim"
    scheduler: str = "normal"
    eta: float = 0.0  # DDIM only
    strength: float = None  # img2img only
    clip_skip: int = 1
    original_size: tuple[int, int] = None  # SDXL: (width, height), as Size
    target_size: tuple[int, int] = None  # SDXL base
    crop: tuple[int, int] = None  # SDXL: (top, left)
    aesthetic_score: float = None  # SDXL refiner
    refiner_switch: float = None  # SDXL: where a refiner took over


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text  # as A1111 quotes such values


def _pair_text(pair: tuple[int, int] | None) -> str | None:
    return None if pair is None else f"{pair[0]}x{pair[1]}"


def format_parameters(job: Job, model_info: dict) -> str:
    """'prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, ...'.
    model_info: Model hash, Model, VAE ... fields (None values are left out). The noise is the CPU's, per image:
    A1111 reproduces it with its RNG source set to CPU, which the RNG field asks for."""
    ddim = job.sampler == "ddim"
    fields = {"Steps": job.steps, "Sampler": SAMPLER_NAMES[job.sampler],
              "Schedule type": None if ddim else SCHEDULE_NAMES[job.scheduler], "CFG scale": job.cfg,
              "Seed": job.seed, "Size": f"{job.width}x{job.height}", **model_info,
              "Refiner switch at": job.refiner_switch, "Denoising strength": job.strength,
              "Clip skip": job.clip_skip if job.clip_skip != 1 else None,
              "Original size": _pair_text(job.original_size), "Target size": _pair_text(job.target_size),
              "Crop top-left": _pair_text(job.crop),
              "Aesthetic score": job.aesthetic_score, "RNG": "CPU", "Eta": job.eta if ddim else None}
    lines = [job.prompt] + ([f"Negative prompt: {job.negative}"] if job.negative else [])
    return "\n".join(lines + [", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)])


PARAM_RE = re.compile(r'\s*([\w][\w \-/()+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def sampler_and_schedule(fields: dict) -> tuple[str, str]:
    """(sampler, scheduler) from 'Sampler' and 'Schedule type', or the older 'Sampler: DPM++ 2M Karras' form."""
    name, schedule = fields.get("Sampler", ""), fields.get("Schedule type")
    if schedule is None:  # before A1111 1.9 the schedule was part of the sampler's name (none: evenly spaced)
        for suffix, ours in ((" Karras", "karras"), (" Exponential", "exponential")):
            if name.endswith(suffix):
                name, schedule = name[:-len(suffix)], SCHEDULE_NAMES[ours]
    sampler = {v: k for k, v in SAMPLER_NAMES.items()}.get(name)
    if sampler is None:
        raise UserError(f"sampler {fields.get('Sampler')!r} is not available; available: "
                        + ", ".join(SAMPLER_NAMES.values()))
    if schedule in (None, "Automatic"):
        return sampler, AUTOMATIC.get(sampler, "normal") if schedule else "normal"
    if schedule not in SCHEDULE_ALIASES or (sampler == "ddim" and SCHEDULE_ALIASES[schedule] != "normal"):
        raise UserError(f"Schedule type {schedule!r} is not available for {name}; available: Automatic, "
                        + ", ".join(SCHEDULE_ALIASES))
    return sampler, SCHEDULE_ALIASES[schedule]


def check_supported(fields: dict, sampler: str):
    """Every field must be one this project reproduces or one that does not change the pixels."""
    unknown = [f"{k}: {v}" for k, v in fields.items() if k not in READ | INFORMATIONAL]
    if unknown:
        raise UserError(f"the image's settings include {', '.join(unknown[:3])}, which this project does not have; "
                        "generate without them (or take the prompt alone)")
    if fields.get("Emphasis", "Original") != "Original":
        raise UserError(f"Emphasis {fields['Emphasis']!r} is not available (only A1111's default, Original)")
    if sampler in ANCESTRAL and float(fields.get("Eta", 1.0)) != 1.0:
        raise UserError(f"Eta {fields['Eta']} with {SAMPLER_NAMES[sampler]} is not available (only 1, the default)")


def _pair(text: str | None) -> tuple[int, int] | None:
    return None if text is None else tuple(int(v) for v in text.split("x"))


def parse_parameters(text: str) -> tuple[Job, dict]:
    """The inverse of format_parameters, for ours and A1111's: (Job, every 'Key: value' field as a string)."""
    *head, last = text.strip("\n").split("\n")
    fields = {k: json.loads(v) if v.startswith('"') else v.strip() for k, v in PARAM_RE.findall(last)}
    at = next((i for i, line in enumerate(head) if line.startswith("Negative prompt:")), len(head))
    negative = "\n".join(head[at:])[len("Negative prompt:"):].strip()
    sampler, scheduler = sampler_and_schedule(fields)
    check_supported(fields, sampler)
    try:
        width, height = (int(v) for v in fields["Size"].split("x"))
        job = Job("\n".join(head[:at]), negative, int(fields["Seed"]), int(fields["Steps"]),
                  float(fields["CFG scale"]), width, height, sampler, scheduler,
                  float(fields.get("Eta", 0.0)) if sampler == "ddim" else 0.0,
                  float(fields["Denoising strength"]) if "Denoising strength" in fields else None,
                  int(fields.get("Clip skip", 1)), *(_pair(fields.get(k)) for k in ("Original size", "Target size",
                                                                                     "Crop top-left")),
                  *(float(fields[k]) if k in fields else None for k in ("Aesthetic score", "Refiner switch at")))
    except (KeyError, ValueError) as e:
        raise UserError(f"unreadable generation parameters ({type(e).__name__}: {e}) in: {last!r}") from None
    return job, fields


# -----------------------------------------------------------------------------------------------------------------
# LoRA: A1111's extra-network tags in prompts and its "Lora hashes" field

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # <kind:arg:arg...>, A1111's extra networks
LORA_KINDS = ("lora", "lyco")  # A1111 reads LyCORIS's old <lyco:...> tag as <lora:...>


@dataclass(frozen=True)
class LoraTag:
    """<lora:NAME:WEIGHT>: the LoRA file NAME (the file's name without its extension) merged at WEIGHT, or at WEIGHT
    in the text encoders and `unet` in the U-Net (<lora:NAME:TE:UNET>)."""
    name: str
    weight: float = 1.0
    unet: float | None = None  # None: WEIGHT


def _tag_weight(tag: str, what: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{tag}: the {what} {text.strip()!r} is not a finite number")
    return value


def _lora_tag(tag: str, args: str) -> LoraTag:
    """One tag's arguments as A1111 reads them: NAME, then positional TE (default 1), UNET (default TE) and DYN, or
    te= / unet= / dyn=. DYN (a rank cut) is not available."""
    name, *items = [item.strip() for item in args.split(":")]
    named = dict(item.split("=", 1) for item in items if "=" in item)
    positional = [item for item in items if "=" not in item]
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if not name or unknown or len(positional) > 3:
        raise UserError(f"{tag}: not a LoRA tag as A1111 writes them (<lora:NAME>, <lora:NAME:WEIGHT>, "
                        "<lora:NAME:TE:UNET>, te= / unet=)")
    if "dyn" in named or len(positional) > 2:
        raise UserError(f"{tag}: a dyn rank cut (DYN) is not available; give the weight alone")
    te = _tag_weight(tag, "weight", positional[0]) if positional else 1.0
    te = _tag_weight(tag, "te weight", named["te"]) if "te" in named else te
    unet = _tag_weight(tag, "unet weight", positional[1]) if len(positional) > 1 else te
    unet = _tag_weight(tag, "unet weight", named["unet"]) if "unet" in named else unet
    return LoraTag(name, te, None if unet == te else unet)


def lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt as it is encoded, its <lora:...> tags in order). Each extra-network tag is cut out and nothing
    put in its place, as A1111 does; another kind of extra network (<hypernet:...>) is an error."""
    tags = []

    def take(m: re.Match) -> str:
        if m[1].lower() not in LORA_KINDS:
            raise UserError(f"{m[0]}: A1111's {m[1]} extra networks are not available (only <lora:NAME:WEIGHT>)")
        tags.append(_lora_tag(m[0], m[2]))
        return ""

    return EXTRA_NETWORK.sub(take, prompt), tags


def _number_text(value: float) -> str:
    return repr(float(value))  # the shortest text that reads back as the same float


def lora_tag(name: str, weight: float) -> str:
    """The tag of a LoRA applied at `weight`, as A1111 adds one to the prompt it records for a LoRA it applies by
    itself (its "Add network to prompt" setting)."""
    if not name or any(c in name for c in ":<>") or name != name.strip():
        raise UserError(f"the LoRA name {name!r} cannot be written as a <lora:NAME> tag (':', '<', '>' or spaces at "
                        "its ends); rename the file")
    return f"<lora:{name}:{_number_text(weight)}>"


def _hash_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")  # A1111 drops them from the names it lists


def format_lora_hashes(entries: list[tuple[str, str]]) -> str:
    """A1111's "Lora hashes" value for [(name, 12-hex-digit hash)]: "name: hash, name: hash", each name once."""
    return ", ".join(dict.fromkeys(f"{_hash_name(name)}: {digest}" for name, digest in entries))


def parse_lora_hashes(text: str | None) -> dict[str, str]:
    """{name: hash} of a "Lora hashes" value; entries that are not "name: hash" are skipped."""
    out = {}
    for entry in (text or "").split(","):
        name, sep, digest = entry.partition(":")
        if sep and name.strip() and digest.strip():
            out[name.strip()] = digest.strip().lower()
    return out


def lora_hash_for(hashes: dict[str, str], name: str) -> str | None:
    """The hash `hashes` (parse_lora_hashes) records for the LoRA a tag names."""
    return hashes.get(_hash_name(name))
