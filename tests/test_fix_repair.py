"""fix that helps and never harms: the validation part and the state kept, the preservation
term, targeted repair of a confusion, and the bad inputs of each (issue #29).

Real models: the committed digits model, and two damaged copies of it with a known defect
(noise in layer2; class 3's evidence added to class 8's logit, a trained-in confusion 3 -> 8).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import SAMPLES, save_like, snapshot
from model_audit.cli import cli
from model_audit.commands.fix import NO_REPAIR_EXIT, fix
from model_audit.results.fix import FixConfig
from model_audit.commands.fix.train import Teacher
from model_audit.commands.fix.validate import MIN_VALIDATION, holdout
from model_audit.core.stats import mcnemar_exact
from model_audit.core.layers import layer_groups
from model_audit.core.plant import Planter
from model_audit.errors import ConfigError
from model_audit.io.tensors import read_tensors
from model_audit.models.checkpoint import load_checkpoint

SGD = SAMPLES / "digits-sgd.safetensors"
TRAIN = SAMPLES / "digits-train.safetensors"
PROBE = SAMPLES / "digits-probe.safetensors"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The digits model with Gaussian noise in layer2 (probe accuracy 96% -> 77%)."""
    ckpt = load_checkpoint(SGD)
    group = next(g for g in layer_groups(ckpt.model) if g.name == "layer2")
    model = Planter(ckpt.model, group, "noise", seed=0).apply(0.5)
    return save_like(model, tmp_path_factory.mktemp("damaged") / "noisy.safetensors")


@pytest.fixture(scope="module")
def confused(tmp_path_factory):
    """The digits model with 1.4 x class 3's weights added to class 8's: most 3s are read as
    8s, the other classes are almost untouched."""
    model = copy.deepcopy(load_checkpoint(SGD).model)
    with torch.no_grad():
        model.fc.weight[8] += 1.4 * model.fc.weight[3]
        model.fc.bias[8] += 1.4 * model.fc.bias[3]
    return save_like(model, tmp_path_factory.mktemp("confused") / "confused.safetensors")


def run(ckpt, out, *extra):
    return CliRunner().invoke(cli, ["fix", str(ckpt), "--train", str(TRAIN), "--probe",
                                    str(PROBE), "--output", str(out / "fixed.safetensors"),
                                    "--out", str(out / "report"), *[str(e) for e in extra]])


# ------------------------------------------------------------------------------------------
# Do no harm


def test_a_repair_that_helps_is_kept_and_written(damaged, tmp_path):
    r = run(damaged, tmp_path, "--layers", "layer2", "--steps", "40", "--controls", "random")
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "report/fix.json").read_text())
    sel, v = d["selection"], d["selection"]["validation"]
    assert d["validation"]["repair_found"] and d["output"]["written"]
    assert not d["output"]["forced"] and (tmp_path / "fixed.safetensors").is_file()
    _, meta = read_tensors(tmp_path / "fixed.safetensors")  # provenance of the state written
    assert meta["model_audit.fix.accepted"] == "true"
    assert meta["model_audit.fix.kept_step"] == str(d["selection"]["kept_step"])
    assert meta["model_audit.fix.preserve"] == "1.0" and meta["model_audit.fix.validation"] == "0.2"
    assert sel["accepted"] and sel["kept_step"] == v["best_step"] > 0
    assert v["candidates"][0] == {**v["candidates"][0], "step": 0, "fixed": 0, "broken": 0}
    best = next(c for c in v["candidates"] if c["step"] == v["best_step"])
    assert best["correct"] == max(c["correct"] for c in v["candidates"])
    assert v["p_single"] == pytest.approx(mcnemar_exact(best["fixed"], best["broken"], "greater"))
    # the pick of the best state costs: its p-value is at least the state's own (up to the
    # resampling's error), and it is compared with alpha itself
    assert v["p_value"] >= v["p_single"] - 0.01 and "max-statistic" in v["test"]
    assert v["p_value"] < v["threshold"] == 0.05
    # held out of the repair data, stratified: fit + validation = the repair data
    assert d["validation"]["n"] + d["validation"]["fit_n"] == d["train"]["n"]
    assert d["validation"]["n"] >= MIN_VALIDATION
    # and it helps on the probe, which validation never saw
    assert d["net"] > 0 and sel["net_p_value"] < 0.05
    # the control went through the same procedure
    control = d["controls"][0]
    assert control["validation"]["candidates"][0]["step"] == 0
    assert "repair found" in r.output
    html = (tmp_path / "report/report.html").read_text()
    assert "Repair found" in html and "Validation: which state was kept" in html
    assert "<svg" in html and f"{v['best_step']}</td>" in html


def test_a_repair_that_only_hurts_writes_nothing_and_says_so(tmp_path):
    # a learning rate far too large, on the errors alone: every state is worse than the original
    r = run(SGD, tmp_path, "--layers", "fc", "--lr", "1", "--wrong-fraction", "1.0", "--steps",
            "24", "--controls", "all")
    assert r.exit_code == NO_REPAIR_EXIT == 3, r.output
    assert "no repair found" in r.output and "no checkpoint was written" in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "fixed.safetensors").exists()
    d = json.loads((tmp_path / "report/fix.json").read_text())
    assert not d["output"]["written"] and d["output"]["sha256"] is None
    assert not d["validation"]["repair_found"]
    assert d["validation"]["reason"].startswith("no state of the repair was better")
    v = d["selection"]["validation"]
    assert all(c["net"] < 0 for c in v["candidates"][1:]) and v["chosen_step"] == 0
    # the original was kept: the probe's predictions are the original's
    assert d["fixed"] == d["broken"] == 0 and d["accuracy"]["after"] == d["accuracy"]["before"]
    assert d["controls"][0]["kept_step"] == 0
    assert "No repair found" in (tmp_path / "report/report.html").read_text()


def test_write_anyway_forces_the_best_trained_state(tmp_path):
    r = run(SGD, tmp_path, "--layers", "fc", "--lr", "1", "--wrong-fraction", "1.0", "--steps",
            "24", "--controls", "none", "--write-anyway")
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "report/fix.json").read_text())
    assert d["output"]["written"] and d["output"]["forced"]
    assert d["selection"]["kept_step"] == d["selection"]["validation"]["best_step"] > 0
    assert (tmp_path / "fixed.safetensors").is_file() and "--write-anyway" in r.output
    _, meta = read_tensors(tmp_path / "fixed.safetensors")
    assert meta["model_audit.fix.accepted"] == "false"


def test_holdout_is_stratified_seeded_and_disjoint():
    labels = torch.arange(10).repeat_interleave(30)
    fit, val = holdout(labels, 0.2, seed=0)
    assert sorted(fit + val) == list(range(300)) and not set(fit) & set(val)
    assert torch.bincount(labels[val]).tolist() == [6] * 10
    assert holdout(labels, 0.2, seed=0) == (fit, val) and holdout(labels, 0.2, seed=1) != (fit, val)
    # a stratum (the targeted confusion) is split in the same shares
    strata = torch.zeros(300, dtype=torch.bool)
    strata[:10] = True
    fit, val = holdout(labels, 0.2, 0, strata)
    assert sum(1 for p in val if p < 10) == 2
    with pytest.raises(ConfigError, match="needs at least 100"):
        holdout(labels[:60], 0.2, 0)


def test_the_max_statistic_test_pays_for_the_pick_and_only_for_it():
    import numpy as np
    import scipy.stats

    from model_audit.core.stats import max_sign_flip_p

    rng = np.random.default_rng(0)
    base = rng.random(14) < 0.5
    states = np.stack([base ^ (rng.random(14) < 0.35) for _ in range(3)], 1)
    d = states.astype(int) - base.astype(int)[:, None]
    # exact: every sign flip of the changed images, as scipy's paired permutation test does
    rows = d[np.any(d != 0, axis=1)].T

    def stat(x, y, axis):
        return np.max(np.sum(y - x, axis=axis), axis=-1)
    ref = scipy.stats.permutation_test((np.zeros_like(rows), rows), stat, alternative="greater",
                                       permutation_type="samples", vectorized=True, axis=-1,
                                       n_resamples=100000).pvalue
    assert max_sign_flip_p(d) == pytest.approx(ref)
    # one state: the exact sign test (one-sided McNemar) of its fixes against its breaks
    for col in range(3):
        one = d[:, col]
        assert max_sign_flip_p(one) == pytest.approx(
            mcnemar_exact(int((one > 0).sum()), int((one < 0).sum()), "greater"))
    # K identical states cost nothing; K independent ones cost about K times
    same = np.repeat(d[:, :1], 8, axis=1)
    assert max_sign_flip_p(same) == pytest.approx(max_sign_flip_p(d[:, 0]))
    big = np.where(rng.random((400, 8)) < 0.06, 1, np.where(rng.random((400, 8)) < 0.04, -1, 0))
    t = float(big.sum(0).max())
    p_max = max_sign_flip_p(big, seed=1)
    each = [mcnemar_exact(int((c > 0).sum()), int((c < 0).sum()), "greater")
            if c.sum() == t else max_sign_flip_p(c, t, seed=1) for c in big.T]
    # between the best state's own p and Bonferroni's bound (the sum over the states)
    assert min(each) - 0.01 <= p_max <= sum(each) + 0.01
    assert p_max == max_sign_flip_p(big, seed=1)                    # seeded
    assert max_sign_flip_p(np.zeros((5, 2))) == 1.0


def test_one_sided_exact_test():
    assert mcnemar_exact(0, 0, "greater") == 1.0
    assert mcnemar_exact(5, 0, "greater") == pytest.approx(0.5 ** 5)
    assert mcnemar_exact(3, 7, "greater") > 0.5 > mcnemar_exact(7, 3, "greater")


# ------------------------------------------------------------------------------------------
# Preservation


def test_preservation_term_is_the_divergence_on_the_images_it_got_right():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    teacher = Teacher(logits, torch.tensor([True, True, False]), weight=1.0)
    assert float(teacher.summed_divergence(logits.clone(), [0, 1, 2])) == pytest.approx(0, abs=1e-6)
    moved = logits.clone()
    moved[2] = torch.tensor([9.0, -9.0, 0.0])  # the image it got wrong: free to change
    assert float(teacher.summed_divergence(moved, [0, 1, 2])) == pytest.approx(0, abs=1e-6)
    moved[0] = torch.tensor([0.0, 2.0, -1.0])  # one it got right: penalised
    t = teacher.temperature
    p = torch.softmax(logits[0] / t, 0)
    q = torch.softmax(moved[0] / t, 0)
    expected = t * t * float((p * (p.log() - q.log())).sum())
    assert float(teacher.summed_divergence(moved, [0, 1, 2])) == pytest.approx(expected, rel=1e-5)
    # positions index the teacher's rows: a batch of the second and first images
    assert float(teacher.summed_divergence(moved[[1, 0]], [1, 0])) == pytest.approx(expected,
                                                                                 rel=1e-5)


def test_preservation_keeps_the_outputs_on_what_the_model_got_right(damaged, tmp_path):
    """The same repair with and without the term: the term holds the repaired model's outputs
    closer to the original's on the repair images it classified correctly."""
    from model_audit.core.evaluate import evaluate
    from model_audit.io.probe import open_probe

    base = load_checkpoint(damaged)
    images = open_probe(TRAIN, channels=1, normalize=base.normalize or "none")
    original = evaluate(base.model, images, keep_logits=True)
    right = original.predictions == original.labels
    drift = {}
    for weight in (0.0, 5.0):
        config = FixConfig(steps=30, layers=("layer2",), controls=(), preserve=weight,
                           write_anyway=True)
        result = fix(damaged, TRAIN, PROBE, tmp_path / f"{weight}.safetensors", config)
        assert result.to_dict()["config"]["preserve"] == weight
        out = evaluate(load_checkpoint(tmp_path / f"{weight}.safetensors").model, images,
                       keep_logits=True)
        p = torch.log_softmax(original.logits[right] / 2, 1)
        q = torch.log_softmax(out.logits[right] / 2, 1)
        drift[weight] = float((p.exp() * (p - q)).sum(1).mean())
    assert drift[5.0] < drift[0.0]


# ------------------------------------------------------------------------------------------
# Targeted repair


def test_targeted_repair_of_the_largest_confusion(confused, tmp_path):
    r = run(confused, tmp_path, "--target", "auto", "--steps", "40", "--controls", "none")
    assert r.exit_code == 0, r.output
    assert "picked 3:8, the largest confusion" in r.output
    d = json.loads((tmp_path / "report/fix.json").read_text())
    t = d["target"]
    assert (t["true"], t["pred"], t["auto"]) == ("3", "8", True)
    assert t["probe_before"] >= 40 and t["probe_after"] < t["probe_before"] / 2
    # on these 540 digits the break rate over seeds 0/1 and with or without the positive set
    # was 0.4-2.6% (2-12 images): the bound is the repair's spread, not one run's value
    assert t["repair_rate"] >= 0.5 and t["break_rate"] <= 0.05 and t["net"] == d["net"] > 0
    assert t["pairs"] == [{"true": "3", "pred": "8", "probe_before": t["probe_before"],
                           "probe_after": t["probe_after"],
                           "repaired": round(t["repair_rate"] * t["probe_before"])}]
    # the flagged groups come from a scan of the confusion's instances in the repair data
    assert d["selection"]["source"] == "scan" and d["selection"]["scan_scores"]
    assert len(d["images"]["target_fixed"]) == round(t["repair_rate"] * t["probe_before"])
    assert all(i["label"] == 3 and i["before"] == 8 for i in d["images"]["target_fixed"])
    html = (tmp_path / "report/report.html").read_text()
    assert html.index("Targeted confusion: 3 predicted as 8") < html.index("<h2>Summary")
    assert "The confusion, repaired" in html
    assert "target: 3 predicted as 8 (picked: the largest confusion)" in r.output


def test_the_positive_set_is_the_predicted_class_right_images(confused):
    from model_audit.commands.fix import _RepairData
    from model_audit.core.evaluate import evaluate
    from model_audit.io.probe import open_probe

    ckpt = load_checkpoint(confused)
    train = open_probe(TRAIN, channels=1, normalize=ckpt.normalize or "none")
    ev = evaluate(ckpt.model, train, keep_logits=True)
    data = _RepairData.split(train, ev, FixConfig(target=("3:8",)))
    guard = data.guard_positions
    fit = data.fit_eval
    expected = [i for i in range(len(fit.labels))
                if int(fit.labels[i]) == 8 and int(fit.predictions[i]) == 8]
    assert guard == expected and len(guard) > 10
    plan = data.plan(FixConfig(target=("3:8",), steps=5, batch_size=16))
    n = round(16 * FixConfig.target_fraction)
    assert all(set(b[:n]) <= set(data.target_positions) and set(b[n:2 * n]) <= set(guard)
               for b in plan)
    unguarded = data.plan(FixConfig(target=("3:8",), steps=5, batch_size=16, guard=False))
    assert unguarded != plan


def test_a_break_budget_keeps_only_states_within_it(confused, tmp_path):
    # every row of the head free: a repair of class 8's row alone broke none of these
    r = run(confused, tmp_path, "--target", "3:8", "--layers", "fc", "--steps", "40",
            "--lr", "0.05", "--controls", "none", "--max-break", "0", "--head-rows", "all")
    assert r.exit_code in (0, NO_REPAIR_EXIT), r.output
    d = json.loads((tmp_path / "report/fix.json").read_text())
    v = d["selection"]["validation"]
    assert v["max_break"] == 0 and d["config"]["max_break"] == 0
    kept = next(c for c in v["candidates"] if c["step"] == v["chosen_step"])
    assert kept["broken"] == 0
    within = [c for c in v["candidates"][1:] if c["broken"] == 0]
    over = [c for c in v["candidates"][1:] if c["broken"] > 0]
    assert over, "the repair at this learning rate breaks validation images"
    if within:
        best = max(within, key=lambda c: (c["correct"], -c["step"]))
        assert v["best_step"] == best["step"]
    else:
        assert v["best_step"] == -1 and "broke more than the budget" in v["reason"]
    html = (tmp_path / "report/report.html").read_text()
    assert "over the break budget" in html and "the break budget" in html
    # without the budget the same repair keeps a state that breaks some
    free = fix(confused, TRAIN, PROBE, None,
               FixConfig(steps=40, lr=0.05, controls=(), layers=("fc",), target=("3:8",),
                         head_rows="all"))
    fv = free.selection.validation
    assert next(c for c in fv.candidates if c.step == fv.best).broken > 0


def test_a_targeted_repair_of_the_head_changes_only_the_predicted_class_row(confused,
                                                                            tmp_path):
    """--head-rows target (the default with a target): of the head, only class 8's weights
    and bias move, and fix.json, the terminal and the report say so; with --head-rows all the
    other rows move too. Nothing outside the head moves in either."""
    source = read_tensors(confused)[0]
    r = run(confused, tmp_path, "--target", "3:8", "--layers", "fc", "--steps", "12",
            "--controls", "none", "--write-anyway")
    assert r.exit_code == 0, r.output
    assert "retrained fc (the head's row of 8 only): 33 parameters" in r.output  # 32 + 1
    d = json.loads((tmp_path / "report/fix.json").read_text())
    assert d["config"]["head_rows"] == "target" and d["selection"]["head_rows"] == ["8"]
    assert d["selection"]["trainable_params"] == source["fc.weight"].shape[1] + 1
    html = (tmp_path / "report/report.html").read_text()
    assert "fc (the head&#39;s row of 8 only)" in html or "fc (the head's row of 8 only)" in html
    every = fix(confused, TRAIN, PROBE, tmp_path / "all.safetensors",
                FixConfig(steps=12, controls=(), layers=("fc",), target=("3:8",),
                          head_rows="all", write_anyway=True)).to_dict()
    assert every["config"]["head_rows"] == "all" and every["selection"]["head_rows"] is None
    assert every["selection"]["trainable_params"] == 10 * d["selection"]["trainable_params"]
    changed = {}
    for rows, path in (("target", tmp_path / "fixed.safetensors"),
                       ("all", tmp_path / "all.safetensors")):
        tensors, meta = read_tensors(path)
        assert meta["model_audit.fix.head_rows"] == rows
        assert all(torch.equal(tensors[k], source[k]) for k in source if not k.startswith("fc."))
        changed[rows] = {k: sorted(torch.nonzero((tensors[k] != source[k]).reshape(
            len(source[k]), -1).any(1)).flatten().tolist()) for k in ("fc.weight", "fc.bias")}
    assert changed["target"] == {"fc.weight": [8], "fc.bias": [8]}
    assert len(changed["all"]["fc.weight"]) > 1 and len(changed["all"]["fc.bias"]) > 1


def test_head_rows_apply_to_the_head_only_and_only_with_a_target(confused):
    from model_audit.commands.fix import _RepairData
    from model_audit.commands.fix.train import HeadRows
    from model_audit.core.evaluate import evaluate
    from model_audit.io.probe import open_probe

    ckpt = load_checkpoint(confused)
    train = open_probe(TRAIN, channels=1, normalize=ckpt.normalize or "none")
    ev = evaluate(ckpt.model, train, keep_logits=True)
    targeted = FixConfig(target=("3:8", "7:8"))  # one predicted class: one row
    data = _RepairData.split(train, ev, targeted)
    assert data.head_rows(ckpt.model, targeted) == HeadRows("fc", (8,))
    assert data.head_rows(ckpt.model, FixConfig(target=("3:8",), head_rows="all")) is None
    plain = _RepairData.split(train, ev, FixConfig())
    assert plain.head_rows(ckpt.model, FixConfig()) is None
    model = copy.deepcopy(ckpt.model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.weight.requires_grad_(True)  # a selection that holds the weight, not the bias
    (param, frozen), = HeadRows("fc", (3, 8)).frozen(model)
    assert param is model.fc.weight
    assert frozen.tolist() == [i not in (3, 8) for i in range(10)]
    with pytest.raises(ConfigError, match="unknown head rows 'rows'"):
        FixConfig(head_rows="rows").validate()


def test_a_named_target_equals_auto_and_indices_equal_names(confused):
    one = fix(confused, TRAIN, PROBE, None,
              FixConfig(steps=12, controls=(), layers=("fc",), target=("3:8",)))
    two = fix(confused, TRAIN, PROBE, None,
              FixConfig(steps=12, controls=(), layers=("fc",), target=("auto",)))
    a, b = one.to_dict(), two.to_dict()
    assert a["target"]["auto"] is False and b["target"]["auto"] is True
    assert {k: v for k, v in a["target"].items() if k != "auto"} == \
        {k: v for k, v in b["target"].items() if k != "auto"}


# ------------------------------------------------------------------------------------------
# Bad inputs: exit 2, a message, nothing written


@pytest.fixture
def work(tmp_path, confused):
    import shutil

    for src in (confused, TRAIN, PROBE):
        shutil.copy(src, tmp_path / src.name)
    return tmp_path


@pytest.mark.parametrize("extra, needles", [
    (("--target", "cat:8"), ["'cat' is not a class of the repair data",
                             "the classes are 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"]),
    (("--target", "3:3"), ["the true and the predicted class are the same"]),
    (("--target", "2:7"), ["holds 0 image(s) of 2 predicted as 7",
                           "The largest confusions in the repair data: 3:8 ("]),
    (("--target", "3-8"), ["give TRUE:PRED"]),
    (("--target", "auto", "--target", "3:8"), ["--target auto picks one confusion"]),
    (("--validation", "0"), ["the validation share must be in (0, 0.5]"]),
    (("--validation", "0.6"), ["the validation share must be in (0, 0.5]"]),
    (("--train-limit", "60"), ["too few to hold out a validation part",
                               "it needs at least 100"]),
    (("--target-fraction", "0"), ["the target fraction must be in (0, 1]"]),
    (("--preserve", "-1"), ["the preservation weight must be >= 0"]),
    (("--max-break", "1.5"), ["the break budget must be in [0, 1)"]),
    (("--max-break", "-0.1"), ["the break budget must be in [0, 1)"]),
    (("--target", "3:8", "--head-rows", "some"), ["Invalid value for '--head-rows'",
                                                   "'target', 'all'"]),
])
def test_bad_inputs_are_refused_and_nothing_is_written(work, extra, needles):
    before = snapshot(work)
    r = CliRunner().invoke(cli, ["fix", str(work / "confused.safetensors"), "--train",
                                 str(work / TRAIN.name), "--probe", str(work / PROBE.name),
                                 "--output", str(work / "x.safetensors"), "--out",
                                 str(work / "out"), "--steps", "2", "--layers", "fc", *extra])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in r.output, r.output
    assert snapshot(work) == before and not (work / "out").exists()
