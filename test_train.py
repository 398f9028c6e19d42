"""train.py tests: CPU, the tiny preset at 32x32 on small synthetic image folders."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image, ImageOps

import bench
import checkpoint
import cli
import data
import ldm
import losses as losses_lib
import runs
import sample
import train
import train_vae
import vae as vae_lib
from testutil import SDXL_NARROW, randomize_

HERE = Path(__file__).parent
FAST = ["--resolution", "32", "--batch-size", "4", "--num-workers", "0", "--no-progress", "--sample-every", "0",
        "--sample-steps", "2", "--val-fraction", "0", "--save-every", "1000"]



def make_images(folder: Path, n: int, captions: str | None = "txt", size: int = 40) -> list[str]:
    """n synthetic images (a coloured square on a plain background, various sizes and modes) with captions in
    .txt files, a metadata.jsonl, or none."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names, records = [], []
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    for i in range(n):
        arr = np.full((size, size + 8 * (i % 3), 3), rng.integers(0, 255, 3), dtype=np.uint8)
        lo = int(rng.integers(0, size // 2))
        arr[lo:lo + size // 3, lo:lo + size // 3] = rng.integers(0, 255, 3)
        im = Image.fromarray(arr)
        name = f"sub{i % 2}/img{i:02d}.png" if i % 4 else f"img{i:02d}.jpg"
        (folder / name).parent.mkdir(exist_ok=True)
        im.save(folder / name)
        caption = f"a {colours[i % len(colours)]} square number {i}"
        if captions == "txt":
            (folder / name).with_suffix(".txt").write_text(caption + "\n")
        records.append({"file_name": name, "text": caption})
        names.append(name)
    if captions == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return names


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out) if "loss" in r]


# --- data ----------------------------------------------------------------------------------------------------------


def test_captions_from_txt_and_metadata_jsonl(tmp_path):
    for kind in ("txt", "jsonl"):
        names = make_images(tmp_path / kind, 5, captions=kind)
        items, has_captions = data.find_images(tmp_path / kind)
        assert has_captions
        got = {p.relative_to(tmp_path / kind).as_posix(): c for p, c in items}
        assert got == {n: f"a {c} square number {i}" for i, (n, c) in
                       enumerate(zip(names, ["red", "green", "blue", "yellow", "purple"]))}


def test_image_modes_exif_and_crop(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert data.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255] * 256)
    assert data.to_rgb(pal).getpixel((0, 0)) == (0, 0, 255)
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert data.to_rgb(grey16).getpixel((0, 0)) == (255, 255, 255)
    assert data.to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    # EXIF orientation 6 (rotate 90 degrees clockwise): a 40x20 landscape file is shown as 20x40 portrait
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # left half white: after rotation the top half is white
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    x = data.load_image(tmp_path / "rot.jpg", 16)  # upright 20x40 -> 16x32 -> centre crop 16x16
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1
    assert x[:, :3].mean() > 0.9 and x[:, -3:].mean() < -0.9  # white on top, black below: the EXIF turn applied
    assert ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg")).size == (20, 40)


def test_empty_folder_and_no_images_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a caption")
    for folder in ("empty", "texts"):
        with pytest.raises(SystemExit, match="no images found"):
            train.main(["--data", str(tmp_path / folder), "--out", str(tmp_path / "out")] + FAST)
    with pytest.raises(SystemExit, match="no such folder"):
        train.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")] + FAST)
    assert not (tmp_path / "out").exists()


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    make_images(tmp_path / "d", 4)
    (tmp_path / "d" / "bad1.png").write_bytes(b"not an image at all")
    good = (tmp_path / "d" / "img00.jpg").read_bytes()
    (tmp_path / "d" / "bad2.jpg").write_bytes(good[:20])  # cut inside the header
    (tmp_path / "d" / "bad3.jpg").write_bytes(good[:len(good) // 2])  # cut inside the pixel data: opens fine
    train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--steps", "2"] + FAST)
    err = capsys.readouterr()
    assert "skipped 3 unreadable images: bad1.png, bad2.jpg, bad3.jpg" in err.out + err.err
    assert len(losses(tmp_path / "out")) == 2


def test_bad_captions_huge_and_all_bad_images_are_one_line(tmp_path, capsys, monkeypatch):
    make_images(tmp_path / "d", 4)
    argv = ["--steps", "1"] + FAST
    (tmp_path / "d" / "img00.txt").write_bytes(b"caf\xe9 latin-1")  # not UTF-8
    with pytest.raises(SystemExit, match=r"img00.txt: not UTF-8 text .* re-save it as UTF-8"):
        train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "a")] + argv)
    (tmp_path / "d" / "img00.txt").write_text("a caption")
    monkeypatch.setattr(data, "MAX_PIXELS", 40 * 40)  # the 40x48 and 40x56 pictures are now too large
    train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "b")] + argv)
    assert "skipped 2 images over 1,600 pixels: img02.png, img01.png" in capsys.readouterr().out
    for i, name in enumerate(make_images(tmp_path / "d", 4)):
        (tmp_path / "d" / name).write_bytes(b"garbage")
    with pytest.raises(SystemExit, match=r"none of the 4 images can be used \(unreadable: .*img00.jpg"):
        train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "c")] + argv)


def test_a_long_strip_is_cropped_to_4_to_1_before_resizing(tmp_path):
    """A 2x400 strip would be resized to 16x3200 pixels (a 1x200,000 one to gigabytes): its centre 2x8 is kept."""
    arr = np.zeros((400, 2, 3), dtype=np.uint8)
    arr[196:204] = 255  # the centre 8 rows white, the rest black
    Image.fromarray(arr).save(tmp_path / "strip.png")
    x = data.load_image(tmp_path / "strip.png", 16)
    assert x.shape == (3, 16, 16) and x.min() > 0.9  # all of it from the white centre


def test_image_unreadable_at_run_time_is_replaced_by_the_next(tmp_path, capsys):
    make_images(tmp_path / "d", 3)
    items, _ = data.find_images(tmp_path / "d")
    items[1][0].unlink()  # vanished after the check
    ds = data.ImageDataset(items, 16, seed=0)
    assert [ds[(i, 0)][0] for i in range(3)] == [0, 2, 2]
    assert "skipping unreadable image" in capsys.readouterr().err


def test_no_captions_trains_unconditionally(tmp_path, capsys):
    make_images(tmp_path / "d", 4, captions=None)
    args, explicit = cli.parse_run_args(train.make_parser, ["--data", str(tmp_path / "d"), "--out",
                                                             str(tmp_path / "out"), "--steps", "1"] + FAST)
    t = train.setup(args, explicit)
    out = capsys.readouterr()
    assert (out.out + out.err).count("training unconditionally") == 1
    assert all(c == "" for _, c in t.run.items) and t.prompts == [""]
    train.train(t)
    assert len(losses(tmp_path / "out")) == 1


def test_step_sampler_shards_one_global_order():
    one = data.StepSampler(10, 4, 1, 0, 1, seed=3, start=1, total=5)
    two = [data.StepSampler(10, 2, 2, r, 1, seed=3, start=1, total=5) for r in range(2)]
    for b1, b20, b21 in zip(one, *two):
        assert b1 == b20 + b21
    assert one.steps_per_epoch == 2
    first_epoch = [i for b in list(one)[:2] for i, _ in b]
    assert len(set(first_epoch)) == 8  # no repeats inside an epoch


# --- training ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_vae(tmp_path_factory) -> str:
    """A random tiny KL autoencoder whose posterior is (almost) deterministic, saved as a standalone VAE file: the
    randomly initialised one has posterior std ~1, which buries the images in noise no model can learn."""
    torch.manual_seed(0)
    model = vae_lib.build_autoencoder(vae_lib.PRESETS["tiny-kl"])
    with torch.no_grad():
        model.quant_conv.bias[model.cfg.embed_dim:] = -12.0  # logvar channels: std = exp(-6)
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    checkpoint.save_safetensors(path, model.state_dict(), {"scale_factor": "2.0"})
    return str(path)


def test_overfit_one_batch(tmp_path, sharp_vae):
    make_images(tmp_path / "d", 4)
    out = tmp_path / "out"
    train.main(["--data", str(tmp_path / "d"), "--out", str(out), "--steps", "25", "--cache-latents", "--lr", "3e-3",
                "--vae", sharp_vae, "--uncond-prob", "0", "--ema-decay", "0", "--warmup-steps", "5"]
               + FAST + ["--batch-size", "16"])  # 4 images tiled to 16 per step: less timestep noise in the loss
    loss = losses(out)
    assert len(loss) == 25
    first, last = np.mean(loss[:3]), np.mean(loss[-5:])
    assert first > 0.9 and last < 0.4 * first, (first, last)


def test_a_u_net_on_an_untrained_autoencoder_is_warned_about(tmp_path, capsys, sharp_vae):
    make_images(tmp_path / "d", 4)
    argv = ["--data", str(tmp_path / "d"), "--steps", "1"] + FAST
    train.setup(*cli.parse_run_args(train.make_parser, argv + ["--out", str(tmp_path / "a")]))
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if "untrained autoencoder" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "train_vae.py" in lines[0]
    train.setup(*cli.parse_run_args(train.make_parser, argv + ["--out", str(tmp_path / "b"), "--vae", sharp_vae]))
    out = capsys.readouterr()
    assert "untrained autoencoder" not in out.out + out.err


def test_lr_schedule():
    assert [runs.lr_at(s, 1.0, 4, 10, "constant") for s in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert runs.lr_at(4, 1.0, 4, 10, "cosine") == 1.0 and runs.lr_at(10, 1.0, 4, 10, "cosine") == 0.0
    assert runs.lr_at(7, 1.0, 4, 10, "cosine") == pytest.approx(0.5)


@pytest.mark.parametrize("how", ["more_steps", "crash"])
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, monkeypatch, how):
    """`--steps 3` then `--steps 6 --resume` (constant LR), or a 6-step cosine run that crashes in step 5 and
    resumes from its step-3 checkpoint, give the losses and weights of one uninterrupted 6-step run."""
    make_images(tmp_path / "d", 10)
    data = ["--data", str(tmp_path / "d")]
    common = data + ["--flip", "--random-crop", "--lr-schedule", "cosine" if how == "crash" else "constant",
                     "--warmup-steps", "2", "--ema-decay", "0.9", "--grad-accum", "2", "--snr-gamma", "5",
                     "--noise-offset", "0.1"] + FAST + ["--batch-size", "2", "--save-every", "3"]
    train.main(common + ["--out", str(tmp_path / "a"), "--steps", "6"])
    if how == "more_steps":
        train.main(common + ["--out", str(tmp_path / "b"), "--steps", "3"])
    else:
        real = train.forward_backward

        def crash_in_step_5(t, step):
            if step == 5:
                raise RuntimeError("simulated crash")
            return real(t, step)

        monkeypatch.setattr(train, "forward_backward", crash_in_step_5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main(common + ["--out", str(tmp_path / "b"), "--steps", "6"])
        monkeypatch.setattr(train, "forward_backward", real)
        assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3, 4]
    # after the crash, --resume alone: the data folder and every other setting come from the checkpoint
    train.main((data + ["--steps", "6"] if how == "more_steps" else []) + ["--out", str(tmp_path / "b"), "--resume"])
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 6 and a == b  # bitwise equal floats
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    sa = checkpoint.read_checkpoint(tmp_path / "a" / "final.safetensors")[0]
    sb = checkpoint.read_checkpoint(tmp_path / "b" / "final.safetensors")[0]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ck = torch.load(runs.list_checkpoints(tmp_path / "b")[0], weights_only=True)
    assert ck["step"] == 6 and ck["epoch"] == 6 // 2 and set(ck) >= {"unet", "ema", "optimizer", "rng", "args"}


def test_data_is_required_unless_resuming_a_saved_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "a")])
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no loadable checkpoint .* pass --data"):
        train.main(["--out", str(tmp_path / "a"), "--resume"])


def test_cached_latents_train_like_encoding_every_step(tmp_path):
    make_images(tmp_path / "d", 6)
    argv = ["--data", str(tmp_path / "d"), "--steps", "4", "--flip", "--warmup-steps", "0", "--lr", "3e-3"] + FAST
    train.main(argv + ["--out", str(tmp_path / "live")])
    train.main(argv + ["--out", str(tmp_path / "cached"), "--cache-latents"])
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "live"), rtol=1e-5)


# SIGINT's handler is the same one (and test_a_second_ctrl_c_... sends it in-process): its subprocess run is slow-only
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_exits_0(tmp_path, sig):
    make_images(tmp_path / "d", 8)
    out = tmp_path / "out"
    cmd = [sys.executable, str(HERE / "train.py"), "--data", str(tmp_path / "d"), "--out", str(out),
           "--steps", "100000"] + FAST
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not ((out / "log.jsonl").exists() and len(read_log(out)) >= 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    (ckpt,) = runs.list_checkpoints(out)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == read_log(out)[-1]["step"] >= 2
    assert "continue with --resume" in output


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    """The first Ctrl-C lets the step finish and save; a second one during that step stops at once: one line (no
    traceback), exit 130, the checkpoints written so far intact."""
    make_images(tmp_path / "d", 8)
    out = tmp_path / "out"
    real = train.forward_backward

    def interrupted_twice(t, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled at once: the step goes on, to be saved
            os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt here
        return real(t, step)

    monkeypatch.setattr(train, "forward_backward", interrupted_twice)
    argv = ["--data", str(tmp_path / "d"), "--out", str(out), "--steps", "10"] + FAST + ["--save-every", "1"]
    assert cli.run(train.main, argv, interrupted="interrupted: the checkpoints are intact") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted: the checkpoints are intact"
    assert [p.name for p in runs.list_checkpoints(out)][:1] == ["ckpt-0000002.pt"] and not list(out.glob("*.tmp"))
    assert torch.load(runs.list_checkpoints(out)[0], weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handlers are gone


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    make_images(tmp_path / "d", 4)
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path / "d"), "--out", str(out), "--steps", "4"] + FAST + ["--save-every", "2"]
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("ckpt-0000004.pt"):
            assert Path(src).stat().st_size > 0  # the temporary file was written in full
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        train.main(argv)
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in runs.list_checkpoints(out)] == ["ckpt-0000002.pt"]
    assert not list(out.glob("*.tmp"))
    state, _ = runs.load_latest_checkpoint(out)
    assert state["step"] == 2
    train.main(["--data", str(tmp_path / "d"), "--out", str(out), "--resume"])
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4]
    # a damaged newest checkpoint is passed over on resume
    (out / "ckpt-0000009.pt").write_bytes(b"PK garbage")
    state, path = runs.load_latest_checkpoint(out)
    assert state["step"] == 4 and path.name == "ckpt-0000004.pt"


def test_run_folders_that_cannot_be_written_are_one_line(tmp_path, capsys, monkeypatch):
    make_images(tmp_path / "d", 4)
    argv = ["--data", str(tmp_path / "d"), "--steps", "2"] + FAST
    (tmp_path / "file").write_text("x")
    for out, expect in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "cannot write there")):
        assert cli.run(train.main, argv + ["--out", str(out)]) == 2
        assert expect in capsys.readouterr().err.strip().splitlines()[-1]
    # a disk that fills up while saving: one line, exit 1, the last good checkpoint kept, no temporary file
    out = tmp_path / "run"
    train.main(argv + ["--out", str(out), "--save-every", "1"])
    (out / "ckpt-0000009.pt.tmp").write_bytes(b"left by a killed run")
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert cli.run(train.main, ["--out", str(out), "--resume", "--steps", "3"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: No space left on device"
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in runs.list_checkpoints(out)] == ["ckpt-0000002.pt", "ckpt-0000001.pt"]
    assert not list(out.glob("*.tmp"))  # the killed run's and the failed save's temporary files are gone
    assert torch.load(out / "ckpt-0000002.pt", weights_only=True)["step"] == 2


def test_non_finite_loss_stops_after_repeated_failures(tmp_path, monkeypatch, capsys):
    make_images(tmp_path / "d", 4)
    monkeypatch.setattr(ldm, "diffusion_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="not finite for 5 steps"):
        train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--steps", "50"] + FAST)
    state, _ = runs.load_latest_checkpoint(tmp_path / "out")
    assert state["step"] == 5
    fresh = train.setup(*cli.parse_run_args(train.make_parser, ["--data", str(tmp_path / "d"), "--out",
                                                                str(tmp_path / "x")] + FAST))
    assert all(torch.equal(v, fresh.model.unet.state_dict()[k]) for k, v in state["unet"].items())


def test_the_log_written_every_n_steps_is_the_log_of_every_step(tmp_path, monkeypatch):
    """--log-every 4 (how a GPU run reads its losses: a wait for the device every few steps, not every step) writes the
    same lines and weights as --log-every 1, and still stops on non-finite losses, where it next writes the log."""
    make_images(tmp_path / "d", 4)
    common = ["--data", str(tmp_path / "d"), "--steps", "6", "--ema-decay", "0.9"] + FAST
    for n in (1, 4):
        train.main(common + ["--out", str(tmp_path / f"n{n}"), "--log-every", str(n)])
    a, b = read_log(tmp_path / "n1"), read_log(tmp_path / "n4")
    assert len(a) == 6 and [dict(r, images_per_s=0) for r in a] == [dict(r, images_per_s=0) for r in b]
    ka = checkpoint.read_checkpoint(tmp_path / "n1" / "final.safetensors")[0]
    kb = checkpoint.read_checkpoint(tmp_path / "n4" / "final.safetensors")[0]
    assert all(torch.equal(ka[k], kb[k]) for k in ka)
    monkeypatch.setattr(ldm, "diffusion_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="not finite for 8 steps"):  # 5 in a row, seen at the log of step 8
        train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "nan"), "--steps", "50",
                    "--log-every", "4"] + FAST)
    assert runs.load_latest_checkpoint(tmp_path / "nan")[0]["step"] == 8


def test_a_fused_optimizer_skips_a_non_finite_step_on_the_device():
    """runs.Run.optimizer_step with a fused AdamW: a NaN gradient leaves weights, moments and step count as they were,
    with no look at the flag on the host; finite steps update as the unfused optimizer does."""
    run = types.SimpleNamespace(args=types.SimpleNamespace(lr=0.1, warmup_steps=0, lr_schedule="constant",
                                                           grad_clip=1.0), total=3, scaler=None,
                                device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    start, grads = torch.randn(5, 3, generator=g), [torch.randn(5, 3, generator=g) for _ in range(3)]
    grads[1][2, 1] = float("nan")
    weights = []
    for fused in (True, False):
        w = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([w], fused=fused)
        flags = []
        for step, grad in enumerate(grads, 1):
            w.grad = grad.clone()
            before = (w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()})
            applied, _ = runs.Run.optimizer_step(run, [opt], step, torch.tensor(1.0))
            flags.append(bool(applied))
            if step == 2:
                assert torch.equal(w.detach(), before[0])
                assert all(torch.equal(opt.state[w][k], v) for k, v in before[1].items())
        assert flags == [True, False, True] and float(opt.state[w]["step"]) == 2
        weights.append(w.detach())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=1e-7)


# --- export --------------------------------------------------------------------------------------------------------


def test_export_loads_and_samples(tmp_path):
    make_images(tmp_path / "d", 4)
    out = tmp_path / "out"
    train.main(["--data", str(tmp_path / "d"), "--out", str(out), "--steps", "3", "--cache-latents"] + FAST)
    model = ldm.load_model(out / "final.safetensors", device="cpu")
    ck, _ = runs.load_latest_checkpoint(out)
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in ck["ema"].items())  # EMA weights exported
    images = ldm.sample(model, ["a red square"], steps=2, seed=0, progress=False)
    assert images[0].size == (64, 64)  # the model's resolution (the tiny preset's)
    for other in (out, runs.list_checkpoints(out)[0]):  # the run folder, the checkpoint: the same weights
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ldm.load_model(other).state_dict().items())
    assert sample.main(["a red square", "--ckpt", str(out), "--steps", "1", "--out", str(tmp_path / "s")]) == 0
    (out / "final.safetensors").unlink()  # a run folder without its export: the newest checkpoint
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in ldm.load_model(out).unet.state_dict().items())
    assert (out / "loss.png").exists()
    (grid,) = (out / "samples").glob("step-*.png")  # the final grid: the prompts under their images and in its text
    prompts = json.loads(Image.open(grid).text["prompts"])  # four captions of the data, one per image
    assert sorted(prompts) == sorted(c for _, c in data.find_images(tmp_path / "d")[0])
    assert Image.open(grid).size[0] == 4 * 32 and Image.open(grid).size[1] > 32  # a label strip under the row


def test_fine_tune_from_checkpoint_with_text_encoder_epochs_and_validation(tmp_path):
    make_images(tmp_path / "d", 12)
    base = ldm.build_model("tiny", prediction_type="v")
    ldm.save_model(base, tmp_path / "base.safetensors")
    out = tmp_path / "out"
    train.main(["--data", str(tmp_path / "d"), "--out", str(out), "--ckpt", str(tmp_path / "base.safetensors"),
                "--train-text-encoder", "--epochs", "2", "--grad-checkpointing", "--precision", "bf16"]
               + FAST + ["--val-fraction", "0.25", "--val-every", "2"])
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # 9 training images, 4 a step: 2 steps an epoch
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4]
    tuned = ldm.load_model(out / "final.safetensors", device="cpu")
    assert tuned.prediction_type == "v" and not tuned.unet.cfg.use_checkpoint
    for name in ("text_encoder", "unet"):
        before, after = getattr(base, name).state_dict(), getattr(tuned, name).state_dict()
        assert not all(torch.equal(before[k], after[k]) for k in before), name  # both were trained
    assert all(torch.equal(base.vae.state_dict()[k], v) for k, v in tuned.vae.state_dict().items())  # frozen
    ck = torch.load(runs.list_checkpoints(out)[0], weights_only=True)
    assert "text_encoder" in ck and "vae" not in ck  # the VAE reloads from --ckpt on resume
    # the checkpoint itself loads: its EMA U-Net and trained text encoder, the frozen VAE from the base file
    from_ckpt = ldm.load_model(runs.list_checkpoints(out)[0], device="cpu")
    assert all(torch.equal(from_ckpt.unet.state_dict()[k], v) for k, v in ck["ema"].items())
    assert all(torch.equal(from_ckpt.text_encoder.state_dict()[k], v) for k, v in ck["text_encoder"].items())
    assert all(torch.equal(base.vae.state_dict()[k], v) for k, v in from_ckpt.vae.state_dict().items())
    (tmp_path / "base.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="base model .*base.safetensors, which is not there"):
        ldm.load_model(runs.list_checkpoints(out)[0], device="cpu")


def test_export_keys_are_the_public_sd1_layout():
    with torch.device("meta"):
        model = ldm.build_model("sd1")
    manifest = json.loads((HERE / "fixtures" / "manifests" / "sd15.json").read_text())
    keys = set(model.checkpoint_state_dict())  # what ldm.save_model writes
    assert keys == {k for k in manifest if not k.endswith("position_ids")}


# --- SDXL ----------------------------------------------------------------------------------------------------------


def test_sdxl_conditions_each_image_on_its_own_size_and_crop(tmp_path):
    """SDXL's recipe: y = [pooled caption | embeddings of the image's original (h, w), its crop's corner, the
    training size]. Uncached with --random-crop --flip the geometry is each load's own; cached with --flip the
    mirror view carries the mirrored corner, so cached and uncached centre-crop runs give the same y."""
    make_images(tmp_path / "d", 6)  # 40 high, 40 / 48 / 56 wide: resized to 32 x 32 / 38 / 45
    base = ["--data", str(tmp_path / "d"), "--config", "tiny-sdxl", "--steps", "1"] + FAST
    t = train.setup(*cli.parse_run_args(train.make_parser, base + ["--out", str(tmp_path / "a"), "--random-crop",
                                                                    "--flip"]))
    z0, noise, timesteps, cond, y = train.micro_batch(t, 1, 0)
    assert cond.shape == (4, 77, 80) and y.shape == (4, 1576)
    idx, epoch = t.run.sampler.global_batch(1)
    rows = []
    for i in idx[:4]:
        rng = np.random.default_rng([0, epoch, int(i)])  # the draws ImageDataset makes for image i
        rows.append([*data.load_image_sizes(t.run.items[int(i)][0], 32, rng, True, True)[1], 32, 32])
    assert len({tuple(r[:2]) for r in rows}) > 1  # images of different original sizes in the batch
    expected = ldm.unet_lib.adm_vector(torch.zeros(4, 40), torch.tensor(rows, dtype=torch.float32))
    torch.testing.assert_close(y[:, 40:], expected[:, 40:], rtol=0, atol=1e-6)
    kept = (train.randomness(t, 1, range(4))["drop"] >= 0.1).tolist()  # caption dropout: zeros, else the caption's
    assert [bool(row.abs().max() > 0) for row in y[:, :40]] == kept and not all(kept)
    ys = []
    for extra in ([], ["--cache-latents"]):
        out = str(tmp_path / f"b{len(extra)}")
        t = train.setup(*cli.parse_run_args(train.make_parser, base + ["--out", out, "--flip"] + extra))
        ys.append(train.micro_batch(t, 1, 0)[4])
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=1e-6)
    # a caption-less (or dropped) caption is zeros in both context and pooled vector, as sampling's empty prompt
    context, pooled = train.encode_text(t, ["", "a red square"])
    assert context[0].abs().max() == 0 and pooled[0].abs().max() == 0 and pooled[1].abs().max() > 0


def test_sdxl_fine_tune_exports_the_public_layout_and_samples(tmp_path):
    """Fine-tune an SDXL-structured model (cached latents + text states + pooled vectors, flips, bf16, gradient
    checkpointing) -> final.safetensors in the public SDXL keys -> ldm.load_model -> sample; diffusers' single-file
    loader recognises it as an SDXL base."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    make_images(tmp_path / "d", 8)
    base = randomize_(ldm.build_model(SDXL_NARROW["sdxl"]))  # real text-encoder depths: diffusers detects by them
    ldm.save_model(base, tmp_path / "base.safetensors")
    out = tmp_path / "out"
    train.main(["--data", str(tmp_path / "d"), "--out", str(out), "--ckpt", str(tmp_path / "base.safetensors"),
                "--steps", "3", "--cache-latents", "--flip", "--grad-checkpointing", "--precision", "bf16"] + FAST)
    tuned = ldm.load_model(out / "final.safetensors", device="cpu")
    assert ldm.is_sdxl(tuned) and tuned.text_encoder.cfg == base.text_encoder.cfg
    before, after = base.unet.state_dict(), tuned.unet.state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)  # the U-Net trained
    for name in ("text_encoder", "vae"):  # both frozen
        assert all(torch.equal(getattr(base, name).state_dict()[k], v)
                   for k, v in getattr(tuned, name).state_dict().items()), name
    sd, _ = checkpoint.read_checkpoint(out / "final.safetensors")
    assert set(sd) == set(base.checkpoint_state_dict())
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "conditioner"}
    assert infer_diffusers_model_type(sd) == "xl_base"
    images = ldm.sample(tuned, ["a red square"], steps=2, sampler="euler", seed=0, progress=False)
    assert images[0].size == (64, 64) and np.asarray(images[0]).std() > 0
    assert sample.main(["a red square", "--ckpt", str(out), "--steps", "2", "--sampler", "euler", "--out",
                        str(tmp_path / "s")]) == 0
    with pytest.raises(SystemExit, match="an SDXL run trains its U-Net only"):
        train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "x"), "--config", "tiny-sdxl",
                    "--train-text-encoder", "--steps", "1"] + FAST)


# --- LoRA ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_base(tmp_path_factory) -> Path:
    """A tiny model with seeded random U-Net weights, as a base file: a fresh U-Net's zero-initialised output layers
    would give a LoRA on it no gradient."""
    model = ldm.build_model("tiny")
    randomize_(model.unet, 5)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    ldm.save_model(model, path)
    return path


def fixed_loss(model: ldm.LatentDiffusion, folder: Path) -> float:
    """The training loss over every image of `folder` at 32 px with their captions, at timesteps spread over 0..999
    and fixed noise."""
    x, captions, _ = data.load_images(data.find_images(folder)[0], 32)
    with torch.no_grad():
        z0 = model.encode_images(x)
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
        t = torch.linspace(0, 999, len(x)).round().long()
        return ldm.diffusion_loss(model, model.unet, z0, noise, t, model.encode_prompt(captions)).item()


def test_a_lora_loses_loss_like_a_full_fine_tune_and_leaves_the_base_alone(tmp_path, random_base):
    """30 steps on the same data: a LoRA on every U-Net layer (rank 4, LoCon convolutions) and on the text encoder
    gets most of the way a full fine-tune of the U-Net gets; its first step is the base model's (up = 0), and its
    export holds its modules only, with kohya's metadata."""
    make_images(tmp_path / "d", 8)
    common = ["--data", str(tmp_path / "d"), "--ckpt", str(random_base), "--steps", "30", "--cache-latents",
              "--uncond-prob", "0"] + FAST
    train.main(common + ["--out", str(tmp_path / "full"), "--ema-decay", "0"])
    train.main(common + ["--out", str(tmp_path / "lora"), "--lora-rank", "4", "--lora-targets", "all",
                         "--lora-text-encoder", "--lr", "1e-2"])
    assert losses(tmp_path / "lora")[0] == losses(tmp_path / "full")[0]  # step 1 runs the base model
    base = ldm.load_model(random_base)
    before = fixed_loss(base, tmp_path / "d")
    full = fixed_loss(ldm.load_model(tmp_path / "full" / "final.safetensors"), tmp_path / "d")
    base.apply_lora(tmp_path / "lora" / "lora.safetensors")
    after = fixed_loss(base, tmp_path / "d")
    assert full < 0.6 * before and before - after > 0.6 * (before - full), (before, full, after)
    assert not (tmp_path / "lora" / "final.safetensors").exists()
    sd, meta = checkpoint.read_checkpoint(tmp_path / "lora" / "lora.safetensors")
    names = {k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_down.weight")}
    assert {k[len(n):] for n in names for k in sd if k.startswith(n + ".")} == {
        ".lora_down.weight", ".lora_up.weight", ".alpha"}  # the file holds LoRA weights and nothing else
    assert any("_resnets_" in n and n.endswith("_conv1") for n in names)  # convolutions (LoCon)
    assert any(n.startswith("lora_unet_down_blocks_") and n.endswith("_attn2_to_k") for n in names)  # diffusers names
    assert any(n.startswith("lora_te_text_model_encoder_layers_") for n in names)
    assert all(sd[k].shape[0] == 4 for k in sd if k.endswith("lora_down.weight"))
    assert {k: meta[k] for k in ("ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_steps",
                                 "ss_network_module")} == {"ss_network_dim": "4", "ss_network_alpha": "4.0",
                                                           "ss_base_model_version": "sd_v1", "ss_steps": "30",
                                                           "ss_network_module": "networks.lora"}
    ck = torch.load(runs.list_checkpoints(tmp_path / "lora")[0], weights_only=True)
    assert "unet" not in ck and "text_encoder" not in ck and set(ck["lora"]) == set(sd)  # the base: from --ckpt


def test_a_lora_export_gives_diffusers_the_same_outputs(tmp_path, random_base):
    """OUT/lora.safetensors through diffusers' load_lora_weights (peft): its U-Net and text encoder give what ours
    give with the file applied."""
    make_images(tmp_path / "d", 4)
    out = tmp_path / "out"
    train.main(["--data", str(tmp_path / "d"), "--out", str(out), "--ckpt", str(random_base), "--steps", "3",
                "--lora-rank", "4", "--lora-targets", "all", "--lora-text-encoder", "--lr", "1e-2"] + FAST)
    base = ldm.load_model(random_base)
    pipe, _ = bench.diffusers_pipeline(base)  # its own copy of the base weights
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    tokens = base.tokenizer(["a red square", ""])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        theirs_context = pipe.text_encoder(tokens)[0]
        theirs = pipe.unet(z, t, theirs_context).sample
        plain = base.unet(z, t, base.text_encoder(tokens))
        base.apply_lora(out / "lora.safetensors")
        context = base.text_encoder(tokens)
        ours = base.unet(z, t, context)
    assert (ours - plain).abs().max() > 1e-2  # the LoRA changes the output far beyond the tolerance
    torch.testing.assert_close(theirs_context, context, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_a_lora_run_resumes_bitwise_reloads_and_its_file_redraws_the_sample_grid(tmp_path, random_base):
    """A LoRA run (EMA, gradient accumulation) for 3 steps then --resume to 6 equals 6 steps at once; the run folder
    loads as the base with the LoRA merged; sample.py --lora OUT/lora.safetensors redraws the grid bit for bit."""
    make_images(tmp_path / "d", 6)
    common = ["--data", str(tmp_path / "d"), "--ckpt", str(random_base), "--lora-rank", "2", "--lora-alpha", "1",
              "--ema-decay", "0.9", "--grad-accum", "2", "--lr", "1e-2", "--lr-schedule", "constant"] + FAST
    common += ["--batch-size", "2", "--save-every", "3"]
    train.main(common + ["--out", str(tmp_path / "a"), "--steps", "6", "--sample-every", "6"])
    train.main(common + ["--out", str(tmp_path / "b"), "--steps", "3"])
    train.main(["--out", str(tmp_path / "b"), "--steps", "6", "--resume", "--sample-every", "6"])
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 6 and a == b
    sa = checkpoint.read_checkpoint(tmp_path / "a" / "lora.safetensors")[0]
    sb = checkpoint.read_checkpoint(tmp_path / "b" / "lora.safetensors")[0]
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(float(v) == 1.0 for k, v in sa.items() if k.endswith(".alpha"))
    merged = ldm.load_model(random_base)
    merged.apply_lora(tmp_path / "a" / "lora.safetensors")  # the EMA weights, as the export
    run = ldm.load_model(tmp_path / "a")
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in run.state_dict().items())
    grid = Image.open(tmp_path / "a" / "samples" / "step-0000006.png")
    prompts = json.loads(grid.text["prompts"])
    assert len(prompts) > 1
    for i, prompt in enumerate(prompts):  # image i: --seed + i
        out = tmp_path / f"s{i}.png"
        assert sample.main([prompt, "--ckpt", str(random_base), "--lora", str(tmp_path / "a" / "lora.safetensors"),
                            "--steps", "2", "--cfg", "5", "--seed", str(i), "--height", "32", "--width", "32",
                            "--out", str(out)]) == 0
        tile = grid.convert("RGB").crop((32 * i, 0, 32 * i + 32, 32))
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(tile)), i


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "4"], "pass the model with --ckpt"),
    (["--lora-alpha", "8"], "--lora-alpha goes with --lora-rank"),
    (["--lora-rank", "4", "--ckpt", "BASE", "--train-text-encoder"], "use --lora-text-encoder"),
    (["--lora-rank", "4", "--ckpt", "XL", "--lora-text-encoder"], "for SD 1.x models"),
])
def test_lora_flags_that_do_not_fit_are_one_line_errors(tmp_path, random_base, flags, message):
    make_images(tmp_path / "d", 2)
    if "XL" in flags:
        ldm.save_model(ldm.build_model("tiny-sdxl"), tmp_path / "xl.safetensors")
    flags = [{"BASE": str(random_base), "XL": str(tmp_path / "xl.safetensors")}.get(f, f) for f in flags]
    with pytest.raises(SystemExit, match=message):
        train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--steps", "1"] + flags + FAST)


def test_an_sdxl_lora_exports_sdxl_names_and_reloads(tmp_path):
    """An SDXL LoRA (cached latents, sizes and pooled vectors) is written in the original module names sd-scripts
    gives SDXL files, with SDXL's base model version; the run folder loads as the base with it merged."""
    make_images(tmp_path / "d", 4)
    base = randomize_(ldm.build_model("tiny-sdxl"), 4)
    ldm.save_model(base, tmp_path / "xl.safetensors")
    train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--ckpt", str(tmp_path / "xl.safetensors"),
                "--lora-rank", "4", "--cache-latents", "--steps", "3", "--lr", "1e-2"] + FAST)
    sd, meta = checkpoint.read_checkpoint(tmp_path / "o" / "lora.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in sd)
    base.apply_lora(tmp_path / "o" / "lora.safetensors")
    run = ldm.load_model(tmp_path / "o")
    assert all(torch.equal(base.state_dict()[k], v) for k, v in run.state_dict().items())


# --- distributed ---------------------------------------------------------------------------------------------------


STAGES = {"unet": train, "lora": train, "encoder": train_vae}  # whose gradients are compared -> its stage's script


def stage_setup(module: str, argv: list[str]):
    script = STAGES[module]
    return script, script.setup(*cli.parse_run_args(script.make_parser, argv))


def trained_module(t, module: str) -> torch.nn.Module:
    return t.network if module == "lora" else getattr(t.model, module)


def _ddp_worker(rank: int, world: int, port: int, argv: list[str], grads_path: str, module: str = "unet"):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    script, t = stage_setup(module, argv)
    script.forward_backward(t, 1)
    if rank == 0:
        torch.save({n: p.grad for n, p in trained_module(t, module).named_parameters()}, grads_path)
    for opt in t.optimizers if module == "encoder" else [t.optimizer]:
        opt.zero_grad(set_to_none=True)
    t.run.batches = None
    script.train(t)  # leaves the process group at its end


@pytest.mark.parametrize("module", ["unet", pytest.param("lora", marks=pytest.mark.slow)])
def test_two_process_ddp_matches_single_process_gradient(tmp_path, module, random_base):
    """Two ranks of two micro-batches each: the gradient of one process's batch of four, for the U-Net, and for a
    LoRA (U-Net and text-encoder modules)."""
    make_images(tmp_path / "d", 8, captions="jsonl")
    base = ["--data", str(tmp_path / "d"), "--steps", "2", "--uncond-prob", "0.5"] + FAST
    if module == "lora":
        base += ["--ckpt", str(random_base), "--lora-rank", "2", "--lora-targets", "all", "--lora-text-encoder"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = base + ["--out", str(tmp_path / "ddp"), "--batch-size", "1", "--grad-accum", "2"]  # 2 ranks x 2 x 1
    mp.spawn(_ddp_worker, args=(2, port, two, str(tmp_path / "grads.pt"), module), nprocs=2, join=True)
    _, single = stage_setup(module, base + ["--out", str(tmp_path / "one"), "--batch-size", "4"])
    train.forward_backward(single, 1)
    ddp_grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    params = dict(trained_module(single, module).named_parameters())
    assert set(ddp_grads) == set(params) and any(p.grad.abs().max() > 0 for p in params.values())
    for n, p in params.items():
        torch.testing.assert_close(ddp_grads[n], p.grad, rtol=1e-4, atol=1e-6)
    log = read_log(tmp_path / "ddp")
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert (tmp_path / "ddp" / ("lora.safetensors" if module == "lora" else "final.safetensors")).exists()


# --- autoencoder stage ---------------------------------------------------------------------------------------------

AE = ["--resolution", "32", "--batch-size", "4", "--num-workers", "0", "--no-progress",
      "--sample-every", "0", "--val-fraction", "0", "--save-every", "1000"]


@pytest.mark.slow  # ~12 s: 120 autoencoder steps
def test_autoencoder_overfits_and_the_discriminator_starts_at_disc_start(tmp_path):
    """tiny-kl on 4 synthetic images: PSNR from ~6 dB to above 17 dB in 120 steps (measured 18.6); the GAN term and
    the discriminator's loss appear exactly from --disc-start on."""
    make_images(tmp_path / "d", 4)
    out = tmp_path / "out"
    train_vae.main(["--data", str(tmp_path / "d"), "--out", str(out), "--config", "tiny-kl", "--steps", "120",
                "--disc-start", "100"] + AE)
    log = [r for r in read_log(out) if "loss" in r]
    assert all(r["d_weight"] == 0 and r["disc_factor"] == 0 and "disc_loss" not in r for r in log[:100])
    assert all(r["d_weight"] > 0 and r["disc_factor"] == 1 and "disc_loss" in r for r in log[100:])
    model = vae_lib.load_autoencoder(out / "final.safetensors")
    ck = vae_lib.load_autoencoder(runs.list_checkpoints(out)[0])  # the run's checkpoint and folder load too
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ck.state_dict().items())
    assert vae_lib.load_autoencoder(out).scale_factor == model.scale_factor != 1.0  # the folder: final.safetensors
    with pytest.raises(checkpoint.CheckpointError, match=r"an autoencoder\); pass it as --vae"):
        ldm.load_model(runs.list_checkpoints(out)[0])
    x = torch.stack([data.load_image(p, 32) for p, _ in data.find_images(tmp_path / "d")[0]])
    with torch.no_grad():
        first = vae_lib.build_autoencoder(vae_lib.PRESETS["tiny-kl"])
        before = losses_lib.psnr(first.decode(first.encode(x).mode()).clamp(-1, 1), x).item()
        after = losses_lib.psnr(model.decode(model.encode(x).mode()).clamp(-1, 1), x).item()
    assert before < 10 and after > 17, (before, after)
    grid = Image.open(next((out / "samples").glob("step-*.png")))
    assert grid.size == (4 * 32, 2 * 32)  # 4 inputs beside their reconstructions, two pairs a row


@pytest.mark.parametrize("config", ["tiny-kl", "tiny-vq"])
def test_autoencoder_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, config):
    """2 steps + 2 resumed == 4 straight: model, discriminator (on from step 2), both Adam states, logvar, and for
    tiny-vq the codebook EMA with dead-code restarts."""
    make_images(tmp_path / "d", 8)
    common = ["--data", str(tmp_path / "d"), "--config", config, "--disc-start", "1", "--flip", "--grad-accum", "2",
              "--codebook-ema", "--restart-dead-codes", "1"] + AE + ["--batch-size", "2", "--save-every", "2"]
    train_vae.main(common + ["--out", str(tmp_path / "a"), "--steps", "4"])
    train_vae.main(common + ["--out", str(tmp_path / "b"), "--steps", "2"])
    train_vae.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "b"), "--resume", "--steps", "4"])
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert len(a) == len(b) == 4 and a == [dict(r, images_per_s=ra["images_per_s"]) for r, ra in zip(b, a)]
    assert "disc_loss" not in a[0] and "disc_loss" in a[1]
    if config == "tiny-vq":
        assert all(0 < r["perplexity"] <= 64 and 0 < r["codes_used"] <= 64 for r in a)
        assert sum(r["codes_restarted"] for r in a) > 0
    ca, cb = (torch.load(runs.list_checkpoints(tmp_path / x)[0], weights_only=True) for x in "ab")
    assert ca["step"] == cb["step"] == 4 and ("codebook_ema" in ca) == (config == "tiny-vq")
    for part in ("autoencoder", "discriminator", "codebook_ema"):
        assert all(torch.equal(v, cb[part][k]) for k, v in ca.get(part, {}).items()), part
    assert ca["disc_optimizer"]["state"] and ca["optimizer"]["state"]


def test_autoencoder_export_scale_factor_reaches_the_unet_stage_and_sampling(tmp_path, capsys):
    make_images(tmp_path / "d", 6)
    vae_out, ldm_out = tmp_path / "vae", tmp_path / "ldm"
    train_vae.main(["--data", str(tmp_path / "d"), "--out", str(vae_out), "--steps", "3"] + AE
               + ["--val-fraction", "0.34", "--val-every", "3", "--resolution", "64"])
    printed = float(capsys.readouterr().out.split("scale factor 1/std = ")[1].split()[0])
    val = [r for r in read_log(vae_out) if "val_psnr" in r]
    assert [r["step"] for r in val] == [3] and 0 < val[0]["val_ssim"] <= 1 and val[0]["val_psnr"] > 0
    vae = vae_lib.load_autoencoder(vae_out / "final.safetensors")
    assert vae.scale_factor == pytest.approx(printed, abs=5e-5) and vae.scale_factor != 1.0
    assert vae.cfg.resolution == 64 and vae.cfg.scale_factor == vae.scale_factor
    train.main(["--data", str(tmp_path / "d"), "--out", str(ldm_out), "--steps", "2", "--vae",
                str(vae_out / "final.safetensors"), "--config", "tiny"] + FAST)
    model = ldm.load_model(ldm_out / "final.safetensors", device="cpu")
    assert model.scale_factor == vae.scale_factor
    assert all(torch.equal(v, model.vae.state_dict()[k]) for k, v in vae.state_dict().items())
    images = ldm.sample(model, ["a red square"], steps=2, seed=0, progress=False)
    assert images[0].size == (64, 64)


def test_autoencoder_fine_tunes_the_decoder_only_and_stops_on_non_finite_losses(tmp_path, monkeypatch):
    make_images(tmp_path / "d", 4)
    torch.manual_seed(1)
    base = vae_lib.build_autoencoder(vae_lib.PRESETS["tiny-kl"])
    checkpoint.save_safetensors(tmp_path / "base.safetensors", base.state_dict())
    argv = ["--data", str(tmp_path / "d"), "--ckpt", str(tmp_path / "base.safetensors"), "--steps", "2"] + AE
    train_vae.main(argv + ["--out", str(tmp_path / "a"), "--train-decoder-only", "--disc-start", "0"])
    tuned = vae_lib.load_autoencoder(tmp_path / "a" / "final.safetensors").state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(v, tuned[k]) != k.startswith(("decoder.", "post_quant_conv.")), k
    real = train_vae.reconstruct

    def nan_reconstruction(t, x, noise=None):
        recon, parts = real(t, x, noise)
        return recon * float("nan"), parts

    monkeypatch.setattr(train_vae, "reconstruct", nan_reconstruction)
    with pytest.raises(SystemExit, match="not finite for 5 steps"):
        train_vae.main(argv + ["--out", str(tmp_path / "b"), "--steps", "50"])
    state, _ = runs.load_latest_checkpoint(tmp_path / "b")
    assert state["step"] == 5 and all(torch.equal(v, base.state_dict()[k]) for k, v in state["autoencoder"].items())

def test_autoencoder_perceptual_weights_and_gan_state_from_a_first_stage_checkpoint(tmp_path, capsys):
    """A narrow LPIPS (random weights, our layout) switches the perceptual term on; an LDM-style first-stage file
    with `loss.*` keys brings its discriminator and logvar along."""
    make_images(tmp_path / "d", 4)
    torch.manual_seed(2)
    lpips = losses_lib.LPIPS(width=4)
    for p in lpips.parameters():
        p.data = torch.rand(p.shape) * 0.1
    checkpoint.save_safetensors(tmp_path / "lpips.safetensors", lpips.state_dict())
    ae = vae_lib.build_autoencoder(vae_lib.PRESETS["tiny-kl"])
    gan = losses_lib.build_loss(dataclasses.replace(losses_lib.PRESETS["kl-f8"], disc_ndf=32, perceptual_weight=0))
    gan.logvar.data.fill_(0.5)
    checkpoint.save_safetensors(tmp_path / "ae.safetensors", {**ae.state_dict(), **{
        "loss." + k: v for k, v in gan.state_dict().items() if not k.startswith("perceptual_loss.")}})
    train_vae.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "out"), "--steps", "1", "--ckpt",
                str(tmp_path / "ae.safetensors"), "--perceptual-weights", str(tmp_path / "lpips.safetensors")] + AE)
    out = capsys.readouterr().out
    assert "LPIPS) term is off" not in out and "discriminator and logvar from" in out
    (rec,) = read_log(tmp_path / "out")
    assert rec["p_loss"] > 0 and rec["logvar"] == pytest.approx(0.5, abs=0.01)

def test_stage_presets_are_checked(tmp_path, capsys):
    """Each stage's --config takes its own presets only, named in --help without importing torch."""
    assert set(train.CONFIGS) == set(ldm.PRESETS) and set(train_vae.CONFIGS) == set(vae_lib.PRESETS)
    make_images(tmp_path / "d", 2)
    with pytest.raises(SystemExit) as e:
        train_vae.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "a"), "--config", "tiny"] + AE)
    assert e.value.code == 2 and "invalid choice: 'tiny'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "b"), "--config", "tiny-kl"] + FAST)
    assert e.value.code == 2 and "invalid choice: 'tiny-kl'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow  # ~4 s, two spawned ranks; the U-Net stage's DDP test runs by default, this one in CI's slow pass
def test_two_process_autoencoder_matches_single_process_gradient(tmp_path):
    """Hand-averaged gradients over 2 ranks x 1 image x 2 micro-batches == one process with 4 images (the
    discriminator, whose BatchNorm sees per-rank batches, is still off)."""
    make_images(tmp_path / "d", 8)
    base = ["--data", str(tmp_path / "d"), "--steps", "2", "--config", "tiny-vq", "--codebook-ema"] + AE
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = base + ["--out", str(tmp_path / "ddp"), "--batch-size", "1", "--grad-accum", "2"]
    mp.spawn(_ddp_worker, args=(2, port, two, str(tmp_path / "grads.pt"), "encoder"), nprocs=2, join=True)
    _, single = stage_setup("encoder", base + ["--out", str(tmp_path / "one"), "--batch-size", "4"])
    train_vae.forward_backward(single, 1)
    ddp_grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    for n, p in single.model.encoder.named_parameters():
        torch.testing.assert_close(ddp_grads[n], p.grad, rtol=1e-4, atol=1e-6)
    assert [r["step"] for r in read_log(tmp_path / "ddp")] == [1, 2]
    assert vae_lib.load_autoencoder(tmp_path / "ddp" / "final.safetensors").cfg.n_embed == 64


@pytest.mark.slow  # ~13 s: four training runs, each in its own process
def test_compare_vae_report(tmp_path):
    """The KL-vs-VQ command runs its four stages and writes a complete report."""
    import compare_vae
    make_images(tmp_path / "d", 12)
    out = tmp_path / "cmp"
    compare_vae.main(["--data", str(tmp_path / "d"), "--out", str(out), "--resolution", "32", "--ae-steps", "2",
                      "--unet-steps", "2", "--batch-size", "2", "--val-fraction", "0.25", "--sample-steps", "1",
                      "--extra", "--val-every", "1", "--sample-every", "0", "--save-every", "0",
                      "--num-workers", "0"])
    report = (out / "report.md").read_text()
    for label in ("compression", "held-out PSNR", "held-out SSIM", "latent std", "codebook codes used",
                  "U-Net validation loss"):
        assert label in report
    assert "nan" not in report.lower()
    assert Image.open(out / "report.png").size == (3 * 32, 3 * 32)  # 3 held-out images x (input, KL, VQ)
