"""Hostile and broken inputs: clear errors, nothing lost, nothing executed.

Every case checks the exact behaviour: a message naming the file and the problem, exit code 2
(the gate's 1 where a check fails), no traceback, no output written or changed, no code run.

Already covered elsewhere (not repeated here):

* safetensors header checks on the library API: tests/test_checkpoint.py::
  test_safetensors_header_validation (short/over-long/huge header length, non-UTF-8, non-JSON,
  deep nesting, duplicate names, bad dtype/shape/offsets, overlaps, gaps, trailing bytes, no
  tensors, bad metadata, ``../``, empty and control-character names),
  test_header_length_is_checked_before_reading, test_library_refusal_is_a_checkpoint_error.
* ``.pt`` files on the library API: test_checkpoint.py::test_code_running_pickle_is_refused
  (also with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, in-process), test_payload_is_live,
  test_torchscript_archive_refused, test_legacy_pt_refused, test_non_state_dict_refused,
  test_corrupt_zip_refused.
* item 4, the gate: tests/test_gate.py::test_nonfinite_tensors_fail_and_are_named (exit 1) and
  test_unsafe_pickle_fails_the_gate_and_runs_nothing; the scan on the library API:
  tests/test_scan.py::test_nan_weights_are_named.
* item 6 (wrong architecture, missing/unexpected keys, shape mismatches, one error listing
  them): tests/test_cli.py::test_wrong_arch_for_the_weights, test_missing_and_unexpected_keys;
  tests/test_checkpoint.py::test_strict_loading_reports_everything_at_once,
  test_strict_loading_long_key_lists_are_shortened.
* probe sets on the library API: tests/test_probe.py::test_undecodable_images (truncated JPEG,
  non-image, empty file, decompression bombs), test_empty_directory,
  test_class_folder_without_images, test_symlink_outside_the_probe,
  test_symlinked_class_directory_outside_the_probe, test_tensor_probe_invalid (rank, channels,
  negative labels, dtypes), test_labels_beyond_the_head, test_sixteen_bit_png_refused;
  through the CLI: tests/test_cli.py::test_empty_probe_dir, test_corrupt_image.
* item 8, ``scan --out`` equal to the checkpoint by name: tests/test_cli.py::
  test_out_must_not_be_an_input; library: tests/test_checkpoint.py::test_same_file.
* item 9 on the library API (fsync ENOSPC, old file kept, no temp file): tests/
  test_checkpoint.py::test_save_checkpoint_failure_keeps_old_file_and_no_temp.
* item 11 on the library API: tests/test_scan.py::test_same_seed_same_audit.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save as st_save

import model_audit.io.files as files_mod
import model_audit.models.checkpoint as ckpt_mod
from conftest import ROOT, snapshot, write_tensor_probe, without_timing, png_declaring

from model_audit.io.tensors import MAX_HEADER_BYTES, read_tensors, validate_safetensors_header
from model_audit.models.checkpoint import save_checkpoint
from model_audit.models.tiny import TinyResNet
from model_audit.cli import cli
from model_audit.errors import AuditError, CheckpointError

FAST = ["--baselines", "none", "--bootstrap", "5", "--device", "cpu"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                  "PYTHONWARNINGS": "ignore"}
SUBPROCESS_ENV.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
SUBPROCESS_ENV.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)


# ------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and the CPU is shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def assert_clean_error(result, *needles, exit_code=2):
    """Exit code, an ``Error:`` paragraph with every needle, and no traceback."""
    out = result.output
    assert result.exit_code == exit_code, out
    # click's own exit, not an exception that escaped the command
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out, out
    assert "Error:" in out, out
    for needle in needles:
        assert needle in out, (needle, out)


@pytest.fixture
def work(tmp_path, sgd_checkpoint, digits_probe):
    """Copies of the inputs in a directory of their own (to check they stay unchanged)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(sgd_checkpoint, inputs / "model.safetensors")
    shutil.copy(digits_probe, inputs / "probe.safetensors")
    return inputs


@pytest.fixture
def sample_state(sgd_checkpoint):
    state, meta = read_tensors(sgd_checkpoint)
    return state, meta


def scan_refused(work, checkpoint, *needles, probe=None, extra=()):
    """``scan`` exits 2 naming ``checkpoint`` (or the probe) and the problem; nothing written."""
    before = snapshot(work.parent)
    out = work.parent / "out"
    result = run(["scan", checkpoint, "--probe", probe or work / "probe.safetensors",
                  "--out", out, *FAST, *extra])
    assert_clean_error(result, *needles)
    assert not out.exists()
    assert snapshot(work.parent) == before
    return result


def raw_safetensors(path: Path, header, data: bytes = b"", *, length=None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


# ------------------------------------------------------------------------------------------
# items 1-3: safetensors header attacks, through the CLI


@pytest.mark.parametrize("case,make,words", [
    ("huge_length", lambda p: p.write_bytes(struct.pack("<Q", 2 ** 63) + b"{}"),
     [f"header length {2 ** 63} exceeds the file"]),
    ("nul_name", lambda p: raw_safetensors(p, {"fc.\x00weight": ENTRY}, b"\0" * 8),
     ["invalid tensor name 'fc.\\x00weight'"]),
    ("escape_name", lambda p: raw_safetensors(p, {"fc\x1b[2J.weight": ENTRY}, b"\0" * 8),
     ["invalid tensor name 'fc\\x1b[2J.weight'"]),
    ("newline_name", lambda p: raw_safetensors(p, {"fc\nweight": ENTRY}, b"\0" * 8),
     ["invalid tensor name 'fc\\nweight'"]),
    ("dotdot_name", lambda p: raw_safetensors(p, {"../../escaped.weight": ENTRY}, b"\0" * 8),
     ["invalid tensor name ../../escaped.weight"]),
    ("backslash_name", lambda p: raw_safetensors(p, {"..\\..\\escaped": ENTRY}, b"\0" * 8),
     ["invalid tensor name"]),
    ("duplicate", lambda p: raw_safetensors(
        p, b'{"fc.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           b'"fc.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8),
     ["duplicate key 'fc.weight'"]),
    ("duplicate_metadata", lambda p: raw_safetensors(
        p, b'{"__metadata__": {"model_audit.arch": "tiny-resnet", "model_audit.arch": "x:y"}, '
           b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8),
     ["duplicate key 'model_audit.arch'"]),
    ("no_tensors", lambda p: raw_safetensors(p, {"__metadata__": {"model_audit.arch": "tiny-resnet"}}),
     ["holds no tensors; nothing to audit"]),
    ("empty_header", lambda p: raw_safetensors(p, {}), ["holds no tensors"]),
    # found by the property test below: a list is unhashable (was a TypeError)
    ("dtype_list", lambda p: raw_safetensors(p, {"a": {**ENTRY, "dtype": []}}, b"\0" * 8),
     ["tensor a has unknown dtype []"]),
    # valid for the format (u64), not for torch (int64): was a C++ stack trace in the message
    ("int64_overflow", lambda p: raw_safetensors(
        p, {"a": {"dtype": "F32", "shape": [2 ** 63, 0], "data_offsets": [0, 0]}}),
     ["cannot read safetensors file: tensor a has shape [9223372036854775808, 0]",
      "at most 64 dimensions and 2**63 - 1 elements"]),
    ("many_dims", lambda p: raw_safetensors(
        p, {"a": {"dtype": "F32", "shape": [1] * 100_000, "data_offsets": [0, 4]}}, b"\0" * 4),
     ["(300000 characters); torch tensors have at most 64 dimensions"]),
    ("huge_shape_list", lambda p: raw_safetensors(
        p, {"a": {"dtype": "F32", "shape": [2 ** 60] * 100_000, "data_offsets": [0, 4]}}, b"\0" * 4),
     ["spans 4 bytes but its shape [1152921504606846976", "need more than the file's"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_safetensors_header_attacks_through_the_cli(work, case, make, words):
    path = work / f"{case}.safetensors"
    make(path)
    result = scan_refused(work, path, str(path), *words)
    # control characters are shown escaped, never written raw to the terminal; messages stay
    # one short paragraph (no C++ stack frames, no megabytes of echoed header)
    assert not any(c in result.output for c in ("\x00", "\x1b"))
    assert "frame #" not in result.output and len(result.output) < 1000
    if case not in ("no_tensors", "empty_header", "int64_overflow", "many_dims"):
        assert "not a valid safetensors file" in result.output
    # a name is never used as a path: nothing appeared next to or above the inputs
    assert not list(work.parent.rglob("escaped*")) and not list(work.parent.parent.glob("escaped*"))


@pytest.mark.parametrize("length", [2 ** 63, 2 ** 64 - 1, MAX_HEADER_BYTES - 1, MAX_HEADER_BYTES + 1])
def test_header_length_refused_before_allocating(tmp_path, length):
    """A header length larger than the file is refused without reading (allocating) it."""
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b'{"a": 1}')
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=f"header length {length} exceeds"):
            read_tensors(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # far less than the claimed header


# ------------------------------------------------------------------------------------------
# item 4: NaN/Inf in weights


def test_nonfinite_weight_that_leaves_the_loss_finite_is_warned_about(work, sample_state):
    """Inf in a BatchNorm running_var keeps the outputs finite: the scan runs, and warns."""
    state, meta = sample_state
    state["bn1.running_var"][3] = float("inf")
    path = work / "inf.safetensors"
    save_checkpoint(state, path, metadata=meta)
    out = work.parent / "out"
    result = run(["scan", path, "--probe", work / "probe.safetensors", "--out", out, *FAST])
    assert result.exit_code == 0, result.output
    assert "warning: 1 tensor(s) hold NaN/Inf values: bn1.running_var" in result.stderr
    data = json.loads((out / "audit.json").read_text())
    assert data["model"]["nonfinite_tensors"] == ["bn1.running_var"]
    assert any("bn1.running_var" in w for w in data["warnings"])
    # --quiet drops the warning from the terminal, not from audit.json
    result = run(["scan", path, "--probe", work / "probe.safetensors", "--out", out, *FAST, "-q"])
    assert result.exit_code == 0 and "warning" not in result.output
    assert json.loads((out / "audit.json").read_text())["model"]["nonfinite_tensors"] == ["bn1.running_var"]


def test_nan_weight_that_breaks_the_loss_is_named_through_the_cli(work, sample_state):
    state, meta = sample_state
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = work / "nan.safetensors"
    save_checkpoint(state, path, metadata=meta)
    scan_refused(work, path, "NaN/Inf values in layer2.0.conv1.weight")


# ------------------------------------------------------------------------------------------
# item 5: .pt files that are unsafe or not state dicts


class _ShellPayload:
    """Unpickling this runs a shell command (it only touches a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_code_running_pickle_refused_in_a_subprocess_even_when_forced(work, tmp_path):
    """`python -m model_audit scan evil.pt` with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set
    before torch is imported: refused, exit 2, and the payload never runs."""
    marker = tmp_path / "PWNED"
    evil = work / "evil.pt"
    state, _ = read_tensors(work / "model.safetensors")
    torch.save({**state, "x": _ShellPayload(marker)}, evil)
    before = snapshot(work)
    env = {**SUBPROCESS_ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "model_audit", "scan", str(evil), "--arch", "tiny-resnet",
         "--probe", str(work / "probe.safetensors"), "--out", str(tmp_path / "out"), *FAST],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"Error: {evil}: refused" in proc.stderr and "weights-only" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    assert snapshot(work) == before
    # The file really is live: loading it the unsafe way runs the payload.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def _inflate_declared_sizes(path: Path) -> None:
    """Make every central-directory entry of a zip claim ~4 GiB of content."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        pos = zf.start_dir
    count = 0
    while True:
        pos = data.find(b"PK\x01\x02", pos)
        if pos < 0:
            break
        struct.pack_into("<I", data, pos + 24, 0xFFFFFFF0)
        count += 1
        pos += 46
    assert count >= 4
    path.write_bytes(bytes(data))


def _legacy_tar(path: Path, state) -> None:
    """The pre-1.0 tar layout (sys_info, pickle, storages, tensors members)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            payload = pickle.dumps({"name": name})
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())


def _pt_cases():
    def torchscript(path, state):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(TinyResNet(10, in_channels=1, width=4)).save(str(path))

    def legacy_pickle(path, state):
        with open(path, "wb") as fh:
            torch.save(state, fh, _use_new_zipfile_serialization=False)

    def huge_zip(path, state):
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
        _inflate_declared_sizes(path)

    def replaced(key, make):
        def build(path, state):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.save({**state, key: make(state[key])}, path)
        return build

    return [
        ("torchscript", torchscript, ["this is a TorchScript archive, not a state dict"]),
        ("legacy_pickle", legacy_pickle, ["not a torch zip checkpoint (legacy tar/pickle"]),
        ("legacy_tar", _legacy_tar, ["not a torch zip checkpoint (legacy tar/pickle"]),
        ("huge_zip", huge_zip, ["bytes of content, far more than the file holds; refusing"]),
        ("sparse", replaced("fc.weight", lambda t: t.to_sparse()), ["fc.weight (layout sparse_coo)"]),
        ("sparse_csr", replaced("fc.weight", lambda t: t.to_sparse_csr()), ["fc.weight (layout sparse_csr)"]),
        ("quantized", replaced("fc.weight", lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)),
         ["fc.weight (quantized qint8)"]),
        ("complex", replaced("fc.weight", lambda t: t.to(torch.complex64)),
         ["fc.weight (complex complex64)"]),
        ("meta", replaced("fc.weight", lambda t: torch.empty(t.shape, device="meta")),
         ["fc.weight (no data on the CPU (device meta))"]),
        ("list", lambda p, s: torch.save(list(s.values()), p), ["holds a list, not a state dict"]),
        ("tensor", lambda p, s: torch.save(s["fc.weight"], p), ["holds a Tensor, not a state dict"]),
        ("mixed_dict", lambda p, s: torch.save({**s, "epoch": 3, "arch": "resnet"}, p),
         ["entries that are not tensors: epoch (int), arch (str)"]),
        ("int_keys", lambda p, s: torch.save({0: s["fc.weight"]}, p), ["not tensors: 0 (Tensor)"]),
        ("empty", lambda p, s: torch.save({}, p), ["the state dict is empty; nothing to audit"]),
    ]


@pytest.mark.parametrize("case,make,words", _pt_cases(), ids=[c[0] for c in _pt_cases()])
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: sparse validation, TypedStorage
def test_unsupported_pt_files_through_the_cli(work, sample_state, case, make, words):
    path = work / f"{case}.pt"
    make(path, sample_state[0])
    scan_refused(work, path, f"Error: {path}", *words, extra=["--arch", "tiny-resnet"])


# ------------------------------------------------------------------------------------------
# item 7: probe sets, through the CLI


def _png(path: Path, value: int = 128, size=(8, 8), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path




def _folder(root: Path) -> Path:
    for cls in ("0", "1"):
        for i in range(2):
            _png(root / cls / f"{i}.png", 60 * i + 20)
    return root


def _folder_cases():
    def empty_class(root):
        _folder(root)
        (root / "2").mkdir()
        (root / "2" / "README.txt").write_text("no images")
        return root / "2", "has no images (.jpg, .jpeg, .png)"

    def truncated_jpeg(root):
        _folder(root)
        torch.manual_seed(0)
        noise = (torch.rand(64, 64) * 255).to(torch.uint8).numpy()
        path = root / "1" / "cut.jpg"
        Image.fromarray(noise, "L").save(path, quality=90)
        path.write_bytes(path.read_bytes()[:400])
        return path, "cannot decode image"

    def not_an_image(root):
        _folder(root)
        path = root / "0" / "photo.jpg"
        path.write_text("<html><script>alert(1)</script></html>")
        return path, "cannot decode image"

    def bomb(root):
        _folder(root)
        path = root / "1" / "bomb.png"
        path.write_bytes(png_declaring(30_000, 30_000, color_type=0))
        return path, "decompression bomb"

    def symlink_out(root):
        _folder(root)
        secret = _png(root.parent / "elsewhere" / "secret.png")
        link = root / "1" / "link.png"
        link.symlink_to(secret)
        return link, "points outside the probe directory"

    def wrong_class(root):
        _folder(root)
        _png(root / "cat" / "0.png")
        return root, "classes cat are not among the model's classes"

    return [("empty_class", empty_class), ("truncated_jpeg", truncated_jpeg),
            ("not_an_image", not_an_image), ("bomb", bomb), ("symlink_outside", symlink_out),
            ("unknown_class", wrong_class)]


@pytest.mark.parametrize("case,make", _folder_cases(), ids=[c[0] for c in _folder_cases()])
def test_bad_image_folders_through_the_cli(work, case, make):
    bad, words = make(work / "probe")
    scan_refused(work, work / "model.safetensors", str(bad), words, probe=work / "probe")


def _tensor_cases():
    u8 = torch.uint8
    return [
        ("negative_label", torch.zeros(4, 1, 8, 8, dtype=u8), torch.tensor([0, 1, -1, 2]),
         "labels must be >= 0, found -1"),
        ("label_past_head", torch.zeros(4, 1, 8, 8, dtype=u8), torch.tensor([0, 1, 10, 2]),
         "has labels up to 10 but the model's head has 10 outputs"),
        ("huge_label", torch.zeros(4, 1, 8, 8, dtype=u8), torch.tensor([0, 1, 2 ** 40, 2]),
         f"has labels up to {2 ** 40} but the model's head has 10 outputs"),
        ("rank_3", torch.zeros(4, 8, 8, dtype=u8), torch.arange(4), "images must be 4-D (N,C,H,W)"),
        ("rank_5", torch.zeros(4, 1, 1, 8, 8, dtype=u8), torch.arange(4), "images must be 4-D"),
        ("two_channels", torch.zeros(4, 2, 8, 8, dtype=u8), torch.arange(4), "images have 2 channels"),
        ("four_channels", torch.zeros(4, 4, 8, 8, dtype=u8), torch.arange(4), "images have 4 channels"),
        ("zero_size", torch.zeros(4, 1, 0, 8, dtype=u8), torch.arange(4), "images have no pixels"),
        ("nan_pixels", torch.full((4, 1, 8, 8), float("nan")), torch.arange(4),
         "images at index 0, 1, 2, 3 hold NaN or infinite pixel values"),
        ("float_labels", torch.zeros(4, 1, 8, 8, dtype=u8), torch.zeros(4), "labels must be integers"),
        ("no_images", torch.zeros(0, 1, 8, 8, dtype=u8), torch.zeros(0, dtype=torch.long),
         "holds no images"),
    ]


@pytest.mark.parametrize("case,images,labels,words", _tensor_cases(),
                         ids=[c[0] for c in _tensor_cases()])
def test_bad_tensor_probes_through_the_cli(work, case, images, labels, words):
    path = write_tensor_probe(work / f"{case}.safetensors", images, labels)
    start = time.perf_counter()
    scan_refused(work, work / "model.safetensors", str(path), words, probe=path)
    assert time.perf_counter() - start < 20  # a label of 2**40 must not build 2**40 names


def test_probe_file_with_header_attack(work):
    path = raw_safetensors(work / "p.safetensors", {"images": ENTRY, "images\x00": ENTRY},
                           b"\0" * 16)
    scan_refused(work, work / "model.safetensors", str(path), "invalid tensor name", probe=path)


# ------------------------------------------------------------------------------------------
# item 8: outputs that are inputs, refused before any work


@pytest.fixture
def no_work(monkeypatch):
    """Make every stage that does work fail loudly: a refusal must come before them."""
    import importlib

    # (model_audit.commands.scan the module, not the function model_audit exports under that name)
    scan_mod, compare_mod, gate_mod = (importlib.import_module(f"model_audit.commands.{name}")
                                       for name in ("scan", "compare", "gate"))

    def forbidden(*args, **kwargs):
        raise AssertionError("work started although the output is an input")

    from model_audit.io.records import AuditRecord

    cli_mod = importlib.import_module("model_audit.cli")
    for name in ("run_scan", "run_compare", "check_gate", "load_policy", "run_fix",
                 "run_sanity_cli"):
        monkeypatch.setattr(cli_mod, name, forbidden)
    for module, name in ((scan_mod, "scan"), (compare_mod, "compare"), (AuditRecord, "read"),
                         (gate_mod, "check_gate"),
                         (importlib.import_module("model_audit.policy"), "load_policy"),
                         (ckpt_mod, "load_checkpoint")):
        monkeypatch.setattr(module, name, forbidden)


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotted"])
def test_scan_out_is_the_checkpoint(work, no_work, how):
    ckpt = work / "model.safetensors"
    out = {"same": lambda: ckpt,
           "symlink": lambda: (work / "alias").symlink_to(ckpt) or work / "alias",
           "hardlink": lambda: os.link(ckpt, work / "hard") or work / "hard",
           "dotted": lambda: work / ".." / "in" / "model.safetensors"}[how]()
    before = snapshot(work)
    result = run(["scan", ckpt, "--probe", work / "probe.safetensors", "--out", out, *FAST])
    assert_clean_error(result, f"refusing to write {out} (--out: not a directory)",
                       f"it is the checkpoint input {ckpt}", "Nothing was done")
    assert snapshot(work) == before


def test_scan_out_holding_links_to_the_inputs(work, no_work, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.link(work / "probe.safetensors", out / "audit.json")
    (out / "report.html").symlink_to(work / "model.safetensors")
    before = snapshot(tmp_path)
    result = run(["scan", work / "model.safetensors", "--probe", work / "probe.safetensors",
                  "--out", out, *FAST])
    assert_clean_error(result, f"refusing to write {out / 'audit.json'} (--out)",
                       f"it is the probe input {work / 'probe.safetensors'}")
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def audits(tmp_path_factory, sgd_checkpoint_path, digits_probe_path):
    """Two audit.json files of the same scan (CLI, run twice; item 11 checks they agree)."""
    base = tmp_path_factory.mktemp("audits")
    paths = []
    for name in ("a", "b"):
        result = run(["scan", sgd_checkpoint_path, "--probe", digits_probe_path,
                      "--out", base / name, "--seed", "3", "--bootstrap", "30", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        paths.append(base / name / "audit.json")
    return paths


@pytest.fixture(scope="module")
def sgd_checkpoint_path():
    return ROOT / "samples" / "digits-sgd.safetensors"


@pytest.fixture(scope="module")
def digits_probe_path():
    return ROOT / "samples" / "digits-probe.safetensors"


@pytest.mark.parametrize("how", ["out_is_a", "out_symlink_to_b", "compare_json_hardlink_to_a"])
def test_compare_out_is_an_input(audits, tmp_path, no_work, how):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    shutil.copy(audits[0], a)
    shutil.copy(audits[1], b)
    if how == "out_is_a":
        out, target, src = a, a, a
    elif how == "out_symlink_to_b":
        out = tmp_path / "alias"
        out.symlink_to(b)
        target, src = out, b
    else:
        out = tmp_path / "cmp"
        out.mkdir()
        os.link(a, out / "compare.json")
        target, src = out / "compare.json", a
    before = snapshot(tmp_path)
    result = run(["compare", a, b, "--out", out])
    assert_clean_error(result, f"refusing to write {target} (--out", f"input {src}")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("option,link,victim", [
    ("--junit", "hardlink", "policy"),
    ("--junit", "hardlink", "checkpoint"),
    ("--summary", "symlink", "checkpoint"),
    ("--summary", "same", "probe"),
    ("--summary", "hardlink", "baseline"),
    ("--out", "same", "checkpoint"),
])
def test_gate_outputs_are_inputs(work, tmp_path, audits, no_work, option, link, victim):
    policy = work / "policy.toml"
    policy.write_text("[policy]\nmin_accuracy = 0.5\n")
    baseline = work / "baseline.json"
    shutil.copy(audits[0], baseline)
    src = {"policy": policy, "checkpoint": work / "model.safetensors",
           "probe": work / "probe.safetensors", "baseline": baseline}[victim]
    target = tmp_path / "target"
    if link == "hardlink":
        os.link(src, target)
    elif link == "symlink":
        target.symlink_to(src)
    else:
        target = src
    args = {"--out": tmp_path / "gate-out", "--junit": tmp_path / "junit.xml",
            "--summary": tmp_path / "summary.md", option: target}
    before = snapshot(tmp_path)
    result = run(["gate", work / "model.safetensors", "--probe", work / "probe.safetensors",
                  "--policy", policy, "--baseline", baseline,
                  *[x for kv in args.items() for x in kv], "--quiet"])
    assert_clean_error(result, f"refusing to write {target} ({option}",
                       f"it is the {victim} input {src}")
    assert snapshot(tmp_path) == before


def test_gate_default_out_would_overwrite_the_baseline(work, tmp_path, audits, no_work, monkeypatch):
    """The previous run's reports/gate-<name>/audit.json as --baseline, no --out given."""
    monkeypatch.chdir(tmp_path)
    previous = Path("reports") / "gate-model" / "audit.json"
    previous.parent.mkdir(parents=True)
    shutil.copy(audits[0], previous)
    policy = work / "policy.toml"
    policy.write_text("[policy]\nmin_accuracy = 0.5\n")
    before = snapshot(tmp_path)
    result = run(["gate", work / "model.safetensors", "--probe", work / "probe.safetensors",
                  "--policy", policy, "--baseline", previous, "--quiet"])
    assert_clean_error(result, f"refusing to write {previous} (--out)",
                       f"it is the baseline input {previous}")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------
# item 9: unwritable output directory, full disk, killed mid-write


class _OsProxy:
    """The ``os`` module as model_audit.io.files sees it, with some functions replaced."""

    def __init__(self, **overrides) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(os, name)


class _FullDisk:
    """A file whose write stores half of the data, then fails like a full disk."""

    def __init__(self, fh) -> None:
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def _deny_mkstemp(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def _deny_replace(src, dst):
    raise PermissionError(errno.EACCES, "Permission denied")


def _full_on_second_file():
    opened = []

    def fdopen(fd, *args, **kwargs):
        fh = os.fdopen(fd, *args, **kwargs)
        opened.append(fd)
        return _FullDisk(fh) if len(opened) == 2 else fh

    return fdopen


@pytest.mark.parametrize("case", ["read_only_dir", "rename_denied", "disk_full_second_file"])
def test_unwritable_output_keeps_the_old_outputs(work, tmp_path, monkeypatch, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "audit.json").write_text('{"old": true}\n')
    (out / "report.html").write_text("<p>old report</p>\n")
    if case == "read_only_dir":   # what mkstemp gets in a 0555 directory (root ignores the bits)
        monkeypatch.setattr(files_mod, "tempfile", SimpleNamespace(mkstemp=_deny_mkstemp))
        words = [f"cannot write {out / 'audit.json'}: Permission denied"]
    elif case == "rename_denied":
        monkeypatch.setattr(files_mod, "os", _OsProxy(replace=_deny_replace))
        words = [f"cannot write {out / 'audit.json'}: Permission denied"]
    else:                          # audit.json fits, report.html does not
        monkeypatch.setattr(files_mod, "os", _OsProxy(fdopen=_full_on_second_file()))
        words = [f"cannot write {out / 'report.html'}: No space left on device"]
    before = snapshot(tmp_path)
    result = run(["scan", work / "model.safetensors", "--probe", work / "probe.safetensors",
                  "--out", out, *FAST])
    assert_clean_error(result, *words)
    assert snapshot(tmp_path) == before  # old outputs byte-identical, inputs too
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "report.html"]  # no temp files


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import model_audit.io.files as c

    real_fdopen = os.fdopen

    class Stalling:
        def __init__(self, fh): self.fh = fh
        def __enter__(self): return self
        def __exit__(self, *exc): self.fh.close()
        def write(self, data):
            self.fh.write(data[: len(data) // 2]); self.fh.flush(); os.fsync(self.fh.fileno())
            print("half", flush=True)
            time.sleep(60)

    c.os = type("Os", (), {"__getattr__": lambda self, n: getattr(os, n),
                            "fdopen": staticmethod(lambda fd, *a: Stalling(real_fdopen(fd, *a)))})()
    c.atomic_write_bytes(Path(sys.argv[1]), b"n" * 8_000_000)
""")


def test_killed_mid_write_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "audit.json"
    old = b'{"old": "audit"}\n' * 1000
    target.write_bytes(old)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=SUBPROCESS_ENV, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "half", proc.stderr.read()
        temps = [p for p in out.iterdir() if p != target]
        assert len(temps) == 1 and temps[0].stat().st_size == 4_000_000  # really mid-write
        assert target.read_bytes() == old
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == old  # byte-identical
    leftovers = [p.name for p in out.iterdir() if p != target]
    # a SIGKILLed process cannot clean up: its temp file is hidden and cannot pass for output
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".audit.json.") and leftovers[0].endswith(".tmp")


# ------------------------------------------------------------------------------------------
# item 10: Ctrl-C


# The child gets Python's usual SIGINT handler, as in a terminal: a shell that runs the suite in
# the background (`make test &`, nohup) starts it with SIGINT ignored, and Python keeps that.
_RUN_AFTER_IMPORT = ("import faulthandler, signal, sys, runpy, model_audit.cli; "
                     "signal.signal(signal.SIGINT, signal.default_int_handler); "
                     "faulthandler.register(signal.SIGUSR1); print('ready', flush=True); "
                     "sys.argv[0] = 'model-audit'; runpy.run_module('model_audit', run_name='__main__')")


def test_ctrl_c_during_a_scan(work, tmp_path):
    """SIGINT mid-scan: a one-line message, exit 130, inputs unchanged, nothing written.

    The child prints 'ready' once its imports are done (then runs `python -m model_audit`
    unchanged), so the signal lands in the scan and not in `import torch`.
    """
    out = tmp_path / "out"
    before = snapshot(work)
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN_AFTER_IMPORT, "scan", str(work / "model.safetensors"),
         "--probe", str(work / "probe.safetensors"), "--out", str(out), "--bootstrap", "2000000",
         "--baselines", "none", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(1.5)
        assert proc.poll() is None, "the scan finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        try:
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a hang shows where it hangs
            proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack to stderr
            time.sleep(2)
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"no exit 10 s after SIGINT; the child's stacks:\n{stderr}")
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert elapsed < 10
    assert proc.returncode == 130, stderr
    assert "interrupted: nothing was written" in stderr
    assert "Traceback" not in stderr + stdout and "Aborted!" not in stderr
    assert not out.exists()
    assert snapshot(work) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_ctrl_c_in_process_reports_what_was_written(work, tmp_path, monkeypatch):
    """KeyboardInterrupt anywhere in a command: exit 130 and an honest message."""
    import importlib

    cli_mod = importlib.import_module("model_audit.cli")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "run_scan", interrupted)
    result = run(["scan", work / "model.safetensors", "--probe", work / "probe.safetensors",
                  "--out", tmp_path / "out"])
    assert result.exit_code == 130
    assert "interrupted: nothing was written" in result.output and "Aborted" not in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------
# item 11: reproducible




def test_two_cli_scans_give_identical_audits(audits):
    a, b = (json.loads(p.read_text()) for p in audits)
    assert a["seed"] == 3 and a["device"] == "cpu" and a["agreement"]  # baselines included
    assert without_timing(a) == without_timing(b)
    assert a["timing"].keys() == b["timing"].keys()


# ------------------------------------------------------------------------------------------
# item 12: property-based mutation of a valid safetensors file


_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_BASE_TENSORS = {
    "conv.weight": torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2) / 7,
    "conv.bias": torch.tensor([0.5], dtype=torch.float16),
    "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    "mask": torch.tensor([True, False, True]),
    "fc.weight": torch.tensor([[1.0, -2.0], [3.0, 4.5]], dtype=torch.bfloat16),
}
_BASE = st_save(_BASE_TENSORS, metadata={"model_audit.arch": "tiny-resnet", "note": "x"})
_N = struct.unpack("<Q", _BASE[:8])[0]
_HEADER = json.loads(_BASE[8:8 + _N])
_DATA = _BASE[8 + _N:]
_NAMES = sorted(k for k in _HEADER if k != "__metadata__")

_odd_ints = st.one_of(st.integers(-3, 40), st.sampled_from([2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64, 2 ** 70]))
_odd_values = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4),
                        _odd_ints, st.lists(_odd_ints, max_size=4),
                        st.dictionaries(st.text(max_size=3), _odd_ints, max_size=2))
_names = st.one_of(st.text(max_size=10), st.sampled_from(
    ["../x", "a/b", "..\\b", "..", "", "\x00", "a\x00b", "__metadata__", "conv.weight", "\u202e", "é"]))


@st.composite
def _mutated_header(draw):
    header = json.loads(json.dumps(_HEADER))
    duplicate = None
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(_NAMES))
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "duplicate", "delete",
                                   "extra", "metadata", "swap", "entry"]))
        if not isinstance(header.get(name), dict):  # deleted, renamed or replaced already
            continue
        if op == "dtype":
            header[name]["dtype"] = draw(st.one_of(st.sampled_from(list(_TORCH_DTYPES)), _odd_values))
        elif op == "shape":
            header[name]["shape"] = draw(st.one_of(st.lists(_odd_ints, max_size=5), _odd_values))
        elif op == "offsets":
            header[name]["data_offsets"] = draw(st.one_of(st.lists(_odd_ints, max_size=3), _odd_values))
        elif op == "rename":
            header[draw(_names)] = header.pop(name)
        elif op == "duplicate":
            duplicate = name
        elif op == "delete":
            del header[name]
        elif op == "extra":
            header[name][draw(st.text(max_size=5))] = draw(_odd_values)
        elif op == "metadata":
            header["__metadata__"] = draw(st.one_of(_odd_values, st.dictionaries(
                st.text(max_size=5), st.one_of(st.text(max_size=5), _odd_ints), max_size=3)))
        elif op == "swap":
            other = draw(st.sampled_from(_NAMES))
            if isinstance(header.get(other), dict):
                header[name]["data_offsets"], header[other]["data_offsets"] = (
                    header[other].get("data_offsets"), header[name].get("data_offsets"))
        else:
            header[name] = draw(_odd_values)
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8")
    if duplicate is not None and duplicate in header:
        raw = raw[:-1] + b", " + json.dumps(duplicate).encode() + b": " + \
            json.dumps(header[duplicate]).encode() + b"}"
    raw += b" " * draw(st.integers(0, 8))  # the format pads headers with spaces
    length = draw(st.one_of(st.just(len(raw)), st.just(len(raw)), st.integers(0, len(raw) + 64),
                            st.sampled_from([2 ** 63, 2 ** 64 - 1, MAX_HEADER_BYTES])))
    data = _DATA
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=16))
    return struct.pack("<Q", length) + raw + data


def _flip_bytes(draw_list):
    blob = bytearray(_BASE)
    for pos, value in draw_list:
        blob[pos % len(blob)] = value
    return bytes(blob)


_mutations = st.one_of(
    st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(0, 255)), min_size=1,
             max_size=8).map(_flip_bytes),
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 255)), min_size=1, max_size=3)
    .map(_flip_bytes),                                     # the length prefix only
    st.integers(0, len(_BASE) - 1).map(lambda k: _BASE[:k]),
    st.binary(min_size=1, max_size=64).map(lambda extra: _BASE + extra),
    _mutated_header(),
    st.just(_BASE),
)


class _Hang(BaseException):
    """Raised by the alarm: not an Exception, so nothing in the tool can swallow it."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _blob(header, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + data


@settings(max_examples=200, deadline=2000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=_mutations)
# what earlier runs found (each was another exception than AuditError)
@example(blob=_blob({"a": {"dtype": [], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8))
@example(blob=_blob({"a": {"dtype": {}, "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8))
@example(blob=_blob({"a": {"dtype": "F32", "shape": [2 ** 63, 0], "data_offsets": [0, 0]}}))
@example(blob=_blob({"a": {"dtype": "U8", "shape": [0, 2 ** 64 - 1], "data_offsets": [0, 0]}}))
@example(blob=_blob({"__metadata__": None, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x"))
def test_mutated_safetensors_load_exactly_or_raise_audit_error(tmp_path_factory, blob):
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(blob)

    def alarm(signum, frame):
        raise _Hang(f"read_tensors hung on {blob[:80]!r}")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        tensors, metadata = read_tensors(path)
    except AuditError as exc:
        assert str(path) in str(exc)  # the message names the file
        return
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # Accepted: then it is exactly what the file's own header describes.
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    assert metadata == (header.pop("__metadata__", None) or {}) and all(  # null: no metadata
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert set(tensors) == set(header)
    data = blob[8 + n:]
    for name, t in tensors.items():
        entry = header[name]
        assert isinstance(t, torch.Tensor) and t.layout == torch.strided
        assert list(t.shape) == entry["shape"] and t.dtype == _TORCH_DTYPES[entry["dtype"]]
        lo, hi = entry["data_offsets"]
        assert _tensor_bytes(t) == data[lo:hi]
    if blob[8:] == _BASE[8:]:
        assert set(tensors) == set(_BASE_TENSORS)
        for name, t in _BASE_TENSORS.items():
            assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t)


def test_the_fuzzed_base_file_is_valid(tmp_path):
    path = tmp_path / "base.safetensors"
    path.write_bytes(_BASE)
    header, meta = validate_safetensors_header(path)
    assert set(header) == set(_BASE_TENSORS) and meta["note"] == "x"
    tensors, _ = read_tensors(path)
    assert all(torch.equal(tensors[k], v) for k, v in _BASE_TENSORS.items())
