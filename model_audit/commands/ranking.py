"""What ranks and flags a scan's groups, and how far it is to be trusted on this model.

By default the combined score ranks the groups and the flag rule flags them. ``--method NAME``
ranks by another method; ``--method auto`` by the method that localised planted faults best on
this model and probe, read from a ``sanity`` run (:class:`~model_audit.core.scoring.
MethodEvidence`), when its lead over the default is more than chance gives. Given evidence,
the scan says next to its ranking how often that method ranked a planted fault's group first
on this model (:meth:`Ranking.trust`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..baselines import BASELINES
from ..core.attribution import METRIC_NAME
from ..core.scoring import AUTO, COMBINED, DEFAULT_METHOD, OWN, MethodChoice, MethodEvidence
from ..errors import ConfigError
from ..io.probe import ProbeSet
from ..models.checkpoint import LoadedCheckpoint


def choose_method(method: str, ev: Optional[MethodEvidence], ckpt: LoadedCheckpoint,
                  probe: ProbeSet, metric: str = METRIC_NAME
                  ) -> Tuple[str, str, Optional[MethodChoice]]:
    """(the method that ranks and flags: the own metric's name ``metric`` or a baseline's,
    how it was chosen: default, given or sanity, and for ``auto`` the test behind the choice),
    after checking that the sanity evidence ``ev`` is of this checkpoint, probe and own metric.
    ``auto`` keeps the default ranking unless another method localised this model's planted
    faults better beyond noise (:meth:`~model_audit.core.scoring.MethodEvidence.choice`).

    Raises:
        ConfigError: evidence of another checkpoint (sha256), another probe, or another
            formulation of the own metric.
    """
    if ev is not None:
        if ev.sha256 and ev.sha256 != ckpt.sha256:
            raise ConfigError(
                f"{ev.source} is of another checkpoint (sha256 {ev.sha256[:12]}..., this one "
                f"{ckpt.sha256[:12]}...): run `model-audit sanity` on this checkpoint and "
                "probe, and give its sanity.json")
        if ev.probe_n and (ev.probe_n != len(probe) or (
                ev.probe_classes and tuple(ev.probe_classes) != tuple(probe.classes))):
            raise ConfigError(
                f"{ev.source} was measured on another probe ({ev.probe_n} images, classes "
                f"{', '.join(ev.probe_classes[:5])}...; this probe: {len(probe)} images): "
                "give the sanity.json of this checkpoint and probe")
        if ev.own != metric:
            raise ConfigError(
                f"{ev.source} measured the own metric {ev.own}, this scan computes {metric}: "
                f"give --metric {ev.own}, or the sanity.json of a `sanity --metric {metric}` run")
    if method == AUTO:
        if ev is None:
            raise ConfigError("--method auto needs sanity evidence (--sanity SANITY_JSON)")
        usable = [n for n in BASELINES
                  if not (probe.integer_inputs and BASELINES[n].scales_input)]
        usable += [COMBINED] if "auto_rgn" in usable else []
        chosen = ev.choice(usable)
        return chosen.method, "sanity", chosen
    if method == OWN:
        return metric, "given", None
    return method, "default" if method == DEFAULT_METHOD else "given", None


def ranked(names: Sequence[str], scores: np.ndarray) -> Tuple[str, ...]:
    """``names`` by ``scores``, the highest first (non-finite scores last; ties in the given
    order)."""
    values = np.asarray(scores, dtype=np.float64)
    values = np.where(np.isfinite(values), values, -np.inf)
    return tuple(names[i] for i in np.argsort(-values, kind="stable"))
