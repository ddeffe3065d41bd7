import math

import pytest
import torch

from model_audit.errors import ConfigError
from model_audit.core.schedules import (
    MomentumSchedule, MomentumScheduler, beta_momentum, cosine_lr, crossover_lr, damping_ratio,
    damping_regime, hybrid_momentum)


@pytest.mark.parametrize("lr,expected", [(0.1, 1 - 2 * math.sqrt(0.1)), (0.01, 0.8),
                                          (0.0025, 0.9), (0.001, 1 - 2 * math.sqrt(0.001))])
def test_beta_momentum_values(lr, expected):
    assert beta_momentum(lr) == pytest.approx(expected)


def test_beta_momentum_clips():
    assert beta_momentum(0.25) == 0.0
    assert beta_momentum(1.0) == 0.0
    assert beta_momentum(0.0) == pytest.approx(0.999)
    assert beta_momentum(1e-8, max_momentum=0.95) == 0.95


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_beta_momentum_rejects_bad_lr(bad):
    with pytest.raises(ConfigError, match="learning rate"):
        beta_momentum(bad)


def test_damping_regimes():
    # The beta momentum is critical by construction.
    for lr in (0.1, 0.01, 0.001):
        assert damping_ratio(beta_momentum(lr), lr) == pytest.approx(1.0)
        assert damping_regime(beta_momentum(lr), lr) == "critical"
    # Constant 0.9 under a cosine from 0.1: underdamped until lr < 0.0025, then overdamped.
    assert damping_regime(0.9, 0.1) == "underdamped"
    assert damping_regime(0.9, 0.0001) == "overdamped"
    assert crossover_lr(0.9) == pytest.approx(0.0025)
    assert damping_regime(0.9, 0.0025) == "critical"
    # tolerance: zeta = 1.04 is critical at 5%, overdamped at 1%
    lr = 0.01
    mu = 1 - 1.04 * 2 * math.sqrt(lr)
    assert damping_regime(mu, lr) == "critical"
    assert damping_regime(mu, lr, tolerance=0.01) == "overdamped"
    assert damping_ratio(0.5, 0.0) == math.inf


def test_hybrid_switches_at_crossover_and_latches():
    sched = MomentumSchedule("hybrid")
    assert sched(0.01) == pytest.approx(0.8)
    assert sched(0.001) == 0.9          # beta would be 0.937: switched to the constant
    assert sched(0.01) == 0.9           # a warm restart keeps the constant once switched
    assert hybrid_momentum(0.01) == pytest.approx(0.8)


def test_unknown_schedule_lists_valid():
    with pytest.raises(ConfigError, match="beta, hybrid, constant"):
        MomentumSchedule("nesterov")


def test_scheduler_drives_real_sgd_with_cosine():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    ms = MomentumScheduler(opt, "beta")
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    seen = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_sched.step()
        ms.step()
        group = opt.param_groups[0]
        assert group["momentum"] == pytest.approx(beta_momentum(group["lr"]))
        seen.append(group["momentum"])
    assert seen == sorted(seen)            # lr falls, so the momentum rises
    # SGD really used the momentum: a buffer exists for every parameter.
    assert all("momentum_buffer" in opt.state[p] and opt.state[p]["momentum_buffer"] is not None
               for p in model.parameters())
    assert len(ms.history) == 21
    for rec in ms.history:  # critical, except where the clip at 0.999 binds (lr -> 0)
        clipped = rec.lr < crossover_lr(0.999)
        assert rec.regime == ("overdamped" if clipped else "critical")


def test_scheduler_sets_adam_beta1():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.999))
    ms = MomentumScheduler(opt, "beta")
    assert opt.param_groups[0]["betas"] == (pytest.approx(0.8), 0.999)
    opt.param_groups[0]["lr"] = 0.0025
    ms.step()
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.9)
    p.sum().backward()
    opt.step()  # Adam accepts the betas it was given


def test_scheduler_rejects_optimizer_without_momentum():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ConfigError, match="neither 'momentum' nor 'betas'"):
        MomentumScheduler(torch.optim.Adagrad([p]), "beta")


def test_cosine_lr_endpoints():
    assert cosine_lr(0, 5, 0.01, 0.001) == pytest.approx(0.01)
    assert cosine_lr(4, 5, 0.01, 0.001) == pytest.approx(0.001)
    assert cosine_lr(0, 1, 0.01) == 0.01
