"""Probe formats people already have: a CSV or Parquet manifest, a Hugging Face save_to_disk
directory and a torchvision dataset over files on disk give the answers of the same images in
the committed tensor file; each gets the ImageFolder's treatment of bad input (a missing file,
a label not in the classes, a decode error naming the row, an empty set), on the CLI with
exit 2 and nothing written."""
from __future__ import annotations

import csv
import struct

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, SESSION_THREADS
from model_audit import ProbeError, ScanConfig, scan
from model_audit.cli import cli
from model_audit.errors import EmptyProbeError

MODEL = ROOT / "samples" / "digits-sgd.safetensors"
PROBE = ROOT / "samples" / "digits-probe.safetensors"
N = 60  # the first N probe images: enough errors to scan, seconds to write


@pytest.fixture(scope="module")
def digits():
    t = load_file(PROBE)
    return t["images"][:N], t["labels"][:N]


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """The scan of the same N images from a tensor file (lossless: 8-bit gray PNGs)."""
    from safetensors.torch import save_file
    torch.set_num_threads(SESSION_THREADS)  # made before the per-test thread fixture
    path = tmp_path_factory.mktemp("ref") / "probe.safetensors"
    save_file({"images": digits[0].contiguous(), "labels": digits[1].contiguous()}, str(path),
              metadata={"classes": '["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]'})
    return scan(MODEL, path, ScanConfig(bootstrap=0))


def _pngs(digits, folder):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(digits[0]):
        name = f"img{i:03d}.png"
        Image.fromarray(image[0].numpy(), mode="L").save(folder / name)
        names.append(name)
    return names


def _manifest(digits, tmp_path, rows=None, name="probe.csv"):
    names = _pngs(digits, tmp_path / "images")
    rows = rows if rows is not None else [(f"images/{n}", str(int(y)))
                                          for n, y in zip(names, digits[1])]
    with open(tmp_path / name, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return tmp_path / name


def _same(result, reference):
    assert result.flagged == reference.flagged
    assert [la.score for la in result.layers] == pytest.approx(
        [lb.score for lb in reference.layers], abs=1e-6)
    assert result.evaluation.misclassified == reference.evaluation.misclassified


def test_a_csv_manifest_gives_the_tensor_files_answer(digits, reference, tmp_path):
    _same(scan(MODEL, _manifest(digits, tmp_path), ScanConfig(bootstrap=0)), reference)


def test_a_parquet_manifest_with_named_columns(digits, reference, tmp_path):
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    names = _pngs(digits, tmp_path / "images")
    frame = pandas.DataFrame({"file_name": [f"images/{n}" for n in names],
                              "digit": [str(int(y)) for y in digits[1]]})
    frame.to_parquet(tmp_path / "probe.parquet")
    from model_audit import AuditOptions
    options = AuditOptions(image_column="file_name", label_column="digit")
    _same(scan(MODEL, tmp_path / "probe.parquet", ScanConfig(options=options, bootstrap=0)),
          reference)


def test_a_hugging_face_datasets_directory(digits, reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(),
                                  "digit": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    data = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(x[0].numpy(), mode="L") for x in digits[0]],
         "digit": [int(y) for y in digits[1]]}, features=features)
    datasets.DatasetDict({"train": data.select(range(5)), "test": data}).save_to_disk(
        str(tmp_path / "hf"))
    result = scan(MODEL, tmp_path / "hf", ScanConfig(bootstrap=0))  # the test split, detected
    _same(result, reference)
    assert result.probe.kind == "hf-dataset"


def _mnist(digits, root):
    """The images and labels in MNIST's idx files, as torchvision's MNIST reads them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = digits[0][:, 0].numpy(), digits[1].numpy().astype("uint8")
    for split in ("train", "t10k"):  # torchvision checks that all four files are there
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, len(images), 8, 8) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, len(labels)) + labels.tobytes())


def test_a_torchvision_dataset_on_disk(digits, reference, tmp_path):
    _mnist(digits, tmp_path)
    result = scan(MODEL, f"torchvision:MNIST:{tmp_path}", ScanConfig(bootstrap=0))
    assert result.probe.kind == "torchvision"
    assert result.evaluation.misclassified == reference.evaluation.misclassified
    assert [la.score for la in result.layers] == pytest.approx(
        [lb.score for lb in reference.layers], abs=1e-6)


def _cli(args, tmp_path):
    out = tmp_path / "out"
    run = CliRunner().invoke(cli, ["scan", str(MODEL), "--probe", *args, "--out", str(out)])
    return run, out


@pytest.mark.parametrize("case, message", [
    ("missing", "row 3: the image images/nowhere.png does not exist"),
    ("label", "classes cat are not among the model's classes \\(0, 1, 2"),
    ("decode", "broken.png: cannot decode image"),
    ("empty", "the manifest has no rows"),
    ("column", "no label column \\(it has path, kind\\); name it with --label-column"),
    ("torchvision-files", "MNIST could not be opened under .*nothing is downloaded"),
    ("torchvision-name", "torchvision has no dataset class 'NoSuchSet'"),
])
def test_bad_input_exits_2_and_writes_nothing(digits, tmp_path, case, message):
    if case == "missing":
        probe = _manifest(digits, tmp_path, rows=[("images/img000.png", "1"),
                                                  ("images/nowhere.png", "2")])
    elif case == "label":
        probe = _manifest(digits, tmp_path, rows=[("images/img000.png", "cat"),
                                                  ("images/img001.png", "1")])
    elif case == "decode":
        _pngs(digits, tmp_path / "images")
        (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
        probe = _manifest(digits, tmp_path, rows=[("images/img000.png", "0"),
                                                  ("images/broken.png", "1")])
    elif case == "empty":
        probe = _manifest(digits, tmp_path, rows=[])
    elif case == "column":
        (tmp_path / "p.csv").write_text("path,kind\nimages/img000.png,0\n")
        probe = tmp_path / "p.csv"
    elif case == "torchvision-files":
        probe = f"torchvision:MNIST:{tmp_path / 'empty'}"
    else:
        probe = f"torchvision:NoSuchSet:{tmp_path}"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    run, out = _cli([str(probe)], tmp_path)
    assert run.exit_code == 2, run.output
    assert "Traceback" not in run.output
    import re
    assert re.search(message, run.output), run.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_an_empty_datasets_split_and_a_bad_manifest_from_the_library(tmp_path):
    (tmp_path / "p.csv").write_text("")
    with pytest.raises(EmptyProbeError, match="the manifest is empty"):
        scan(MODEL, tmp_path / "p.csv")
    (tmp_path / "q.txt").write_text("path,label\n")
    with pytest.raises(ProbeError, match="neither a directory"):
        scan(MODEL, tmp_path / "q.txt")


@pytest.mark.parametrize("form", ["csv", "hf", "torchvision"])
def test_fix_repairs_from_each_form_as_from_the_tensor_file(tmp_path, form):
    """The repair data as a CSV manifest of PNGs, a datasets directory or torchvision's MNIST
    files gives the tensor file's repair."""
    from model_audit import FixConfig, fix
    t = load_file(ROOT / "samples" / "digits-train.safetensors")
    train = (t["images"], t["labels"])
    if form == "csv":
        data = _manifest(train, tmp_path / "train")
    elif form == "hf":
        datasets = pytest.importorskip("datasets")
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
            names=[str(i) for i in range(10)])})
        datasets.Dataset.from_dict(
            {"image": [Image.fromarray(x[0].numpy(), mode="L") for x in train[0]],
             "label": [int(y) for y in train[1]]}, features=features).save_to_disk(
                 str(tmp_path / "hf"))
        data = tmp_path / "hf"
    else:
        _mnist(train, tmp_path / "mn")
        data = f"torchvision:MNIST:{tmp_path / 'mn'}"
    config = FixConfig(controls=(), steps=30, write_anyway=True)
    a = fix(MODEL, ROOT / "samples" / "digits-train.safetensors", PROBE,
            tmp_path / "a.safetensors", config)
    b = fix(MODEL, data, PROBE, tmp_path / "b.safetensors", config)
    assert (a.selection.fixed, a.selection.broken) == (b.selection.fixed, b.selection.broken)
    assert a.train_n == b.train_n and b.train_source == str(data)
    sa, sb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)
