"""Matching a checkpoint's keys and shapes against architectures, and the cache that makes a
second guess cheap.

Guessing an architecture compares the checkpoint's state-dict keys with those of every
registered architecture (torchvision's ~100, timm's ~1,000). Building a template costs about
0.05 s (on the meta device), so the sorted key list of each one built is kept, as a SHA-1, in a
cache file per library version (:class:`KeyCache`): a later guess builds only the
architectures whose keys are the checkpoint's. ``MODEL_AUDIT_CACHE`` names the folder
(default ``~/.cache/model-audit``); a read-only home only loses the speed-up.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Sequence

import torch


def shapes_match(expected: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]],
                 head_keys: Sequence[str]) -> bool:
    """Every tensor of ``expected`` has its shape in ``shapes``, the head's (``head_keys``)
    aside from its first dimension, the number of classes."""
    return all(tuple(expected[k].shape) == tuple(shapes[k])
               or (k in head_keys and tuple(expected[k].shape)[1:] == tuple(shapes[k])[1:])
               for k in expected)


def keys_digest(keys: Iterable[str]) -> str:
    """SHA-1 of the sorted keys (the same set of keys gives the same digest)."""
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("MODEL_AUDIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "model-audit"))


class KeyCache:
    """Architecture name -> :func:`keys_digest` of its state dict, in one JSON file per
    library and version (``<library>-<version>-keys.json``)."""

    def __init__(self, library: str, version: str) -> None:
        self.path = cache_dir() / f"{library}-{version}-keys.json"
        try:
            self.digests: Dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.digests = {}
        self.changed = False

    def __contains__(self, name: str) -> bool:
        return name in self.digests

    def __getitem__(self, name: str) -> str:
        return self.digests[name]

    def __setitem__(self, name: str, digest: str) -> None:
        if self.digests.get(name) != digest:
            self.digests[name], self.changed = digest, True

    def save(self) -> None:
        """Replace the file atomically when something was added; a read-only folder only
        loses the speed-up (the cache is not an output: it is never listed as written)."""
        if not self.changed:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.digests, sort_keys=True))
            os.replace(tmp, self.path)
            self.changed = False
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
