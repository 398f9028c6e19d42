"""What the command-line scripts share and must have before torch is imported (so that `--help` and usage errors
answer at once): the help formatter, the flags of a training run, and how a script ends: bad input is one line on
stderr and exit status 2, a failed write one line and status 1, Ctrl-C status 130; only a bug prints a traceback.
Standard library only."""

import argparse
import os
import sys


class UserError(SystemExit):
    """Bad input, or a setting that cannot work: `run` prints 'error: <message>' as one line and exits with 2. (A
    SystemExit, so that code calling a script's main() directly stops just as the script would.)"""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).removeprefix("error: ").split()))


STOPPED_TRAINING = ("interrupted: stopped without saving this step; the last checkpoint is intact (continue with "
                    "--resume)")


def run(main, argv: list[str] = None, *, errors: tuple = (), interrupted: str = "interrupted",
        out_of_memory: str = "") -> int:
    """Call main(argv) and turn the ways it can fail into one line and an exit status: UserError and `errors` (the
    modules' own input errors, e.g. checkpoint.CheckpointError) 2; OSError (disk full, read-only folder) 1; an
    out-of-memory error 2 with the `out_of_memory` advice; KeyboardInterrupt 130 with the `interrupted` line."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    except (UserError, *errors) as e:
        message, status = str(e), 2
    except OSError as e:
        what = f"{e.strerror or type(e).__name__}" + (f": {e.filename}" if e.filename else "")
        message, status = f"{what} ({e})" if not e.strerror else what, 1
    except RuntimeError as e:
        if not any(s in str(e).lower() for s in ("out of memory", "can't allocate memory")):
            raise
        message, status = f"out of memory ({str(e).splitlines()[0]}); {out_of_memory}", 2
    print("error: " + " ".join(message.removeprefix("error: ").split()), file=sys.stderr)  # always one line
    return status


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except None and off switches (their help says what happens without them)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors ('error: ... (see prog --help)'), exit status 2, like every other error."""

    def error(self, message: str):
        hint = "; a value that starts with '-' is written --flag=VALUE" if "expected one argument" in message else ""
        self.exit(2, f"error: {message} (see {self.prog} --help{hint})\n")


def add_run_flags(p: argparse.ArgumentParser, defaults: dict[str, str]) -> argparse.ArgumentParser:
    """The flags every training stage has: data, run folder, resume, optimisation, precision, checkpoints, progress.
    `defaults` says in words what each size-dependent default is, e.g. {"lr": "1e-3 tiny, 1e-5 SD"}."""
    def a(flag, help, **kw):
        name = flag[2:].replace("-", "_")
        p.add_argument(flag, help=f"{help} (default: {defaults[name]})" if name in defaults else help, **kw)

    a("--data", "image folder (recursive; same-named .txt captions or a metadata.jsonl); with --resume, the run's own")
    a("--out", "run folder: checkpoints, log.jsonl, loss.png, samples/, final.safetensors", required=True)
    a("--ckpt", "start from this checkpoint (fine-tuning)")
    a("--resume", "continue from the latest loadable checkpoint in --out", action="store_true")
    a("--resolution", "training image size", type=int)
    a("--random-crop", "random instead of centre crop after resizing the short side", action="store_true")
    a("--flip", "random horizontal flips", action="store_true")
    a("--val-fraction", "share of images held out for validation", type=float, default=0.02)
    a("--batch-size", "images per GPU per micro-batch", type=int)
    a("--grad-accum", "micro-batches per optimizer step", type=int, default=1)
    a("--steps", "total optimizer steps, counted from 1", type=int)
    a("--epochs", "total epochs instead of --steps", type=int)
    a("--lr", "peak learning rate", type=float)
    a("--warmup-steps", "linear warm-up steps", type=int)
    a("--lr-schedule", "after warm-up", choices=["constant", "cosine"], default="constant")
    a("--grad-clip", "max gradient norm, 0: off", type=float)
    a("--precision", "autocast dtype", choices=["bf16", "fp16", "fp32"])
    a("--seed", "seed of data order, noise, augmentation and from-scratch weights", type=int, default=0)
    a("--num-workers", "data loading processes per GPU", type=int, default=min(4, os.cpu_count() or 1))
    a("--device", "cpu or cuda[:N]")
    a("--save-every", "checkpoint every N steps, 0: only at the end", type=int)
    a("--keep", "number of checkpoints kept (at least 1)", type=int, default=3)
    a("--sample-every", "sample grid every N steps, 0: only at the end", type=int)
    a("--val-every", "validation every N steps", type=int)
    a("--max-bad-steps", "stop after this many non-finite losses in a row (counted when the log is written)",
      type=int, default=5)
    a("--log-every", "write log.jsonl and the progress bar every N steps: reading the loss makes the GPU wait, so "
      "not every step there (default: 1 on the CPU, 10 on a GPU)", type=int)
    a("--no-progress", "no progress bar", action="store_true")
    return p


def parse_run_args(make_parser, argv: list[str] = None) -> tuple[argparse.Namespace, set[str]]:
    """(args, names of the flags given explicitly: on --resume those override the run's saved settings)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.data is None and not args.resume:
        parser.error("the following arguments are required: --data (unless --resume continues a run)")
    return args, explicit_flags(make_parser, argv)


def explicit_flags(make_parser, argv: list[str] = None) -> set[str]:
    """The destinations of the flags given on the command line (not defaults): a second parse without defaults."""
    parser = make_parser()
    for action in parser._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return set(vars(parser.parse_args(argv)))
