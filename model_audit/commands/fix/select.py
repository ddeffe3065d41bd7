"""What a repair retrains, and its controls (steps 1 and 5 of :mod:`model_audit.commands.fix`).

The selection (named groups, an ``audit.json`` or a fresh scan), the ``random`` and ``rgn``
controls, and the content-hash check that the probe and the repair data share no image.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ...baselines import compute_baselines
from ...core.layers import LayerGroup, layer_groups
from ...errors import ConfigError
from ...io.probe import BatchCache, ProbeSet
from ...io.records import AuditRecord
from ...models.checkpoint import LoadedCheckpoint
from ..scan import scan
from ...results.scan import ScanConfig
from ...results.fix import FixConfig

#: A disjoint random control is used when its parameter share is within this relative
#: distance of the selection's; otherwise the control falls back to whole groups.
RANDOM_SHARE_TOLERANCE = 0.25
#: The first random draw within this relative distance is taken as it is (so that the control
#: varies with the seed instead of converging on the one best-fitting subset).
RANDOM_SHARE_ACCEPT = 0.1


def content_hashes(probe: ProbeSet, batch_size: int = 256) -> List[str]:
    """SHA-1 of every image's decoded 8-bit pixels (shape included), in probe order; of a
    non-image input's values as the model gets them (float32 or int64, shape and dtype
    included): 8-bit quantisation would make distinct token ids or feature rows equal."""
    out: List[str] = []
    for start in range(0, len(probe), batch_size):
        positions = list(range(start, min(start + batch_size, len(probe))))
        x = probe.load(positions, normalized=False)
        if not probe.is_image:
            for row in x:
                digest = hashlib.sha1(f"{tuple(row.shape)} {row.dtype}".encode())
                digest.update(row.contiguous().numpy().tobytes())
                out.append(digest.hexdigest())
            continue
        pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        for img in pixels:
            digest = hashlib.sha1(str(tuple(img.shape)).encode())
            digest.update(img.contiguous().numpy().tobytes())
            out.append(digest.hexdigest())
    return out


def check_overlap(probe: ProbeSet, train: ProbeSet) -> List[Tuple[int, int]]:
    """(probe position, train position) pairs of identical images."""
    train_index: Dict[str, int] = {}
    for i, h in enumerate(content_hashes(train)):
        train_index.setdefault(h, i)
    return [(i, train_index[h]) for i, h in enumerate(content_hashes(probe)) if h in train_index]


def resolve_selection(config: FixConfig, groups: Sequence[LayerGroup], ckpt: LoadedCheckpoint,
                       probe: ProbeSet, audit: Optional[Union[str, os.PathLike]],
                       progress: bool
                       ) -> Tuple[Tuple[str, ...], str, Optional[Dict[str, float]]]:
    """The selected group names (in forward order) and where they come from.

    Named groups (``config.layers``), else the groups flagged by ``audit`` (an ``audit.json``
    of this checkpoint at this granularity), else those flagged by a scan of ``probe`` (``fix``
    gives the part of the repair data it trains on, or a targeted confusion's instances:
    never the probe it is judged on). The third item is the scan's (or the audit's) score of
    every group, None for named groups.
    """
    names = [g.name for g in groups]
    if config.layers != "auto":
        wanted = list(config.layers)
        unknown = [n for n in wanted if n not in names]
        if unknown or not wanted:
            raise ConfigError(f"unknown layer group(s) {', '.join(unknown) or '(none)'}; the "
                              f"groups at granularity {config.options.granularity!r} are: "
                              f"{', '.join(names)}")
        return tuple(n for n in names if n in wanted), "names", None
    if audit is not None:
        record = AuditRecord.read(audit)
        if record.sha256 != ckpt.sha256:
            raise ConfigError(f"{audit} is the audit of another checkpoint (sha256 "
                              f"{str(record.sha256)[:12]}..., this one "
                              f"{ckpt.sha256[:12]}...); scan this checkpoint or drop --audit")
        if (record.granularity or "group") != config.options.granularity:
            raise ConfigError(f"{audit} was made at granularity {record.granularity!r}, "
                              f"not {config.options.granularity!r}")
        flagged = record.flagged
        source = f"audit {audit}"
        scores = {layer.name: layer.score for layer in record.layers}
    else:
        result = scan(ckpt, probe, ScanConfig(options=config.options, baselines=()),
                      progress=progress)
        flagged = result.flagged
        source = "scan"
        scores = {layer.name: layer.score for layer in result.layers}
    if not flagged:
        raise ConfigError("the scan flags no layer group, so --layers auto has nothing to "
                          "retrain; name the groups with --layers")
    unknown = [n for n in flagged if n not in names]
    if unknown:
        raise ConfigError(f"the audit flags groups this model does not have: {', '.join(unknown)}")
    return tuple(n for n in names if n in flagged), source, scores


def _random_groups(groups: Sequence[LayerGroup], selected: Sequence[str], seed: int
                   ) -> Tuple[str, ...]:
    """Random whole groups with the share closest to the selection's (not the selection)."""
    target = sum(g.share for g in groups if g.name in selected)
    rng = np.random.default_rng(seed + 7919)
    best: Optional[Tuple[float, Tuple[str, ...]]] = None
    for _ in range(64):
        order = rng.permutation(len(groups))
        chosen: List[str] = []
        share = 0.0
        for i in order:
            if share >= target:
                break
            chosen.append(groups[i].name)
            share += groups[i].share
        names = tuple(g.name for g in groups if g.name in chosen)
        if set(names) == set(selected) and len(groups) > len(selected):
            continue
        gap = abs(share - target)
        if best is None or gap < best[0]:
            best = (gap, names)
    return best[1] if best else tuple(g.name for g in groups)


def random_control(model: nn.Module, groups: Sequence[LayerGroup], selected: Sequence[str],
                    seed: int) -> Tuple[Tuple[str, ...], List[LayerGroup], bool]:
    """The ``random`` control: (names, the units they name, disjoint from the selection?).

    Whole groups are too coarse for a fair random control: in a ResNet the only sets of groups
    with the share of the flagged group usually *contain* it (layer2 + bn1 for layer2), and
    then the control is the selection again. So the control draws parameter-owning *modules*
    outside the selected groups, at random (seeded draws; each adds modules in random order,
    skipping those that would move its share away from the selection's), and takes the first
    draw within :data:`RANDOM_SHARE_ACCEPT` of the selection's share (else the closest of 256
    draws). When no draw comes within
    :data:`RANDOM_SHARE_TOLERANCE` of it (relative), it falls back to random whole groups
    with the closest share, which may overlap the selection (reported as not disjoint).
    """
    target = sum(g.share for g in groups if g.name in selected)
    taken = {p for g in groups if g.name in selected for p in g.parameter_names}
    modules = [u for u in layer_groups(model, "module") if not taken & set(u.parameter_names)]
    rng = np.random.default_rng(seed + 7919)
    best: Optional[Tuple[float, List[LayerGroup]]] = None
    for _ in range(256 if modules else 0):
        order = rng.permutation(len(modules))
        chosen: List[LayerGroup] = []
        share = 0.0
        for i in order:
            unit = modules[int(i)]
            if abs(share + unit.share - target) > abs(share - target) and chosen:
                continue  # adding it moves away from the target: try the next one
            chosen.append(unit)
            share += unit.share
        gap = abs(share - target)
        if best is None or gap < best[0]:
            best = (gap, chosen)
        if gap <= RANDOM_SHARE_ACCEPT * target:
            break  # the first draw close enough: random, not the one best-fitting subset
    if best is not None and target > 0 and best[0] <= RANDOM_SHARE_TOLERANCE * target:
        keep = {u.name for u in best[1]}
        units = [u for u in modules if u.name in keep]  # forward order
        return tuple(u.name for u in units), units, True
    names = _random_groups(groups, selected, seed)
    return names, list(groups), not (set(names) & set(selected))


def rgn_control(model: nn.Module, groups: Sequence[LayerGroup], selected: Sequence[str],
                 train: ProbeSet, wrong: List[int], n: int, batch_size: int, device: str
                 ) -> Tuple[str, ...]:
    """The ``rgn`` control: Auto-RGN's choice of as many groups as the selection.

    The groups with the largest ||grad|| / ||weight|| (Lee et al. 2023) on up to 512 of the
    repair data's errors ``wrong`` (on the first 256 of its ``n`` images when the model makes
    none), in forward order; a NaN score ranks last, ties go to the earlier group.
    """
    errors = wrong[:512] if wrong else list(range(min(256, n)))
    rgn = compute_baselines(model, BatchCache(train, errors, batch_size, shard=True), groups,
                            ["auto_rgn"],
                            device=device)["auto_rgn"].scores
    order = sorted(range(len(groups)), key=lambda i: (-np.nan_to_num(rgn[i], nan=-1), i))
    top = {groups[i].name for i in order[:len(selected)]}
    return tuple(g.name for g in groups if g.name in top)


def control_groups(name: str, model: nn.Module, groups: Sequence[LayerGroup],
                   selected: Sequence[str], train: ProbeSet, wrong: List[int], seed: int,
                   batch_size: int, device: str
                   ) -> Tuple[Tuple[str, ...], List[LayerGroup], Optional[bool]]:
    """What the control ``name`` retrains: (names, the units they name, disjoint from the
    selection? - for the random control only)."""
    if name == "all":
        return tuple(g.name for g in groups), list(groups), None
    if name == "random":
        return random_control(model, groups, selected, seed)
    return rgn_control(model, groups, selected, train, wrong, len(train), batch_size,
                       device), list(groups), None
