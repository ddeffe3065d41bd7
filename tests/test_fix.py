"""fix: surgical retraining on the digits models, frozen tensors, counts, controls, refusals."""
import importlib
import json
import os

import pytest
import torch
from click.testing import CliRunner

from conftest import SAMPLES, snapshot
from model_audit.models.checkpoint import load_checkpoint, save_checkpoint
from model_audit.io.tensors import read_tensors
from model_audit.cli import cli
from model_audit.commands.fix import OverlapError, fix
from model_audit.outputs import write_fix
from model_audit.results.fix import FixConfig
from model_audit.core.layers import layer_groups
TRAIN = SAMPLES / "digits-train.safetensors"
PROBE = SAMPLES / "digits-probe.safetensors"
# write_anyway: the committed model fits its training split, so no repair beats it on
# validation; these tests are about the written file, so the best trained state is forced out
QUICK = FixConfig(steps=25, controls=("all", "random", "rgn"), layers=("layer2", "fc"),
                  write_anyway=True)


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fix")
    out = tmp / "fixed.safetensors"
    result = fix(SAMPLES / "digits-sgd.safetensors", TRAIN, PROBE, out, QUICK)
    return result, out


def test_frozen_tensors_are_byte_identical(repaired):
    result, out = repaired
    src, _ = read_tensors(SAMPLES / "digits-sgd.safetensors")
    new, meta = read_tensors(out)
    assert set(src) == set(new)
    groups = layer_groups(load_checkpoint(SAMPLES / "digits-sgd.safetensors").model)
    trained = {p for g in groups if g.name in ("layer2", "fc") for p in g.parameter_names}
    buffers = {b for g in groups if g.name in ("layer2", "fc") for b in g.buffer_names}
    changed = [k for k in src if not torch.equal(_bytes(src[k]), _bytes(new[k]))]
    # batchnorm="train" (the default): the selected groups' BatchNorm statistics follow
    assert changed and set(changed) <= trained | buffers
    assert any("running_mean" in k for k in changed)
    # verified byte-identical: every tensor outside the retrained groups (their buffers count
    # as retrained: with batchnorm="train" they change)
    assert result.verified_identical == len(src) - len(trained | buffers)
    # provenance
    assert meta["model_audit.fix.source_sha256"] == result.checkpoint.sha256
    assert json.loads(meta["model_audit.fix.groups"]) == ["layer2", "fc"]
    assert meta["model_audit.fix.schedule"] == "beta" and meta["model_audit.fix.seed"] == "0"
    assert meta["model_audit.version"] and meta["model_audit.arch"] == "tiny-resnet"
    # the repaired checkpoint is a normal checkpoint: it loads without --arch
    assert load_checkpoint(out).num_classes == 10


def test_counts_add_up(repaired):
    result, _ = repaired
    d = result.to_dict()
    n = d["probe"]["n"]
    correct_before = round(d["accuracy"]["before"] * n)
    correct_after = round(d["accuracy"]["after"] * n)
    assert d["fixed"] - d["broken"] == d["net"] == correct_after - correct_before
    assert sum(c["fixed"] for c in d["per_class"]) == d["fixed"]
    assert sum(c["broken"] for c in d["per_class"]) == d["broken"]
    assert len(d["images"]["fixed"]) == d["fixed"] and len(d["images"]["broken"]) == d["broken"]
    wrong_before = n - correct_before
    assert len(d["images"]["still_wrong"]) == wrong_before - d["fixed"]
    for item in d["images"]["fixed"]:
        assert item["before"] != item["label"] and item["after"] == item["label"]
    for run in [d["selection"]] + d["controls"]:
        assert run["compute_param_steps"] == run["steps"] * run["trainable_params"]


def test_controls_share_the_budget(repaired):
    result, _ = repaired
    d = result.to_dict()
    runs = {c["name"]: c for c in d["controls"]}
    assert set(runs) == {"all", "random", "rgn"}
    assert runs["all"]["params_percent"] == pytest.approx(100.0)
    assert runs["random"]["groups"] != d["selection"]["groups"]
    # random modules outside the selection, with the selection's parameter share (within 25%)
    assert runs["random"]["disjoint_from_selection"] is True
    assert not any(m.split(".")[0] in ("layer2", "fc") for m in runs["random"]["groups"])
    assert abs(runs["random"]["params_percent"] / d["selection"]["params_percent"] - 1) <= 0.25
    assert len(runs["rgn"]["groups"]) == len(d["selection"]["groups"])
    assert all(c["steps"] == d["selection"]["steps"] for c in d["controls"])
    for c in d["controls"]:
        assert c["flagged_beat_it"] == (d["net"] > c["net"])
    assert d["compute"]["param_steps_saving_vs_full"] == pytest.approx(
        1 - d["selection"]["trainable_params"] / runs["all"]["trainable_params"])


def test_fix_json_and_report(repaired, tmp_path):
    result, _ = repaired
    paths = write_fix(result, tmp_path / "out")
    data = json.loads(paths["fix"].read_text())
    assert {"fixed", "broken", "net", "per_class", "controls", "images", "compute"} <= set(data)
    html = paths["report"].read_text()
    assert "Fixed misclassifications" in html or data["fixed"] == 0
    assert "Controls" in html and "data:image/png;base64," in html
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output


def test_float16_input_keeps_dtypes(tmp_path):
    state, meta = read_tensors(SAMPLES / "digits-sgd.safetensors")
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    src = tmp_path / "half.safetensors"
    save_checkpoint({"module." + k: v for k, v in half.items()}, src, metadata=meta)
    out = tmp_path / "out.safetensors"
    fix(src, TRAIN, PROBE, out, FixConfig(steps=5, controls=(), layers=("fc",),
                                          write_anyway=True))
    new, _ = read_tensors(out)
    assert set(new) == {"module." + k for k in half}  # the input's own key names
    for k, v in half.items():
        assert new["module." + k].dtype == v.dtype
        if not k.startswith("fc."):
            assert torch.equal(_bytes(new["module." + k]), _bytes(v))


def test_auto_selection_from_scan_and_from_audit(tmp_path):
    runner = CliRunner()
    scan_out = tmp_path / "scan"
    assert runner.invoke(cli, ["scan", str(SAMPLES / "digits-sgd.safetensors"), "--probe",
                               str(PROBE), "--out", str(scan_out), "-q"]).exit_code == 0
    flagged = json.loads((scan_out / "audit.json").read_text())["flagged"]
    r = runner.invoke(cli, ["fix", str(SAMPLES / "digits-sgd.safetensors"), "--train", str(TRAIN),
                            "--probe", str(PROBE), "--output", str(tmp_path / "f.safetensors"),
                            "--audit", str(scan_out / "audit.json"), "--steps", "5",
                            "--controls", "none", "--out", str(tmp_path / "fo")])
    # 3: no state beat the original on validation (the model fits its training split)
    assert r.exit_code in (0, 3), r.output
    assert (tmp_path / "f.safetensors").exists() == (r.exit_code == 0)
    data = json.loads((tmp_path / "fo/fix.json").read_text())
    assert data["selection"]["groups"] == flagged and data["selection"]["source"].startswith("audit")
    assert "fixed" in r.output and "net" in r.output
    # an audit of another checkpoint is refused
    r = runner.invoke(cli, ["fix", str(SAMPLES / "digits-adam.safetensors"), "--train", str(TRAIN),
                            "--probe", str(PROBE), "--output", str(tmp_path / "g.safetensors"),
                            "--audit", str(scan_out / "audit.json"), "--steps", "5"])
    assert r.exit_code == 2 and "audit of another checkpoint" in r.output
    assert not (tmp_path / "g.safetensors").exists()


@pytest.fixture
def work(tmp_path):
    import shutil

    for name in ("digits-sgd.safetensors", "digits-probe.safetensors", "digits-train.safetensors"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    return tmp_path


def _refused(work, output, *needles, extra=()):
    before = snapshot(work)
    r = CliRunner().invoke(cli, ["fix", str(work / "digits-sgd.safetensors"), "--train",
                                 str(work / "digits-train.safetensors"), "--probe",
                                 str(work / "digits-probe.safetensors"), "--output", str(output),
                                 "--out", str(work / "out"), "--steps", "5", *extra])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in r.output, r.output
    assert snapshot(work) == before and not (work / "out").exists()


def test_output_equal_to_input_is_refused(work):
    _refused(work, work / "digits-sgd.safetensors", "refusing to write", "input")
    os.symlink(work / "digits-sgd.safetensors", work / "link.safetensors")
    _refused(work, work / "link.safetensors", "refusing to write", "input")
    os.link(work / "digits-sgd.safetensors", work / "hard.safetensors")
    _refused(work, work / "hard.safetensors", "refusing to write", "input")
    _refused(work, work / "digits-train.safetensors", "refusing to write", "input")


def test_bad_outputs_and_layers(work):
    _refused(work, work / "fixed.pt", "must end in .safetensors")
    (work / "dir.safetensors").mkdir()
    _refused(work, work / "dir.safetensors", "is a directory")
    _refused(work, work / "nodir" / "x.safetensors", "does not exist")
    _refused(work, work / "x.safetensors", "unknown layer group(s) layer9", "conv1, bn1",
             extra=("--layers", "layer9"))
    _refused(work, work / "x.safetensors", "unknown control(s) everything",
             extra=("--controls", "everything"))


def test_overlap_between_probe_and_train_is_refused(work):
    before = snapshot(work)
    with pytest.raises(OverlapError, match="by content hash.*--allow-overlap"):
        fix(work / "digits-sgd.safetensors", work / "digits-probe.safetensors",
            work / "digits-probe.safetensors", work / "x.safetensors", FixConfig(steps=2))
    assert snapshot(work) == before
    result = fix(work / "digits-sgd.safetensors", work / "digits-probe.safetensors",
                 work / "digits-probe.safetensors", None,
                 FixConfig(steps=2, controls=(), layers=("fc",), allow_overlap=True))
    assert any("also appear" in w for w in result.warnings)


def test_input_is_never_modified(work):
    before = snapshot(work)
    fix(work / "digits-sgd.safetensors", work / "digits-train.safetensors",
        work / "digits-probe.safetensors", work / "new.safetensors",
        FixConfig(steps=3, controls=(), layers=("fc",), write_anyway=True))
    after = snapshot(work)
    assert after.pop("new.safetensors")
    assert after == before


def test_a_diverging_control_is_recorded_not_fatal(monkeypatch, tmp_path):
    import importlib

    # model_audit.commands.fix is also the name of the function the package exports
    fixmod = importlib.import_module("model_audit.commands.fix")

    real = fixmod.retrain

    def retrain(base, groups, selected, *args, **kwargs):
        if {"conv1", "fc"} <= set(selected):  # the "all" control (the selection is fc alone)
            raise fixmod.RepairDiverged("the repair of everything diverged at step 3 (loss nan)")
        return real(base, groups, selected, *args, **kwargs)

    monkeypatch.setattr(fixmod, "retrain", retrain)
    result = fix(SAMPLES / "digits-sgd.safetensors", TRAIN, PROBE, None,
                 FixConfig(steps=3, controls=("all", "random"), layers=("fc",)))
    d = result.to_dict()
    runs = {c["name"]: c for c in d["controls"]}
    assert runs["all"]["diverged"] and runs["all"]["flagged_beat_it"] is None
    assert runs["all"]["fixed"] == runs["all"]["broken"] == 0
    assert d["verdict"]["diverged"] == ["all"] and "all" not in d["verdict"]["did_not_beat"]
    assert runs["random"]["diverged"] is None
    assert any("diverged" in w for w in result.warnings)


def test_bad_wrong_fraction_and_batchnorm_are_refused(work):
    _refused(work, work / "x.safetensors", "--wrong-fraction must be a number between 0 and 1 "
             "or 'natural'", extra=("--wrong-fraction", "most"))
    _refused(work, work / "x.safetensors", "wrong fraction must be between 0 and 1",
             extra=("--wrong-fraction", "1.5"))
    _refused(work, work / "x.safetensors", "Invalid value for '--batchnorm'",
             extra=("--batchnorm", "update"))


def test_batch_plan_mixes_at_the_asked_fraction():
    fixmod = importlib.import_module("model_audit.commands.fix")
    wrong, right = list(range(0, 30)), list(range(30, 100))
    plan = fixmod.batch_plan(wrong, right, steps=20, batch=16, seed=0, wrong_fraction=0.25)
    assert all(len(b) == 16 and sum(i < 30 for i in b) == 4 for b in plan)
    assert fixmod.batch_plan(wrong, right, 3, 16, 0, 0.25) == plan[:3]  # seeded
    assert all(i < 30 for b in fixmod.batch_plan(wrong, right, 5, 8, 0, 1.0) for i in b)
    assert all(i >= 30 for b in fixmod.batch_plan(wrong, right, 5, 8, 0, 0.0) for i in b)
    assert all(i >= 30 for b in fixmod.batch_plan([], right, 5, 8, 0, 0.5) for i in b)
    assert all(i < 30 for b in fixmod.batch_plan(wrong, [], 5, 8, 0, 0.5) for i in b)
    # natural: epochs without replacement over everything, errors at their own rate
    natural = fixmod.batch_plan(wrong, right, steps=25, batch=8, seed=0, wrong_fraction=None)
    flat = [i for b in natural for i in b]
    assert sorted(flat[:100]) == list(range(100)) and sorted(flat[100:200]) == list(range(100))
    assert all(len(b) == 8 for b in natural)


def test_batch_plan_draws_the_guard_as_often_as_the_errors():
    fixmod = importlib.import_module("model_audit.commands.fix")
    wrong, right, guard = list(range(0, 30)), list(range(30, 100)), list(range(90, 100))
    plain = fixmod.batch_plan(wrong, right, steps=20, batch=16, seed=0, wrong_fraction=0.25)
    plan = fixmod.batch_plan(wrong, right, 20, 16, 0, 0.25, guard=guard)
    # each batch: 4 errors, then 4 of the guard, then 8 from the rest
    assert all(len(b) == 16 and sum(i < 30 for i in b) == 4 for b in plan)
    assert all(all(90 <= i < 100 for i in b[4:8]) for b in plan)
    assert all(all(i >= 30 for i in b[8:]) for b in plan)
    assert fixmod.batch_plan(wrong, right, 20, 16, 0, 0.25, guard=()) == plain  # off: as before
    # the errors' share above a half: the guard takes what is left
    most = fixmod.batch_plan(wrong, right, 5, 16, 0, 0.75, guard=guard)
    assert all(sum(i < 30 for i in b) == 12 and all(i >= 90 for i in b[12:]) for b in most)


def test_batchnorm_frozen_keeps_every_statistic(tmp_path):
    out = tmp_path / "bn.safetensors"
    result = fix(SAMPLES / "digits-sgd.safetensors", TRAIN, PROBE, out,
                 FixConfig(steps=10, controls=(), layers=("layer2",), batchnorm="frozen",
                           wrong_fraction=0.5, write_anyway=True))
    src, _ = read_tensors(SAMPLES / "digits-sgd.safetensors")
    new, _ = read_tensors(out)
    changed = {k for k in src if not torch.equal(_bytes(src[k]), _bytes(new[k]))}
    assert changed and all(k.startswith("layer2.") for k in changed)
    assert not any("running_" in k or "num_batches" in k for k in changed)
    d = result.to_dict()
    assert d["config"]["batchnorm"] == "frozen" and d["config"]["wrong_fraction"] == 0.5


def test_the_repaired_file_reproduces_the_reported_accuracy(repaired):
    from model_audit.core.evaluate import evaluate
    from model_audit.io.probe import open_probe
    result, out = repaired
    model = load_checkpoint(out)
    probe = open_probe(PROBE, channels=1, normalize=model.normalize or "none")
    assert evaluate(model.model.eval(), probe).accuracy == pytest.approx(
        result.to_dict()["accuracy"]["after"])


def test_net_and_controls_come_with_exact_mcnemar_tests(repaired):
    from model_audit.core.stats import mcnemar_exact
    result, _ = repaired
    d = result.to_dict()
    sel = d["selection"]
    assert sel["net_p_value"] == mcnemar_exact(sel["fixed"], sel["broken"])
    assert d["verdict"]["net_significant"] == (sel["net_p_value"] < 0.05)
    for c in d["controls"]:
        v = c["vs_flagged"]
        # paired on the same images: the difference of the nets is the discordant difference
        assert v["only_flagged_right"] - v["only_control_right"] == sel["net"] - c["net"]
        assert v["p_value"] == mcnemar_exact(v["only_flagged_right"], v["only_control_right"])
        assert (c["name"] in d["verdict"]["beat_significantly"]) == (
            c["flagged_beat_it"] and v["p_value"] < 0.05)
    from model_audit.outputs import format_fix
    text = format_fix(result)
    assert "p(net)" in text and "paired McNemar test" in text


def test_random_control_is_disjoint_when_it_can_be_and_says_so_when_not():
    from model_audit.models.tiny import TinyResNet
    select_mod = importlib.import_module("model_audit.commands.fix.select")
    model = TinyResNet()
    groups = layer_groups(model)
    share = {g.name: g.share for g in groups}
    names, units, disjoint = select_mod.random_control(model, groups, ["layer2"], seed=0)
    assert disjoint and not any(n.startswith("layer2.") for n in names)
    got = sum(u.share for u in units if u.name in names)
    assert abs(got / share["layer2"] - 1) <= select_mod.RANDOM_SHARE_TOLERANCE
    assert select_mod.random_control(model, groups, ["layer2"], seed=0)[0] == names  # seeded
    # layer3 holds most parameters: no set of other modules comes near its share, so the
    # control falls back to whole groups (here: overlapping the selection), and says so
    names, units, disjoint = select_mod.random_control(model, groups, ["layer3"], seed=0)
    assert units == groups and set(names) != {"layer3"}
    assert disjoint == (not set(names) & {"layer3"})


def test_warns_when_the_repair_data_has_few_or_no_errors(tmp_path):
    from conftest import write_tensor_probe
    from model_audit.core.evaluate import evaluate
    from model_audit.io.probe import open_probe
    ckpt = load_checkpoint(SAMPLES / "digits-sgd.safetensors")
    train, meta = read_tensors(TRAIN)
    ev = evaluate(ckpt.model.eval(), open_probe(TRAIN, channels=1,
                                                normalize=ckpt.normalize or "none"))
    right = (ev.predictions == ev.labels).nonzero().flatten()
    wrong = (ev.predictions != ev.labels).nonzero().flatten()
    classes = json.loads(meta["classes"]) if "classes" in meta else None
    cases = {"few": torch.cat([right, wrong[:1]]), "none": right}
    for name, keep in cases.items():
        path = write_tensor_probe(tmp_path / f"{name}.safetensors", train["images"][keep],
                                  train["labels"][keep], classes)
        result = fix(SAMPLES / "digits-sgd.safetensors", path, PROBE, None,
                     FixConfig(steps=2, controls=(), layers=("fc",)))
        text = " ".join(result.warnings)
        if name == "few":  # 1 error in ~1,200 images vs 3.9% on the probe
            assert "fits the repair data far better than the probe" in text
        else:
            assert "makes no errors on the repair data" in text
        assert "held-out validation split (not the probe)" in text
    # the committed training split itself (1.8% vs 3.9% errors): no warning
    result = fix(SAMPLES / "digits-sgd.safetensors", TRAIN, PROBE, None,
                 FixConfig(steps=2, controls=(), layers=("fc",)))
    assert not result.warnings


def test_bench_fix_section_summarises_seeds(repaired):
    from bench import fix_bench

    result, _ = repaired
    d = result.to_dict()
    other = json.loads(json.dumps(d))
    other["seed"] = 1
    text = fix_bench.markdown([d, other], SAMPLES / "digits-sgd.safetensors", "cpu", "cmd",
                              "abc", "seen")
    assert "seeds 0, 1" in text and "wrong fraction natural, batchnorm train" in text
    assert f"| flagged | {d['net']:+.1f} | {d['net']:+d} | {d['net']:+d} | 2/2 |" in text
    assert "(outside the selection)" in text
    assert f"net > 0 in {2 if d['net'] > 0 else 0}/2 seeds" in text


def test_random_control_varies_with_the_seed():
    # twelve equal layers: many sets of two outside the selection match its share exactly
    # (in a ResNet the stages grow 4x, so usually one family of module sets fits)
    select_mod = importlib.import_module("model_audit.commands.fix.select")
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(12)])
    groups = layer_groups(model)
    draws = [select_mod.random_control(model, groups, ["0", "1"], seed=s) for s in range(8)]
    assert len({d[0] for d in draws}) > 1
    for names, units, disjoint in draws:
        assert disjoint and len(names) == 2 and not {"0", "1"} & set(names)
    assert select_mod.random_control(model, groups, ["0", "1"], seed=3) == draws[3]
