"""Shared fixtures: tiny real models and real probe sets (the committed digits samples)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.cifar import CIFAR_TARBALL, missing_data_message

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
SHARED_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True)
def _timm_key_cache(tmp_path_factory, monkeypatch):
    """The cache of timm's architecture keys (architecture guessing) in one folder for the
    test session, never in the user's home."""
    monkeypatch.setenv("MODEL_AUDIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def cifar_archive() -> Path:
    """The CIFAR-10 JPEG archive of ../shared/data; the test is skipped, saying why, without it."""
    if not CIFAR_TARBALL.is_file():
        pytest.skip(missing_data_message(CIFAR_TARBALL))
    return CIFAR_TARBALL


@pytest.fixture
def sgd_checkpoint() -> Path:
    return SAMPLES / "digits-sgd.safetensors"


@pytest.fixture
def adam_checkpoint() -> Path:
    return SAMPLES / "digits-adam.safetensors"


@pytest.fixture
def digits_probe() -> Path:
    return SAMPLES / "digits-probe.safetensors"


def snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes: to assert that nothing changed."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def write_tensor_probe(path: Path, images: torch.Tensor, labels: torch.Tensor, classes=None) -> Path:
    from safetensors.torch import save_file

    meta = {"classes": json.dumps(classes)} if classes is not None else None
    save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(path), metadata=meta)
    return path


def without_timing(d):
    """An audit without its wall-time fields (timing, seconds, ratios of seconds)."""
    if isinstance(d, dict):
        return {k: without_timing(v) for k, v in d.items()
                if k not in ("timing", "seconds", "relative_to_own")}
    if isinstance(d, list):
        return [without_timing(v) for v in d]
    return d


def png_declaring(width: int, height: int, color_type: int = 2) -> bytes:
    """A PNG whose header declares width x height (the pixel data is never reached)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))
