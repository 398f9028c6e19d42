"""Image folders for training: captions, decoding, augmentation, and the step-indexed sampler that makes the
data order a function of (seed, step) alone, so resumed and multi-process runs see the same batches.

Each step's global batch is fixed by (seed, epoch, position): epoch e is a permutation of the training set seeded by
(seed, e), augmentations are seeded by (seed, epoch, image).
"""

import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from cli import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 64 * 2 ** 20  # larger images cost seconds and gigabytes at every load: refused by check_images
MAX_ASPECT = 4  # a longer side beyond 4x the shorter is centre-cropped to 4:1 before resizing


def read_text(path: Path) -> str:
    """A caption file or metadata.jsonl as UTF-8, or a one-line error naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None


def find_images(root: str | os.PathLike) -> tuple[list[tuple[Path, str]], bool]:
    """[(image path, caption)] from a metadata.jsonl (file_name, text) or a recursive scan with same-named .txt
    captions, and whether any caption exists. Errors (no folder, no images) are one-line UserErrors."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file; pass the folder that holds the images" if root.exists() else "no such folder"
        raise UserError(f"--data {root}: {what}")
    meta = root / "metadata.jsonl"
    items = []
    if meta.exists():
        for n, line in enumerate(read_text(meta).splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    items.append((root / rec["file_name"], rec.get("text")))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}} ({e})")
    else:
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
            txt = path.with_suffix(".txt")
            items.append((path, read_text(txt).strip() if txt.exists() else None))
    if not items:
        raise UserError(f"--data {root}: no images found (looked for {', '.join(IMAGE_EXTS)} recursively, "
                         "or a metadata.jsonl)")
    has_captions = any(c for _, c in items)
    return [(p, str(c or "")) for p, c in items], has_captions


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit greyscale rescaled, transparency composited onto white."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 257.0 if arr.max() > 255 else 1.0  # 65535 / 255: 16-bit range onto 8 bits
        im = Image.fromarray((arr / scale).clip(0, 255).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB")


def kept_size(w: int, h: int) -> tuple[int, int]:
    """What load_image keeps of a w x h picture before resizing: all of it, or its centre at MAX_ASPECT:1."""
    return min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)


def resized_size(w: int, h: int, resolution: int) -> tuple[int, int]:
    """The (w, h) load_image resizes a w x h picture to before cropping: its kept part, short side = resolution."""
    w, h = kept_size(w, h)
    s = resolution / min(w, h)
    return max(resolution, round(w * s)), max(resolution, round(h * s))


def mirrored(sizes: torch.Tensor, resolution: int) -> torch.Tensor:
    """load_image_sizes geometry [..., 4] of the same crops flipped left-right: the crop's left edge measured from
    the right (what the mirror image shows)."""
    out = sizes.clone()
    for row in out.view(-1, 4):
        row[3] = resized_size(int(row[1]), int(row[0]), resolution)[0] - resolution - row[3]
    return out


def load_image(path: Path, resolution: int, rng: np.random.Generator = None, random_crop: bool = False,
               flip: bool = False) -> torch.Tensor:
    """[3, R, R] in [-1, 1]: EXIF-rotated, RGB, short side resized to R, centre (or random) crop, optional flip.
    Random choices come from `rng`, seeded per (seed, epoch, image) by the caller."""
    return load_image_sizes(path, resolution, rng, random_crop, flip)[0]


def load_image_sizes(path: Path, resolution: int, rng: np.random.Generator = None, random_crop: bool = False,
                     flip: bool = False) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """load_image's image, and the geometry SDXL conditions on (its training recipe): (original height, original
    width, crop top, crop left), the crop's corner in the resized image, measured from the right edge in a
    flipped one (what the flipped picture shows)."""
    with Image.open(path) as im:
        im = to_rgb(ImageOps.exif_transpose(im))
    w, h = original = im.size
    keep_w, keep_h = kept_size(w, h)  # a 1x200000 strip would be resized to 64x12800000 pixels
    if (keep_w, keep_h) != (w, h):
        im = im.crop(((w - keep_w) // 2, (h - keep_h) // 2, (w + keep_w) // 2, (h + keep_h) // 2))
    w, h = resized_size(w, h, resolution)
    im = im.resize((w, h), Image.BICUBIC)
    if random_crop:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    else:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
        left = w - resolution - left
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, R, R)
    return x / 127.5 - 1.0, (original[1], original[0], top, left)


def load_images(items: list[tuple[Path, str]], resolution: int) -> tuple[torch.Tensor | None, list[str], list]:
    """(images [N, 3, R, R] or None, their captions, their load_image_sizes geometry), centre-cropped; unreadable
    files are left out with a warning."""
    x, captions, sizes = [], [], []
    for path, caption in items:
        try:
            image, geometry = load_image_sizes(path, resolution)
            x.append(image)
            captions.append(caption)
            sizes.append(geometry)
        except Exception as e:
            print(f"warning: image {path} is unreadable, left out ({e})", file=sys.stderr)
    return (torch.stack(x) if x else None), captions, sizes


def split_items(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded split, the same for every run with the same data, fraction and seed."""
    order = np.random.default_rng([seed, 1]).permutation(len(items))
    n_val = int(len(items) * val_fraction) if len(items) > 1 else 0
    keep, held_out = sorted(order[:len(items) - n_val]), sorted(order[len(items) - n_val:])
    return [items[i] for i in keep], [items[i] for i in held_out]


def image_problem(path: Path) -> str | None:
    """Why an image cannot be trained on ('unreadable', 'over N pixels'), or None: each one is decoded once, at
    reduced scale where the format allows, after its size is checked from the header."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                return f"over {MAX_PIXELS:,} pixels"
            im.draft("RGB", (256, 256))  # JPEG: decode at reduced scale, still reading every byte
            im.load()
        return None
    except Exception:  # PIL raises many types for damaged files (OSError, SyntaxError, ValueError, ...)
        return "unreadable"


def check_images(items: list[tuple[Path, str]], progress: bool = False) -> tuple[list, dict[str, list[Path]]]:
    """(usable items, {problem: paths}): every image is checked before training (threads; PIL decodes without the
    GIL), so a damaged, truncated or huge file is reported up front instead of failing mid-run."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        problems = list(tqdm(pool.map(image_problem, [p for p, _ in items]), total=len(items),
                             desc="checking images", disable=not progress, leave=False))
    bad = {}
    for (path, _), problem in zip(items, problems):
        if problem:
            bad.setdefault(problem, []).append(path)
    return [it for it, problem in zip(items, problems) if not problem], bad


class ImageDataset(torch.utils.data.Dataset):
    """Item (index, epoch) -> (index, image [3, R, R], its geometry [4]: load_image_sizes); augmentation seeded by
    (seed, epoch, index). A file that fails to decode now (it passed check_images) is replaced by the next readable
    image, so batches keep their size."""

    def __init__(self, items: list[tuple[Path, str]], resolution: int, seed: int, random_crop=False, flip=False):
        self.items, self.resolution, self.seed = items, resolution, seed
        self.random_crop, self.flip = random_crop, flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        index, epoch = key
        for k in range(len(self.items)):
            i = (index + k) % len(self.items)
            try:
                rng = np.random.default_rng([self.seed, epoch, i])
                x, sizes = load_image_sizes(self.items[i][0], self.resolution, rng, self.random_crop, self.flip)
                return i, x, torch.tensor(sizes)
            except Exception as e:
                print(f"warning: skipping unreadable image {self.items[i][0]} ({e})", file=sys.stderr)
        raise RuntimeError("no readable image left")


class StepSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of (index, epoch) for steps start..total. Epoch e is a permutation of the training
    set seeded by (seed, e); step k of the epoch takes its positions [k G, (k + 1) G), G = batch * ranks * accum,
    cut into accum micro-batches, each cut into ranks (DistributedSampler-like)."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, accum: int, seed: int, start: int, total: int):
        self.n, self.B, self.W, self.rank, self.accum, self.seed = n, batch_size, world, rank, accum, seed
        self.start, self.total = start, total
        self.G = batch_size * world * accum
        self.steps_per_epoch = max(1, n // self.G)  # drop the last partial global batch; tile sets smaller than G

    @lru_cache(maxsize=2)
    def permutation(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return np.tile(perm, -(-self.G // self.n)) if self.n < self.G else perm

    def global_batch(self, step: int) -> tuple[np.ndarray, int]:
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        return self.permutation(epoch)[k * self.G:(k + 1) * self.G], epoch

    def micro_slice(self, m: int, rank: int = None) -> slice:
        """Positions in the global batch of micro-batch m on `rank`."""
        lo = (m * self.W + (self.rank if rank is None else rank)) * self.B
        return slice(lo, lo + self.B)

    def __iter__(self):
        for step in range(self.start, self.total + 1):
            idx, epoch = self.global_batch(step)
            for m in range(self.accum):
                yield [(int(i), epoch) for i in idx[self.micro_slice(m)]]

    def __len__(self) -> int:
        return max(0, self.total - self.start + 1) * self.accum


def collate(batch: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [B], images [B, 3, R, R], geometry [B, 4]: original h, w, crop top, left)."""
    return tuple(torch.stack([torch.as_tensor(item[k]) for item in batch]) for k in range(3))


def worker_init(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the main process, which stops cleanly
