"""A training run, as both stages use it (train.py: the U-Net; train_vae.py: the autoencoder): the device and the
process group, the run folder, resume (the newest loadable checkpoint, its settings merged with the flags given
now), the data split and its step order, AMP, the optimizer step with non-finite losses skipped, log.jsonl and the
loss curve, atomic checkpoints, and Ctrl-C / SIGTERM.

Everything random is a function of (--seed, step): epoch e is a permutation seeded by (seed, e) (data.StepSampler),
the draws of the sample at position p of a step's global batch come from step_generator(seed, step, p), and
augmentations from (seed, epoch, image). So a resumed run repeats the uninterrupted one exactly, and N ranks compute
the gradient of the same global batch as one process would.
"""

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

import checkpoint
import data
from cli import UserError

# Settings that fix the data order and noise: changing them on --resume breaks exact continuation.
ORDER_ARGS = ("data", "seed", "batch_size", "grad_accum", "resolution", "val_fraction", "random_crop", "flip")


def step_generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints (e.g. (seed, step)); same numbers on every device and rank."""
    return torch.Generator("cpu").manual_seed(int(np.random.SeedSequence(list(seeds)).generate_state(1, np.uint64)[0]))


def lr_at(step: int, lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over steps 1..warmup, then constant or cosine to 0 at `total`."""
    if step <= warmup:
        return lr * step / max(1, warmup)
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return lr


def rng_state() -> dict:
    """Every global RNG state as tensors and plain types (loadable with torch.load(weights_only=True))."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=torch.tensor(mt, dtype=torch.int64), python_version=version, python_gauss=gauss,
                 numpy=torch.from_numpy(keys.astype(np.int64)), numpy_pos=int(pos),
                 numpy_gauss=[int(has_gauss), float(cached)], torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         *state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out: Path) -> list[Path]:
    """ckpt-<step>.pt files in `out`, newest step first."""
    found = [(int(p.stem.split("-")[1]), p) for p in Path(out).glob("ckpt-*.pt") if p.stem.split("-")[1].isdigit()]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest_checkpoint(out: Path) -> tuple[dict, Path] | tuple[None, None]:
    """The newest checkpoint that loads; damaged ones are reported and passed over."""
    for path in list_checkpoints(out):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:
            print(f"warning: {path.name} does not load ({type(e).__name__}: {e}); trying an older one", file=sys.stderr)
    return None, None


def draw_loss_curve(log_path: Path, png_path: Path, size=(800, 400)):
    """Training loss (light: per step, dark: smoothed) and validation loss (red dots) against step, drawn with PIL."""
    train, val = [], []
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        rec = json.loads(line)
        if rec.get("loss") is not None:
            train.append((rec["step"], rec["loss"]))
        if rec.get("val_loss") is not None:
            val.append((rec["step"], rec["val_loss"]))
    if not train:
        return
    W, H, pad = size[0], size[1], 50
    ys = [y for _, y in train + val]
    lo, hi = min(ys), float(np.percentile(ys, 99)) if len(ys) > 20 else max(ys)
    hi = hi if hi > lo else lo + 1e-6
    x_max = max(train[-1][0], 2)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)

    def xy(step, y):
        return (pad + (W - 2 * pad) * (step - 1) / (x_max - 1),
                H - pad - (H - 2 * pad) * (min(y, hi) - lo) / (hi - lo))

    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    smooth, s = [], train[0][1]
    for step, y in train:
        s = 0.9 * s + 0.1 * y
        smooth.append((step, s))
    if len(train) > 1:
        d.line([xy(*p) for p in train], fill=(170, 190, 230), width=1)
        d.line([xy(*p) for p in smooth], fill=(20, 60, 160), width=2)
    for p in val:
        x, y = xy(*p)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
    d.text((pad, 15), f"loss  (last smoothed {smooth[-1][1]:.4f}" + (f", val {val[-1][1]:.4f}" if val else "") + ")",
           fill="black")
    d.text((4, pad - 6), f"{hi:.3g}", fill="black")
    d.text((4, H - pad - 6), f"{lo:.3g}", fill="black")
    d.text((W - pad - 40, H - pad + 8), f"step {x_max}", fill="black")
    with checkpoint.atomic_write(png_path) as f:
        im.save(f, format="PNG")


def training_device(name: str | None, world: int, local_rank: int) -> torch.device:
    """cuda:<local rank> when CUDA is there (unless --device says otherwise), else the CPU."""
    if torch.cuda.is_available() and (name or "cuda").startswith("cuda"):
        # always an indexed device: torch.cuda.set_device refuses a bare "cuda"
        return torch.device(name if name and ":" in name and world == 1 else f"cuda:{local_rank}")
    return torch.device(name or "cpu")


class Run:
    """What a training loop calls. Built in two steps: Run(args, explicit) sets up the device and process group,
    finds the run's checkpoint to resume (merging its settings with the flags given now: `run.args`) and checks the
    images; then, once the stage has built its model and filled its defaults, `run.begin(downsample_factor)` makes
    the held-out split, the step order and the AMP settings. Under torchrun every rank builds one; only rank 0
    writes files."""

    def __init__(self, args: argparse.Namespace, explicit: set[str] = frozenset(), resumed: tuple = None):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = training_device(args.device, self.world, int(os.environ.get("LOCAL_RANK", 0)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 parts, e.g. the loss
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.out = Path(args.out)
        self.state = None  # the checkpoint resumed from
        if args.resume:
            self.state, path = resumed or load_latest_checkpoint(self.out)
            if self.state is None:
                if args.data is None:
                    raise UserError(f"no loadable checkpoint in {self.out} to resume; "
                                     "pass --data to start a run")
                self.print(f"no loadable checkpoint in {self.out}; starting a new run")
            else:
                args = self.merge_args(self.state["args"], args, explicit)
                self.print(f"resuming from {path} (step {self.state['step']})")
        elif list_checkpoints(self.out):
            raise UserError(f"{self.out} already holds checkpoints; pass --resume to continue that run or "
                             "choose another --out")
        self.args = args
        items, self.has_captions = data.find_images(args.data)  # before building anything: a bad folder fails fast
        if self.rank == 0:
            self.prepare_folder()
        self.items, bad = data.check_images(items, progress=self.rank == 0 and not args.no_progress)
        for problem, paths in bad.items():  # "skipped 3 unreadable images: ...", "skipped 1 image over N pixels: ..."
            what = f"image{'s' * (len(paths) > 1)}"
            what = f"{problem} {what}" if problem == "unreadable" else f"{what} {problem}"
            self.print(f"skipped {len(paths)} {what}: " + ", ".join(p.name for p in paths[:5])
                       + (", ..." if len(paths) > 5 else ""))
        if not self.items:
            raise UserError(f"--data {args.data}: none of the {len(items)} images can be used ("
                            + "; ".join(f"{problem}: {', '.join(str(p) for p in paths[:3])}"
                                        + (" ..." if len(paths) > 3 else "") for problem, paths in bad.items()) + ")")
        self.start, self.bad_steps, self.stop_requested, self.stop = 1, 0, False, False
        self.pending, self.busy = [], 0.0  # steps not yet written to log.jsonl; their time on the host

    def merge_args(self, saved: dict, given: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
        """The run's saved settings, overridden by the flags given now (e.g. a larger --steps)."""
        args = argparse.Namespace(**{**vars(given), **saved})  # settings newer than the checkpoint: defaults
        for k in explicit:
            if k in ORDER_ARGS and saved.get(k) != getattr(given, k):
                self.print(f"warning: --{k.replace('_', '-')} changed on resume; the run no longer repeats exactly")
            setattr(args, k, getattr(given, k))
        if "steps" in explicit:
            args.epochs = None
        if "epochs" in explicit:
            args.steps = None
        args.resume = True
        return args

    def fill(self, defaults: dict):
        """Settings not given (None) from the stage's defaults; --epochs stands in for --steps."""
        for k, v in defaults.items():
            if getattr(self.args, k, None) is None and not (k == "steps" and self.args.epochs):
                setattr(self.args, k, v)

    def begin(self, downsample_factor: int):
        """The held-out split, the step order, the total step count and the AMP settings (after the defaults)."""
        args = self.args
        if args.resolution % downsample_factor:
            raise UserError(f"--resolution must be a multiple of {downsample_factor}")
        if args.precision is None:
            args.precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.items, self.val_items = data.split_items(self.items, args.val_fraction, args.seed)
        self.sampler = data.StepSampler(len(self.items), args.batch_size, self.world, self.rank, args.grad_accum,
                                        args.seed, 1, 0)
        self.global_batch = self.sampler.G
        self.total = args.epochs * self.sampler.steps_per_epoch if args.epochs else args.steps
        self.dataset = data.ImageDataset(self.items, args.resolution, args.seed, args.random_crop, args.flip)
        self.batches = None
        if args.log_every is None:  # reading the loss waits for the GPU, which then runs dry: not every step there
            args.log_every = 10 if self.device.type == "cuda" else 1
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "fp16" else None

    # --- helpers the loop calls ------------------------------------------------------------------------------

    def print(self, *a):
        if self.rank == 0:
            tqdm.write(" ".join(map(str, a)))

    def announce(self, model: str):
        """One line on what trains where: the stage's model description, then the run's settings."""
        self.print(f"{model}, {self.args.resolution}px, device {self.device}, world {self.world}, "
                   f"precision {self.args.precision}")

    @property
    def quiet(self) -> bool:
        return self.rank != 0 or self.args.no_progress

    def autocast(self, enabled: bool = True):
        if self.amp_dtype is None or not enabled:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch (indices, images [B, 3, R, R], geometry [B, 4]: data.collate) of the step
        order, from `step` on."""
        if self.batches is None:
            sampler = data.StepSampler(len(self.items), self.args.batch_size, self.world, self.rank,
                                       self.args.grad_accum, self.args.seed, step, self.total)
            self.batches = iter(torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, collate_fn=data.collate, num_workers=self.args.num_workers,
                pin_memory=self.device.type == "cuda", worker_init_fn=data.worker_init))
        return next(self.batches)

    def mean_over_ranks(self, losses: list[torch.Tensor]) -> torch.Tensor:
        loss = torch.stack(losses).mean()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return loss

    def average_gradients(self, params: list[torch.Tensor]):
        """Mean of each gradient over the ranks, for models trained without a DDP wrapper."""
        if self.world > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world

    def optimizer_step(self, optimizers: list[torch.optim.Optimizer], step: int,
                       loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the LR, unscale and clip, step every optimizer that has gradients, zero them. Returns (applied, grad
        norm of the first one) as 0-d device tensors. A non-finite loss or gradient skips the update: a fused
        optimizer skips on the device (its found_inf input, as GradScaler uses it), so nothing here waits for the
        GPU; an unfused one (the CPU's) after a look at the flag; GradScaler skips fp16 overflows itself."""
        args = self.args
        lr = lr_at(step, args.lr, args.warmup_steps, self.total, args.lr_schedule)
        active = [o for o in optimizers if any(p.grad is not None for g in o.param_groups for p in g["params"])]
        ok, norms = torch.isfinite(torch.as_tensor(loss, device=self.device)), []
        for opt in active:
            for group in opt.param_groups:
                group["lr"] = lr
            if self.scaler:
                self.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            norms.append(torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf")))
            ok = ok & torch.isfinite(norms[-1]).to(ok.device)
        if self.scaler:
            scale = self.scaler.get_scale()  # waits for the GPU: fp16 runs only
            for opt in active:
                self.scaler.step(opt)
            self.scaler.update()
            ok = ok & (self.scaler.get_scale() >= scale)  # the scale drops exactly when a step is skipped
        else:
            for opt in active:
                if opt.defaults.get("fused"):
                    opt.found_inf = (~ok).float()
                    opt.step()
                    del opt.found_inf
                elif ok.item():
                    opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return ok, norms[0] if norms else torch.zeros((), device=self.device)

    def due(self, step: int, every: int) -> bool:
        """Rank 0's turn to validate or sample at this step (every N steps, 0: never)."""
        return bool(every) and step % every == 0 and self.rank == 0

    # --- files -----------------------------------------------------------------------------------------------

    def log(self, record: dict):
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def prepare_folder(self):
        """Before anything is built: --out must be a folder this process can write (one line if not), and temporary
        files a killed run left behind (an interrupted atomic write) are removed."""
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out}: is a file; pass a folder for the run")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / ".write-test").touch()
            (self.out / ".write-test").unlink()
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write there ({e.strerror or e})") from None
        for tmp in self.out.glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    def open_folder(self):
        """Create the run folder; drop log lines past the step training restarts from (written after the last
        checkpoint)."""
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "log.jsonl"
        if self.start == 1 or not path.exists():
            path.unlink(missing_ok=True)
            return
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < self.start]
        path.write_text("".join(ln + "\n" for ln in lines))

    def save_grid(self, image: Image.Image, step: int, pnginfo=None):
        """OUT/samples/step-<step>.png, written atomically."""
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        with checkpoint.atomic_write(self.out / "samples" / f"step-{step:07d}.png") as f:
            image.save(f, format="PNG", pnginfo=pnginfo)

    def state_dict(self, step: int, optimizer: torch.optim.Optimizer) -> dict:
        """The checkpoint fields every stage has: position, optimizer, scaler, LR schedule, RNG, settings."""
        args = self.args
        epoch, epoch_step = divmod(step, self.sampler.steps_per_epoch)
        return dict(step=step, epoch=epoch, epoch_step=epoch_step, images_seen=step * self.global_batch,
                    optimizer=optimizer.state_dict(), scaler=self.scaler.state_dict() if self.scaler else {},
                    lr_schedule=dict(name=args.lr_schedule, lr=args.lr, warmup_steps=args.warmup_steps,
                                     total=self.total, last_lr=optimizer.param_groups[0]["lr"]),
                    rng=rng_state(), args=vars(args), world_size=self.world)

    def restore(self, optimizer: torch.optim.Optimizer):
        """Continue the resumed checkpoint's run (the stage has loaded its own parts from run.state)."""
        state = self.state
        optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if state["world_size"] != self.world:
            self.print(f"warning: resuming a {state['world_size']}-process run on {self.world}; the data order changes")
        self.start = state["step"] + 1

    def save(self, step: int, state: dict):
        """ckpt-<step>.pt, written atomically; older ones beyond --keep are removed; the loss curve is redrawn."""
        self.flush_log()  # log.jsonl up to the checkpoint's step, as a resume from it expects
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with checkpoint.atomic_write(self.out / f"ckpt-{step:07d}.pt") as f:
                torch.save(state, f)
            for old in list_checkpoints(self.out)[max(1, self.args.keep):]:
                old.unlink(missing_ok=True)
            draw_loss_curve(self.out / "log.jsonl", self.out / "loss.png")
        self.barrier()

    def finish(self, path: Path):
        """After the stage wrote its final file (rank 0): the loss curve, a last word, and every rank waits."""
        if self.rank == 0:
            draw_loss_curve(self.out / "log.jsonl", self.out / "loss.png")
            self.print(f"wrote {path}")
        self.barrier()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:  # the lines of the steps that ran before an error or an interrupt
            try:
                self.flush_log()
            except Exception:  # a failed device cannot be read; the error itself is what matters
                pass
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    # --- the loop's frame ------------------------------------------------------------------------------------

    def steps(self):
        """The steps still to run, start..total, for the stage's `for step in run.steps():` loop, with the progress
        bar. After each step's body it stops the run, as the body's checkpoint_due/save arranged: on a first
        SIGINT/SIGTERM (the step finishes and is saved; a second one raises KeyboardInterrupt) and after
        --max-bad-steps non-finite losses in a row. `run.completed` tells afterwards whether every step ran."""
        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.print(f"\n{signal.Signals(signum).name}: finishing this step, saving, then exiting "
                       "(again to abort without saving)")

        self.open_folder()
        self.completed = False
        if self.start > self.total:
            self.print(f"already at step {self.start - 1} of {self.total}")
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        self.bar = tqdm(total=self.total, initial=self.start - 1, disable=self.quiet, dynamic_ncols=True, unit="step")
        self.tick = time.perf_counter()
        try:
            for step in range(self.start, self.total + 1):
                yield step
                if self.bad_steps >= self.args.max_bad_steps:  # the body saved the last good weights
                    raise UserError(f"the loss was not finite for {self.bad_steps} steps in a row (step "
                                     f"{step}); saved the last good weights. Lower --lr, or use --precision bf16/fp32")
                if self.stop and step < self.total:
                    return self.print(f"stopped at step {step}; continue with --resume")
                self.tick = time.perf_counter()  # validation, samples and saves do not count against images/s
            self.completed = True
        finally:
            self.bar.close()
            self.batches = None
            for s, h in handlers.items():
                signal.signal(s, h)

    def log_step(self, step: int, loss: torch.Tensor, norm: torch.Tensor, applied: torch.Tensor, lr: float,
                 logs: dict = None):
        """Note a step's loss, gradient norm and applied flag (device tensors) for log.jsonl and the progress bar.
        They are read every --log-every steps, at the last step and when stopping: the one wait for the GPU then,
        not one a step. images/s leaves out validation, samples and saves."""
        now = time.perf_counter()
        self.busy, self.tick = self.busy + now - self.tick, now
        self.pending.append((step, lr, logs or {}, torch.stack([loss.float(), norm.float(), applied.float()])))
        # a stop on one process: read at once; under DDP the ranks agree on stopping at the log steps only, where
        # every rank reads, so that each counts the same non-finite steps at the same step
        if step % self.args.log_every == 0 or step == self.total or (self.stop_requested and self.world == 1):
            self.flush_log()

    def flush_log(self):
        """Write the noted steps: their log.jsonl lines, the progress bar, and the count of non-finite losses in a
        row (fp16: GradScaler skips overflowing steps while it calibrates; only a non-finite loss counts there)."""
        if not self.pending:
            return
        start = time.perf_counter()
        values = torch.stack([v for *_, v in self.pending]).tolist()  # waits for the device
        now = time.perf_counter()
        ips = self.global_batch * len(values) / max(self.busy + now - start, 1e-9)
        self.busy, self.tick = 0.0, now
        for (step, lr, logs, _), (loss, norm, applied) in zip(self.pending, values):
            applied = bool(applied)
            bad = not math.isfinite(loss) or (not applied and self.scaler is None)
            self.bad_steps = self.bad_steps + 1 if bad else 0
            finite = {k: v for k, v in logs.items() if math.isfinite(v)}
            self.log(dict(step=step, epoch=(step - 1) // self.sampler.steps_per_epoch,
                          loss=loss if math.isfinite(loss) else None, lr=lr,
                          grad_norm=norm if math.isfinite(norm) else None, images_per_s=round(ips, 3),
                          applied=applied, **finite))
        if self.rank == 0:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}", refresh=False)
            self.bar.update(len(values))
        self.pending = []

    def log_validation(self, step: int, metrics: dict | None):
        if metrics:
            self.flush_log()  # the step lines before it
            self.log(dict(step=step, **metrics))
            self.bar.write(f"step {step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items()))

    def checkpoint_due(self, step: int) -> bool:
        """Save now: every --save-every steps, at the last step, when stopping on a signal (agreed by every rank), or
        to keep the last good weights before giving up on non-finite losses."""
        self.stop = self.stop_requested
        if self.world > 1 and (step % self.args.log_every == 0 or step == self.total):
            # all ranks must leave the loop after the same step: they agree at the steps they all log
            flag = torch.tensor([float(self.stop_requested)], device=self.device)
            dist.all_reduce(flag)
            self.stop = flag.item() > 0
        every = self.args.save_every
        return (self.stop or bool(every) and step % every == 0 or step == self.total
                or self.bad_steps >= self.args.max_bad_steps)
