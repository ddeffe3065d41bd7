"""Probe sets: ImageFolder and tensor files, channels, normalisation, subsets, bad inputs."""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import model_audit.io.imagefolder as imagefolder_mod
import model_audit.io.tensorfile as tensorfile_mod
from conftest import snapshot, write_tensor_probe, png_declaring
from model_audit.errors import AuditError, ProbeError
from model_audit.io.probe import (
    NORMALIZATIONS, BatchCache, ImageFolderProbe, TensorFileProbe, open_probe, parse_normalize,
    parse_resize, stratified_positions)

# ------------------------------------------------------------------------------------------
# helpers


def luma(r: int, g: int, b: int) -> int:
    """PIL's RGB -> L conversion (ITU-R 601-2, fixed point)."""
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def save_image(path: Path, mode: str = "RGB", color=(255, 0, 128), size=(6, 4), **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def make_folder(root: Path, spec) -> Path:
    """spec: {class: [(name, mode, color), ...]}; size 6x4 (WxH)."""
    for cls, images in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name, mode, color in images:
            save_image(root / cls / name, mode, color)
    return root




def load_all(probe, **kwargs):
    return probe.load(list(range(len(probe))), **kwargs)


# ------------------------------------------------------------------------------------------
# ImageFolder


_MODES = [
    ("RGB", (255, 0, 128), (255, 0, 128)),
    ("L", 100, (100, 100, 100)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),      # alpha dropped, even fully transparent
    ("RGBA", (200, 150, 100, 128), (200, 150, 100)),
    ("P", None, (200, 100, 50)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("1", 1, (255, 255, 255)),
    ("LA", (60, 10), (60, 60, 60)),
]
_FORMATS = [(".png", 0.0), (".jpg", 3 / 255), (".JPEG", 3 / 255)]
_SAVABLE = {".png": {"RGB", "L", "RGBA", "P", "1", "LA"}, ".jpg": {"RGB", "L", "CMYK", "1"}}


@pytest.mark.parametrize("suffix,tol,mode,color,rgb", [
    (suffix, tol, *m) for suffix, tol in _FORMATS for m in _MODES
    if m[0] in _SAVABLE[suffix.lower().replace(".jpeg", ".jpg")]])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_modes_and_channels(tmp_path, suffix, tol, mode, color, rgb, channels):
    path = tmp_path / "probe" / "cls" / f"img{suffix}"
    path.parent.mkdir(parents=True)
    if mode == "P":
        img = Image.new("P", (6, 4), 0)
        img.putpalette([200, 100, 50, 1, 2, 3] + [0] * (256 * 3 - 6))
        img.info["transparency"] = 0  # a transparent palette entry: goes through RGBA
        img.save(path)
    else:
        Image.new(mode, (6, 4), color).save(path)
    snap = snapshot(tmp_path / "probe")
    probe = open_probe(tmp_path / "probe", channels=channels, normalize="none")
    x = load_all(probe)
    assert x.shape == (1, channels, 4, 6) and x.dtype == torch.float32
    if channels == 3:
        expected = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) / 255
    else:
        expected = torch.full((1, 1, 1, 1), float(luma(*rgb)) / 255)
    torch.testing.assert_close(x, expected.expand_as(x), atol=tol + 1e-6, rtol=0)
    assert snapshot(tmp_path / "probe") == snap


def test_sixteen_bit_png_refused(tmp_path):
    save_image(tmp_path / "p" / "c" / "deep.png", "I;16", 1000)
    probe = open_probe(tmp_path / "p", normalize="none")
    with pytest.raises(ProbeError, match=r"deep\.png.*16/32-bit"):
        load_all(probe)


def test_known_colour_normalised(tmp_path):
    make_folder(tmp_path, {"a": [("x.png", "RGB", (255, 0, 128))]})
    x = load_all(open_probe(tmp_path, normalize="cifar10"))
    mean, std = NORMALIZATIONS["cifar10"]
    for c, v in enumerate((255, 0, 128)):
        torch.testing.assert_close(x[0, c], torch.full((4, 6), (v / 255 - mean[c]) / std[c]))
    # normalized=False gives the [0, 1] values, whatever the normalisation.
    raw = open_probe(tmp_path, normalize="imagenet").load([0], normalized=False)
    torch.testing.assert_close(raw[0, :, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))
    # One mean/std for every channel, and one per channel.
    y = load_all(open_probe(tmp_path, normalize="0.5,0.25"))
    torch.testing.assert_close(y[0, :, 0, 0], (torch.tensor([1.0, 0.0, 128 / 255]) - 0.5) / 0.25)
    z = load_all(open_probe(tmp_path, normalize="0.1,0.2,0.3,0.5,0.5,0.25"))
    torch.testing.assert_close(
        z[0, :, 0, 0], (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor([0.1, 0.2, 0.3]))
        / torch.tensor([0.5, 0.5, 0.25]))


def test_per_channel_normalisation_must_fit_channels(tmp_path):
    make_folder(tmp_path, {"a": [("x.png", "L", 7)]})
    probe = open_probe(tmp_path, channels=1, normalize="cifar10")
    with pytest.raises(ProbeError, match="3 channel values but the images have 1 channels"):
        load_all(probe)


def test_labels_from_sorted_folder_names_and_mixed_formats(tmp_path):
    colors = {"zebra": (250, 0, 0), "ant": (0, 250, 0), "Moth": (0, 0, 250), "bee": (9, 9, 9)}
    for cls, color in colors.items():
        save_image(tmp_path / cls / "1.png", "RGB", color)
        save_image(tmp_path / cls / "2.jpg", "RGB", color, quality=95)
        save_image(tmp_path / cls / "sub" / "3.jpeg", "RGB", color, quality=95)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "ant" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / ".cache").mkdir()
    save_image(tmp_path / ".cache" / "x.png")
    (tmp_path / "README.md").write_text("top-level files are not classes")
    snap = snapshot(tmp_path)

    probe = open_probe(tmp_path, normalize="none")
    assert isinstance(probe, ImageFolderProbe) and probe.kind == "imagefolder"
    assert probe.classes == ("Moth", "ant", "bee", "zebra")
    assert probe.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert probe.class_counts() == [3, 3, 3, 3]
    assert [p.name for p in probe.files[:3]] == ["1.png", "2.jpg", "3.jpeg"]
    assert probe.ignored == [str(tmp_path / "ant" / "notes.txt")]
    info = probe.describe()
    assert info["n"] == 12 and info["ignored_files"] == 1 and info["classes"] == list(probe.classes)
    x = load_all(probe)
    for i, label in enumerate(probe.labels.tolist()):
        want = torch.tensor(colors[probe.classes[label]], dtype=torch.float32) / 255
        torch.testing.assert_close(x[i, :, 2, 3], want, atol=4 / 255, rtol=0)
    assert snapshot(tmp_path) == snap


def test_batches_stream(tmp_path, monkeypatch):
    make_folder(tmp_path, {c: [(f"{i}.png", "RGB", (i * 20, 0, 0)) for i in range(n)]
                           for c, n in (("a", 3), ("b", 2), ("c", 2))})
    probe = open_probe(tmp_path, normalize="none")
    probe.workers = 0  # decoded in this process, where the count below sees it
    decoded = []
    original = ImageFolderProbe._decode

    def counting(self, path):
        decoded.append(path.name)
        return original(self, path)

    monkeypatch.setattr(ImageFolderProbe, "_decode", counting)
    gen = probe.batches(3)
    assert decoded == []
    positions, x, y = next(gen)
    assert len(decoded) == 3  # only the first batch is decoded
    assert positions == [0, 1, 2] and x.shape == (3, 3, 4, 6) and y.tolist() == [0, 0, 0]
    rest = list(gen)
    assert [b[0] for b in rest] == [[3, 4, 5], [6]]
    assert [tuple(b[1].shape) for b in rest] == [(3, 3, 4, 6), (1, 3, 4, 6)]
    assert [b[2].tolist() for b in rest] == [[1, 1, 2], [2]]
    assert len(decoded) == 7
    # Given positions, in the given order.
    pos, x, y = next(probe.batches(10, positions=[6, 0]))
    assert pos == [6, 0] and y.tolist() == [2, 0]
    torch.testing.assert_close(x[1, 0], torch.zeros(4, 6))
    with pytest.raises(ProbeError, match="batch size must be >= 1"):
        next(probe.batches(0))


def test_mixed_sizes_need_resize(tmp_path):
    save_image(tmp_path / "a" / "1.png", size=(8, 8))
    save_image(tmp_path / "a" / "2.png", size=(10, 6))
    save_image(tmp_path / "b" / "3.png", size=(8, 8))
    snap = snapshot(tmp_path)
    probe = open_probe(tmp_path)
    with pytest.raises(ProbeError) as err:
        load_all(probe)
    msg = str(err.value)
    assert "2.png" in msg and "10x6" in msg and "8x8" in msg and "--resize" in msg
    # Also when the different image is in a later batch.
    with pytest.raises(ProbeError, match="--resize"):
        list(open_probe(tmp_path).batches(1))

    resized = open_probe(tmp_path, resize="16", normalize="none")
    assert load_all(resized).shape == (3, 3, 16, 16)
    x = load_all(resized)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    torch.testing.assert_close(x[:, :, 8, 8], torch.tensor([[1.0, 0.0, 128 / 255]] * 3),
                               atol=1 / 255, rtol=0)
    assert load_all(open_probe(tmp_path, resize="12x20")).shape == (3, 3, 12, 20)
    assert resized.describe()["resize"] == [16, 16]
    assert snapshot(tmp_path) == snap


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), ("16", (16, 16)),
                                            ("12x20", (12, 20)), (" 8X4 ", (8, 4))])
def test_parse_resize(value, expected):
    assert parse_resize(value) == expected


@pytest.mark.parametrize("value", ["0", "abc", "16x", "1x2x3", "-4", "4x0"])
def test_parse_resize_invalid(value):
    with pytest.raises(ProbeError, match="invalid resize .*give N or HxW"):
        parse_resize(value)


# ------------------------------------------------------------------------------------------
# tensor files


def test_tensor_probe_uint8(tmp_path):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 4, 5), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)
    path = write_tensor_probe(tmp_path / "p.safetensors", images, labels, classes=["a", "b", "c"])
    snap = snapshot(tmp_path)
    probe = open_probe(path, channels=1, normalize="none")
    assert isinstance(probe, TensorFileProbe) and probe.kind == "tensors"
    assert probe.classes == ("a", "b", "c")
    assert probe.labels.dtype == torch.int64 and probe.labels.tolist() == labels.tolist()
    x = load_all(probe)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, images.float() / 255)
    # 1 -> 3 channels by repetition.
    x3 = load_all(open_probe(path, channels=3, normalize="none"))
    assert x3.shape == (6, 3, 4, 5)
    torch.testing.assert_close(x3, (images.float() / 255).expand(-1, 3, -1, -1))
    # Non-contiguous, unordered positions.
    probe = open_probe(path, channels=1, normalize="0.5,0.5")
    torch.testing.assert_close(probe.load([4, 1]), (images[[4, 1]].float() / 255 - 0.5) / 0.5)
    batches = list(probe.batches(4))
    assert [b[0] for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert [tuple(b[1].shape) for b in batches] == [(4, 1, 4, 5), (2, 1, 4, 5)]
    assert snapshot(tmp_path) == snap


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_tensor_probe_float(tmp_path, dtype):
    torch.manual_seed(1)
    images = torch.rand(4, 3, 3, 3).to(dtype)
    path = write_tensor_probe(tmp_path / "f.safetensors", images, torch.tensor([1, 0, 1, 0]))
    probe = open_probe(path, channels=3, normalize="none")
    assert probe.classes == ("0", "1")
    torch.testing.assert_close(load_all(probe), images.float())
    # 3 -> 1 channel by luma.
    gray = load_all(open_probe(path, channels=1, normalize="none"))
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close(gray, (images.float() * w).sum(1, keepdim=True))
    resized = load_all(open_probe(path, channels=3, normalize="none", resize="6"))
    assert resized.shape == (4, 3, 6, 6)


def test_committed_digits_probe(digits_probe):
    probe = open_probe(digits_probe, channels=1, normalize="0.3056,0.3760", num_classes=10)
    assert len(probe) == 540
    assert probe.classes == tuple(str(i) for i in range(10))
    assert sum(probe.class_counts()) == 540
    _, x, y = next(probe.batches(32))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)


@pytest.mark.parametrize("images,labels,words", [
    (torch.zeros(4, 5, 5, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
     "images must be 4-D (N,C,H,W), got shape [4, 5, 5]"),
    (torch.zeros(4, 1, 1, 5, 5, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), "must be 4-D"),
    (torch.zeros(4, 4, 5, 5, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
     "images have 4 channels"),
    (torch.zeros(4, 2, 5, 5, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
     "images have 2 channels"),
    (torch.zeros(4, 1, 5, 5, dtype=torch.uint8), torch.zeros(3, dtype=torch.long),
     "labels must have shape (4,) to match the images, got [3]"),
    (torch.zeros(4, 1, 5, 5, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.long),
     "labels must have shape (4,)"),
    (torch.zeros(4, 1, 5, 5, dtype=torch.uint8), torch.tensor([0, 1, -1, 2]),
     "labels must be >= 0, found -1"),
    (torch.zeros(4, 1, 5, 5, dtype=torch.uint8), torch.zeros(4, dtype=torch.float32),
     "labels must be integers, got F32"),
    (torch.zeros(4, 1, 5, 5, dtype=torch.int32), torch.zeros(4, dtype=torch.long),
     "images must be uint8 or float, got I32"),
    (torch.zeros(0, 1, 5, 5, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
     "holds no images"),
])
def test_tensor_probe_invalid(tmp_path, images, labels, words):
    path = write_tensor_probe(tmp_path / "bad.safetensors", images, labels)
    snap = snapshot(tmp_path)
    with pytest.raises(ProbeError) as err:
        open_probe(path)
    assert str(path) in str(err.value) and words in str(err.value)
    assert snapshot(tmp_path) == snap


@pytest.mark.parametrize("present", [["images"], ["labels"], ["pixels", "targets"]])
def test_tensor_probe_missing_tensor(tmp_path, present):
    tensors = {name: torch.zeros(2, 1, 3, 3) for name in present}
    path = tmp_path / "missing.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ProbeError) as err:
        open_probe(path)
    msg = str(err.value)
    missing = "images" if "images" not in present else "labels"
    assert str(path) in msg and f"no {missing!r} tensor" in msg
    assert ", ".join(sorted(present)) in msg and "images (N,C,H,W) and labels (N)" in msg


@pytest.mark.parametrize("classes,words", [
    ("not json", "metadata 'classes' is not JSON"),
    ("[" * 100_000, "metadata 'classes' is not JSON"),
    ('{"a": 1}', "must be a JSON list of strings"),
    ("[1, 2, 3]", "must be a JSON list of strings"),
    ('["a", "b"]', "labels go up to 2 but metadata names only 2 classes"),
])
def test_tensor_probe_bad_classes_metadata(tmp_path, classes, words):
    path = tmp_path / "c.safetensors"
    save_file({"images": torch.zeros(3, 1, 2, 2), "labels": torch.tensor([0, 1, 2])}, str(path),
              metadata={"classes": classes})
    with pytest.raises(ProbeError) as err:
        open_probe(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_tensor_probe_corrupt_file_is_a_probe_error(tmp_path):
    path = write_tensor_probe(tmp_path / "cut.safetensors", torch.zeros(4, 1, 4, 4),
                              torch.zeros(4, dtype=torch.long))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ProbeError, match="is cut short"):
        open_probe(path)
    path.write_bytes(b"\x00\x01")
    with pytest.raises(ProbeError, match="fewer than the 8-byte header length"):
        open_probe(path)


@pytest.mark.parametrize("metadata", [[], "", 0])
def test_tensor_probe_bad_metadata_block(tmp_path, metadata):
    header = {"__metadata__": metadata,
              "images": {"dtype": "U8", "shape": [1, 1, 1, 1], "data_offsets": [0, 1]},
              "labels": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x05\x00")
    with pytest.raises(ProbeError, match="__metadata__ must map strings to strings"):
        open_probe(path, channels=1)


def test_tensor_probe_library_refusal_is_a_probe_error(tmp_path):
    # Passes the header checks, but the safetensors library cannot parse 2**70 as a usize.
    header = {"images": {"dtype": "U8", "shape": [0, 1, 2 ** 70, 4], "data_offsets": [0, 0]},
              "labels": {"dtype": "I64", "shape": [0], "data_offsets": [0, 0]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "wide.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ProbeError) as err:
        open_probe(path, channels=1)
    assert str(path) in str(err.value) and "cannot read the labels" in str(err.value)


def test_tensor_probe_reads_only_the_requested_images(tmp_path, monkeypatch):
    import safetensors

    n = 200
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2)
    path = write_tensor_probe(tmp_path / "big.safetensors", images, torch.arange(n) % 4)
    probe = open_probe(path, channels=1, normalize="none")
    read = []
    real_open = safetensors.safe_open

    class SliceSpy:
        def __init__(self, inner):
            self.inner = inner

        def __getitem__(self, item):
            out = self.inner[item]
            read.append(int(out.shape[0]))
            return out

    class HandleSpy:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.fh = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_slice(self, name):
            return SliceSpy(self.fh.get_slice(name))

        def get_tensor(self, name):
            return self.fh.get_tensor(name)

    monkeypatch.setattr(tensorfile_mod, "safe_open", HandleSpy)
    positions = [199, 0, 100, 101, 102, 5]
    x = probe.load(positions)
    assert (x.flatten(1)[:, 0] * 255).round().long().tolist() == positions
    assert sum(read) == len(positions)  # not the 200 images from 0 to 199
    read.clear()
    sub = open_probe(path, channels=1, limit=20, seed=0)
    batches = list(sub.batches(5))
    assert sum(read) == 20 and len(batches) == 4
    for pos, xb, _ in batches:
        assert (xb.flatten(1)[:, 0] * 255).round().long().tolist() == sub.indices[pos].tolist()


def test_not_a_probe_file(tmp_path):
    path = tmp_path / "probe.pt"
    torch.save({"images": torch.zeros(1)}, path)
    with pytest.raises(ProbeError, match="neither a directory, a .safetensors tensor file nor a .csv or .parquet manifest"):
        open_probe(path)


# ------------------------------------------------------------------------------------------
# normalisation


@pytest.mark.parametrize("spec,mean,std,name", [
    ("cifar10", NORMALIZATIONS["cifar10"][0], NORMALIZATIONS["cifar10"][1], "cifar10"),
    (" ImageNet ", NORMALIZATIONS["imagenet"][0], NORMALIZATIONS["imagenet"][1], "imagenet"),
    ("none", (0.0,), (1.0,), "none"),
    (None, (0.0,), (1.0,), "none"),
    ("", (0.0,), (1.0,), "none"),
    ("0.5,0.25", (0.5,), (0.25,), "0.5,0.25"),
    ("0.49, 0.48, 0.45, 0.25, 0.24, 0.26", (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), None),
])
def test_parse_normalize(spec, mean, std, name):
    norm = parse_normalize(spec)
    assert norm.mean == pytest.approx(mean) and norm.std == pytest.approx(std)
    if name is not None:
        assert norm.spec == name
    x = torch.rand(2, 3, 2, 2)
    m = torch.tensor(mean * (3 // len(mean))).view(1, -1, 1, 1)
    s = torch.tensor(std * (3 // len(std))).view(1, -1, 1, 1)
    torch.testing.assert_close(norm.apply(x), (x - m) / s)


@pytest.mark.parametrize("spec", ["abc", "0.5", "1,0", "0.5,-1", "1,2,3", "nan,1", "0.5,inf",
                                  "cifar", "0.5;0.25", "1,2,3,4,5"])
def test_parse_normalize_invalid(spec):
    with pytest.raises(ProbeError) as err:
        parse_normalize(spec)
    msg = str(err.value)
    assert f"invalid normalisation {spec!r}" in msg
    assert "cifar10, imagenet, none" in msg and "MEAN,STD" in msg
    if spec in ("1,0", "0.5,-1"):
        assert "std must be > 0" in msg


def test_invalid_normalize_through_open_probe(tmp_path):
    with pytest.raises(ProbeError, match="invalid normalisation 'bogus'"):
        open_probe(tmp_path, normalize="bogus")


# ------------------------------------------------------------------------------------------
# limit


def _imbalanced(tmp_path, counts=(37, 23, 11, 4)):
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))]
    # Each image carries its own index, so the loaded images can be checked.
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1) / 1000
    return write_tensor_probe(tmp_path / "imb.safetensors", images, labels), labels


@pytest.mark.parametrize("limit", [1, 7, 17, 40, 74])
def test_limit_is_stratified(tmp_path, limit):
    path, labels = _imbalanced(tmp_path)
    counts = Counter(labels.tolist())
    n = len(labels)
    probe = open_probe(path, channels=1, normalize="none", limit=limit, seed=3)
    assert len(probe) == limit
    got = Counter(probe.labels.tolist())
    for c, total in counts.items():
        assert abs(got.get(c, 0) - limit * total / n) < 1, (c, got)
    positions = probe.indices.tolist()
    assert positions == sorted(positions) and len(set(positions)) == limit
    # The subset's labels and images are those of the chosen source positions.
    assert probe.labels.tolist() == labels[probe.indices].tolist()
    x = load_all(probe)
    torch.testing.assert_close(x.flatten(), probe.indices.float() / 1000)
    assert [b[2].tolist() for b in probe.batches(1000)] == [probe.labels.tolist()]


def test_limit_is_seeded(tmp_path):
    path, labels = _imbalanced(tmp_path)
    a = open_probe(path, channels=1, limit=20, seed=1).indices.tolist()
    b = open_probe(path, channels=1, limit=20, seed=1).indices.tolist()
    c = open_probe(path, channels=1, limit=20, seed=2).indices.tolist()
    assert a == b
    assert a != c
    assert stratified_positions(labels, 20, 1) == a


def test_limit_bounds(tmp_path):
    path, labels = _imbalanced(tmp_path)
    assert len(open_probe(path, channels=1, limit=10_000)) == len(labels)
    assert open_probe(path, channels=1, limit=len(labels)).indices.tolist() == list(range(len(labels)))
    for bad in (0, -3):
        with pytest.raises(ProbeError, match=f"--limit must be >= 1, got {bad}"):
            open_probe(path, channels=1, limit=bad)


def test_limit_on_image_folder_keeps_images_and_labels_together(tmp_path):
    colors = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}
    make_folder(tmp_path, {c: [(f"{i}.png", "RGB", col) for i in range(n)]
                           for (c, col), n in zip(colors.items(), (6, 3, 3))})
    probe = open_probe(tmp_path, normalize="none", limit=4, seed=0)
    assert probe.class_counts() == [2, 1, 1]
    for _, x, y in probe.batches(3):
        for img, label in zip(x, y.tolist()):
            want = torch.tensor(colors["abc"[label]], dtype=torch.float32) / 255
            torch.testing.assert_close(img[:, 0, 0], want)


# ------------------------------------------------------------------------------------------
# fitting the model


def test_labels_beyond_the_head(tmp_path):
    path = write_tensor_probe(tmp_path / "p.safetensors", torch.zeros(3, 1, 2, 2),
                              torch.tensor([0, 4, 2]))
    assert len(open_probe(path, channels=1, num_classes=5)) == 3
    with pytest.raises(ProbeError) as err:
        open_probe(path, channels=1, num_classes=3)
    msg = str(err.value)
    assert str(path) in msg and "labels up to 4" in msg and "has 3 outputs" in msg


def test_image_folder_with_more_classes_than_the_head(tmp_path):
    make_folder(tmp_path, {c: [("x.png", "RGB", (0, 0, 0))] for c in "abcd"})
    with pytest.raises(ProbeError, match=r"labels up to 3 \(4 classes\).*has 2 outputs"):
        open_probe(tmp_path, num_classes=2)


def test_model_classes_remap_by_name(tmp_path):
    make_folder(tmp_path, {"cat": [("1.png", "RGB", (1, 1, 1)), ("2.png", "RGB", (2, 2, 2))],
                           "dog": [("3.png", "RGB", (3, 3, 3))]})
    model_classes = ("airplane", "cat", "bird", "dog")
    probe = open_probe(tmp_path, normalize="none", model_classes=model_classes, num_classes=4)
    assert probe.classes == model_classes
    assert probe.labels.tolist() == [1, 1, 3]
    assert probe.class_counts() == [0, 2, 0, 1]
    _, x, y = next(probe.batches(8))
    assert y.tolist() == [1, 1, 3]
    torch.testing.assert_close(x[:, 0, 0, 0] * 255, torch.tensor([1.0, 2.0, 3.0]))
    # Subsets keep the remapped labels.
    sub = open_probe(tmp_path, model_classes=model_classes, limit=2, seed=0)
    assert sorted(sub.labels.tolist()) == [1, 3]
    # Remapped labels are checked against the head.
    with pytest.raises(ProbeError, match="labels up to 3.*has 3 outputs"):
        open_probe(tmp_path, model_classes=model_classes, num_classes=3)


def test_probe_class_not_among_model_classes(tmp_path):
    make_folder(tmp_path, {"cat": [("1.png", "RGB", (1, 1, 1))],
                           "wolf": [("2.png", "RGB", (2, 2, 2))]})
    snap = snapshot(tmp_path)
    with pytest.raises(ProbeError) as err:
        open_probe(tmp_path, model_classes=("cat", "dog"))
    msg = str(err.value)
    assert "wolf" in msg and "not among the model's classes" in msg and "cat, dog" in msg
    assert snapshot(tmp_path) == snap


# ------------------------------------------------------------------------------------------
# bad inputs: an error naming the problem, and nothing in the probe changed


def _truncated_jpeg(root: Path) -> Path:
    save_image(root / "a" / "ok.png")
    path = root / "b" / "cut.jpg"
    torch.manual_seed(0)
    noise = (torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_an_image(root: Path) -> Path:
    save_image(root / "a" / "ok.png")
    path = root / "b" / "fake.jpg"
    path.parent.mkdir(parents=True)
    path.write_text("<html>this is not a JPEG</html>")
    return path


def _empty_image_file(root: Path) -> Path:
    save_image(root / "a" / "ok.png")
    path = root / "a" / "zero.png"
    path.write_bytes(b"")
    return path


def _bomb_huge(root: Path) -> Path:
    save_image(root / "a" / "ok.png")
    path = root / "a" / "bomb.png"
    path.write_bytes(png_declaring(100_000, 100_000))  # 10 gigapixels, PIL's own error
    return path


def _bomb_warning(root: Path) -> Path:
    save_image(root / "a" / "ok.png")
    path = root / "a" / "bomb.png"
    path.write_bytes(png_declaring(10_000, 10_000))  # above PIL's warning limit
    return path


def _bomb_over_module_limit(root: Path) -> Path:
    save_image(root / "a" / "ok.png")
    path = root / "a" / "bomb.png"
    path.write_bytes(png_declaring(8_000, 8_000))  # 64 Mpx: under PIL's, over the tool's limit
    return path


@pytest.mark.parametrize("make,words", [
    (_truncated_jpeg, "cannot decode image"),
    (_not_an_image, "cannot decode image"),
    (_empty_image_file, "cannot decode image"),
    (_bomb_huge, "decompression bomb"),
    (_bomb_warning, "decompression bomb"),
    (_bomb_over_module_limit, "exceeds the 50000000-pixel limit"),
], ids=["truncated_jpeg", "not_an_image", "empty_file", "bomb_error", "bomb_warning",
        "bomb_module_limit"])
def test_undecodable_images(tmp_path, make, words):
    root = tmp_path / "probe"
    bad = make(root)
    snap = snapshot(root)
    probe = open_probe(root, normalize="none")  # files are only decoded per batch
    assert len(probe) == 2
    with pytest.raises(ProbeError) as err:
        list(probe.batches(8))
    msg = str(err.value)
    assert str(bad) in msg and words in msg
    assert snapshot(root) == snap


def test_decompression_bomb_with_small_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(imagefolder_mod, "MAX_IMAGE_PIXELS", 100)
    root = tmp_path / "probe"
    save_image(root / "a" / "small.png", size=(10, 10))
    save_image(root / "a" / "big.png", size=(11, 10))
    snap = snapshot(root)
    probe = open_probe(root)
    assert [p.name for p in probe.files] == ["big.png", "small.png"]
    probe.load([1])  # exactly at the limit is fine
    with pytest.raises(ProbeError) as err:
        probe.load([0])
    msg = str(err.value)
    assert "big.png" in msg and "11x10 pixels exceeds the 100-pixel limit" in msg
    assert "decompression bomb" in msg
    assert snapshot(root) == snap


def test_empty_directory(tmp_path):
    (tmp_path / "probe").mkdir()
    with pytest.raises(ProbeError) as err:
        open_probe(tmp_path / "probe")
    msg = str(err.value)
    assert str(tmp_path / "probe") in msg and "no class sub-directories" in msg
    assert "<root>/<class>/<image>" in msg
    assert list((tmp_path / "probe").iterdir()) == []


def test_flat_directory_of_images(tmp_path):
    save_image(tmp_path / "1.png")
    snap = snapshot(tmp_path)
    with pytest.raises(ProbeError, match="no class sub-directories"):
        open_probe(tmp_path)
    assert snapshot(tmp_path) == snap


def test_class_folder_without_images(tmp_path):
    save_image(tmp_path / "a" / "1.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("no images here")
    save_image(tmp_path / "c" / "1.png")
    snap = snapshot(tmp_path)
    with pytest.raises(ProbeError) as err:
        open_probe(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "b") in msg and "has no images" in msg and "shift every label" in msg
    assert snapshot(tmp_path) == snap


def test_symlink_outside_the_probe(tmp_path):
    outside = save_image(tmp_path / "elsewhere" / "secret.png")
    root = tmp_path / "probe"
    save_image(root / "a" / "1.png")
    (root / "b").mkdir()
    link = root / "b" / "link.png"
    link.symlink_to(outside)
    snap = snapshot(root)
    outside_snap = snapshot(tmp_path / "elsewhere")
    with pytest.raises(ProbeError) as err:
        open_probe(root)
    msg = str(err.value)
    assert str(link) in msg and "outside the probe directory" in msg and str(outside) in msg
    assert snapshot(root) == snap and snapshot(tmp_path / "elsewhere") == outside_snap


def test_symlinked_class_directory_outside_the_probe(tmp_path):
    save_image(tmp_path / "elsewhere" / "secret.png")
    root = tmp_path / "probe"
    save_image(root / "a" / "1.png")
    (root / "b").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ProbeError, match="outside the probe directory"):
        open_probe(root)


def test_symlink_inside_the_probe_is_fine(tmp_path):
    root = tmp_path / "probe"
    target = save_image(root / "a" / "1.png")
    (root / "b").mkdir()
    (root / "b" / "same.png").symlink_to(target)
    probe = open_probe(root, normalize="none")
    assert probe.labels.tolist() == [0, 1]
    x = load_all(probe)
    torch.testing.assert_close(x[0], x[1])
    # The probe root itself may be reached through a link.
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    assert len(open_probe(alias)) == 2


def test_missing_path(tmp_path):
    with pytest.raises(ProbeError) as err:
        open_probe(tmp_path / "nope")
    msg = str(err.value)
    assert str(tmp_path / "nope") in msg and "does not exist" in msg and "ImageFolder" in msg
    with pytest.raises(ProbeError, match="does not exist"):
        open_probe(tmp_path / "nope.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_probe_errors_are_audit_errors():
    assert issubclass(ProbeError, AuditError)


# ------------------------------------------------------------------------------------------
# BatchCache


def _cache_probe(tmp_path):
    torch.manual_seed(2)
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10) % 3
    path = write_tensor_probe(tmp_path / "c.safetensors", images, labels)
    return open_probe(path, normalize="cifar10"), images, labels


def _collect(cache):
    return [(p, x.clone(), y.clone()) for p, x, y in cache]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (pa, xa, ya), (pb, xb, yb) in zip(a, b):
        assert pa == pb and torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("budget,expected_loads", [(512 << 20, 3), (1, 9)])
def test_batch_cache_repeats(tmp_path, monkeypatch, budget, expected_loads):
    probe, images, labels = _cache_probe(tmp_path)
    positions = [7, 1, 4, 9, 0, 2, 3]
    loads = []
    original = TensorFileProbe._load_raw

    def counting(self, idx):
        loads.append(list(idx))
        return original(self, idx)

    monkeypatch.setattr(TensorFileProbe, "_load_raw", counting)
    cache = BatchCache(probe, positions, batch_size=3, budget_bytes=budget)
    assert len(cache) == 3
    first = _collect(cache)
    second = _collect(cache)
    third = _collect(cache)
    _assert_same_batches(first, second)
    _assert_same_batches(first, third)
    assert [b[0] for b in first] == [[7, 1, 4], [9, 0, 2], [3]]
    assert torch.cat([b[2] for b in first]).tolist() == labels[positions].tolist()
    assert len(loads) == expected_loads  # cached: decoded once; over budget: every time
    direct = probe.load(positions)
    torch.testing.assert_close(torch.cat([b[1] for b in first]), direct)


def test_batch_cache_partial_iteration(tmp_path):
    probe, _, _ = _cache_probe(tmp_path)
    cache = BatchCache(probe, list(range(10)), batch_size=4)
    it = iter(cache)
    next(it)
    del it  # abandoned after one batch
    full = _collect(cache)
    assert [b[0] for b in full] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    _assert_same_batches(full, _collect(cache))


def test_batch_cache_over_image_folder(tmp_path):
    make_folder(tmp_path, {c: [(f"{i}.jpg", "RGB", (i * 30, 10, 200)) for i in range(3)]
                           for c in "ab"})
    probe = open_probe(tmp_path, normalize="imagenet")
    for budget in (1, 1 << 20):
        cache = BatchCache(probe, [5, 0, 3], batch_size=2, budget_bytes=budget)
        _assert_same_batches(_collect(cache), _collect(cache))
