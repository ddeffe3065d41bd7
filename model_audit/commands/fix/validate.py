"""Do no harm: a validation part held out of the repair data, the repair's trajectory scored on
it, and the state that is kept (step 2 of :mod:`model_audit.commands.fix`).

* :func:`holdout` splits the repair data into the part trained on and a validation part,
  stratified by class (and by the targeted confusion, when there is one), seeded. The probe is
  never part of either.
* :class:`Trajectory` evaluates the validation part at the original state (step 0) and every
  few steps of a repair, keeps the best state of the retrained tensors in memory, and puts it
  back at the end. "No change" (step 0) is always a candidate.
* The best trained state (the most validation images right; the earlier on a tie; with a
  break budget ``max_break``, only among the states that break at most that share of the
  validation images the original gets right) is accepted only when it beats the original by
  more than noise: a one-sided max-statistic sign-flip test over the K trained states
  (:func:`~model_audit.core.stats.max_sign_flip_p`, Westfall and Young) at ``alpha``.
  Picking the best of K states would pass a single test at ``alpha`` by chance far more often
  than ``alpha``; the max-statistic test accounts for the pick exactly, and, unlike
  Bonferroni's ``alpha / K``, does not pay for K states that are nearly the same (the
  checkpoints of one repair are). Otherwise the original is kept.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...core.stats import max_sign_flip_p, mcnemar_exact
from ...errors import ConfigError, ProbeError
from ...io.probe import BatchCache
from ...results.repair import Candidate, Validation, check_share, within_budget

#: Fewest validation images a repair is judged on.
MIN_VALIDATION = 20
#: Trained states scored on validation along one repair (besides step 0, the original).
CHECKPOINTS = 8


def holdout(labels: torch.Tensor, share: float, seed: int,
            strata: Optional[torch.Tensor] = None) -> Tuple[List[int], List[int]]:
    """(positions trained on, validation positions) of the repair data: ``share`` of every
    class (of every stratum when ``strata`` is given) held out, at least one image of each
    stratum that has two, seeded.

    Raises:
        ConfigError: a share outside (0, 0.5], or repair data too small to hold out
            :data:`MIN_VALIDATION` images.
    """
    check_share(share)
    n = int(labels.numel())
    needed = math.ceil(MIN_VALIDATION / share)
    if n < needed:
        raise ConfigError(
            f"the repair data has {n} images, too few to hold out a validation part: with "
            f"--validation {share:g} it needs at least {needed} (a validation part of "
            f"{MIN_VALIDATION}); give more repair data or a larger --validation share")
    key = labels.long() if strata is None else labels.long() * 2 + strata.long()
    rng = np.random.default_rng(seed + 31337)
    fit: List[int] = []
    val: List[int] = []
    for k in torch.unique(key).tolist():
        members = torch.nonzero(key == k).flatten().numpy()
        members = members[rng.permutation(len(members))]
        take = int(round(share * len(members)))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        else:
            take = 0
        val.extend(members[:take].tolist())
        fit.extend(members[take:].tolist())
    return sorted(fit), sorted(val)


@torch.no_grad()
def predictions(model: nn.Module, cache: BatchCache, device: str
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Predictions and per-image losses of ``model`` (put in eval mode) over ``cache`` (every
    rank's rows gathered when the cache is sharded)."""
    model.eval()
    preds, losses = [torch.empty(0, dtype=torch.long)], [torch.empty(0)]
    with distributed.agree(cache.sharded):
        for _, x, y in cache:
            logits = model(x.to(device)).float()
            preds.append(logits.argmax(1).cpu())
            losses.append(F.cross_entropy(logits, y.to(device), reduction="none").cpu())
    return cache.gathered(torch.cat(preds)), cache.gathered(torch.cat(losses))


class Trajectory:
    """Scores a repair's states on the validation part and keeps the best one in memory.

    ``names`` are the state-dict entries the repair may change (the selected groups'
    parameters and buffers); only those are copied, once per better state.
    """

    def __init__(self, val: BatchCache, base_predictions: torch.Tensor, base_losses: torch.Tensor,
                 names: Sequence[str], every: int, alpha: float, device: str,
                 keep_best: bool = False, max_break: Optional[float] = None,
                 seed: int = 0) -> None:
        self.val, self.device, self.every, self.alpha = val, device, max(1, every), alpha
        self.keep_best = keep_best  # keep the best trained state even when not accepted
        self.max_break, self.seed = max_break, seed
        self.rights: List[torch.Tensor] = []   # per trained state: validation images right
        self.labels = val.probe.labels[torch.as_tensor(val.positions, dtype=torch.long)]
        self.base_right = base_predictions == self.labels
        self.names = list(names)
        self.candidates: List[Candidate] = [Candidate(
            0, int(self.base_right.sum()), 0, 0, float(base_losses.mean()))]
        self.snapshot: Optional[Dict[str, torch.Tensor]] = None
        self.best: Optional[Candidate] = None

    def due(self, step: int, last: int) -> bool:
        """Whether the state after ``step`` optimizer steps (of ``last``) is scored."""
        return step == last or step % self.every == 0

    def observe(self, step: int, model: nn.Module,
                state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Score the state after ``step`` steps; keep a copy when it is the best so far.

        ``state`` is the model's state dict taken before any module was wrapped (its tensors
        are the ones the optimizer updates in place); by default ``model.state_dict()``."""
        preds, losses = predictions(model, self.val, self.device)
        right = preds == self.labels
        cand = Candidate(step, int(right.sum()), int((right & ~self.base_right).sum()),
                         int((~right & self.base_right).sum()), float(losses.mean()))
        self.candidates.append(cand)
        self.rights.append(right)
        if not within_budget(cand, self.max_break, self.candidates[0].correct):
            return
        if self.best is None or cand.correct > self.best.correct:
            self.best = cand
            state = model.state_dict() if state is None else state
            self.snapshot = {k: state[k].detach().clone() for k in self.names}

    def result(self) -> Validation:
        if not self.rights:
            raise ProbeError("internal error: the repair's trajectory was never scored")
        if self.best is None:  # no state within the break budget
            return Validation(len(self.labels), tuple(self.candidates), 0, -1, 1.0, self.alpha,
                              False, self.max_break)
        # per image and state: +1 fixed, -1 broken; the null flips each image's row. With a
        # break budget the null's maximum runs over every state (the budget's eligibility is
        # not re-applied per flip): a larger null maximum, so a conservative p-value
        differences = (torch.stack(self.rights, 1).long()
                       - self.base_right.long()[:, None]).numpy()
        p = max_sign_flip_p(differences, float(self.best.net), seed=self.seed)
        accepted = self.best.net > 0 and p < self.alpha
        kept = self.best.step if accepted or self.keep_best else 0
        return Validation(len(self.labels), tuple(self.candidates), kept, self.best.step, p,
                          self.alpha, accepted, self.max_break,
                          mcnemar_exact(self.best.fixed, self.best.broken, "greater"))

    def restore(self, model: nn.Module, original: Dict[str, torch.Tensor]) -> Validation:
        """Put the kept state into ``model`` (the best trained one when it was accepted or
        ``keep_best`` forces it, the original's tensors otherwise) and return the evidence."""
        result = self.result()
        chosen = self.snapshot if result.chosen else original
        state = model.state_dict()
        with torch.no_grad():
            for k in self.names:
                state[k].copy_(chosen[k])
        return result
