"""Shared fixtures: tiny real models and real probe sets (the committed digits samples)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bench.cifar import CIFAR_TARBALL, missing_data_message

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
SHARED_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _session_threads() -> int:
    """The intra-op thread count of this test session: the machine's default or
    OMP_NUM_THREADS; under pytest-xdist the cores shared out among the workers (two workers
    with two threads each on two cores would spend their time in spinning barriers). The
    suite must pass under any of them (the golden tests' tolerance covers 1, 2 and 4)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        return max(1, (os.cpu_count() or 1) // workers)
    return torch.get_num_threads()


SESSION_THREADS = _session_threads()


@pytest.fixture(autouse=True)
def _threads():
    """Every test starts with the session's thread count and leaves it so: a test that sets
    its own (one thread for many tiny ops) cannot change what a later test computes."""
    torch.set_num_threads(SESSION_THREADS)
    yield
    torch.set_num_threads(SESSION_THREADS)


@pytest.fixture(autouse=True)
def _timm_key_cache(tmp_path_factory, monkeypatch):
    """The cache of timm's and torchvision's architecture keys (architecture guessing) in one
    folder for the test session, never in the user's home; shared by the pytest-xdist
    workers (the cache file is replaced atomically), so the first guess pays for the rest."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    monkeypatch.setenv("MODEL_AUDIT_CACHE", str(base / "cache"))


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


def save_like(model: torch.nn.Module, path: Path,
              like: Path = SAMPLES / "digits-sgd.safetensors") -> Path:
    """Save ``model``'s weights at ``path`` with the metadata (architecture) of ``like``."""
    from model_audit.io.tensors import read_tensors
    from model_audit.models.checkpoint import save_checkpoint

    _, meta = read_tensors(like)
    save_checkpoint(model.state_dict(), path, metadata=meta)
    return path


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


#: The longest test files (about 30-110 s each on one core), run first: pytest-xdist hands
#: out whole files (``--dist loadfile``, so that a module's fixtures are computed once), and a
#: long file handed out last would keep one worker busy while the others wait.
LONGEST_FIRST = ("test_distributed.py", "test_torchvision_families.py",
                 "test_bench_distributed.py", "test_baselines.py", "test_bench_train.py",
                 "test_bench_sources.py", "test_sources.py", "test_integration_cifar.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The longest files first, the rest in their usual order (``--random-order`` shuffles
    after this)."""
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)
