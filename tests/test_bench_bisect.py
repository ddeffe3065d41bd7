"""bench bisect: the buggy releases' data and the bench's second computation of the top group.

The bench itself fine-tunes the reference ResNet-18 (minutes per release, bench/RESULTS.md);
here its pieces run on the committed digits model.
"""
import torch

from bench import bisect_bench
from conftest import SAMPLES
from model_audit.commands.bisect import bisect
from model_audit.core.evaluate import evaluate
from model_audit.core.layers import layer_groups
from model_audit.core.plant import Planter
from model_audit.io.probe import open_probe
from model_audit.models.checkpoint import load_checkpoint

CLASSES = tuple(str(i) for i in range(10))


def test_each_bug_is_in_the_data_and_nowhere_else():
    x = torch.randn(30, 1, 8, 8)
    y = torch.arange(10).repeat(3)
    sx, sy = bisect_bench.buggy_data(x, y, "swap:3:5", CLASSES, seed=0)
    assert torch.equal(sx, x) and (sy[y == 3] == 5).all() and (sy[y == 5] == 3).all()
    assert torch.equal(sy[(y != 3) & (y != 5)], y[(y != 3) & (y != 5)])
    nx, ny = bisect_bench.buggy_data(x, y, "noise:0.5", CLASSES, seed=0)
    assert torch.equal(ny, y) and 0.3 < float((nx - x).std()) < 0.7
    assert torch.equal(nx, bisect_bench.buggy_data(x, y, "noise:0.5", CLASSES, seed=0)[0])
    dx, dy = bisect_bench.buggy_data(x, y, "drop:4", CLASSES, seed=0)
    assert len(dy) == 27 and not (dy == 4).any() and len(dx) == 27


def test_the_hand_merged_check_equals_the_bisection():
    base = load_checkpoint(SAMPLES / "digits-sgd.safetensors")
    probe = open_probe(SAMPLES / "digits-probe.safetensors", channels=1,
                       normalize=base.normalize or "none")
    groups = layer_groups(base.model)
    layer2 = next(g for g in groups if g.name == "layer2")
    candidate = Planter(base.model, layer2, "noise", seed=1).apply(0.5).eval()
    regression = bisect(base.model, candidate, groups, probe)
    right_a = evaluate(base.model, probe).predictions == probe.labels
    right_b = evaluate(candidate, probe).predictions == probe.labels
    regressed = torch.nonzero(right_a & ~right_b).flatten().tolist()
    fixes = torch.nonzero(~right_a & right_b).flatten().tolist()
    best = regression.best
    assert best.groups == ("layer2",)
    check = bisect_bench.hand_merged_recovery(base.model, candidate, layer2, probe, regressed,
                                              fixes, base.arch)
    assert check == (best.recovered, best.lost_fixes)
