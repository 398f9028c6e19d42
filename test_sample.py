"""Tests for sample.py (the text-to-image CLI). CPU, a tiny random model written by the test."""

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import checkpoint
import ldm
import sample
import vae as vae_lib
from testutil import random_lora, randomize_

ROOT = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model = randomize_(ldm.build_model("tiny"))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    ldm.save_model(model, path)
    return path



@pytest.fixture(scope="module")
def tiny(ckpt):
    """The tiny model of `ckpt`; tests must not change it."""
    return ldm.load_model(ckpt, device="cpu")


def cli(*args, cwd, env=None):
    """Run sample.py in a fresh interpreter (one thread: the test machine may be busy)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def run_main(capsys, *args) -> tuple[int, str, str]:
    """Run sample.main in this process (faster than a subprocess for the many small cases)."""
    rc = sample.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def parameters(path) -> str:
    with Image.open(path) as im:
        return im.text["parameters"]


def error_line(err: str) -> str:
    """The one line an error prints: no traceback (progress bars end in '\\r' and are dropped)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(("error", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


FAST = ("--steps", 3)


# -----------------------------------------------------------------------------------------------------------------
# generation, metadata, replay


def test_generate_then_replay_matches(tmp_path, ckpt, ldm_home):
    r = cli("a red apple", "--negative", "blurry, dark", "--ckpt", ckpt, "--seed", 3, *FAST, cwd=tmp_path,
            env={"LDM_HOME": str(ldm_home)})
    assert r.returncode == 0, r.stderr
    path = tmp_path / r.stdout.strip()
    assert path == tmp_path / "outputs" / "00000.png" and Image.open(path).size == (64, 64)
    text = parameters(path)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert text == ("a red apple\nNegative prompt: blurry, dark\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 3, "
                    f"Size: 64x64, Model hash: {sha[:10]}, Model: tiny, RNG: CPU, Eta: 0.0")
    assert "seed 3" in r.stderr and "sampling" in r.stderr  # the seed and a progress bar
    assert json.loads((ldm_home / "sha256.json").read_text())[str(ckpt.resolve())]["sha256"] == sha  # hash cached

    r = cli("--replay", path, "--ckpt", ckpt, cwd=tmp_path, env={"LDM_HOME": str(ldm_home)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("match: identical pixels") and "warning" not in r.stderr


def test_replay_finds_the_model_by_its_hash(tmp_path, ckpt, capsys, ldm_home):
    """Without --ckpt, --replay looks for the PNG's Model hash in the download cache and beside the PNG, and never
    downloads the default weights for an image another model made."""
    rc, out, _ = run_main(capsys, "x", "--ckpt", ckpt, "--seed", 1, *FAST, "--out", tmp_path / "outputs")
    png = Path(out.strip())
    rc, out, err = run_main(capsys, "--replay", png)  # the model is nowhere it looks: one line, no download
    assert rc == 2 and f"Model hash {parameters(png).split('Model hash: ')[1][:10]}" in error_line(err)
    assert "pass it with --ckpt" in error_line(err) and not list(ldm_home.glob("*.safetensors"))
    for place in (ldm_home, png.parent):
        place.mkdir(parents=True, exist_ok=True)
        copy = place / "renamed.safetensors"
        copy.write_bytes(ckpt.read_bytes())
        rc, out, err = run_main(capsys, "--replay", png)
        assert rc == 0 and out.startswith("match: identical pixels") and str(copy) in err
        copy.unlink()


def test_replay_reports_a_changed_pixel(tmp_path, ckpt, capsys):
    rc, out, _ = run_main(capsys, "x", "--ckpt", ckpt, "--seed", 1, "--cfg", 1, *FAST, "--out", tmp_path)
    path = Path(out.strip())
    with Image.open(path) as im:
        arr, text = np.array(im), im.text["parameters"]
    arr[5, 7, 1] = (int(arr[5, 7, 1]) + 9) % 256
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.fromarray(arr).save(tmp_path / "edited.png", pnginfo=info)
    rc, out, _ = run_main(capsys, "--replay", tmp_path / "edited.png", "--ckpt", ckpt)
    assert rc == 1 and out.startswith("mismatch: max pixel difference") and "1 of 4096 pixels" in out


@pytest.mark.parametrize("sampler, scheduler", [("dpmpp_2m", "karras"), ("euler_a", "normal"),
                                                ("dpmpp_sde", "exponential")])
def test_k_samplers_write_a1111_parameters_and_replay(tmp_path, ckpt, capsys, sampler, scheduler):
    rc, out, _ = run_main(capsys, "a cat", "--ckpt", ckpt, "--sampler", sampler, "--scheduler", scheduler,
                          "--steps", 4, "--seed", 9, "--out", tmp_path)
    text = parameters(out.strip())
    names = {"dpmpp_2m": "DPM++ 2M, Schedule type: Karras", "euler_a": "Euler a, Schedule type: Normal",
             "dpmpp_sde": "DPM++ SDE, Schedule type: Exponential"}
    assert rc == 0 and f"Steps: 4, Sampler: {names[sampler]}, CFG scale: 7.5, Seed: 9, " in text
    assert "RNG: CPU" in text and "Eta" not in text
    rc, out, _ = run_main(capsys, "--replay", out.strip(), "--ckpt", ckpt)
    assert rc == 0 and out.startswith("match: identical pixels")


def test_params_from_takes_an_a1111_pngs_settings(tmp_path, ckpt, capsys):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red apple\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: "
                  "Automatic, CFG scale: 6, Seed: 77, Size: 48x32, Model hash: 6ce0161689, Model: v1-5, Clip skip: 1, "
                  "RNG: CPU, Version: v1.10.1")
    Image.new("RGB", (48, 32)).save(tmp_path / "a1111.png", pnginfo=info)
    rc, out, err = run_main(capsys, "--params-from", tmp_path / "a1111.png", "--ckpt", ckpt, "--out", tmp_path / "o")
    made = parameters(out.strip())
    assert rc == 0 and made.startswith("a red apple\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, "
                                       "Schedule type: Karras, CFG scale: 6.0, Seed: 77, Size: 48x32, ")
    assert Image.open(out.strip()).size == (48, 32) and "warning" not in err
    rc, out, _ = run_main(capsys, "a green apple", "--params-from", tmp_path / "a1111.png", "--steps", 2,
                          "--scheduler", "normal", "--ckpt", ckpt, "--out", tmp_path / "o")
    made = parameters(out.strip())  # flags given win over the PNG's settings
    assert rc == 0 and made.startswith("a green apple\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, "
                                       "Schedule type: Normal, CFG scale: 6.0, Seed: 77, Size: 48x32")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Hires upscale: 2")
    Image.new("RGB", (8, 8)).save(tmp_path / "hires.png", pnginfo=info)
    rc, _, err = run_main(capsys, "--params-from", tmp_path / "hires.png", "--ckpt", ckpt, "--out", tmp_path / "h")
    assert rc == 2 and "Hires upscale: 2, which this project does not have" in error_line(err)


def test_embeddings_are_used_recorded_and_needed_for_replay(tmp_path, ckpt, capsys):
    (tmp_path / "emb").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                "string_to_token": {"*": 265}, "name": "shiny", "step": 100}, tmp_path / "emb" / "shiny.pt")
    args = ("a shiny cat", "--ckpt", ckpt, *FAST, "--seed", 4)
    rc, out, err = run_main(capsys, *args, "--embeddings", tmp_path / "emb", "--out", tmp_path / "a")
    sha = hashlib.sha256((tmp_path / "emb" / "shiny.pt").read_bytes()).hexdigest()
    assert rc == 0 and f'TI hashes: "shiny: {sha[:12]}"' in parameters(out.strip()) and "1 embedding" in err
    rc, plain, _ = run_main(capsys, *args, "--out", tmp_path / "b")  # without it "shiny" is just a word
    assert "TI hashes" not in parameters(plain.strip())
    assert not np.array_equal(np.asarray(Image.open(out.strip())), np.asarray(Image.open(plain.strip())))
    rc, _, err = run_main(capsys, "--replay", out.strip(), "--ckpt", ckpt)
    assert rc == 2 and "uses the embedding 'shiny'" in error_line(err)
    rc, res, _ = run_main(capsys, "--replay", out.strip(), "--ckpt", ckpt, "--embeddings", tmp_path / "emb")
    assert rc == 0 and res.startswith("match")


@pytest.fixture(scope="module")
def sdxl_ckpts(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("xl")
    for name, seed in (("tiny-sdxl", 3), ("tiny-sdxl-refiner", 4)):
        ldm.save_model(randomize_(ldm.build_model(name), seed), folder / f"{name}.safetensors")
    return folder / "tiny-sdxl.safetensors", folder / "tiny-sdxl-refiner.safetensors"


def test_sdxl_refiner_and_size_conditioning_are_used_recorded_and_replayed(tmp_path, sdxl_ckpts, capsys):
    base, refiner = sdxl_ckpts
    flags = ["--sampler", "euler", "--steps", 4, "--seed", 5, "--original-size", 96, 64, "--crop", 8, 0]
    rc, out, _ = run_main(capsys, "a red apple", "--ckpt", base, "--refiner", refiner, "--refiner-switch", 0.7,
                          "--aesthetic-score", 6.5, *flags, "--out", tmp_path)
    assert rc == 0
    text = parameters(out.strip())
    digest = hashlib.sha256(refiner.read_bytes()).hexdigest()[:10]
    assert "Original size: 96x64, Target size: 64x64, Crop top-left: 8x0, Aesthetic score: 6.5" in text
    assert f"Refiner: tiny-sdxl-refiner [{digest}], Refiner switch at: 0.7" in text
    models = [ldm.load_model(p, device="cpu") for p in (base, refiner)]
    expected = ldm.sample(models[0], ["a red apple"], steps=4, sampler="euler", seed=5, refiner=models[1],
                          refiner_switch=0.7, sizes=ldm.Sizes(original_size=(64, 96), crop=(8, 0),
                                                              aesthetic_score=6.5), progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out.strip())), np.asarray(expected))
    rc, replayed, _ = run_main(capsys, "--replay", out.strip(), "--ckpt", base, "--refiner", refiner)
    assert rc == 0 and replayed.startswith("match: identical pixels")
    rc, _, err = run_main(capsys, "--replay", out.strip(), "--ckpt", base)
    assert rc == 2 and "pass it as --refiner" in error_line(err)
    # without a refiner the base runs the whole schedule, on the size conditioning given
    rc, out, _ = run_main(capsys, "a red apple", "--ckpt", base, *flags, "--out", tmp_path)
    assert rc == 0 and "Refiner" not in parameters(out.strip()) and "Crop top-left: 8x0" in parameters(out.strip())


def test_sdxl_flags_on_the_wrong_models_are_one_line_errors(tmp_path, ckpt, sdxl_ckpts, capsys):
    base, refiner = sdxl_ckpts
    for model, other, expect in ((ckpt, refiner, "--refiner goes with an SDXL base"),
                                 (base, base, "not an SDXL refiner")):
        rc, _, err = run_main(capsys, "x", "--ckpt", model, "--refiner", other, *FAST, "--out", tmp_path)
        assert rc == 2 and expect in error_line(err)


def test_n_images_use_consecutive_seeds_and_write_a_grid(tmp_path, ckpt, capsys):
    rc, out, _ = run_main(capsys, "a", "--ckpt", ckpt, "--seed", 10, "--n", 2, "--batch-size", 2, *FAST,
                          "--out", tmp_path)
    paths = [Path(p) for p in out.split()]
    assert rc == 0 and [p.name for p in paths] == ["00000.png", "00001.png", "grid-00000.png"]
    assert ["Seed: 10," in parameters(paths[0]), "Seed: 11," in parameters(paths[1])] == [True, True]
    assert Image.open(paths[2]).size == (128, 64)
    # the second image of a batch is (to the pixel rounding of batched maths) the image its seed gives alone
    rc, out, _ = run_main(capsys, "a", "--ckpt", ckpt, "--seed", 11, *FAST, "--out", tmp_path / "alone.png")
    alone = np.asarray(Image.open(out.strip()), dtype=int)
    assert np.abs(alone - np.asarray(Image.open(paths[1]), dtype=int)).max() <= 1


def test_prompts_file_runs_each_prompt(tmp_path, ckpt, capsys):
    (tmp_path / "prompts.txt").write_text("a red apple\n\na blue car\n", encoding="utf-8")
    rc, out, _ = run_main(capsys, "--prompts-file", tmp_path / "prompts.txt", "--ckpt", ckpt, "--seed", 0,
                          "--steps", 2, "--out", tmp_path / "o")
    paths = out.split()
    assert rc == 0 and len(paths) == 3 and paths[2].endswith("grid-00000.png")
    assert [parameters(p).split("\n")[0] for p in paths[:2]] == ["a red apple", "a blue car"]


def test_existing_files_are_never_overwritten(tmp_path, ckpt, capsys):
    (tmp_path / "00000.png").write_bytes(b"keep")
    (tmp_path / "00007.png").write_bytes(b"keep")
    (tmp_path / "mine.png").write_bytes(b"keep")
    rc, out, _ = run_main(capsys, "a", "--ckpt", ckpt, "--seed", 0, "--steps", 1, "--out", tmp_path)
    assert rc == 0 and Path(out.strip()) == tmp_path / "00008.png"
    rc, out, _ = run_main(capsys, "a", "--ckpt", ckpt, "--seed", 0, "--steps", 1, "--out", tmp_path / "mine.png")
    assert rc == 0 and Path(out.strip()) == tmp_path / "mine-1.png"
    assert all((tmp_path / n).read_bytes() == b"keep" for n in ("00000.png", "00007.png", "mine.png"))


def test_img2img_records_strength_and_replays(tmp_path, ckpt, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    rc, out, _ = run_main(capsys, "a", "--ckpt", ckpt, "--init-image", tmp_path / "init.png", "--strength", 0.5,
                          "--seed", 2, "--steps", 4, "--out", tmp_path)
    path = Path(out.strip())
    assert rc == 0 and Image.open(path).size == (64, 64)  # resized to the model's size
    assert parameters(path).endswith("Denoising strength: 0.5, RNG: CPU, Eta: 0.0")
    rc, out, _ = run_main(capsys, "--replay", path, "--ckpt", ckpt, "--init-image", tmp_path / "init.png")
    assert rc == 0 and out.startswith("match")
    rc, _, err = run_main(capsys, "--replay", path, "--ckpt", ckpt)
    assert rc == 2 and "pass the same --init-image" in error_line(err)


def test_vae_swap_changes_the_image_and_is_recorded(tmp_path, ckpt, capsys):
    vae = randomize_(ldm.build_model("tiny").vae, seed=1)
    checkpoint.save_safetensors(tmp_path / "other-vae.safetensors", vae.state_dict())
    common = ("a", "--ckpt", ckpt, "--seed", 0, "--steps", 2, "--out", tmp_path)
    rc, out, _ = run_main(capsys, *common)
    rc2, out2, _ = run_main(capsys, *common, "--vae", tmp_path / "other-vae.safetensors")
    assert rc == rc2 == 0 and "VAE: other-vae" in parameters(out2.strip())
    assert not np.array_equal(np.asarray(Image.open(out.strip())), np.asarray(Image.open(out2.strip())))
    rc, out, err = run_main(capsys, "--replay", out2.strip(), "--ckpt", ckpt)  # forgot --vae: warned, mismatch
    assert rc == 1 and "VAE hash" in err


# -----------------------------------------------------------------------------------------------------------------
# LoRA: --lora FILE[:WEIGHT], <lora:NAME:WEIGHT> tags, Lora hashes, replay


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny) -> Path:
    """style and detail: random LoRAs of the tiny model (U-Net and text encoder); elsewhere: one whose module names
    are not the tiny model's."""
    folder = tmp_path_factory.mktemp("loras")
    checkpoint.save_safetensors(folder / "style.safetensors", random_lora(tiny, 1), {"ss_output_name": "style"})
    (folder / "sub").mkdir()
    checkpoint.save_safetensors(folder / "sub" / "detail.safetensors", random_lora(tiny, 2))
    checkpoint.save_safetensors(folder / "elsewhere.safetensors", {
        k.replace("lora_unet_", "lora_unet_input_blocks_9_"): v for k, v in random_lora(tiny, 3).items()})
    return folder


def addnet_hash(path: Path) -> str:
    """A1111's Lora hash of a .safetensors file: sha256 of what follows the 8-byte header length and the header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_lora_flag_and_tag_merge_then_sample_record_hashes_and_replay(tmp_path, ckpt, tiny, lora_dir, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --lora-dir, models/Lora, is not
    style = lora_dir / "style.safetensors"
    args = ("--ckpt", ckpt, "--seed", 3, *FAST)
    rc, out, _ = run_main(capsys, "a red apple", "--lora", f"{style}:0.5", *args, "--out", tmp_path / "flag")
    assert rc == 0
    text = parameters(out.strip())
    assert text.startswith("a red apple<lora:style:0.5>\n")  # recorded as the tag A1111 adds for a LoRA it applies
    assert f'Lora hashes: "style: {addnet_hash(style)}"' in text
    model = ldm.load_model(ckpt)
    model.apply_lora(style, 0.5)
    expected = ldm.sample(model, ["a red apple"], seed=3, steps=3, progress=False)[0]
    assert np.array_equal(pixels(out.strip()), np.asarray(expected))
    assert not np.array_equal(np.asarray(expected), np.asarray(ldm.sample(tiny, ["a red apple"], seed=3, steps=3,
                                                                          progress=False)[0]))  # it changes things
    rc, tagged, _ = run_main(capsys, "a red apple<lora:style:0.5>", "--lora-dir", lora_dir, *args, "--out",
                             tmp_path / "tag")  # the same image and record, from the prompt's tag
    assert rc == 0 and parameters(tagged.strip()) == text and np.array_equal(pixels(tagged.strip()), expected)

    rc, res, _ = run_main(capsys, "--replay", out.strip(), "--ckpt", ckpt, "--lora-dir", lora_dir)
    assert rc == 0 and res.startswith("match: identical pixels")
    rc, _, err = run_main(capsys, "--replay", out.strip(), "--ckpt", ckpt)  # nowhere it looks: one line
    line = error_line(err)
    assert rc == 2 and "<lora:style>: no style.safetensors, .pt or .ckpt in models/Lora (--lora-dir, no such " in line
    assert f"beside the image), and no file there has the image's Lora hash {addnet_hash(style)}" in line
    (tmp_path / "flag" / "renamed.safetensors").write_bytes(style.read_bytes())  # beside the PNG, by its hash
    rc, res, err = run_main(capsys, "--replay", out.strip(), "--ckpt", ckpt)
    assert rc == 0 and res.startswith("match") and "renamed.safetensors: the file with the image's Lora hash" in err


def test_loras_of_tags_and_flags_sum_and_each_prompt_gets_its_own(tmp_path, ckpt, lora_dir, capsys):
    style, detail = lora_dir / "style.safetensors", lora_dir / "sub" / "detail.safetensors"
    (tmp_path / "prompts.txt").write_text("a cat <lora:detail:0.7>\na cat\n", encoding="utf-8")
    rc, out, _ = run_main(capsys, "--prompts-file", tmp_path / "prompts.txt", "--lora", style, "--lora-dir",
                          lora_dir, "--ckpt", ckpt, "--seed", 5, "--steps", 2, "--batch-size", 2, "--out", tmp_path)
    first, second, _grid = out.split()
    assert rc == 0 and parameters(first).startswith("a cat <lora:detail:0.7><lora:style:1.0>\n")
    assert f'Lora hashes: "detail: {addnet_hash(detail)}, style: {addnet_hash(style)}"' in parameters(first)
    assert parameters(second).startswith("a cat<lora:style:1.0>\n")
    model = ldm.load_model(ckpt)
    model.apply_lora(detail, 0.7)
    model.apply_lora(style, 1.0)
    both = ldm.sample(model, ["a cat "], seed=5, steps=2, progress=False)[0]
    model.remove_loras()
    model.apply_lora(style, 1.0)
    one = ldm.sample(model, ["a cat"], seed=5, steps=2, progress=False)[0]
    assert np.array_equal(pixels(first), both) and np.array_equal(pixels(second), one)
    rc, res, _ = run_main(capsys, "--replay", first, "--ckpt", ckpt, "--lora-dir", lora_dir)
    assert rc == 0 and res.startswith("match")


def test_a_tag_with_its_own_unet_weight_merges_each_part_at_its_weight(tmp_path, ckpt, lora_dir, capsys):
    """<lora:NAME:TE:UNET>, as A1111 reads it: the text encoder at TE, the U-Net at UNET; the PNG keeps the tag, and
    --replay redraws it."""
    rc, out, _ = run_main(capsys, "a cat <lora:style:0.5:1.5>", "--lora-dir", lora_dir, "--ckpt", ckpt, "--seed", 3,
                          "--steps", 2, "--out", tmp_path)
    assert rc == 0 and parameters(out.strip()).startswith("a cat <lora:style:0.5:1.5>\n")
    model = ldm.load_model(ckpt)
    model.apply_lora(lora_dir / "style.safetensors", 0.5, unet_multiplier=1.5)
    split = ldm.sample(model, ["a cat "], seed=3, steps=2, progress=False)[0]
    model.remove_loras()
    model.apply_lora(lora_dir / "style.safetensors", 0.5)
    same = ldm.sample(model, ["a cat "], seed=3, steps=2, progress=False)[0]
    assert np.array_equal(pixels(out.strip()), split) and not np.array_equal(split, same)
    rc, res, _ = run_main(capsys, "--replay", out.strip(), "--ckpt", ckpt, "--lora-dir", lora_dir)
    assert rc == 0 and res.startswith("match")


@pytest.mark.parametrize("prompt, flags, expect", [
    ("a <lora:nope:1>", [], "<lora:nope>: no nope.safetensors, .pt or .ckpt in LORAS (--lora-dir); pass --lora-dir"),
    ("a", ["--lora", "LORAS/elsewhere.safetensors"], "LoRA modules match nothing in this"),
    ("a <hypernet:x:1>", [], "A1111's hypernet extra networks are not available"),
    ("a", ["--negative", "<lora:style>"], "LoRA tags go in the prompt"),
    ("a", ["--lora", "LORAS/missing.safetensors:0.5"], "--lora LORAS/missing.safetensors: no such file"),
])
def test_lora_mistakes_are_one_line_errors(tmp_path, ckpt, lora_dir, capsys, prompt, flags, expect):
    flags = [str(f).replace("LORAS", str(lora_dir)) for f in flags]
    rc, out, err = run_main(capsys, prompt, *flags, "--lora-dir", lora_dir, "--ckpt", ckpt, *FAST, "--out",
                            tmp_path / "out")
    assert rc == 2 and out == "" and expect.replace("LORAS", str(lora_dir)) in error_line(err)
    assert not (tmp_path / "out").exists()


def test_lora_flag_weight_is_a_last_number():
    assert sample.lora_flag("a/b.safetensors:0.5") == (Path("a/b.safetensors"), 0.5)
    assert sample.lora_flag("a/b.safetensors:-1") == (Path("a/b.safetensors"), -1.0)
    assert sample.lora_flag("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert sample.lora_flag("dir:x/b.safetensors") == (Path("dir:x/b.safetensors"), 1.0)  # ':' in a path
    assert sample.lora_flag("dir:2/b:1e-1") == (Path("dir:2/b"), 0.1)


# -----------------------------------------------------------------------------------------------------------------
# errors: one line on stderr, exit code 2


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_main(capsys, "a", "--ckpt", tmp_path / "nope.safetensors")
    assert rc == 2 and "no such file" in error_line(err)
    assert not (tmp_path / "outputs").exists()


def test_failed_download_says_to_pass_ckpt(tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LDM_MODEL_URL", f"http://127.0.0.1:{port}/m.safetensors")
    rc, _, err = run_main(capsys, "a", "--out", tmp_path / "out")
    line = error_line(err)
    assert rc == 2 and "download of http://127.0.0.1" in line and "refused" in line.lower()
    assert "pass --ckpt PATH" in line


@pytest.mark.parametrize("case", ["corrupt_ckpt", "unknown_layout", "size", "init_image", "prompts_file",
                                  "no_prompt", "strength", "bad_vae", "tile"])
def test_bad_inputs_are_one_line_errors(tmp_path, ckpt, capsys, case):
    args = ["a", "--ckpt", ckpt, "--steps", 1, "--out", tmp_path / "out"]
    expect = {"corrupt_ckpt": "corrupt safetensors header", "unknown_layout": "unknown checkpoint layout",
              "size": "size 64x30: width and height must be positive multiples of 4",
              "init_image": "cannot read --init-image", "prompts_file": "cannot read --prompts-file",
              "no_prompt": "no prompt", "strength": "--strength must be in (0, 1]",
              "bad_vae": "do not fit this model", "tile": "--tile must be at least 8"}[case]
    if case == "corrupt_ckpt":
        (tmp_path / "bad.safetensors").write_bytes(ckpt.read_bytes()[:5000])
        args[2] = tmp_path / "bad.safetensors"
    elif case == "unknown_layout":
        checkpoint.save_safetensors(tmp_path / "lora.safetensors", {"lora_unet_x.alpha": torch.ones(1)})
        args[2] = tmp_path / "lora.safetensors"
    elif case == "size":
        args += ["--height", 30]
    elif case == "init_image":
        (tmp_path / "init.png").write_bytes(b"not an image")
        args += ["--init-image", tmp_path / "init.png"]
    elif case == "prompts_file":
        (tmp_path / "p.txt").write_bytes(b"\xff\xfe bad utf-8")
        args += ["--prompts-file", tmp_path / "p.txt"]
    elif case == "no_prompt":
        args = args[1:]
    elif case == "strength":
        (tmp_path / "init.png").write_bytes(b"unused")
        args += ["--init-image", tmp_path / "init.png", "--strength", 0]
    elif case == "tile":
        args += ["--tile", 4]
    elif case == "bad_vae":  # a VQ autoencoder: loads, but its keys are not the tiny KL model's
        vq = vae_lib.build_autoencoder(vae_lib.PRESETS["tiny-vq"])
        checkpoint.save_safetensors(tmp_path / "vae.safetensors", vq.state_dict())
        args += ["--vae", tmp_path / "vae.safetensors"]
    rc, out, err = run_main(capsys, *args)
    assert rc == 2 and out == ""
    assert expect in error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expect", [
    (["--seed", 2 ** 70], "--seed must be in 0..18446744073709551615"),
    (["--seed=-5"], "or -1 for a random one"),
    (["--seed", 2 ** 64 - 1, "--n", 2], "image i uses seed + i"),
    (["--steps", 1000], "--steps must be at most 999"),
    (["--cfg", "nan"], "must be finite numbers"),
    (["--cfg", "-1e30"], "a value that starts with '-' is written --flag=VALUE"),
])
def test_out_of_range_settings_are_one_line_errors(tmp_path, ckpt, capsys, flags, expect):
    with pytest.raises(SystemExit) if flags[-1] == "-1e30" else contextlib.nullcontext() as raised:
        rc, out, err = run_main(capsys, "a", "--ckpt", ckpt, *flags, "--out", tmp_path / "out")
    if raised:  # argparse's own errors: one line too (cli.Parser)
        rc, err = raised.value.code, capsys.readouterr().err
    assert rc == 2 and expect in error_line(err) and not (tmp_path / "out").exists()


def test_extreme_but_valid_settings_run(tmp_path, ckpt, capsys):
    """The largest seed, the most steps the schedule has (every timestep but 0), a huge guidance scale (NaN latents:
    one line)."""
    assert ldm.ddim_timesteps(999) == list(range(1, 1000))
    rc, out, _ = run_main(capsys, "a", "--ckpt", ckpt, "--seed", 2 ** 64 - 1, "--steps", 2, "--height", 8,
                          "--width", 8, "--out", tmp_path)
    assert rc == 0 and "Seed: 18446744073709551615, " in parameters(out.strip())
    rc, _, err = run_main(capsys, "a", "--ckpt", ckpt, "--cfg=-1e30", "--steps", 2, "--out", tmp_path / "x")
    assert rc == 2 and "NaN/inf latents" in error_line(err)


# -----------------------------------------------------------------------------------------------------------------
# sampling internals: same pixels as ldm.sample, the float16 VAE retry


def test_batches_with_eta_give_each_image_its_own_seed(tmp_path, ckpt, capsys):
    """eta > 0 draws fresh noise every step from each image's own generator, so --batch-size 2 gives the images of
    --batch-size 1 (up to the last bit of batched float maths: a pixel level at most, where a shared generator would
    give other pictures), and each replays alone."""
    args = ("a cat", "--ckpt", ckpt, "--seed", 5, "--steps", 3, "--eta", 0.5, "--n", 2, "--height", 48)
    rc, out1, _ = run_main(capsys, *args, "--out", tmp_path / "one")
    rc2, out2, _ = run_main(capsys, *args, "--batch-size", 2, "--out", tmp_path / "two")
    one, two = out1.split()[:2], out2.split()[:2]
    assert rc == rc2 == 0 and len(one) == len(two) == 2
    pixels = [[np.asarray(Image.open(p), dtype=np.int16) for p in paths] for paths in (one, two)]
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(*pixels))
    assert np.abs(pixels[0][0] - pixels[0][1]).mean() > 10  # two seeds, two pictures
    rc, out, _ = run_main(capsys, "--replay", one[1], "--ckpt", ckpt)
    assert rc == 0 and out.startswith("match")


def test_tile_decodes_large_images_in_tiles(tiny, tmp_path, ckpt, capsys):
    kw = dict(seed=2, steps=2, height=128, width=128, progress=False)  # 32x32 latents: tiles of 8 + 2 overlap
    whole = np.asarray(ldm.sample(tiny, ["a cat"], **kw)[0], dtype=np.int16)
    tiled = np.asarray(ldm.sample(tiny, ["a cat"], tile=8, **kw)[0], dtype=np.int16)
    assert tiled.shape == whole.shape and not np.array_equal(tiled, whole)  # the tiled decoder really ran
    # per-tile GroupNorm statistics move pixels, not the picture. Measured with these random weights over seeds 2-4:
    # correlation 0.983-0.986, mean |difference| 16-17% of the image's own mean |pixel - mean|
    assert np.corrcoef(tiled.ravel(), whole.ravel())[0, 1] > 0.97
    assert np.abs(tiled - whole).mean() < 0.2 * np.abs(whole - whole.mean((0, 1))).mean()
    rc, out, _ = run_main(capsys, "a cat", "--ckpt", ckpt, "--seed", 2, "--steps", 2, "--width", 128, "--height",
                          128, "--tile", 8, "--out", tmp_path)
    assert rc == 0 and np.array_equal(np.asarray(Image.open(out.strip()).convert("RGB"), dtype=np.int16), tiled)


def test_half_precision_vae_overflow_is_decoded_again_in_float32(tiny, monkeypatch, capsys):
    vae = tiny.vae
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z: decode(z) * (float("nan") if z.dtype == torch.float16 else 1))
    vae.half()
    try:
        z = torch.randn(1, tiny.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
        images = ldm.decode(tiny, z)
        assert torch.isfinite(images).all() and next(vae.parameters()).dtype == torch.float32
        assert "decoding again with the VAE in float32" in capsys.readouterr().err
        monkeypatch.setattr(vae, "decode", lambda z: decode(z) * float("nan"))
        with pytest.raises(ldm.NonFiniteError, match="NaN/inf pixels even in float32"):
            ldm.decode(tiny, z)
        with pytest.raises(ldm.NonFiniteError, match="NaN/inf latents"):
            ldm.decode(tiny, torch.full_like(z, float("inf")))
    finally:
        vae.float()


def test_ctrl_c_keeps_written_images_and_exits_130(tmp_path, ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LDM_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "a", "--ckpt", str(ckpt), "--n", "50",
                             "--steps", "2", "--seed", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # the first image is written: interrupt the run
    proc.send_signal(__import__("signal").SIGINT)
    out, err = proc.communicate(timeout=60)
    written = sorted((tmp_path / "outputs").glob("0*.png"))
    assert proc.returncode == 130 and first.strip() == "outputs/00000.png"
    assert "interrupted: kept the" in err and 1 <= len(written) < 50
    assert all(Image.open(p).text["parameters"] for p in written)


def test_any_multiple_of_the_vae_factor_is_a_size(tmp_path, ckpt, capsys, monkeypatch):
    """Latents that do not halve evenly down the U-Net (36 px -> 9 -> 5) upsample to the skip connections' sizes
    (exact against diffusers: test_unet.py); sizes that cannot work are one line, before any sampling."""
    rc, out, _ = run_main(capsys, "a", "--ckpt", ckpt, "--steps", 1, "--height", 36, "--width", 44, "--out", tmp_path)
    assert rc == 0 and Image.open(out.strip()).size == (44, 36)
    for flags, expect in ((("--height", 0), "size 64x0"), (("--width", -8), "size -8x64"),
                          (("--width", 30), "multiples of 4")):
        rc, _, err = run_main(capsys, "a", "--ckpt", ckpt, "--steps", 1, *flags, "--out", tmp_path)
        assert rc == 2 and expect in error_line(err)
    monkeypatch.setattr(sample, "available_memory", lambda device: 2 ** 30)  # a 1 GiB machine
    rc, _, err = run_main(capsys, "a", "--ckpt", ckpt, "--width", 8192, "--height", 1024, "--out", tmp_path)
    line = error_line(err)
    assert rc == 2 and "needs about" in line and "--tile 64" in line
    before = set(tmp_path.iterdir())
    rc, _, err = run_main(capsys, "a", "--ckpt", ckpt, "--steps", 1, "--width", 1024, "--height", 64, "--tile", 16,
                          "--out", tmp_path)  # what fits when tiled
    assert rc == 0 and len(set(tmp_path.iterdir()) - before) == 1


def test_failed_writes_are_one_line_and_leave_no_partial_png(tmp_path, ckpt, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    rc, _, err = run_main(capsys, "a", "--ckpt", ckpt, *FAST, "--out", tmp_path / "file" / "sub")
    assert rc == 2 and "cannot create the folder" in error_line(err)
    real_save = Image.Image.save

    def disk_full(self, fp, *args, **kwargs):
        if hasattr(fp, "write"):
            fp.write(b"\x89PNG half an image")
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full)
    rc, out, err = run_main(capsys, "a", "--ckpt", ckpt, *FAST, "--out", tmp_path / "outputs")
    assert rc == 1 and "No space left on device" in error_line(err) and out == ""
    assert list((tmp_path / "outputs").iterdir()) == []


def test_out_of_memory_is_one_line_advice(tmp_path, ckpt, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
    monkeypatch.setattr(sample, "generate", oom)
    rc, out, err = run_main(capsys, "a", "--ckpt", ckpt, "--out", tmp_path)
    line = error_line(err)
    assert rc == 2 and "Tried to allocate 2.00 GiB" in line and "--batch-size 1" in line and "--dtype fp16" in line
