"""Checkpoint reading, safety checks, architecture resolution, strict loading and writing."""
from __future__ import annotations

import json
import os
import pickle
import stat
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_audit.io.files import same_file
from model_audit.io.tensors import MAX_HEADER_BYTES, read_tensors, strip_wrapper_prefixes, validate_safetensors_header
from model_audit.models.checkpoint import audit_metadata, load_checkpoint, save_checkpoint
from model_audit.models.registry import available_architectures, build_model, head_name, input_channels
from model_audit.models.tiny import TinyResNet
from model_audit.errors import ArchitectureError, AuditError, CheckpointError

# ------------------------------------------------------------------------------------------
# helpers


def tiny_state(num_classes: int = 3, width: int = 4, in_channels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyResNet(num_classes, in_channels=in_channels, width=width)
    # Non-trivial BatchNorm buffers, so that buffers are compared too.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, state, *, exact: bool = True) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        got = loaded[key]
        want = value.float() if value.is_floating_point() else value
        assert got.dtype == want.dtype, key
        if exact:
            assert torch.equal(got, want), key
        else:
            torch.testing.assert_close(got, want)


def write_raw_safetensors(path: Path, header, data: bytes = b"", *, length=None) -> Path:
    """A safetensors file written by hand: 8-byte little-endian length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def make_marker(path: str) -> int:
    """Harmless stand-in for attacker code: it only creates a marker file."""
    Path(path).write_text("pwned")
    return 0


class Payload:
    """Unpickling this calls make_marker (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (make_marker, (self.marker,))


class ShellPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# ------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_formats_load_identical_parameters(tmp_path, suffix):
    state = tiny_state()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    raw, meta = read_tensors(path)
    assert set(raw) == set(state)
    assert all(torch.equal(raw[k], state[k]) for k in state)
    assert meta == {}

    ckpt = load_checkpoint(path, arch="tiny-resnet")
    assert ckpt.arch == "tiny-resnet"
    assert ckpt.num_classes == 3
    assert ckpt.in_channels == 3
    assert not ckpt.model.training
    assert all(not m.training for m in ckpt.model.modules())
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())
    assert ckpt.source_dtypes == ("float32",)
    assert ckpt.parameters == sum(p.numel() for p in ckpt.model.parameters())
    assert ckpt.path == str(path)
    assert len(ckpt.sha256) == 64
    assert ckpt.nonfinite == ()
    assert_state_equal(ckpt.model, state)


def test_safetensors_and_pt_give_the_same_model(tmp_path):
    state = tiny_state(seed=3)
    save_file(state, str(tmp_path / "a.safetensors"))
    torch.save(state, tmp_path / "a.pt")
    a = load_checkpoint(tmp_path / "a.safetensors", arch="tiny-resnet").model
    b = load_checkpoint(tmp_path / "a.pt", arch="tiny-resnet").model
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("dtype,name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_half_precision_audited_in_float32(tmp_path, dtype, name, suffix):
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tiny_state().items()}
    path = tmp_path / f"half{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    ckpt = load_checkpoint(path, arch="tiny-resnet")
    assert ckpt.source_dtypes == (name,)
    assert ckpt.to_dict()["source_dtypes"] == [name]
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in ckpt.model.buffers())
    # The values are exactly the half-precision values, widened.
    assert_state_equal(ckpt.model, state)
    with torch.no_grad():
        out = ckpt.model(torch.rand(1, 3, 8, 8))
    assert out.dtype == torch.float32


def test_mixed_dtypes_are_all_recorded(tmp_path):
    state = tiny_state()
    state["fc.weight"] = state["fc.weight"].half()
    save_file(state, str(tmp_path / "m.safetensors"))
    ckpt = load_checkpoint(tmp_path / "m.safetensors", arch="tiny-resnet")
    assert ckpt.source_dtypes == ("float16", "float32")


def test_nonfinite_weights_are_reported(tmp_path):
    state = tiny_state()
    state["fc.bias"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    ckpt = load_checkpoint(tmp_path / "nan.safetensors", arch="tiny-resnet")
    assert ckpt.nonfinite == ("fc.bias",)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    state = tiny_state()
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    ckpt = load_checkpoint(path, arch="tiny-resnet")
    assert_state_equal(ckpt.model, state)


def test_strip_wrapper_prefixes_collision():
    t = torch.zeros(1)
    with pytest.raises(CheckpointError, match="both map to 'fc.weight'"):
        strip_wrapper_prefixes({"fc.weight": t, "module.fc.weight": t})


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_nested_state_dict_in_pt(tmp_path, key):
    state = tiny_state()
    path = tmp_path / "nested.pth"
    torch.save({key: {"module." + k: v for k, v in state.items()}, "epoch": 12, "best_acc": 0.93,
                "arch": "tiny", "optimizer": {"lr": 0.1, "momentum": [0.9]}}, path)
    ckpt = load_checkpoint(path, arch="tiny-resnet")
    assert_state_equal(ckpt.model, state)


# ------------------------------------------------------------------------------------------
# number of classes and architecture


def test_num_classes_from_head_weight(tmp_path):
    model = build_model("resnet18-cifar", 7)
    state = model.state_dict()
    path = tmp_path / "r18c.safetensors"
    save_file(state, str(path))
    ckpt = load_checkpoint(path, arch="resnet18-cifar")
    assert ckpt.num_classes == 7
    assert ckpt.arch == "resnet18-cifar"
    assert ckpt.in_channels == 3
    assert ckpt.model.conv1.kernel_size == (3, 3)
    assert head_name(ckpt.model) == "fc"
    assert_state_equal(ckpt.model, state)
    # An explicit, wrong number of classes is a shape mismatch in the head.
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, arch="resnet18-cifar", num_classes=10)
    msg = str(err.value)
    assert "fc.weight is 7x512 but the model wants 10x512" in msg
    assert "fc.bias" in msg


def test_architecture_from_metadata(tmp_path):
    state = tiny_state(num_classes=4, width=8, in_channels=1)
    path = tmp_path / "meta.safetensors"
    meta = audit_metadata("tiny-resnet", 4, normalize="0.5,0.25", classes=["a", "b", "c", "d"])
    save_checkpoint(state, path, metadata=meta)
    ckpt = load_checkpoint(path)
    assert ckpt.arch == "tiny-resnet"
    assert ckpt.num_classes == 4
    assert ckpt.in_channels == 1
    assert ckpt.normalize == "0.5,0.25"
    assert ckpt.classes == ("a", "b", "c", "d")
    assert ckpt.metadata["model_audit.arch"] == "tiny-resnet"
    assert_state_equal(ckpt.model, state)


@pytest.mark.parametrize("classes", ["not json", '{"a": 1}', "[1, 2, 3]", "[" * 100_000])
def test_unusable_classes_metadata_is_ignored(tmp_path, classes):
    path = tmp_path / "meta.safetensors"
    meta = audit_metadata("tiny-resnet", 3)
    meta["model_audit.classes"] = classes
    save_checkpoint(tiny_state(), path, metadata=meta)
    ckpt = load_checkpoint(path)
    assert ckpt.classes is None and ckpt.num_classes == 3


def test_bad_num_classes_metadata(tmp_path):
    path = tmp_path / "meta.safetensors"
    meta = audit_metadata("tiny-resnet", 3)
    meta["model_audit.num_classes"] = "three"
    save_checkpoint(tiny_state(), path, metadata=meta)
    with pytest.raises(CheckpointError, match="model_audit.num_classes is not an integer"):
        load_checkpoint(path)
    # An explicit number of classes does not need the metadata.
    assert load_checkpoint(path, num_classes=3).num_classes == 3


def test_committed_sample_loads_from_metadata(sgd_checkpoint):
    ckpt = load_checkpoint(sgd_checkpoint)
    assert ckpt.arch == "tiny-resnet"
    assert ckpt.num_classes == 10
    assert ckpt.in_channels == 1
    assert ckpt.classes == tuple(str(i) for i in range(10))


def test_no_arch_and_no_metadata_guesses_the_unique_match(tmp_path):
    """A file that names no architecture is loaded as the one registered architecture whose
    keys and shapes it matches exactly (also through a DataParallel prefix), and says so."""
    path = tmp_path / "bare.safetensors"
    save_file(tiny_state(), str(path))
    ckpt = load_checkpoint(path)
    assert (ckpt.arch, ckpt.guessed, ckpt.num_classes) == ("tiny-resnet", True, 3)
    assert load_checkpoint(path, arch="tiny-resnet").guessed is False
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in build_model("resnet18-cifar", 7).state_dict().items()}
    ref = tmp_path / "resnet.safetensors"
    save_file(state, str(ref))
    ckpt = load_checkpoint(ref)
    assert (ckpt.arch, ckpt.guessed, ckpt.num_classes) == ("resnet18-cifar", True, 7)


def test_no_arch_and_no_match_or_several_matches(tmp_path, monkeypatch):
    import model_audit.models.registry as registry

    path = tmp_path / "bare.safetensors"
    save_file({**tiny_state(), "extra.weight": torch.zeros(2)}, str(path))
    before = path.read_bytes()
    with pytest.raises(ArchitectureError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "--arch" in msg and str(path) in msg and "does not say which architecture" in msg
    assert "match none of torchvision's" in msg
    two = tmp_path / "two.safetensors"
    save_file(tiny_state(), str(two))
    monkeypatch.setitem(registry.EXTRA_ARCHS, "tiny-resnet-copy", registry.EXTRA_ARCHS["tiny-resnet"])
    with pytest.raises(ArchitectureError, match="fit several: tiny-resnet, tiny-resnet-copy; give --arch"):
        load_checkpoint(two)
    assert path.read_bytes() == before


def test_factory_in_metadata_is_refused(tmp_path, monkeypatch):
    module = tmp_path / "evil_factory_mod.py"
    module.write_text(
        "from pathlib import Path\n"
        f"Path({str(tmp_path / 'IMPORTED')!r}).write_text('x')\n"
        "def make(num_classes):\n"
        "    from model_audit.models.tiny import TinyResNet\n"
        "    return TinyResNet(num_classes, width=4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "factory.safetensors"
    save_checkpoint(tiny_state(), path, metadata=audit_metadata("evil_factory_mod:make", 3))
    with pytest.raises(ArchitectureError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "evil_factory_mod:make" in msg and "--arch" in msg and "factor" in msg
    assert not (tmp_path / "IMPORTED").exists()
    assert "evil_factory_mod" not in sys.modules
    # The same spec is accepted when the user passes it explicitly.
    try:
        ckpt = load_checkpoint(path, arch="evil_factory_mod:make")
        assert ckpt.arch == "evil_factory_mod:make" and ckpt.num_classes == 3
        assert (tmp_path / "IMPORTED").exists()
    finally:
        sys.modules.pop("evil_factory_mod", None)


def test_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "userpkg_ma").mkdir()
    (tmp_path / "userpkg_ma" / "__init__.py").write_text("")
    (tmp_path / "userpkg_ma" / "nets.py").write_text(
        "import torch.nn as nn\n"
        "def small(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, num_classes))\n"
        "def broken(num_classes):\n"
        "    raise RuntimeError('boom')\n"
        "def not_a_module(num_classes):\n"
        "    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = build_model("userpkg_ma.nets:small", 5)
        state = model.state_dict()
        path = tmp_path / "user.pt"
        torch.save(state, path)
        ckpt = load_checkpoint(path, arch="userpkg_ma.nets:small")
        assert ckpt.num_classes == 5  # read from the head "4.weight"
        assert ckpt.in_channels == 1
        assert_state_equal(ckpt.model, state)

        with pytest.raises(ArchitectureError, match=r"cannot import factory .userpkg_ma\.nets:missing.*no attribute .missing"):
            build_model("userpkg_ma.nets:missing", 2)
        with pytest.raises(ArchitectureError, match="cannot import factory 'no_such_pkg_ma:f'"):
            build_model("no_such_pkg_ma:f", 2)
        with pytest.raises(ArchitectureError, match="failed with num_classes=2: RuntimeError: boom"):
            build_model("userpkg_ma.nets:broken", 2)
        with pytest.raises(ArchitectureError, match="returned int, not a torch.nn.Module"):
            build_model("userpkg_ma.nets:not_a_module", 2)
    finally:
        for name in ("userpkg_ma", "userpkg_ma.nets"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("name,suggestion", [("resnet18_cifar", "resnet18-cifar"),
                                             ("resnt18", "resnet18"),
                                             ("tiny_resnet", "tiny-resnet")])
def test_unknown_architecture_suggests(name, suggestion):
    with pytest.raises(ArchitectureError) as err:
        build_model(name, 10)
    msg = str(err.value)
    assert f"unknown architecture {name!r}" in msg
    assert "Did you mean" in msg and suggestion in msg.split("Valid names")[0]
    assert "Valid names" in msg and "resnet50" in msg and "tiny-resnet" in msg
    assert "package.module:factory" in msg


def test_unknown_architecture_through_load(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(tiny_state(), str(path))
    with pytest.raises(ArchitectureError, match="Did you mean"):
        load_checkpoint(path, arch="tiny-resnt")


def test_registry_names():
    names = available_architectures()
    assert "resnet18" in names and "resnet18-cifar" in names and "tiny-resnet" in names
    assert "wide_resnet50_2-cifar" in names
    assert names == sorted(names)
    # Large models are only ever built on the meta device here.
    with torch.device("meta"):
        big = build_model("resnet50-cifar", 100)
    assert big.fc.out_features == 100 and big.conv1.kernel_size == (3, 3)
    assert isinstance(big.maxpool, torch.nn.Identity)
    assert input_channels(big) == 3


# ------------------------------------------------------------------------------------------
# strict loading


def test_strict_loading_reports_everything_at_once(tmp_path):
    state = tiny_state()
    del state["layer1.0.bn1.running_var"]
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["layer2.0.conv1.weight"] = torch.zeros(8, 4, 5, 5)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, arch="tiny-resnet")
    msg = str(err.value)
    assert str(path) in msg and "does not match architecture 'tiny-resnet'" in msg
    assert "missing keys (2)" in msg
    assert "layer1.0.bn1.running_var" in msg and "fc.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "shape mismatches (1)" in msg
    assert "layer2.0.conv1.weight is 8x4x5x5 but the model wants 8x4x3x3" in msg


def test_strict_loading_long_key_lists_are_shortened(tmp_path):
    state = {f"x{i}.weight": torch.zeros(1) for i in range(15)}
    state.update(tiny_state())
    path = tmp_path / "many.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(15\):.*\(5 more\)"):
        load_checkpoint(path, arch="tiny-resnet")


def test_strict_loading_prefix_hint(tmp_path):
    path = tmp_path / "backbone.pt"
    torch.save({"backbone." + k: v for k, v in tiny_state().items()}, path)
    with pytest.raises(CheckpointError, match="every unexpected key starts with 'backbone.': strip that prefix"):
        load_checkpoint(path, arch="tiny-resnet", num_classes=3)


def test_torchvision_checkpoint_as_cifar_and_back(tmp_path):
    imagenet_style = tmp_path / "r18.safetensors"
    cifar_style = tmp_path / "r18c.safetensors"
    save_file(build_model("resnet18", 10).state_dict(), str(imagenet_style))
    save_file(build_model("resnet18-cifar", 10).state_dict(), str(cifar_style))

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(cifar_style, arch="resnet18")
    msg = str(err.value)
    assert "conv1.weight is 64x3x3x3 but the model wants 64x3x7x7" in msg
    assert "did you mean resnet18-cifar?" in msg

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(imagenet_style, arch="resnet18-cifar")
    msg = str(err.value)
    assert "conv1.weight is 64x3x7x7 but the model wants 64x3x3x3" in msg
    assert "did you mean resnet18?" in msg


def test_deeper_resnet_hint(tmp_path):
    state = tiny_state()
    state["layer1.2.conv1.weight"] = torch.zeros(4, 4, 3, 3)
    path = tmp_path / "deep.safetensors"
    save_file(state, str(path))
    # The hint is only for the resnet family; tiny-resnet gets the generic advice.
    with pytest.raises(CheckpointError, match="Check --arch"):
        load_checkpoint(path, arch="tiny-resnet")


# ------------------------------------------------------------------------------------------
# unsafe and unsupported .pt files


@pytest.mark.parametrize("force_unsafe_env", [False, True])
@pytest.mark.parametrize("payload_cls", [Payload, ShellPayload])
def test_code_running_pickle_is_refused(tmp_path, monkeypatch, force_unsafe_env, payload_cls):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "x": payload_cls(marker)}, path)
    assert not marker.exists()
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, arch="tiny-resnet")
    msg = str(err.value)
    assert str(path) in msg and "refused" in msg and "safetensors" in msg
    with pytest.raises(CheckpointError):
        read_tensors(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload_cls", [Payload, ShellPayload])
def test_payload_is_live(tmp_path, payload_cls):
    """The files used above really run code when loaded without weights_only."""
    marker = tmp_path / "LIVE"
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "x": payload_cls(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(payload_cls(marker)))
    assert marker.exists()


def test_torchscript_archive_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(TinyResNet(3, width=4)).save(str(path))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, arch="tiny-resnet")
    msg = str(err.value)
    assert str(path) in msg and "TorchScript" in msg and "state_dict()" in msg


def test_legacy_pt_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    with open(path, "wb") as fh:
        torch.save(tiny_state(), fh, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, arch="tiny-resnet")
    msg = str(err.value)
    assert str(path) in msg and "legacy" in msg and "torch.save(state_dict)" in msg


@pytest.mark.parametrize("obj,words", [
    ([torch.zeros(1)], "holds a list, not a state dict"),
    ({"fc.weight": torch.zeros(1), "name": "resnet"}, "not tensors: name (str)"),
    ({"fc.weight": torch.zeros(1), "epoch": 3}, "not tensors: epoch (int)"),
    (torch.zeros(3), "holds a Tensor, not a state dict"),
    ({}, "state dict is empty"),
    ({"state_dict": {}, "epoch": 1}, "not tensors"),
    ({"w": torch.zeros(3, 3).to_sparse()}, "sparse"),
])
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_non_state_dict_refused(tmp_path, obj, words):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as err:
        read_tensors(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_corrupt_zip_refused(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(tiny_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        read_tensors(path)
    path.write_bytes(b"PK\x03\x04" + b"\0" * 10)
    with pytest.raises(CheckpointError, match=str(path)):
        read_tensors(path)


# ------------------------------------------------------------------------------------------
# safetensors header validation


def _valid_header():
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "U8", "shape": [2, 2], "data_offsets": [8, 12]}}


def _st_cases():
    dup = (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    one = lambda **entry: {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **entry}}  # noqa: E731
    return [
        ("empty", None, b"", "0 bytes, fewer than the 8-byte header length"),
        ("short", None, b"\x01\x02\x03", "3 bytes, fewer than the 8-byte header length"),
        ("len_over_file", struct.pack("<Q", 100) + b"{}", None, "header length 100 exceeds the file"),
        ("huge_len", struct.pack("<Q", 2 ** 63) + b"{}" * 8, None, f"header length {2 ** 63} exceeds"),
        ("over_limit", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", None, "100000000-byte limit"),
        ("non_utf8", b"\xff\xfe{}", b"", "not UTF-8"),
        ("non_json", b"{not json", b"", "not valid JSON"),
        ("zero_len", b"", b"", "not valid JSON"),
        ("array", b"[1, 2]", b"", "JSON list, not an object"),
        ("string", b'"x"', b"", "JSON str, not an object"),
        ("deep", b"[" * 100_000 + b"]" * 100_000, b"", "header"),
        ("duplicate", dup, b"\0" * 8, "duplicate key 'a'"),
        ("bad_dtype", one(dtype="F3"), b"\0" * 8, "unknown dtype 'F3'"),
        ("no_dtype", {"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype None"),
        ("neg_shape", one(shape=[-2]), b"\0" * 8, "invalid shape [-2]"),
        ("float_shape", one(shape=[2.0]), b"\0" * 8, "invalid shape"),
        ("bool_shape", one(shape=[True, 2]), b"\0" * 8, "invalid shape"),
        ("shape_not_list", one(shape=2), b"\0" * 8, "invalid shape"),
        ("neg_offset", one(data_offsets=[-8, 0]), b"\0" * 8, "invalid data_offsets"),
        ("reversed_offsets", one(data_offsets=[8, 0]), b"\0" * 8, "invalid data_offsets"),
        ("three_offsets", one(data_offsets=[0, 4, 8]), b"\0" * 8, "invalid data_offsets"),
        ("offsets_vs_shape", one(shape=[3]), b"\0" * 8, "spans 8 bytes but its shape [3] and dtype F32 need 12"),
        ("extra_field", one(extra=1), b"\0" * 8, "malformed entry"),
        ("entry_not_dict", {"a": [1, 2]}, b"", "malformed entry"),
        ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
         b"\0" * 8, "overlaps the previous tensor"),
        ("gap", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}},
         b"\0" * 12, "leaves a gap"),
        ("starts_late", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
         b"\0" * 8, "leaves a gap"),
        ("trailing", _valid_header(), b"\0" * 13, "has trailing bytes"),
        ("cut_short", _valid_header(), b"\0" * 11, "is cut short"),
        ("no_tensors", {}, b"", "holds no tensors"),
        ("only_metadata", {"__metadata__": {"k": "v"}}, b"", "holds no tensors"),
        ("bad_metadata", {"__metadata__": {"k": 1}, **_valid_header()}, b"\0" * 12,
         "__metadata__ must map strings to strings"),
        ("metadata_list", {"__metadata__": [], **_valid_header()}, b"\0" * 12,
         "__metadata__ must map strings to strings"),
        ("metadata_string", {"__metadata__": "", **_valid_header()}, b"\0" * 12,
         "__metadata__ must map strings to strings"),
        ("bad_name", {"../a": _valid_header()["a"]}, b"\0" * 8, "invalid tensor name"),
        ("empty_name", {"": _valid_header()["a"]}, b"\0" * 8, "invalid tensor name"),
        ("control_name", {"a\nb": _valid_header()["a"]}, b"\0" * 8, "invalid tensor name 'a\\nb'"),
    ]


@pytest.mark.parametrize("case,header,data,words", _st_cases(), ids=[c[0] for c in _st_cases()])
def test_safetensors_header_validation(tmp_path, case, header, data, words):
    path = tmp_path / f"{case}.safetensors"
    if data is None:          # header is the complete file
        path.write_bytes(header)
    elif header is None:      # data is the complete file
        path.write_bytes(data)
    else:
        write_raw_safetensors(path, header, data)
    for call in (lambda: validate_safetensors_header(path), lambda: read_tensors(path),
                 lambda: load_checkpoint(path, arch="tiny-resnet")):
        try:
            call()
        except CheckpointError as exc:
            msg = str(exc)
            assert str(path) in msg, msg
            assert words in msg, msg
        except Exception as exc:  # pragma: no cover - the failure being tested for
            pytest.fail(f"{case}: raised {type(exc).__name__} instead of CheckpointError: {exc}")
        else:  # pragma: no cover
            pytest.fail(f"{case}: accepted")


def test_valid_hand_written_header(tmp_path):
    values = struct.pack("<2f", 1.5, -2.0) + bytes([1, 2, 3, 4])
    path = write_raw_safetensors(tmp_path / "ok.safetensors",
                                 {"__metadata__": {"k": "v"}, **_valid_header()}, values)
    header, meta = validate_safetensors_header(path)
    assert meta == {"k": "v"} and set(header) == {"a", "b"}
    tensors, meta = read_tensors(path)
    assert meta == {"k": "v"}
    assert tensors["a"].tolist() == [1.5, -2.0]
    assert tensors["b"].tolist() == [[1, 2], [3, 4]]


def test_library_refusal_is_a_checkpoint_error(tmp_path):
    # Valid by the format's rules as Python reads them, but the library's usize overflows.
    path = write_raw_safetensors(tmp_path / "wide.safetensors",
                                 {"a": {"dtype": "F32", "shape": [0, 2 ** 70], "data_offsets": [0, 0]}})
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        read_tensors(path)


def test_header_length_is_checked_before_reading(tmp_path):
    # A header claiming the whole 2**63 range must be refused without trying to read it.
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 64 - 1) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds"):
        validate_safetensors_header(path)


# ------------------------------------------------------------------------------------------
# files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=f"checkpoint {path} does not exist"):
        load_checkpoint(path, arch="tiny-resnet")


def test_directory_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "dir.pt"
    path.mkdir()
    with pytest.raises(CheckpointError, match="is not a file"):
        read_tensors(path)


@pytest.mark.parametrize("name", ["model.onnx", "model.h5", "model", "model.npz"])
def test_unknown_suffix(tmp_path, name):
    path = tmp_path / name
    torch.save(tiny_state(), path)
    with pytest.raises(CheckpointError) as err:
        read_tensors(path)
    msg = str(err.value)
    assert str(path) in msg and "unknown checkpoint type" in msg and ".safetensors" in msg


def test_suffix_is_case_insensitive(tmp_path):
    state = tiny_state()
    torch.save(state, tmp_path / "UPPER.PT")
    save_file(state, str(tmp_path / "UPPER.SAFETENSORS"))
    assert set(read_tensors(tmp_path / "UPPER.PT")[0]) == set(state)
    assert set(read_tensors(tmp_path / "UPPER.SAFETENSORS")[0]) == set(state)


def test_errors_are_audit_errors():
    assert issubclass(CheckpointError, AuditError) and issubclass(ArchitectureError, AuditError)


# ------------------------------------------------------------------------------------------
# writing


def test_save_checkpoint_atomic_roundtrip(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    state = tiny_state()
    state["odd.weight"] = torch.arange(12.0).view(3, 4).t()  # non-contiguous
    state["half.weight"] = torch.rand(3).to(torch.bfloat16)
    meta = audit_metadata("tiny-resnet", 3, normalize="cifar10", classes=["x", "y", "z"])
    path = out / "model.safetensors"
    save_checkpoint(state, path, metadata=meta)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    tensors, got_meta = read_tensors(path)
    assert got_meta == meta
    assert set(tensors) == set(state)
    for k, v in state.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    # Overwriting replaces the file in one step and still leaves nothing behind.
    save_checkpoint({"w": torch.ones(2)}, path)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    tensors, got_meta = read_tensors(path)
    assert got_meta == {} and list(tensors) == ["w"]


def test_save_checkpoint_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "c.safetensors"
    save_checkpoint({"w": torch.ones(1)}, path)
    assert read_tensors(path)[0]["w"].tolist() == [1.0]


def test_save_checkpoint_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    from model_audit.errors import OutputError

    path = tmp_path / "model.safetensors"
    save_checkpoint({"w": torch.ones(2)}, path)
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputError, match="No space left on device") as err:
        save_checkpoint({"w": torch.zeros(5)}, path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_save_checkpoint_into_a_file_as_directory(tmp_path):
    from model_audit.errors import OutputError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        save_checkpoint({"w": torch.ones(1)}, blocker / "model.safetensors")


def test_same_file(tmp_path):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    save_file({"w": torch.ones(1)}, str(a))
    save_file({"w": torch.ones(1)}, str(b))
    sym = tmp_path / "sym.safetensors"
    sym.symlink_to(a)
    hard = tmp_path / "hard.safetensors"
    os.link(a, hard)
    sub = tmp_path / "sub"
    sub.mkdir()
    dotted = sub / ".." / "a.safetensors"
    assert same_file(a, a)
    assert same_file(a, sym) and same_file(sym, a)
    assert same_file(a, hard) and same_file(hard, sym)
    assert same_file(a, dotted)
    assert not same_file(a, b)  # identical content is not the same file
    # A path that does not exist yet is compared by its resolved name.
    assert not same_file(a, tmp_path / "missing.safetensors")
    assert same_file(tmp_path / "missing", sub / ".." / "missing")


def test_an_unexpected_failure_inside_loading_is_a_clear_error(tmp_path, monkeypatch):
    """Whatever a model's own loading code raises becomes a CheckpointError naming the file
    and the architecture (the CLI prints it without a traceback and exits 2)."""
    import model_audit.models.loaded as loaded_mod
    from model_audit.cli import cli
    from click.testing import CliRunner

    path = tmp_path / "m.safetensors"
    save_checkpoint(TinyResNet(10).state_dict(), path, metadata=audit_metadata("tiny-resnet", 10))
    before = path.read_bytes()

    def broken(state, model):
        raise ValueError("version should be set to 1 or 2 instead of None")

    monkeypatch.setattr(loaded_mod, "_with_versions", broken)
    with pytest.raises(CheckpointError, match=r"could not be loaded as 'tiny-resnet': ValueError: "
                                              r"version should be set"):
        load_checkpoint(path)
    result = CliRunner().invoke(cli, ["scan", str(path), "--probe", str(path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "could not be loaded as 'tiny-resnet'" in result.output
    assert path.read_bytes() == before and not (tmp_path / "out").exists()
