"""Device decoding (``task.gpu_decode``): the same augmentation as the CPU path, decoded in the training process.

Run here with ``device="cpu"`` (torchvision's libjpeg decoder); on a GPU the same code calls nvjpeg. Every
input is a real JPEG/PNG file written by PIL in tmp_path.

Pixel tolerance. Both paths decode with libjpeg-turbo (the same integer IDCT and chroma upsampling: the
decoded pixels agree bit for bit, checked below where no resize happens) and resample with the same bicubic
kernel (Keys, a = -0.5, widened when shrinking). PIL resizes in 8-bit fixed point and rounds and clips to
0..255 between its horizontal and vertical passes; the device path computes in float and rounds and clips
once at the end. One rounding step is half a level, so the outputs agree to within one grey level (of 255)
except where PIL's intermediate clipping cut an overshoot at a hard edge that the second pass then spreads:
measured over 660,000 pixels of photo-like crops, 86% identical, all but 12 within one level, at most 3,
mean 0.14. The tests therefore ask for: mean < 0.3 levels, fewer than 0.1% of pixels off by more than one
level, none by more than 4. A bigger difference would be a different crop, flip, kernel or colour path.
"""
import io
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from fairseq_mmkd.data import image_device as device_decode
from fairseq_mmkd.data.image_device import EncodedBatch, decode_batch, device_decodable_header, orient
from fairseq_mmkd.data.transforms import IMAGENET_STD, random_resized_crop_box
from fairseq_mmkd.data.image import ImageListDataset

S = 48  # min_short_side 250 px: files with a shorter side of 500 px or more take the CPU path


def _photo(w, h, seed=0, mode="RGB"):
    """Smooth random colour blobs: like a photo, JPEG-compressible, not a flat colour."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1))
    return img.convert(mode)


def _jpeg(path, w, h, seed=0, **save):
    mode = save.pop("mode", "RGB")
    _photo(w, h, seed, mode).save(path, format="JPEG", quality=save.pop("quality", 90), **save)
    return str(path)


def _grey_levels(a, b):
    return ((a - b) * torch.tensor(IMAGENET_STD).view(-1, 3, 1, 1) * 255).abs()


def assert_within_pil_tolerance(x, reference):
    diff = _grey_levels(x, reference)
    assert diff.max() <= 4.0 + 1e-3, diff.amax(dim=(1, 2, 3))
    assert diff.mean() < 0.3
    assert (diff > 1.0 + 1e-3).float().mean() < 1e-3
    assert (diff > 0.5).float().mean() < 0.4  # most pixels agree exactly


def _device_batch(ds, indices):
    samples = [ds[i] for i in indices]
    batch = ds.collater(samples)
    return samples, batch, batch["net_input"]["source"]


@pytest.fixture
def photos(tmp_path):
    """JPEGs of typical shapes that need upsampling and downsampling crops, one progressive, one greyscale."""
    sizes = [(200, 150), (150, 200), (320, 240), (90, 70), (400, 300), (130, 130)]
    paths = [_jpeg(tmp_path / f"p{i}.jpg", w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    paths.append(_jpeg(tmp_path / "progressive.jpg", 180, 120, seed=7, progressive=True))
    paths.append(_jpeg(tmp_path / "grey.jpg", 160, 110, seed=8, mode="L"))
    return paths


def test_device_path_draws_the_cpu_paths_crop_boxes_and_flips(photos):
    ds = ImageListDataset(photos, input_size=S, seed=11, device_decode=True)
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        for i, path in enumerate(photos):
            sample = ds[i]
            generator = torch.Generator().manual_seed(ds.sample_seed(i))  # the CPU path's draws, in its order
            w, h = Image.open(path).size
            box = random_resized_crop_box(w, h, ds.scale, ds.ratio, generator)
            flip = torch.rand(1, generator=generator).item() < 0.5

            assert "jpeg" in sample and sample["num_replaced"] == 0
            assert tuple(sample["box"]) == box and sample["flip"] == flip
    flips = [ds[i]["flip"] for i in range(len(photos)) for ds.seed in range(40)]
    assert 0.35 < np.mean(flips) < 0.65  # both outcomes occur: the draw is live, not a constant


def test_device_crops_match_the_cpu_path_within_one_grey_level(photos):
    cpu = ImageListDataset(photos, input_size=S, seed=3)
    dev = ImageListDataset(photos, input_size=S, seed=3, device_decode=True)
    for epoch in (1, 2, 3):
        cpu.set_epoch(epoch), dev.set_epoch(epoch)
        _, batch, encoded = _device_batch(dev, range(len(photos)))
        assert encoded.num_encoded == len(photos) and len(encoded.ready_positions) == 0

        x, replaced = decode_batch(encoded, "cpu", dev.fallback_crop)
        reference = torch.stack([cpu[i]["source"] for i in range(len(photos))])

        assert replaced == 0 and x.shape == reference.shape == (len(photos), 3, S, S) and x.dtype == torch.float32
        assert_within_pil_tolerance(x, reference)


def test_crop_of_native_size_is_the_decoded_pixels_exactly(tmp_path):
    """No resize: what is left is the JPEG decode itself, which must agree bit for bit with PIL's."""
    path = _jpeg(tmp_path / "x.jpg", 120, 90, seed=2)
    pil = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    encoded = EncodedBatch.collate([{"id": 0, "jpeg": torch.frombuffer(bytearray(open(path, "rb").read()),
                                                                        dtype=torch.uint8),
                                     "box": (10, 20, S, S), "flip": False, "orientation": 1, "path_index": 0}], S)

    x, _ = decode_batch(encoded, "cpu", fallback=None)

    expected = device_decode.normalize(pil[:, 10:10 + S, 20:20 + S].unsqueeze(0))
    assert torch.equal(x, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_before_the_crop_as_pil_does(tmp_path, orientation):
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _jpeg(tmp_path / "o.jpg", 70, 40, seed=orientation, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(path).convert("RGB"))
    stored = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)

    assert torch.equal(orient(stored, orientation), torch.from_numpy(np.array(upright)).permute(2, 0, 1))
    assert device_decodable_header(open(path, "rb").read(), 250, None) == (*upright.size, orientation)


def test_exif_rotated_photo_gets_the_cpu_paths_crop(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    paths = [_jpeg(tmp_path / "r.jpg", 200, 120, seed=4, exif=exif.tobytes())]
    cpu, dev = ImageListDataset(paths, input_size=S, seed=9), ImageListDataset(paths, input_size=S, seed=9,
                                                                                 device_decode=True)
    _, _, encoded = _device_batch(dev, [0])
    x, _ = decode_batch(encoded, "cpu", dev.fallback_crop)

    assert int(encoded.orientations[0]) == 6
    assert_within_pil_tolerance(x, cpu[0]["source"].unsqueeze(0))


def _cmyk(d):
    p = d / "cmyk.jpg"
    _photo(100, 80, 5).convert("CMYK").save(p, quality=90)
    return str(p)


def _png(d):
    p = d / "x.png"
    _photo(100, 80, 6).save(p)
    return str(p)


def _large(d):  # the CPU path would decode it at reduced scale: it keeps that path and its geometry
    return _jpeg(d / "large.jpg", 700, 520, seed=7)


def _trailer_jpeg(d):  # bytes after EOI (camera makers do this): still a complete JPEG for both decoders
    p = d / "trailer.jpg"
    data = open(_jpeg(d / "t0.jpg", 100, 80, seed=8), "rb").read() + b"\0" * 16
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize("build, on_device", [(_cmyk, False), (_png, False), (_large, False), (_trailer_jpeg, True)],
                         ids=["cmyk_jpeg", "png", "large_jpeg", "jpeg_with_trailer"])
def test_files_the_device_cannot_take_keep_the_cpu_path(tmp_path, build, on_device):
    paths = [build(tmp_path)]
    cpu, dev = ImageListDataset(paths, input_size=S, seed=2), ImageListDataset(paths, input_size=S, seed=2,
                                                                                 device_decode=True)
    samples, _, encoded = _device_batch(dev, [0])

    assert ("jpeg" in samples[0]) == on_device and encoded.num_encoded == int(on_device)
    x, _ = decode_batch(encoded, "cpu", dev.fallback_crop)
    if on_device:
        assert_within_pil_tolerance(x, cpu[0]["source"].unsqueeze(0))
    else:
        assert torch.equal(x[0], cpu[0]["source"])  # the CPU path's pixels, normalised on the device


def test_truncated_jpeg_is_replaced_and_counted_as_on_the_cpu_path(tmp_path, caplog):
    full = open(_jpeg(tmp_path / "full.jpg", 200, 150, seed=1), "rb").read()
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(full[: len(full) // 2])
    paths = [str(bad), _jpeg(tmp_path / "good.jpg", 120, 100, seed=2)]
    cpu = ImageListDataset(paths, input_size=S, seed=4, max_bad_fraction=1.0)
    dev = ImageListDataset(paths, input_size=S, seed=4, max_bad_fraction=1.0, device_decode=True)

    with caplog.at_level(logging.WARNING, logger="fairseq_mmkd.data.image"):
        samples, batch, encoded = _device_batch(dev, [0])
    x, replaced = decode_batch(encoded, "cpu", dev.fallback_crop)

    assert samples[0]["num_replaced"] == 1 and batch["num_replaced"] == 1 and replaced == 0
    assert dev.bad_paths == {str(bad)} and any("truncated" in r.getMessage() for r in caplog.records)
    assert_within_pil_tolerance(x, cpu[0]["source"].unsqueeze(0))  # the next image, with sample 0's draws


def test_file_the_device_decoder_rejects_is_decoded_by_pil_or_replaced_and_counted(tmp_path, monkeypatch):
    paths = [_jpeg(tmp_path / f"{i}.jpg", 150 + 10 * i, 120, seed=i) for i in range(3)]
    dev = ImageListDataset(paths, input_size=S, seed=6, max_bad_fraction=1.0, device_decode=True)
    _, batch, encoded = _device_batch(dev, [0, 1, 2])
    real = device_decode._decode_all
    monkeypatch.setattr(device_decode, "_decode_all", lambda b, d: [None, *real(b, d)[1:]])

    # 1. nvjpeg says no, PIL reads it: the same crop as the CPU path, not counted
    x, replaced = decode_batch(encoded, "cpu", dev.fallback_crop)
    cpu_sample = ImageListDataset(paths, input_size=S, seed=6)[0]["source"]
    assert replaced == 0 and torch.equal(x[0], cpu_sample)

    # 2. the file is corrupt for PIL too: replaced by the next readable image with sample 0's draws, counted
    with open(paths[0], "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 64 + b"not a jpeg any more" * 50)
        f.truncate(600)
    x, replaced = decode_batch(encoded, "cpu", dev.fallback_crop)
    expected = ImageListDataset(paths, input_size=S, seed=6, max_bad_fraction=1.0)[0]
    assert replaced == 1 and expected["num_replaced"] == 1 and torch.equal(x[0], expected["source"])
    assert dev.bad_paths == {paths[0]}


def _png_path(photos):
    path = os.path.join(os.path.dirname(photos[0]), "extra.png")
    _photo(90, 90, 99).save(path)
    return path


def _paths_of(ds):
    return [ds.path(i) for i in range(len(ds))]


def test_encoded_batch_survives_dataloader_workers_and_fairseqs_device_move(photos):
    from fairseq import utils

    ds = ImageListDataset(photos + [_png_path(photos)], input_size=S, seed=1, device_decode=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), num_workers=1, collate_fn=ds.collater,
                                         pin_memory=False)
    batch = next(iter(loader))
    moved = utils.apply_to_sample(lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, batch)
    encoded = moved["net_input"]["source"]

    assert isinstance(encoded, EncodedBatch) and encoded is batch["net_input"]["source"]
    assert encoded.num_encoded == len(photos) and encoded.ready_positions.tolist() == [len(photos)]
    x, _ = decode_batch(encoded, "cpu", ds.fallback_crop, dtype=torch.bfloat16)
    x32, _ = decode_batch(encoded, "cpu", ds.fallback_crop)
    reference = torch.stack([ImageListDataset(_paths_of(ds), input_size=S, seed=1)[i]["source"] for i in range(len(ds))])
    assert x.dtype == torch.bfloat16 and torch.equal(x, x32.to(torch.bfloat16))  # as fairseq's bf16 cast would
    assert_within_pil_tolerance(x32[:-1], reference[:-1])
    assert torch.equal(x32[-1], reference[-1])  # the PNG: the worker's CPU crop, normalised here


def test_eval_samples_never_take_the_device_path(photos):
    ds = ImageListDataset(photos, input_size=S, train=False, device_decode=True)
    assert not ds.device_decode and "source" in ds[0]


def test_device_decode_probe_reports_what_is_wrong():
    assert device_decode.device_decode_works("cpu") is None
    assert "meta" in (device_decode.device_decode_works("meta") or "meta")


def test_jpeg_end_check_tells_complete_from_truncated():
    buf = io.BytesIO()
    _photo(64, 48).save(buf, format="JPEG")
    data = buf.getvalue()
    assert device_decode.jpeg_ends_with_eoi(data) and device_decode.jpeg_ends_with_eoi(data + b"\0" * 100)
    assert not device_decode.jpeg_ends_with_eoi(data[:-200])


def test_training_with_device_decode_through_fairseq_hydra_train(tmp_path, tiny_teacher, tiny_cifar):
    """task.gpu_decode=true on CPU: the real trainer decodes each batch in the training process; a truncated
    JPEG and a PNG among the files still take the workers' CPU path, and the bad file is counted. The data
    is a list file, with validation on (fairseq's valid-subset check must not try to list it as a folder)."""
    from conftest import hydra_train, json_log_lines

    folder = tmp_path / "images"
    folder.mkdir()
    paths = [_jpeg(folder / f"{i}.jpg", 60 + 7 * i, 48, seed=i) for i in range(14)]
    paths.append(_png(folder))
    full = open(paths[0], "rb").read()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    paths.append(str(folder / "truncated.jpg"))
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"images/{os.path.basename(p)}\n" for p in paths))

    proc = hydra_train(tmp_path / "ckpt", f"task.data={listing}", f"model.teacher_checkpoint={tiny_teacher}",
                       f"task.cifar10_root={tiny_cifar}", f"task.cifar100_root={tiny_cifar}", "task.gpu_decode=true",
                       "task.max_bad_image_fraction=0.2", "dataset.num_workers=1", "optimization.max_update=12",
                       "dataset.validate_interval_updates=12", "common.log_interval=4")
    text = proc.stdout + proc.stderr
    train, valid = json_log_lines(text, "train_inner"), json_log_lines(text, "valid")

    assert "decoding training JPEGs on cpu (task.gpu_decode=true)" in text
    assert len(train) == 3 and all(np.isfinite(float(r["loss"])) for r in train)
    assert float(train[-1]["loss"]) < float(train[0]["loss"])
    assert sum(float(r.get("bad_images", 0)) for r in train) >= 1  # the truncated file, counted as before
    assert valid and "valid_cifar10_top1" in valid[-1]


def test_gpu_decode_value_is_checked_before_training(tmp_path, tiny_teacher, photo_folder):
    from conftest import hydra_train

    proc = hydra_train(tmp_path / "ckpt", f"task.data={photo_folder}", f"model.teacher_checkpoint={tiny_teacher}",
                       "task.retrieval=false", "task.gpu_decode=maybe", check=False)
    assert proc.returncode != 0
    assert "task.gpu_decode='maybe' must be auto" in proc.stdout + proc.stderr


def test_batched_resize_equals_torch_antialiased_bicubic_per_image(monkeypatch):
    """resize_crops (PIL's coefficients as batched matrix products, flips folded in) against F.interpolate
    one image at a time, for up- and downsampling, odd sizes, and split into several memory chunks."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(20, 31), (48, 48), (97, 61), (160, 120), (33, 200), (7, 9)]
    images = [torch.randint(0, 256, (3, h + 5, w + 3), generator=gen, dtype=torch.uint8) for h, w in shapes]
    boxes = [(2, 1, h, w) for h, w in shapes]
    flips = [i % 2 == 1 for i in range(len(shapes))]
    crops = [img[:, t:t + h, l:l + w] for img, (t, l, h, w) in zip(images, boxes)]
    reference = torch.stack([device_decode.resize_crop(img, box, S, flip)
                             for img, box, flip in zip(images, boxes, flips)])

    for chunk_elements in (2 ** 28, 3 * 100 * 100):
        monkeypatch.setattr(device_decode, "_RESIZE_CHUNK_ELEMENTS", chunk_elements)
        batched = device_decode.resize_crops(crops, S, flips)
        diff = (batched - reference).abs()
        assert diff.max() <= 1.0 and (diff > 0).float().mean() < 0.01  # float rounding at .5 boundaries only


def test_resize_weights_are_pils_coefficients():
    """Rows sum to 1; identity at scale 1; shrinking by 2 spreads each output over 8 inputs (support 2 x 2)."""
    w = device_decode.resize_weights(torch.tensor([48, 96, 24]), 48, 96)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 48))
    torch.testing.assert_close(w[0, :, :48], torch.eye(48), atol=1e-6, rtol=0)
    assert (w[0, :, 48:] == 0).all() and (w[2, :, 24:] == 0).all()
    assert int((w[1, 20] != 0).sum()) == 8
