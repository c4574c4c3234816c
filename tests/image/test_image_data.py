"""Tests of the training-image pipeline: file discovery, robust decoding, data2vec 2.0 augmentation.

Every input is a real file written in its real format (PIL, or hand-written PNG chunks where PIL cannot
write the variant), in pytest's tmp_path.
"""
import logging
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageFilter
from torchvision import transforms as T

from fairseq_mmkd.data import image as image_data
from fairseq_mmkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fairseq_mmkd.data.image import (ImageDataError, ImageListDataset, UnreadableImageError, collate, find_images,
                                     load_rgb, probe_images)

S = 32  # output side used throughout: small keeps the suite fast


# ---------------------------------------------------------------------------------------------- helpers

def _noise(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _solid(path, colour=(200, 100, 50), size=(40, 30), fmt=None):
    Image.new("RGB", size, colour).save(path, format=fmt)
    return str(path)


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png(path, width, height, bit_depth, colour_type, rows: bytes):
    """A PNG written chunk by chunk, for variants PIL cannot save (16-bit RGB, absurd declared sizes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows))
                + _png_chunk(b"IEND", b""))
    return str(path)


def _rgb_at(img, x, y):
    return np.array(img.convert("RGB").getpixel((x, y)), dtype=int)


def _expected_normalised(colour):
    c = torch.tensor(colour, dtype=torch.float32) / 255
    return (c - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


# ------------------------------------------------------------------------------------------- find_images

def test_find_images_walks_imagefolder_tree_sorted_any_case_skipping_hidden(tmp_path):
    root = tmp_path / "train"
    for sub in ("n02/deep", "n01", ".ipynb_checkpoints"):
        (root / sub).mkdir(parents=True)
    wanted = [_solid(root / "n01" / "b.PNG"), _solid(root / "n01" / "a.jpeg"),
              _solid(root / "n02" / "deep" / "c.webp"), _solid(root / "top.JPG")]
    _solid(root / "n01" / "._a.jpeg")  # macOS AppleDouble file: hidden, not an image
    _solid(root / ".ipynb_checkpoints" / "x.png")
    (root / "n01" / "labels.txt").write_text("not an image")
    (root / "n02" / "loop").symlink_to(root, target_is_directory=True)  # a cycle must not recurse forever

    found = find_images(str(root))

    assert found == sorted(os.path.abspath(p) for p in wanted)
    assert find_images(str(root)) == found


def test_find_images_reads_list_file_in_order_relative_to_list_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    a = _solid(tmp_path / "imgs" / "a.png")
    b = _solid(tmp_path / "b.jpg")
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text(f"# training images\n\n../imgs/a.png\t7\n   \n{b}\n# trailing comment\n")

    assert find_images(str(lst)) == [a, b]


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("empty_folder", ".jpg, .jpeg, .png"),
    ("folder_of_text", "notes.txt"),
    ("empty_list", "names no images"),
    ("binary_list", "neither a folder nor a UTF-8 text file"),
    ("single_image", "is a single image"),
])
def test_find_images_rejects_unusable_data_path_naming_path_and_fix(tmp_path, case, expected):
    target = tmp_path / "data"
    if case == "empty_folder":
        (target / "class_a").mkdir(parents=True)
    elif case == "folder_of_text":
        target.mkdir()
        (target / "notes.txt").write_text("x")
    elif case == "empty_list":
        target.write_text("# nothing yet\n\n")
    elif case == "binary_list":
        target.write_bytes(b"\x00\xff\xfe\x00binary")
    elif case == "single_image":
        target = tmp_path / "one.jpg"
        _solid(target)

    with pytest.raises(ImageDataError) as err:
        find_images(str(target))

    assert expected in str(err.value)
    assert str(target) in str(err.value)


# -------------------------------------------------------------------------------- samples and transforms

def test_train_batch_from_imagefolder_has_expected_shapes(tmp_path):
    for i, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        _noise(50 + 10 * i, 40, seed=i).save(tmp_path / cls / f"{i}.jpg")
        _noise(30, 60, seed=10 + i).save(tmp_path / cls / f"{i}.png")
    ds = ImageListDataset(find_images(str(tmp_path)), input_size=S, train=True)

    batch = collate([ds[i] for i in range(len(ds))])

    assert batch["net_input"]["source"].shape == (4, 3, S, S)
    assert batch["net_input"]["source"].dtype == torch.float32
    assert batch["id"].tolist() == [0, 1, 2, 3] and batch["id"].dtype == torch.long
    assert batch["nsamples"] == 4 and batch["num_replaced"] == 0
    assert collate([]) == {}


@pytest.mark.parametrize("train", [True, False])
def test_constant_colour_image_maps_to_imagenet_normalised_values(tmp_path, train):
    colour = (200, 100, 50)
    ds = ImageListDataset([_solid(tmp_path / "c.png", colour, size=(70, 50))], input_size=S, train=train)

    source = ds[0]["source"]

    expected = _expected_normalised(colour).view(3, 1, 1).expand(3, S, S)
    torch.testing.assert_close(source, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(97, 61), (40, 120), (33, 33)])
def test_train_transform_is_bitwise_the_torchvision_data2vec2_pipeline(tmp_path, size):
    path = str(tmp_path / "x.png")
    _noise(*size, seed=3).save(path)
    ds = ImageListDataset([path], input_size=S, train=True, seed=5)
    reference = T.Compose([
        T.RandomResizedCrop(S, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    for epoch in (1, 2, 3, 4):
        ds.set_epoch(epoch)
        torch.manual_seed(ds.sample_seed(0))
        assert torch.equal(ds[0]["source"], reference(Image.open(path).convert("RGB")))


def _eval_reference(size):
    return T.Compose([T.Resize(int(size / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("size", [(130, 90), (90, 130), (36, 36)])
def test_eval_transform_is_bitwise_torchvision_resize_centre_crop(tmp_path, size):
    path = str(tmp_path / "x.png")
    _noise(*size, seed=4).save(path)
    ds = ImageListDataset([path], input_size=S, train=False)

    assert torch.equal(ds[0]["source"], _eval_reference(S)(Image.open(path).convert("RGB")))


def test_shrinking_a_large_image_before_eval_resize_moves_pixels_under_one_grey_level(tmp_path):
    path = str(tmp_path / "large.png")
    _noise(900, 600, seed=5).filter(ImageFilter.GaussianBlur(3)).save(path)
    ds = ImageListDataset([path], input_size=64, train=False)
    assert min(load_rgb(path, ds.min_short_side).size) < 600  # the shrink did happen

    diff = (ds[0]["source"] - _eval_reference(64)(Image.open(path).convert("RGB")))
    grey_levels = diff * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255

    assert grey_levels.abs().mean() < 1.0


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    path = str(tmp_path / "x.jpg")
    _noise(120, 90).save(path)
    paths = [path] * 3
    a, b = ImageListDataset(paths, input_size=S, seed=7), ImageListDataset(paths, input_size=S, seed=7)
    torch.manual_seed(123)  # the global RNG must not matter
    first = a[1]["source"]
    torch.manual_seed(456)

    assert torch.equal(first, b[1]["source"])
    assert not torch.equal(first, a[2]["source"])  # same file, other index
    assert not torch.equal(first, ImageListDataset(paths, input_size=S, seed=8)[1]["source"])
    b.set_epoch(2)
    assert not torch.equal(first, b[1]["source"])
    b.set_epoch(1)
    assert torch.equal(first, b[1]["source"])


def test_persistent_dataloader_workers_follow_set_epoch(tmp_path):
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        _noise(60, 45, seed=i).save(paths[-1])
    ds = ImageListDataset(paths, input_size=S, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True,
                                         collate_fn=collate)
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        in_workers = torch.cat([b["net_input"]["source"] for b in loader])
        in_process = torch.stack([ds[i]["source"] for i in range(4)])
        assert torch.equal(in_workers, in_process), f"epoch {epoch}"


# -------------------------------------------------------------------------------------- bad-input matrix

def _zero_bytes(d, _):
    p = d / "empty.jpg"
    p.write_bytes(b"")
    return str(p)


def _truncated_jpeg(d, _):
    p = d / "truncated.jpg"
    _noise(64, 64).save(p, quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 6 // 10])
    return str(p)


def _text_named_jpg(d, _):
    p = d / "fake.jpg"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    return str(p)


def _broken_symlink(d, _):
    p = d / "gone.jpg"
    p.symlink_to(d / "does_not_exist.jpg")
    return str(p)


def _permission_denied_chmod(d, _):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading (simulated row covers it)")
    p = _solid(d / "locked.jpg", fmt="JPEG")
    os.chmod(p, 0)
    return p


def _permission_denied_simulated(d, monkeypatch):
    p = _solid(d / "locked.jpg", fmt="JPEG")

    def denying_open(file, *args, **kwargs):
        if os.fspath(file) == p:
            raise PermissionError(13, "Permission denied", p)
        return open(file, *args, **kwargs)

    monkeypatch.setattr(image_data, "open", denying_open, raising=False)
    return p


def _decompression_bomb(d, _):
    # Declares 40,000 x 40,000 (1.6 GP) while the file is tiny; must be refused before decoding.
    return _write_png(d / "bomb.png", 40000, 40000, 8, 0, b"\x00" * 10)


BAD_FILES = {
    "zero_bytes": (_zero_bytes, "cannot identify"),
    "truncated_jpeg": (_truncated_jpeg, "truncated"),
    "text_named_jpg": (_text_named_jpg, "cannot identify"),
    "broken_symlink": (_broken_symlink, "No such file"),
    "permission_denied_chmod": (_permission_denied_chmod, "Permission denied"),
    "permission_denied_simulated": (_permission_denied_simulated, "Permission denied"),
    "decompression_bomb": (_decompression_bomb, "max_pixels"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_unreadable_file_is_replaced_counted_and_logged_once(tmp_path, monkeypatch, caplog, case):
    build, reason = BAD_FILES[case]
    bad = build(tmp_path, monkeypatch)
    good = _solid(tmp_path / "good.png", (10, 20, 30))
    ds = ImageListDataset([bad, good], input_size=S, max_bad_fraction=1.0)

    with pytest.raises(UnreadableImageError, match=reason):
        load_rgb(bad)
    with caplog.at_level(logging.WARNING, logger="fairseq_mmkd.data.image"):
        first, second = ds[0], ds[0]

    assert first["num_replaced"] == 1 and first["id"] == 0
    torch.testing.assert_close(first["source"], _expected_normalised((10, 20, 30)).view(3, 1, 1).expand(3, S, S),
                               atol=1e-6, rtol=0)
    assert torch.equal(first["source"], second["source"])
    assert ds.bad_paths == {bad} and ds.num_bad == 2
    assert sum(bad in r.getMessage() for r in caplog.records) == 1
    assert collate([first, ds[1]])["num_replaced"] == 1


def _cmyk_jpeg(d):
    p = d / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)
    return p, lambda img: np.abs(_rgb_at(img, 8, 8) - (255, 0, 0)).max() <= 8


def _png_named_jpg(d):
    p = d / "really_png.jpg"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(p, format="PNG")
    return p, lambda img: tuple(_rgb_at(img, 0, 0)) == (1, 2, 3)


def _sixteen_bit_gray_png(d):
    p = d / "gray16.png"
    Image.fromarray(np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16)).save(p)
    return p, lambda img: [img.getpixel((x, 0))[0] for x in range(4)] == [0, 100, 255, 128]


def _sixteen_bit_rgb_png(d):
    pixels = np.array([[[65535, 0, 257 * 7], [32768, 65535, 0]]], dtype=">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter byte 0 per row
    p = _write_png(d / "rgb16.png", 2, 1, 16, 2, rows)
    return p, lambda img: (tuple(_rgb_at(img, 0, 0)) == (255, 0, 7) and tuple(_rgb_at(img, 1, 0)) == (128, 255, 0))


def _int32_tiff_in_16_bit_range(d):
    p = d / "int32.tif"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32)).save(p)
    return p, lambda img: [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def _float_tiff(d):
    p = d / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(p)
    return p, lambda img: [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def _palette_png(d):
    p = d / "palette.png"
    img = Image.new("P", (4, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 1, 0, 1])
    img.save(p)
    return p, lambda img: tuple(_rgb_at(img, 0, 0)) == (255, 0, 0) and tuple(_rgb_at(img, 1, 0)) == (0, 0, 255)


def _palette_png_with_transparency(d):
    p = d / "palette_transparent.png"
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.putdata([0, 1])
    img.save(p, transparency=0)  # index 0 (black) is transparent
    return p, lambda img: tuple(_rgb_at(img, 0, 0)) == (255, 255, 255) and tuple(_rgb_at(img, 1, 0)) == (0, 200, 0)


def _rgba_png(d):
    p = d / "rgba.png"
    Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8)).save(p)
    return p, lambda img: (tuple(_rgb_at(img, 0, 0)) == (255, 255, 255) and tuple(_rgb_at(img, 1, 0)) == (255, 0, 0)
                           and abs(_rgb_at(img, 2, 0)[0] - 127) <= 1)


def _la_png(d):
    p = d / "la.png"
    Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), mode="LA").save(p)
    return p, lambda img: tuple(_rgb_at(img, 0, 0)) == (50, 50, 50) and tuple(_rgb_at(img, 1, 0)) == (255, 255, 255)


def _grayscale_jpeg(d):
    p = d / "gray.jpg"
    Image.new("L", (16, 16), 90).save(p, quality=95)
    return p, lambda img: np.abs(_rgb_at(img, 8, 8) - 90).max() <= 2


def _bilevel_png(d):
    p = d / "bw.png"
    Image.new("1", (4, 4), 1).save(p)
    return p, lambda img: tuple(_rgb_at(img, 1, 1)) == (255, 255, 255)


def _animated_gif(d):
    p = d / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return p, lambda img: tuple(_rgb_at(img, 4, 4)) == (255, 0, 0)


def _exif_rotated_jpeg(d):
    # Stored 40 wide x 20 high, red left half, blue right half; orientation 6 = "rotate 90 clockwise to view",
    # so the upright image is 20 x 40 with red on top.
    p = d / "rotated.jpg"
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(p, exif=exif.tobytes(), quality=95)
    return p, lambda img: (img.size == (20, 40) and np.abs(_rgb_at(img, 10, 5) - (255, 0, 0)).max() <= 10
                           and np.abs(_rgb_at(img, 10, 35) - (0, 0, 255)).max() <= 10)


def _one_pixel_png(d):
    p = d / "dot.png"
    Image.new("RGB", (1, 1), (9, 8, 7)).save(p)
    return p, lambda img: img.size == (1, 1) and tuple(_rgb_at(img, 0, 0)) == (9, 8, 7)


CONVERTIBLE_FILES = {f.__name__.lstrip("_"): f for f in (
    _cmyk_jpeg, _png_named_jpg, _sixteen_bit_gray_png, _sixteen_bit_rgb_png, _int32_tiff_in_16_bit_range,
    _float_tiff, _palette_png, _palette_png_with_transparency, _rgba_png, _la_png, _grayscale_jpeg, _bilevel_png,
    _animated_gif, _exif_rotated_jpeg, _one_pixel_png)}


@pytest.mark.parametrize("case", list(CONVERTIBLE_FILES))
def test_unusual_but_valid_image_is_converted_to_upright_8_bit_rgb(tmp_path, case):
    path, pixels_are_right = CONVERTIBLE_FILES[case](tmp_path)

    img = load_rgb(str(path))
    sample = ImageListDataset([str(path)], input_size=S, max_bad_fraction=0.0)[0]

    assert img.mode == "RGB"
    assert pixels_are_right(img), np.array(img)[:2, :4].tolist()
    assert sample["source"].shape == (3, S, S) and sample["num_replaced"] == 0
    assert torch.isfinite(sample["source"]).all()


def test_exif_orientation_decides_what_the_eval_crop_sees(tmp_path):
    path, _ = _exif_rotated_jpeg(tmp_path)
    source = ImageListDataset([str(path)], input_size=S, train=False)[0]["source"]
    red, blue = _expected_normalised((255, 0, 0)), _expected_normalised((0, 0, 255))
    top, bottom = source[:, 2, S // 2], source[:, -3, S // 2]

    assert (top - red).abs().max() < 0.2 and (bottom - blue).abs().max() < 0.2


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    """A 10,000 x 10,000 JPEG (100 MP, above PIL's 89 MP warning limit), encoded in a child process so the
    300 MB it takes to build never counts against this one."""
    path = str(tmp_path_factory.mktemp("huge") / "huge.jpg")
    subprocess.run([sys.executable, "-c", "import sys; from PIL import Image; "
                    "Image.new('RGB', (10000, 10000), (30, 140, 220)).save(sys.argv[1], quality=60)", path],
                   check=True)
    return path


def test_huge_jpeg_is_decoded_at_reduced_scale_and_loads(huge_jpeg, monkeypatch):
    decoded_sizes = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    ds = ImageListDataset([huge_jpeg], input_size=224)
    limit_before = Image.MAX_IMAGE_PIXELS

    sample = ds[0]

    assert set(decoded_sizes) == {(1250, 1250)}  # DCT scale 1/8: 4.7 MB of pixels instead of 300 MB
    assert min(load_rgb(huge_jpeg, ds.min_short_side).size) >= ds.min_short_side
    assert sample["source"].shape == (3, 224, 224) and sample["num_replaced"] == 0
    torch.testing.assert_close(sample["source"][:, 112, 112], _expected_normalised((30, 140, 220)), atol=0.1, rtol=0)
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_large_png_is_reduced_to_the_size_the_crop_needs(tmp_path):
    path = str(tmp_path / "wide.png")
    Image.new("RGB", (3000, 2000), (1, 2, 3)).save(path, compress_level=1)

    img = load_rgb(path, min_short_side=600)

    assert img.size == (1000, 666) or img.size == (1000, 667)


def test_pil_global_flags_are_left_as_the_user_set_them(tmp_path):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    ds = ImageListDataset([_truncated_jpeg(tmp_path, None), _solid(tmp_path / "ok.png")], input_size=S,
                          max_bad_fraction=1.0)
    ds[0]
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


# ------------------------------------------------------------------------------------ bad-fraction limit

def test_more_unreadable_images_than_max_bad_fraction_stops_with_clear_error(tmp_path):
    paths = []
    for i in range(20):
        p = tmp_path / f"{i:02d}.jpg"
        if i % 2:
            p.write_bytes(b"")
        else:
            _solid(p, fmt="PNG", size=(8, 8))
        paths.append(str(p))
    ds = ImageListDataset(paths, input_size=S, max_bad_fraction=0.1)

    with pytest.raises(ImageDataError) as err:
        for i in range(len(ds)):
            ds[i]

    message = str(err.value)
    assert "max_bad_fraction=0.1" in message and paths[1] in message
    assert "Remove or re-encode" in message


def test_rare_unreadable_images_do_not_stop_training_over_epochs(tmp_path):
    paths = [_solid(tmp_path / f"{i:03d}.png", size=(4, 4)) for i in range(300)]
    for bad in (0, 60):  # 2 of 300 (under 1%), but 2 of the first 61 loads: early noise must not count
        (tmp_path / f"{bad:03d}.png").write_bytes(b"")
    ds = ImageListDataset(paths, input_size=8, max_bad_fraction=0.01)

    replaced = 0
    for epoch in (1, 2):  # the same bad files met again are not new bad files
        ds.set_epoch(epoch)
        replaced += sum(ds[i]["num_replaced"] for i in range(len(ds)))

    assert replaced == 4 and ds.bad_paths == {paths[0], paths[60]}


# ------------------------------------------------------------------------------------------------ probe

def test_probe_fails_fast_on_a_folder_of_non_images(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.jpg").write_text("placeholder")
    with pytest.raises(ImageDataError, match="5 of 5 probed images cannot be decoded"):
        probe_images(find_images(str(tmp_path)))


def test_probe_passes_real_images_and_reports_a_stray_bad_one(tmp_path):
    paths = [_solid(tmp_path / f"{i}.png") for i in range(9)]
    (tmp_path / "4.png").write_bytes(b"")

    failures = probe_images(paths, n=9)

    assert [p for p, _ in failures] == [paths[4]]
