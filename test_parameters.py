"""parameters.py: the A1111 `parameters` text, written and read back, ours and A1111's own."""

import pytest

from cli import UserError
from parameters import (SAMPLER_NAMES, SCHEDULE_NAMES, Job, LoraTag, format_lora_hashes, format_parameters,
                        lora_hash_for, lora_tag, lora_tags, parse_lora_hashes, parse_parameters)

# The last line of PNGs the A1111 web UI writes (1.10: the schedule as its own field; before 1.9: in the name)
A1111_NEW = ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
             "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, RNG: CPU, Version: v1.10.1")
A1111_OLD = ("Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 99, Size: 768x512, Model hash: e1441589a6, "
             "Model: v1-5-pruned, Version: v1.6.0")


def test_round_trip_with_quoted_values():
    job = Job("a cat, sitting\non a mat", "dog: no", 42, 20, 6.5, 96, 64, eta=0.5, strength=0.3)
    info = {"Model hash": "0123456789", "Model": 'my "model", v2', "VAE hash": None, "VAE": None}
    text = format_parameters(job, info)
    assert text.endswith('Model: "my \\"model\\", v2", Denoising strength: 0.3, RNG: CPU, Eta: 0.5')
    parsed, fields = parse_parameters(text)
    assert parsed == job and fields["Model"] == 'my "model", v2' and "VAE" not in fields


@pytest.mark.parametrize("sampler", list(SAMPLER_NAMES))
def test_every_sampler_and_schedule_round_trips(sampler):
    for scheduler in (["normal"] if sampler == "ddim" else list(SCHEDULE_NAMES)):
        job = Job("p", "", 7, 25, 7.0, 512, 512, sampler, scheduler, clip_skip=2)
        text = format_parameters(job, {})
        assert f"Sampler: {SAMPLER_NAMES[sampler]}, " in text and "Clip skip: 2" in text
        assert ("Schedule type" in text) == (sampler != "ddim") and ("Eta" in text) == (sampler == "ddim")
        assert parse_parameters(text)[0] == job


def test_sdxl_settings_round_trip():
    job = Job("p", "", 1, 30, 5.0, 1024, 768, "euler", "normal", original_size=(2048, 1536), target_size=(1024, 768),
              crop=(16, 0), aesthetic_score=6.5, refiner_switch=0.8)
    text = format_parameters(job, {"Refiner": "sd_xl_refiner_1.0 [7440042bbd]"})
    assert "Original size: 2048x1536, Target size: 1024x768, Crop top-left: 16x0, Aesthetic score: 6.5" in text
    assert "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8" in text
    assert parse_parameters(text)[0] == job


def test_reads_a1111_pngs_new_and_old():
    job, fields = parse_parameters(f"a castle\nNegative prompt: blurry, lowres\n{A1111_NEW}")
    assert job == Job("a castle", "blurry, lowres", 1234, 20, 7.0, 512, 768, "dpmpp_2m", "karras", clip_skip=2)
    assert fields["Version"] == "v1.10.1"
    job, _ = parse_parameters(f"a castle\n{A1111_OLD}")
    assert (job.sampler, job.scheduler, job.cfg, job.width, job.height) == ("dpmpp_2m", "karras", 6.5, 768, 512)
    cases = {"Sampler: Euler a": ("euler_a", "normal"),  # old form without a schedule: evenly spaced
             "Sampler: DPM++ 2M": ("dpmpp_2m", "normal"),
             "Sampler: DPM++ 2M, Schedule type: Automatic": ("dpmpp_2m", "karras"),  # A1111's default for it
             "Sampler: DPM++ 2M SDE, Schedule type: Automatic": ("dpmpp_2m_sde", "exponential"),
             "Sampler: Euler, Schedule type: Automatic": ("euler", "normal"),
             "Sampler: LMS, Schedule type: Uniform": ("lms", "normal"),
             "Sampler: Heun, Schedule type: Exponential": ("heun", "exponential"),
             "Sampler: DDIM, Schedule type: Automatic": ("ddim", "normal"),
             "Sampler: DPM++ SDE Karras": ("dpmpp_sde", "karras")}
    for sampler, expect in cases.items():
        job, _ = parse_parameters(f"x\nSteps: 20, {sampler}, CFG scale: 7, Seed: 1, Size: 512x512")
        assert (job.sampler, job.scheduler) == expect, sampler


@pytest.mark.parametrize("extra, expect", [
    ("Sampler: UniPC", "sampler 'UniPC' is not available"),
    ("Sampler: Euler, Schedule type: SGM Uniform", "Schedule type 'SGM Uniform' is not available"),
    ("Sampler: DDIM, Schedule type: Karras", "Schedule type 'Karras' is not available for DDIM"),
    ("Sampler: Euler, Hires upscale: 2, Hires steps: 10", "Hires upscale: 2, Hires steps: 10, which this project"),
    ("Sampler: Euler, Emphasis: No norm", "Emphasis 'No norm' is not available"),
    ("Sampler: Euler a, Eta: 0.67", "Eta 0.67 with Euler a is not available"),
    ("Sampler: Euler, Seed: many", "unreadable generation parameters"),
])
def test_settings_this_project_lacks_are_one_line_errors(extra, expect):
    text = f"x\nSteps: 20, {extra}, CFG scale: 7, Seed: 1, Size: 512x512"
    if "Seed: many" in extra:
        text = "x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: many, Size: 512x512"
    with pytest.raises(UserError) as e:
        parse_parameters(text)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_lora_tags_are_read_and_cut_out_as_a1111_does():
    text, tags = lora_tags("a cat, <lora:style:0.8>, (red:1.2) <lyco:sub dir name> <lora:x:te=0.5:unet=0.5>"
                           "<lora:y:-1:-1>")
    assert text == "a cat, , (red:1.2)  "  # nothing is put where a tag was
    assert tags == [LoraTag("style", 0.8), LoraTag("sub dir name", 1.0), LoraTag("x", 0.5), LoraTag("y", -1.0)]
    # A1111's separate text-encoder and U-Net weights: TE, then UNET (default: TE), positional or by name
    assert lora_tags("<lora:x:1:0.5><lora:x:unet=0><lora:x:te=0.3><lora:x:0.2:te=0.4:unet=0.7>")[1] == [
        LoraTag("x", 1.0, 0.5), LoraTag("x", 1.0, 0.0), LoraTag("x", 0.3), LoraTag("x", 0.4, 0.7)]
    assert lora_tags("no tags (x:1.1)") == ("no tags (x:1.1)", [])
    for name, weight in (("style", 0.8), ("a b", 1.0), ("w", 0.1 + 0.2)):  # written so that it reads back the same
        assert lora_tags(lora_tag(name, weight))[1] == [LoraTag(name, weight)]
    assert lora_tag("style", 1) == "<lora:style:1.0>"


@pytest.mark.parametrize("prompt, expect", [
    ("<lora:x:1:1:8>", "a dyn rank cut (DYN) is not available"),
    ("<lora:x:much>", "the weight 'much' is not a finite number"),
    ("<lora:x:inf>", "the weight 'inf' is not a finite number"),
    ("<lora::1>", "not a LoRA tag as A1111 writes them"),
    ("<lora:x:mid=1>", "not a LoRA tag as A1111 writes them"),
    ("<hypernet:x:1>", "A1111's hypernet extra networks are not available"),
])
def test_lora_tags_this_project_cannot_follow_are_one_line_errors(prompt, expect):
    with pytest.raises(UserError) as e:
        lora_tags(f"a cat {prompt}")
    assert expect in str(e.value) and prompt in str(e.value)
    with pytest.raises(UserError, match="cannot be written as a <lora:NAME> tag"):
        lora_tag("a:b", 1.0)


def test_lora_hashes_in_a1111s_format():
    value = format_lora_hashes([("style", "0123456789ab"), ("a, b:c", "ba9876543210"), ("style", "0123456789ab")])
    assert value == "style: 0123456789ab, a bc: ba9876543210"  # ':' and ',' dropped from names, each once
    job = Job("a cat<lora:style:1.0>", "", 1, 20, 7.0, 512, 512)
    text = format_parameters(job, {"Model hash": "0123456789", "Lora hashes": value})
    assert 'Model hash: 0123456789, Lora hashes: "style: 0123456789ab, a bc: ba9876543210", RNG: CPU' in text
    parsed, fields = parse_parameters(text)
    assert parsed == job and parse_lora_hashes(fields["Lora hashes"]) == {"style": "0123456789ab",
                                                                          "a bc": "ba9876543210"}
    assert lora_hash_for(parse_lora_hashes(fields["Lora hashes"]), "a, b:c") == "ba9876543210"
    # an A1111 PNG's field (1.10)
    _, fields = parse_parameters('x <lora:add_detail:0.5>\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: '
                                 '512x512, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1')
    assert parse_lora_hashes(fields["Lora hashes"]) == {"add_detail": "7c6bad76eb54"} and parse_lora_hashes(None) == {}
