"""get_emoji.py on a small emoji-datasource-google tarball the test builds (offline)."""

import io
import json
import tarfile

import pytest
from PIL import Image

import data
import get_emoji


def make_tarball(path, entries: list[dict], images: list[str]):
    """A .tgz in the npm package's layout: package/emoji.json, package/img/google/64/<image> (RGBA PNGs)."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, payload: bytes):
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        add("emoji.json", json.dumps(entries).encode())
        for i, image in enumerate(images):
            buf = io.BytesIO()
            im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent, with one opaque square
            im.paste((200, 10 * i, 30, 255), (16, 16, 48, 48))
            im.save(buf, format="PNG")
            add(f"img/google/64/{image}", buf.getvalue())


ENTRIES = [
    {"name": "RED APPLE", "short_name": "apple", "image": "1f34e.png", "has_img_google": True},
    {"name": "WOMAN FARMER", "short_name": "female-farmer", "image": "1f469-200d-1f33e.png", "has_img_google": True,
     "skin_variations": {"1F3FD": {"image": "1f469-1f3fd-200d-1f33e.png", "has_img_google": True},
                         "1F3FB-1F3FF": {"image": "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3ff.png",
                                         "has_img_google": True},
                         "1F3FE": {"image": "not-drawn.png", "has_img_google": False}}},
    {"name": "Japan Flag", "short_name": "jp", "image": "1f1ef-1f1f5.png", "has_img_google": True},
    {"name": "KEYCAP: *", "short_name": "keycap_star", "image": "002a-fe0f-20e3.png", "has_img_google": True},
    {"name": "OCTOPUS", "short_name": "octopus", "image": "1f419.png", "has_img_google": False},
]
IMAGES = ["1f34e.png", "1f469-200d-1f33e.png", "1f469-1f3fd-200d-1f33e.png",
          "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3ff.png", "1f1ef-1f1f5.png", "002a-fe0f-20e3.png"]


def test_builds_a_captioned_folder_train_py_reads(tmp_path):
    make_tarball(tmp_path / "e.tgz", ENTRIES, IMAGES)
    n = get_emoji.build_folder(tmp_path / "e.tgz", tmp_path / "out", progress=False)
    items, has_captions = data.find_images(tmp_path / "out")
    captions = {p.name: c for p, c in items}
    assert n == 6 and has_captions and captions == {
        "1f34e.png": "an emoji of a red apple",
        "1f469-200d-1f33e.png": "an emoji of a woman farmer",
        "1f469-1f3fd-200d-1f33e.png": "an emoji of a woman farmer, medium skin tone",
        "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3ff.png": "an emoji of a woman farmer, light skin tone, dark skin tone",
        "1f1ef-1f1f5.png": "an emoji of the flag of Japan",
        "002a-fe0f-20e3.png": "an emoji of the keycap *",
    }
    with Image.open(tmp_path / "out" / "1f34e.png") as im:  # transparency flattened onto white
        assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((32, 32)) == (200, 0, 30)
    assert "Apache" in (tmp_path / "out" / "LICENSE.txt").read_text()
    assert get_emoji.build_folder(tmp_path / "e.tgz", tmp_path / "base", skin_tones=False, progress=False) == 4


def test_captions_use_the_article_of_the_name():
    assert get_emoji.caption("OCTOPUS") == "an emoji of an octopus"
    assert get_emoji.caption("THUMBS UP SIGN", "1F3FF") == "an emoji of a thumbs up sign, dark skin tone"
    assert get_emoji.caption("PEOPLE HOLDING HANDS", "1F3FC-1F3FC") == ("an emoji of a people holding hands, "
                                                                       "medium-light skin tone")


@pytest.mark.parametrize("case", ["not_gzip", "no_json", "missing_image"])
def test_bad_tarballs_are_one_line_errors(tmp_path, case):
    path = tmp_path / "e.tgz"
    if case == "not_gzip":
        path.write_bytes(b"<html>not found</html>")
    elif case == "no_json":
        with tarfile.open(path, "w:gz"):
            pass
    else:
        make_tarball(path, ENTRIES, IMAGES[:-1])
    with pytest.raises(SystemExit) as e:
        get_emoji.build_folder(path, tmp_path / "out", progress=False)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    assert {"not_gzip": "unreadable", "no_json": "no package/emoji.json", "missing_image": "002a-fe0f-20e3.png"}[
        case] in message
