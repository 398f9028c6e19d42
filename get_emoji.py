"""Build a captioned training folder of the 3,786 Noto colour emoji (64x64): the data the README's from-scratch
recipe trains on.

    python get_emoji.py --out emoji/
    python train_vae.py --data emoji/ --config tiny-kl --resolution 64 --out runs/emoji-vae

Source: the npm package emoji-datasource-google (Google's Noto emoji as 64x64 PNGs, with their Unicode names in
emoji.json), one 74 MB tarball from the npm registry over HTTPS, resumable and checked against a pinned sha256,
kept in the download cache ($LDM_HOME). Each image is written as OUT/<codepoints>.png (transparency flattened onto
white) with OUT/<codepoints>.txt holding its caption, e.g. "an emoji of a woman farmer, medium skin tone", and
OUT/LICENSE.txt says where it came from: the images are Apache-2.0 (Noto Emoji), the names MIT (emoji-data).
"""

import argparse
import sys
from pathlib import Path

from cli import HelpFormatter, Parser, UserError, run

URL = "https://registry.npmjs.org/emoji-datasource-google/-/emoji-datasource-google-16.0.0.tgz"
SHA256 = "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
LICENSE = """Noto colour emoji, 64x64, from the npm package emoji-datasource-google 16.0.0
({url}, sha256 {sha256}).
Images: Google Noto Emoji, Apache License 2.0 (https://github.com/googlefonts/noto-emoji/blob/main/LICENSE).
Names (emoji.json): emoji-data by Cal Henderson, MIT License (https://github.com/iamcal/emoji-data).
Captions were made from the names by get_emoji.py; transparency was flattened onto white.
"""


def make_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("emoji"), help="folder to write the images and captions into")
    p.add_argument("--tarball", type=Path, help="use this emoji-datasource-google .tgz instead of downloading it")
    p.add_argument("--no-skin-tones", action="store_true", help="leave out the skin-tone variants (1,911 images "
                   "instead of 3,786: about half of them recolour the same drawings)")
    return p


if __name__ == "__main__":
    make_parser().parse_args()  # --help and usage errors answer at once

import json
import tarfile

from PIL import Image
from tqdm import tqdm

import checkpoint
import data


def caption(name: str, tones: str = "") -> str:
    """'an emoji of ...' from an emoji.json name ('RED APPLE', 'Japan Flag', 'KEYCAP: *') and a skin-tone key
    ('1F3FD', or '1F3FB-1F3FF' for two people)."""
    name = name.strip()
    if name.endswith(" Flag"):  # country flags are named "Japan Flag"
        text = f"the flag of {name[:-len(' Flag')]}"
    elif name.upper().startswith("KEYCAP"):
        text = "the keycap " + name[len("KEYCAP"):].lstrip(": ")
    else:
        text = name.lower()
        text = ("an " if text[0] in "aeiou" else "a ") + text
    for tone in dict.fromkeys(tones.split("-")) if tones else ():
        text += f", {SKIN_TONES[tone]} skin tone"
    return "an emoji of " + text


def build_folder(tarball: Path, out: Path, skin_tones: bool = True, progress: bool = True) -> int:
    """Write OUT/<image>.png + .txt for every Google emoji in an emoji-datasource-google tarball; returns the count.
    Errors (not such a tarball, a damaged member) are one-line UserErrors."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            if "package/emoji.json" not in members:
                raise UserError(f"{tarball}: no package/emoji.json; not an emoji-datasource-google tarball")
            entries = json.loads(tar.extractfile(members["package/emoji.json"]).read())
            jobs = []  # (image file name, caption)
            for e in entries:
                if e.get("has_img_google"):
                    jobs.append((e["image"], caption(e["name"] or e["short_name"])))
                for tones, v in (e.get("skin_variations") or {}).items() if skin_tones else ():
                    if v.get("has_img_google"):
                        jobs.append((v["image"], caption(e["name"] or e["short_name"], tones)))
            wanted = dict(jobs)
            missing = [image for image in wanted if f"package/img/google/64/{image}" not in members]
            if missing:
                raise UserError(f"{tarball}: emoji.json names {missing[0]}, which the tarball lacks")
            out.mkdir(parents=True, exist_ok=True)
            with tqdm(total=len(wanted), desc="emoji", unit="img", disable=not progress) as bar:
                for member in tar:  # in archive order: a .tgz is one gzip stream, read once
                    image = member.name.rpartition("/")[2]
                    if member.name.startswith("package/img/google/64/") and image in wanted:
                        with Image.open(tar.extractfile(member)) as im:
                            data.to_rgb(im).save(out / image)
                        (out / image).with_suffix(".txt").write_text(wanted[image] + "\n", encoding="utf-8")
                        bar.update(1)
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError) as e:
        raise UserError(f"{tarball}: unreadable ({type(e).__name__}: {e}); delete it and run again") from None
    (out / "LICENSE.txt").write_text(LICENSE.format(url=URL, sha256=SHA256))
    return len(wanted)


def main(argv: list[str] = None) -> int:
    args = make_parser().parse_args(argv)
    tarball = args.tarball
    if tarball is None:
        tarball = checkpoint.cache_dir() / URL.rpartition("/")[2]
        if not tarball.exists():
            print(f"downloading {URL} into {tarball.parent}", file=sys.stderr)
            try:
                checkpoint.download(URL, tarball, sha256=SHA256, check=False)
            except checkpoint.DownloadError as e:
                raise UserError(f"{e}; or download it by hand and pass --tarball FILE") from None
    n = build_folder(tarball, args.out, skin_tones=not args.no_skin_tones)
    print(f"wrote {n} captioned images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
