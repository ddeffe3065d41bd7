"""`model-audit sanity`: the command, sanity.json, the report, bad inputs, the gate check,
and the scan's net_reduction metric that the localize benchmark chose between."""
from __future__ import annotations

import json
import re
from html import unescape

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import snapshot
from model_audit.models.checkpoint import load_checkpoint
from model_audit.cli import cli

FAST = ["--groups", "layer1,fc", "--defects", "noise,reinit", "--quiet"]


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def sanity_run(tmp_path_factory):
    from conftest import SAMPLES

    out = tmp_path_factory.mktemp("sanity") / "out"
    keep = out.parent / "damaged"
    result = run(["sanity", SAMPLES / "digits-sgd.safetensors", "--probe",
                  SAMPLES / "digits-probe.safetensors", "--out", out, "--keep-damaged", keep,
                  *FAST])
    assert result.exit_code == 0, result.output
    return result, out, keep


def test_sanity_json_matches_the_table(sanity_run):
    result, out, _ = sanity_run
    data = json.loads((out / "sanity.json").read_text())
    assert data["schema_version"] == 1
    assert data["planted_groups"] == ["layer1", "fc"] and data["group_selection"] == "given"
    assert [(c["group"], c["defect"]) for c in data["cases"]] == [
        ("layer1", "noise"), ("layer1", "reinit"), ("fc", "noise"), ("fc", "reinit")]
    methods = data["methods_order"]
    assert methods[0] == data["metric"] == "alone_net" and methods[-1] == "random"
    assert {"grad_x_activation", "auto_rgn"} <= set(methods)
    for c in data["cases"]:
        assert {"group", "defect", "severity", "accuracy_before", "accuracy_after", "ranks",
                "flagged", "reached"} <= set(c)
        # The planted group's rank is printed in the case's row, in the methods' order.
        row = next(line for line in result.output.splitlines()
                   if line.startswith(f"{c['group']} ") and f" {c['defect']} " in line)
        cells = row.split()
        assert cells[-len(methods):] == [f"{c['ranks'][m]:.1f}" for m in methods]
    for m in methods:
        s = data["methods"][m]
        line = next(l for l in result.output.splitlines() if l.split()[:1] == [m])
        assert line.split()[1:4] == [f"{s['top1']:.2f}", f"{s['mrr']:.2f}", str(s["n"])]
    chance = next(l for l in result.output.splitlines() if l.startswith("chance"))
    assert chance.split()[1:3] == ["0.17", "0.41"]   # 6 groups: 1/6 and H_6/6
    assert data["chance"]["top1"] == pytest.approx(1 / 6)
    # Every case reached its drop within the tolerance.
    assert all(c["reached"] and abs(c["drop"] - 0.10) <= 0.01 for c in data["cases"])
    assert data["null"]["flagged"]  # the unmodified model's scan, for comparison
    html = (out / "report.html").read_text()
    assert "Planted group" in html and "chance" in html and "<script" not in html
    # One sentence names the method that localised best on this model, in both outputs.
    from model_audit.render.text import sanity_verdict

    verdict = sanity_verdict(data)
    assert verdict.startswith("on this model") and _best(data) in verdict
    assert verdict in " ".join(result.output.split())
    assert verdict in " ".join(unescape(html).split())


def test_keep_damaged_saves_copies_that_differ_only_in_their_group(sanity_run):
    from conftest import SAMPLES

    _, _, keep = sanity_run
    files = sorted(p.name for p in keep.iterdir())
    assert files == ["fc-noise-s0.safetensors", "fc-reinit-s0.safetensors",
                     "layer1-noise-s0.safetensors", "layer1-reinit-s0.safetensors"]
    original = load_checkpoint(SAMPLES / "digits-sgd.safetensors").model.state_dict()
    damaged = load_checkpoint(keep / "layer1-noise-s0.safetensors").model.state_dict()
    changed = {k for k in original if not torch.equal(original[k], damaged[k])}
    assert changed and all(k.startswith("layer1.") for k in changed)


def test_the_input_checkpoint_is_never_written(tmp_path, sgd_checkpoint, digits_probe):
    before = sgd_checkpoint.read_bytes()
    result = run(["sanity", sgd_checkpoint, "--probe", digits_probe, "--out", tmp_path / "o",
                  "--groups", "fc", "--defects", "noise", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sgd_checkpoint.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["report.html", "sanity.json"]


@pytest.mark.parametrize("args,message", [
    (["--groups", "layer9,fc"],
     "unknown group 'layer9'; valid: conv1, bn1, layer1, layer2, layer3, fc"),
    (["--defects", "noise,rotate"], "unknown defect 'rotate'; valid: all or a comma-separated "
                                    "list of noise, reinit, labelswap, bnstats"),
    (["--drop", "1.5"], "--drop must be in (0, 1), got 1.5"),
    (["--drop", "0"], "--drop must be in (0, 1), got 0.0"),
    (["--methods", "own,saliency"], "unknown baseline 'saliency'"),
])
def test_bad_inputs_say_what_to_do_and_write_nothing(tmp_path, sgd_checkpoint, digits_probe,
                                                     args, message):
    before = snapshot(sgd_checkpoint.parent)
    out = tmp_path / "out"
    result = run(["sanity", sgd_checkpoint, "--probe", digits_probe, "--out", out,
                  "--keep-damaged", tmp_path / "keep", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "keep").exists()
    assert snapshot(sgd_checkpoint.parent) == before


def test_keep_damaged_over_an_input_is_refused(tmp_path, sgd_checkpoint, digits_probe):
    before = snapshot(sgd_checkpoint.parent)
    result = run(["sanity", sgd_checkpoint, "--probe", digits_probe, "--out", tmp_path / "o",
                  "--keep-damaged", sgd_checkpoint])
    assert result.exit_code == 2
    assert "(--keep-damaged): it is the checkpoint input" in result.output
    assert not (tmp_path / "o").exists() and snapshot(sgd_checkpoint.parent) == before


def test_a_model_with_a_single_group_is_refused(tmp_path, monkeypatch, digits_probe):
    (tmp_path / "onegroup_ma.py").write_text(
        "import torch.nn as nn\n"
        "class One(nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.flat = nn.Flatten()\n"
        "        self.fc = nn.Linear(64, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.flat(x))\n"
        "def make(num_classes):\n"
        "    return One(num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from model_audit.models.registry import build_model
    from model_audit.models.checkpoint import save_checkpoint
    ckpt = tmp_path / "one.safetensors"
    save_checkpoint(build_model("onegroup_ma:make", 10).state_dict(), ckpt)
    out = tmp_path / "out"
    result = run(["sanity", ckpt, "--arch", "onegroup_ma:make", "--probe", digits_probe,
                  "--out", out, "--quiet"])
    assert result.exit_code == 2, result.output
    assert "the model has a single layer group (fc): there is nothing to localise" in result.output
    assert not out.exists()


def test_the_gate_reads_a_saved_sanity_check(tmp_path, sanity_run, sgd_checkpoint,
                                            digits_probe):
    _, out, _ = sanity_run
    top1 = json.loads((out / "sanity.json").read_text())["methods"]["combined"]["top1"]
    for limit, code in ((max(top1 - 0.1, 0.0), 0), (min(top1 + 0.1, 1.0), 1)):
        pol = tmp_path / f"p{code}.toml"
        pol.write_text(f"[policy]\nmin_sanity_top1 = {limit}\n")
        gate_out = tmp_path / f"gate{code}"
        result = run(["gate", sgd_checkpoint, "--probe", digits_probe, "--policy", pol,
                      "--sanity", out / "sanity.json", "--out", gate_out, "--quiet"])
        assert result.exit_code == code, result.output
        check = {c["name"]: c for c in json.loads((gate_out / "gate.json").read_text())[
            "checks"]}["min_sanity_top1"]
        assert check["passed"] is (code == 0)
        assert check["value"] == pytest.approx(top1)
        assert re.search(r"ranked the planted group first in \d+% of 4 planted faults "
                         r"\(chance 17%\)", check["message"])


def test_the_gate_runs_the_check_when_no_file_is_given(tmp_path, sgd_checkpoint, digits_probe):
    pol = tmp_path / "p.toml"
    pol.write_text("[policy]\nmin_sanity_top1 = 1.0\n")
    result = run(["gate", sgd_checkpoint, "--probe", digits_probe, "--policy", pol,
                  "--out", tmp_path / "g", "--quiet"])
    check = {c["name"]: c for c in json.loads((tmp_path / "g" / "gate.json").read_text())[
        "checks"]}["min_sanity_top1"]
    # noise and reinit in each of the 6 groups, one of which (bn1 reinit) cannot cost 10 points
    assert "of 11 planted faults" in check["message"]
    assert result.exit_code == (0 if check["passed"] else 1)


def test_a_sanity_file_that_is_not_one_is_bad_input(tmp_path, sgd_checkpoint, digits_probe):
    pol = tmp_path / "p.toml"
    pol.write_text("[policy]\nmin_sanity_top1 = 0.5\n")
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"schema_version": 1, "layers": []}))
    result = run(["gate", sgd_checkpoint, "--probe", digits_probe, "--policy", pol,
                  "--sanity", bogus, "--out", tmp_path / "g"])
    assert result.exit_code == 2
    assert "is not a sanity.json written by `model-audit sanity`" in result.output
    assert not (tmp_path / "g").exists()


def test_min_sanity_top1_must_be_a_fraction(tmp_path):
    from model_audit.errors import ConfigError
    from model_audit.policy import load_policy
    pol = tmp_path / "p.toml"
    pol.write_text("[policy]\nmin_sanity_top1 = 2\n")
    with pytest.raises(ConfigError, match="min_sanity_top1 must be between 0 and 1"):
        load_policy(pol)


# ------------------------------------------------------------------------------------------
# The net_reduction metric


def test_scan_with_the_net_reduction_metric(tmp_path, sgd_checkpoint, digits_probe):
    out = tmp_path / "net"
    result = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--metric", "net_reduction",
                  "--out", out, "--quiet"])
    assert result.exit_code == 0, result.output
    audit = json.loads((out / "audit.json").read_text())
    assert audit["metric"]["name"] == "net_reduction"
    assert "twice as many correctly classified" in audit["metric"]["definition"]
    wrong = [m["index"] for m in audit["misclassified"]]
    rows = audit["per_image"]["index"]
    # The rows: every error and twice as many correct images.
    assert set(wrong) <= set(rows) and len(rows) == 3 * len(wrong)
    assert len(audit["per_image"]["reduction"]) == len(rows)
    assert sum(layer["score"] for layer in audit["layers"]) == pytest.approx(1.0)
    # compare bootstraps over the rows of two such audits.
    other = tmp_path / "net2"
    assert run(["scan", sgd_checkpoint.parent / "digits-adam.safetensors", "--probe",
                digits_probe, "--metric", "net_reduction", "--out", other, "--quiet"]
               ).exit_code == 0
    cmp = run(["compare", out / "audit.json", other / "audit.json", "--out", tmp_path / "c",
               "--quiet", "--resamples", "50"])
    assert cmp.exit_code == 0, cmp.output


def test_an_unknown_metric_is_refused(tmp_path, sgd_checkpoint, digits_probe):
    result = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--metric", "bogus",
                  "--out", tmp_path / "o"])
    assert result.exit_code == 2 and "bogus" in result.output
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# scan --method auto / --sanity: the ranking chosen per model, and how far it is trusted


def _best(data):
    """The method --method auto takes for a sanity.json: the rule itself is tested in
    test_auto_keeps_the_default_unless_another_method_leads_beyond_chance."""
    from model_audit.core.scoring import MethodEvidence

    return MethodEvidence.from_dict(data, "sanity").choice(list(data["methods"])).method


def _evidence(**reciprocal):
    """Evidence whose summaries are the means of the given per-fault reciprocal ranks."""
    from model_audit.core.scoring import MethodEvidence, MethodSummary

    summary = {m: MethodSummary(float(np.mean(np.asarray(r) == 1)), float(np.mean(r)), len(r))
               for m, r in reciprocal.items()}
    return MethodEvidence(summary, (1 / 7, 0.37), None, 100, (), "alone_net", "given",
                          {m: tuple(r) for m, r in reciprocal.items()})


def test_auto_keeps_the_default_unless_another_method_leads_beyond_chance():
    from model_audit.core.scoring import AUTO_ALPHA

    # One fault of twelve goes auto_rgn's way: its MRR lead is what one sign flip in two gives.
    tiny = _evidence(combined=[1.0] * 11 + [0.5], auto_rgn=[1.0] * 12,
                     alone_net=[0.5] * 12)
    choice = tiny.choice(["auto_rgn", "combined"])
    assert (choice.method, choice.reference, choice.rival) == ("combined", "combined",
                                                               "auto_rgn")
    # The largest column sum under the 2 ** 12 sign flips of the 12 rows that differ: auto_rgn's
    # +0.5 is reached when its one row keeps its sign (1/2) or alone_net's eleven -0.5 rows
    # flip to a sum >= +0.5 (1/2), independently: p = 1 - 1/4.
    assert choice.p_value == pytest.approx(0.75) and choice.p_value >= AUTO_ALPHA
    assert choice.n == 12
    assert choice.gain == pytest.approx(0.5 / 12)
    assert "kept the default combined" in choice.sentence()
    # Six faults, each better under alone_net by the same amount, none worse: only the flip
    # that keeps every sign reaches the observed sum, and its mirror image for the other
    # alternative cannot (auto_rgn equals the default everywhere): p = 1 / 2 ** 6.
    clear = _evidence(combined=[0.5] * 6 + [1.0] * 4, alone_net=[1.0] * 10,
                      auto_rgn=[0.5] * 6 + [1.0] * 4)
    choice = clear.choice(["auto_rgn", "combined"])
    assert choice.method == "alone_net" and choice.p_value == pytest.approx(1 / 64)
    assert "alone_net beat the default combined" in choice.sentence()
    # A baseline the probe cannot compute is never chosen; the own metric always can be.
    assert clear.choice(["combined"]).method == "alone_net"
    only_own = _evidence(combined=[0.5] * 6, auto_rgn=[1.0] * 6, alone_net=[0.2] * 6)
    assert only_own.choice([]).method == "alone_net"
    # Without the default among the measured methods, the own metric is the reference.
    own = _evidence(alone_net=[1.0] * 6, auto_rgn=[0.5] * 6).choice(["auto_rgn"])
    assert (own.method, own.reference) == ("alone_net", "alone_net")


def test_auto_without_per_fault_ranks_keeps_the_default():
    from model_audit.core.scoring import MethodEvidence, MethodSummary

    ev = MethodEvidence({"combined": MethodSummary(0.5, 0.6, 10),
                         "auto_rgn": MethodSummary(0.9, 0.95, 10)}, (0.1, 0.3), None, 0, ())
    choice = ev.choice(["auto_rgn", "combined"])
    assert (choice.method, choice.rival, choice.p_value) == ("combined", "auto_rgn", None)
    assert "no per-fault ranks" in choice.sentence()


def test_scan_ranks_with_the_method_that_localised_best(tmp_path, sanity_run, sgd_checkpoint,
                                                        digits_probe):
    _, out, _ = sanity_run
    evidence = json.loads((out / "sanity.json").read_text())
    best = _best(evidence)
    r = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--method", "auto", "--sanity",
             out / "sanity.json", "--out", tmp_path / "s", "--bootstrap", "20"])
    assert r.exit_code == 0, r.output
    audit = json.loads((tmp_path / "s" / "audit.json").read_text())
    ranking = audit["ranking"]
    assert ranking["method"] == best and ranking["chosen_by"] == "sanity"
    assert ranking["evidence"]["methods"] == evidence["methods"]
    choice = ranking["choice"]   # the test behind it, in audit.json and in the trust line
    assert (choice["method"], choice["reference"]) == (best, "combined")
    assert choice["n"] == sum(c["reached"] for c in evidence["cases"])
    assert 0 < choice["p_value"] <= 1
    assert f"p {choice['p_value']:.2g}" in ranking["trust"] or choice["p_value"] < 0.001
    mine = evidence["methods"][best]
    assert f"ranked by {best} (chosen by sanity on this model)" in ranking["trust"]
    assert f"top-1/MRR {mine['top1']:.2f}/{mine['mrr']:.2f}" in ranking["trust"]
    assert ranking["trust"] in r.output
    assert ranking["trust"] in unescape((tmp_path / "s" / "report.html").read_text())
    # the order follows the chosen method's scores; as many flagged as the own rule flags
    score = _method_score(audit, best)
    assert [score(n) for n in ranking["order"]] == sorted(
        (score(n) for n in ranking["order"]), reverse=True)
    plain = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--out", tmp_path / "p",
                 "--bootstrap", "20", "--quiet"])
    assert plain.exit_code == 0, plain.output
    default = json.loads((tmp_path / "p" / "audit.json").read_text())
    assert default["ranking"]["method"] == "combined"
    assert default["ranking"]["chosen_by"] == "default"
    if best in ("combined", evidence["metric"]):  # the flag rule on the method's own scores
        assert ranking["order"][0] in audit["flagged"]
    else:  # a baseline has no flag rule: its top k, k as many as the metric's rule flags
        own = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--out", tmp_path / "o",
                   "--bootstrap", "0", "--quiet", "--method", "own"])
        assert own.exit_code == 0, own.output
        k = len(json.loads((tmp_path / "o" / "audit.json").read_text())["flagged"])
        assert set(audit["flagged"]) == set(ranking["order"][:k])


def _method_score(audit, method):
    """The per-group score ``method`` ranks an audit.json's groups by."""
    from model_audit.core.attribution import combined_scores
    layers = {layer["name"]: layer for layer in audit["layers"]}
    names = list(layers)
    if method == "combined":
        both = combined_scores([layers[n]["reduction"] for n in names],
                               [layers[n]["baselines"]["auto_rgn"] for n in names])
        return dict(zip(names, both)).get
    if method == audit["metric"]["name"]:  # its share: the positive part of its reduction
        return lambda n: max(layers[n]["reduction"], 0.0)
    return lambda n: layers[n]["baselines"][method]


def test_the_combined_method_ranks_by_the_own_metric_and_auto_rgn(tmp_path, sgd_checkpoint,
                                                                   digits_probe, sanity_run):
    r = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--method", "combined",
             "--out", tmp_path / "s", "--bootstrap", "20", "--quiet"])
    assert r.exit_code == 0, r.output
    audit = json.loads((tmp_path / "s" / "audit.json").read_text())
    ranking, score = audit["ranking"], _method_score(audit, "combined")
    assert ranking["method"] == "combined" and ranking["chosen_by"] == "default"
    assert [score(n) for n in ranking["order"]] == sorted(
        (score(n) for n in ranking["order"]), reverse=True)
    # the scores are the combined ones, flagged by the flag rule on them
    import numpy as np
    from model_audit.core.attribution import flag_rule
    layers = audit["layers"]
    assert [layer["score"] for layer in layers] == pytest.approx(
        [score(layer["name"]) for layer in layers], abs=1e-12)
    flags = flag_rule(np.array([layer["score"] for layer in layers]),
                      np.array([layer["share"] for layer in layers]))
    assert audit["flagged"] == [layer["name"] for layer, f in zip(layers, flags) if f]
    assert audit["metric"]["combined_with"] == "auto_rgn"
    assert audit["per_image"]["prior"] == pytest.approx(
        [layer["baselines"]["auto_rgn"] for layer in layers])
    # sanity reports it beside the own metric and the baselines, so auto can choose it
    _, out, _ = sanity_run
    assert "combined" in json.loads((out / "sanity.json").read_text())["methods"]
    # without auto_rgn among the baselines asked for, the ranking computes it (it is free)
    r = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--baselines", "none",
             "--out", tmp_path / "b", "--bootstrap", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "b" / "audit.json").read_text())
    assert again["ranking"]["order"] == ranking["order"]


def test_a_named_method_ranks_and_flags(tmp_path, sgd_checkpoint, digits_probe):
    r = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--method", "auto_rgn",
             "--baselines", "none", "--out", tmp_path / "s", "--bootstrap", "20", "--quiet"])
    assert r.exit_code == 0, r.output
    audit = json.loads((tmp_path / "s" / "audit.json").read_text())
    assert audit["ranking"]["method"] == "auto_rgn" and audit["ranking"]["chosen_by"] == "given"
    rgn = {layer["name"]: layer["baselines"]["auto_rgn"] for layer in audit["layers"]}
    assert audit["ranking"]["order"] == sorted(rgn, key=lambda n: -rgn[n])
    assert "is not measured: run `model-audit sanity`" in r.output


def test_method_auto_runs_sanity_first_without_evidence(tmp_path):
    from conftest import SAMPLES
    from model_audit.commands.sanity import scan_with_best_method
    from model_audit.results.sanity import SanityConfig
    from model_audit.results.scan import ScanConfig

    result, ran = scan_with_best_method(
        SAMPLES / "digits-sgd.safetensors", SAMPLES / "digits-probe.safetensors",
        ScanConfig(bootstrap=0, method="auto"),
        SanityConfig(groups=("layer1", "fc"), defects=("noise",)))
    assert len(ran.cases) == 2
    assert result.ranking.chosen_by == "sanity"
    assert result.ranking.method == _best(ran.to_dict())


@pytest.mark.parametrize("make, needle", [
    ("bogus", "unknown method 'bogus'"),
    ("other-checkpoint", "is of another checkpoint"),
    ("other-probe", "was measured on another probe"),
    ("not-sanity", "is not a sanity.json"),
    ("missing", "does not exist; give a sanity.json written by `model-audit sanity`"),
])
def test_bad_method_inputs_are_refused(tmp_path, sanity_run, sgd_checkpoint, digits_probe, make,
                                       needle):
    _, out, _ = sanity_run
    data = json.loads((out / "sanity.json").read_text())
    given = tmp_path / "given.json"
    args = ["--method", "auto", "--sanity", given]
    if make == "bogus":
        args = ["--method", "bogus"]
    elif make == "other-checkpoint":
        data["model"]["sha256"] = "0" * 64
    elif make == "other-probe":
        data["probe"]["n"] += 1
    elif make == "not-sanity":
        data = {"schema_version": 1, "layers": []}
    if make != "missing":
        given.write_text(json.dumps(data))
    before = snapshot(tmp_path)
    r = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--out", tmp_path / "s", *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert snapshot(tmp_path) == before and not (tmp_path / "s").exists()


def test_scan_method_auto_on_the_command_line_runs_sanity_and_keeps_it(tmp_path, sgd_checkpoint,
                                                                      digits_probe):
    r = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--method", "auto",
             "--out", tmp_path / "s", "--bootstrap", "0"])
    assert r.exit_code == 0, r.output
    assert "sanity: 12 planted cases in 6 groups" in r.output  # the cost, up front
    evidence = json.loads((tmp_path / "s" / "sanity" / "sanity.json").read_text())
    audit = json.loads((tmp_path / "s" / "audit.json").read_text())
    assert audit["ranking"]["method"] == _best(evidence)
    assert audit["ranking"]["evidence"]["source"] == str(tmp_path / "s" / "sanity")
    assert audit["ranking"]["trust"] in r.output


def test_the_ranking_follows_the_own_metric_of_the_scan_and_of_its_evidence(
        tmp_path, sanity_run, sgd_checkpoint, digits_probe):
    _, out, _ = sanity_run  # measured with alone_net
    before = snapshot(tmp_path)
    r = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--metric", "net_reduction",
             "--method", "auto", "--sanity", out / "sanity.json", "--out", tmp_path / "s"])
    assert r.exit_code == 2, r.output
    assert "measured the own metric alone_net, this scan computes net_reduction" in r.output
    assert snapshot(tmp_path) == before and not (tmp_path / "s").exists()
    # evidence of the same formulation: the own metric is named and measured as such
    run(["sanity", sgd_checkpoint, "--probe", digits_probe, "--metric", "net_reduction",
         "--out", tmp_path / "net", *FAST])
    r = run(["scan", sgd_checkpoint, "--probe", digits_probe, "--metric", "net_reduction",
             "--sanity", tmp_path / "net" / "sanity.json", "--out", tmp_path / "s",
             "--bootstrap", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    ranking = json.loads((tmp_path / "s" / "audit.json").read_text())["ranking"]
    assert ranking["method"] == "combined" and ranking["chosen_by"] == "default"
    assert "ranked by combined (the default): on 4 faults planted" in ranking["trust"]
