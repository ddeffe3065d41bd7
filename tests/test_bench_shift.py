"""bench shift and bench fix --target: the corruptions, the report, the Arachne-style search.

The benches themselves run on the reference ResNet-18 for tens of minutes (bench/RESULTS.md);
here their pieces run on small real inputs: CIFAR-style images, a linear head on features.
"""
import numpy as np
import pytest
import torch

from bench import arachne, shift_bench


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(4, 32, 32, 3)).astype(np.uint8)
    # smooth images (as photographs are), so that blur and pixelation change them gradually
    from scipy.ndimage import uniform_filter
    return np.stack([uniform_filter(b.astype(float), size=(5, 5, 1)).astype(np.uint8)
                     for b in base])


@pytest.mark.parametrize("shift", list(shift_bench.LADDER))
def test_every_corruption_grows_with_its_level_and_is_seeded(images, shift):
    ladder = shift_bench.LADDER[shift]
    mild, strong = (ladder[0], ladder[-1])
    out_mild = shift_bench._corrupt_all(images, shift, mild, seed=1)
    out_strong = shift_bench._corrupt_all(images, shift, strong, seed=1)
    assert out_mild.shape == images.shape and out_mild.dtype == np.uint8

    def err(x):
        return float(np.mean((x.astype(float) - images) ** 2))
    assert 0 < err(out_mild) < err(out_strong)
    assert np.array_equal(out_mild, shift_bench._corrupt_all(images, shift, mild, seed=1))


def test_cifar10c_contrast_is_their_formula(images):
    out = shift_bench.corrupt(images[0], "contrast", 0.3, np.random.default_rng(0))
    x = images[0] / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    assert np.array_equal(out, np.uint8(np.round(np.clip((x - means) * 0.3 + means, 0, 1) * 255)))


def test_label_shift_permutes_three_classes_cyclically():
    labels = np.arange(10).repeat(3)
    out, (a, b, c) = shift_bench.permuted(labels, seed=0)
    assert len({a, b, c}) == 3
    assert (out[labels == a] == b).all() and (out[labels == b] == c).all()
    assert (out[labels == c] == a).all()
    others = ~np.isin(labels, [a, b, c])
    assert (out[others] == labels[others]).all()


def _result(shift, seed, gains, flagged, scores):
    runs = {name: {"groups": [name], "gain": g, "last_gain": g - 1, "accepted": g > 0,
                   "kept_step": 10 if g > 0 else 0, "diverged": None, "seconds": 1.0}
            for name, g in gains.items()}
    return {"shift": shift, "seed": seed, "accuracy_before": 50.0, "flagged": flagged,
            "scan_scores": scores, "groups": ["conv1", "layer1", "fc"], "runs": runs}


def test_report_compares_flagged_with_the_oracle_and_the_full_fine_tune():
    scores = {"conv1": 0.1, "layer1": 0.6, "fc": 0.3}
    results = [_result("contrast", s, {"flagged": 20.0 + s, "conv1": 5.0, "layer1": 21.0,
                                       "fc": 2.0, "all": 18.0, "rgn": 10.0}, ["layer1"], scores)
               for s in range(2)]
    summary = shift_bench.summarize(results)["contrast"]
    assert summary["best"] == "layer1" and summary["ranks"] == [1, 1]
    assert summary["kept_original"] == 0

    class Args:
        steps, lr, preserve, seeds, repair_per_class, probe_per_class = 100, 0.01, 0.0, 2, 100, 200
        device = "cpu"

    text = "\n".join(shift_bench.report(Args, results, {"contrast": (0.15, 40.0)}, 90.0,
                                        shift_bench.Path("ref.safetensors")))
    assert "| contrast | 0.15 (-40) | 50.0 | layer1 | +20.5 (+20.0 to +21.0) |" in text
    assert "flagged >= full fine-tune on 1 of 1 corruptions" in text
    assert "below the per-group oracle by 0.5 points" in text


def test_arachne_localises_and_repairs_a_confusion_of_a_linear_head():
    """Features of two classes the head confuses (class 0 read as 1): the search over the
    localised weights repairs them, and keeps the images it had right."""
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4))
        head.bias.zero_()
        head.weight[1, 0] = 1.5   # class 1 also fires on feature 0: 0s are read as 1s
    feats = torch.cat([torch.eye(4)[0].repeat(20, 1), torch.eye(4)[1].repeat(20, 1),
                       torch.eye(4)[2].repeat(20, 1)]) + 0.05 * torch.randn(60, 4)
    labels = torch.tensor([0] * 20 + [1] * 20 + [2] * 20)
    pred = arachne.predict(head, head.weight.detach(), feats)
    neg = (labels == 0) & (pred == 1)
    assert int(neg.sum()) == 20
    chosen = arachne.localise(head.weight.detach(), head.bias.detach(), feats[neg], labels[neg], 5)
    # the weights into feature 0 of the two confused classes: raising 0's or lowering 1's
    assert chosen and set(chosen) <= {(0, 0), (1, 0)}
    pos = pred == labels
    result = arachne.repair(head, feats[neg], labels[neg], feats[pos], labels[pos],
                            budget_s=20, seed=0, maxiter=30, popsize=10)
    after = arachne.predict(head, result.w, feats)
    assert int((after[neg] == 0).sum()) >= 18 and bool((after[pos] == labels[pos]).all())
    assert result.fitness > result.fitness_before


def test_undoing_a_planted_confusion_fully_is_the_model_before_planting(tmp_path):
    """bench fix --plant-confusion's frontier: the digits model with class 3's weights added
    to class 8's; undoing all of it scores exactly as the unplanted model does (computed
    independently: both models evaluated end to end), and undoing more repairs more."""
    import copy

    from conftest import SAMPLES, save_like
    from model_audit.commands.fix.target import resolve_target
    from model_audit.core.evaluate import evaluate
    from model_audit.models.checkpoint import load_checkpoint
    from bench import fix_target

    sgd, train, probe = (SAMPLES / f"digits-{n}.safetensors" for n in ("sgd", "train", "probe"))
    original = load_checkpoint(sgd)
    model = copy.deepcopy(original.model)
    with torch.no_grad():
        model.fc.weight[8] += 1.4 * model.fc.weight[3]
        model.fc.bias[8] += 1.4 * model.fc.bias[3]
    planted = save_like(model, tmp_path / "planted.safetensors")
    rows = fix_target.undo_frontier(sgd, planted, None, None, probe, "cpu", "3:8", train)
    assert [r["share"] for r in rows] == list(fix_target.UNDO_SHARES)

    from model_audit import AuditOptions
    from model_audit.options import load_inputs, open_probe_for
    opts = AuditOptions(device="cpu")
    planted_ckpt, probe_set, _ = load_inputs(planted, probe, opts)
    train_set, _ = open_probe_for(planted_ckpt, train, opts)
    target = resolve_target(["3:8"], train_set.classes, evaluate(planted_ckpt.model, train_set))
    before = evaluate(planted_ckpt.model, probe_set).predictions
    after = evaluate(load_inputs(sgd, probe, opts)[0].model, probe_set).predictions
    exact = fix_target._scores(before, after, probe_set.labels, target)
    assert {k: v for k, v in rows[-1].items() if k != "share"} == exact
    assert exact["probe_before"] > 40 and exact["repair_rate"] > 0.5
    rates = [r["repair_rate"] for r in rows]
    assert rates == sorted(rates) and rates[0] < rates[-1]
