"""Non-image classifiers through scan, compare, fix and gate (issue #19): an MLP on
scikit-learn's digits as 64-feature rows, and a bag-of-tokens model on int64 token ids. Their
tensor probes hold ``inputs`` (any shape) instead of ``images``; the reports show the values
where an image would have a thumbnail."""
import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import ROOT
from model_audit.cli import cli
from model_audit.commands.fix.select import check_overlap
from model_audit.io.probe import open_probe
from model_audit.render.html import MAX_THUMBNAILS
from model_audit.models.checkpoint import load_checkpoint, save_checkpoint

MLP = "nonimage_models:make_mlp"
BAG = "nonimage_models:make_bag"
CLASSES = json.dumps([str(i) for i in range(10)])


@pytest.fixture(autouse=True)
def _one_thread(_threads, monkeypatch):
    """The factories' module importable as ``--arch nonimage_models:...``; one intra-op thread:
    these models are a few small matrices, where a second OpenMP thread gains nothing and,
    when another job shares the two cores, costs 5-10x in spinning barriers."""
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    torch.set_num_threads(1)
    yield


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _train(model, x, y, optimizer, steps):
    """Full-batch training (a second or so for these models)."""
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def _predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """Digits (scikit-learn) as rows in [0, 1]: two MLPs (SGD with momentum, Adam) trained on
    900 rows, a 450-row repair split and a disjoint 447-row probe, as tensor files of
    ``inputs``."""
    from sklearn.datasets import load_digits

    import nonimage_models
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tabular")
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    files = {}
    for name, make_opt, steps in (
            ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 100),
            ("adam", lambda p: torch.optim.Adam(p, lr=3e-3), 60)):
        torch.manual_seed(1)
        model = nonimage_models.make_mlp(10)
        _train(model, x[:900], y[:900], make_opt(model.parameters()), steps)
        files[name] = root / f"mlp-{name}.safetensors"
        save_checkpoint(model.state_dict(), files[name])
    for name, rows in (("repair", slice(900, 1350)), ("probe", slice(1350, None))):
        files[name] = root / f"{name}.safetensors"
        save_file({"inputs": x[rows].contiguous(), "labels": y[rows].contiguous()},
                  str(files[name]), metadata={"classes": CLASSES})
    files["x"], files["y"] = x[1350:], y[1350:]
    return files


# ------------------------------------------------------------------------------------------
# the probe


def test_inputs_reach_the_model_as_stored(tmp_path):
    """Float inputs come back as float32 with their values (no scaling, normalisation or
    resizing, whatever is asked), integer ones as int64; images keep every image step."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(6, 3, 5, generator=gen) * 40  # far outside [0, 1]: never clamped
    tokens = torch.randint(0, 30000, (6, 7), generator=gen, dtype=torch.int32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    save_file({"inputs": features.half(), "labels": labels}, str(tmp_path / "f.safetensors"))
    save_file({"inputs": tokens, "labels": labels}, str(tmp_path / "t.safetensors"))
    save_file({"images": (torch.rand(6, 1, 4, 4, generator=gen) * 255).to(torch.uint8),
               "labels": labels}, str(tmp_path / "i.safetensors"))

    probe = open_probe(tmp_path / "f.safetensors", channels=3, normalize="cifar10", resize="8")
    x = probe.load(list(range(6)))
    assert x.dtype == torch.float32 and x.shape == (6, 3, 5)
    assert torch.equal(x, features.half().float())
    assert not probe.is_image and not probe.integer_inputs and probe.unit == "inputs"
    assert probe.describe() == {
        "source": str(tmp_path / "f.safetensors"), "kind": "inputs", "n": 6,
        "classes": ["0", "1", "2"], "normalize": "none", "resize": None,
        "input_shape": [3, 5], "input_dtype": "F16"}

    probe = open_probe(tmp_path / "t.safetensors", channels=3, normalize="imagenet", limit=3)
    batches = list(probe.batches(2))
    assert [b[1].dtype for b in batches] == [torch.long, torch.long]
    got = torch.cat([b[1] for b in batches])
    assert torch.equal(got, tokens[probe.indices].long()) and int(got.max()) > 255
    assert probe.integer_inputs and probe.describe()["input_dtype"] == "I32"

    image = open_probe(tmp_path / "i.safetensors", channels=3, normalize="none", resize="8")
    assert image.is_image and image.unit == "images" and image.load([0]).shape == (1, 3, 8, 8)
    assert image.describe()["kind"] == "tensors" and "input_shape" not in image.describe()


def test_overlap_check_compares_inputs_exactly(tmp_path):
    """Token ids and feature rows are compared by their values, not by 8-bit pixels (which
    would make every row of ids above 0 the same)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(1, 50, (40, 8), generator=gen) for _ in range(2))
    labels = torch.zeros(40, dtype=torch.long)
    for name, rows in (("a", a), ("b", b), ("a2", torch.cat([b[:30], a[:10]]))):
        save_file({"inputs": rows.contiguous(), "labels": labels},
                  str(tmp_path / f"{name}.safetensors"))
    opened = {n: open_probe(tmp_path / f"{n}.safetensors") for n in ("a", "b", "a2")}
    assert check_overlap(opened["a"], opened["b"]) == []
    assert check_overlap(opened["a"], opened["a2"]) == [(i, 30 + i) for i in range(10)]


# ------------------------------------------------------------------------------------------
# the MLP through every command


def test_scan_of_an_mlp_on_tabular_rows(tabular, tmp_path):
    out = tmp_path / "scan"
    result = run("scan", tabular["sgd"], "--arch", MLP, "--probe", tabular["probe"],
                 "--baselines", "all", "--baseline-steps", "4", "--out", out)
    assert result.exit_code == 0, result.output
    audit = json.loads((out / "audit.json").read_text())
    assert [g["name"] for g in audit["layers"]] == ["fc1", "fc2", "fc3", "head"]
    assert audit["probe"]["kind"] == "inputs" and audit["probe"]["input_shape"] == [64]
    assert audit["probe"]["normalize"] == "none" and audit["probe"]["resize"] is None
    model = load_checkpoint(tabular["sgd"], arch=MLP).model
    wrong = torch.nonzero(_predict(model, tabular["x"]) != tabular["y"]).flatten().tolist()
    assert audit["probe"]["accuracy"] == pytest.approx(1 - len(wrong) / len(tabular["y"]))
    assert [m["index"] for m in audit["misclassified"]] == wrong and 5 < len(wrong) < 60
    # every baseline runs on float rows, conductance and the other input-path methods too
    assert set(audit["baselines"]) == {"grad_x_activation", "activation", "conductance",
                                       "integrated_gradients", "internal_influence", "auto_rgn"}
    assert f"probe {len(tabular['y'])} inputs" in result.output
    assert "normalisation" not in result.output  # no image warning for rows

    html = (out / "report.html").read_text()
    assert "<img" not in html and "Misclassified inputs" in html
    assert f"{len(tabular['y'])} inputs of shape 64, F32" in html
    shown = re.findall(r'<code class="values">([^<]*)</code>', html)
    assert len(shown) == min(len(wrong), MAX_THUMBNAILS)
    values = tabular["x"][wrong[0]][:16].tolist()
    assert shown[0] == " ".join(format(v, ".3g") for v in values) + " … (64 values)"
    assert "(shape 64, float32)" in html

    (out / "report.html").unlink()  # re-rendered from audit.json and the probe file
    assert run("report", out).exit_code == 0
    assert re.findall(r'<code class="values">([^<]*)</code>',
                      (out / "report.html").read_text()) == shown


def test_image_options_on_rows_are_said_to_be_ignored(tabular, tmp_path):
    result = run("scan", tabular["sgd"], "--arch", MLP, "--probe", tabular["probe"],
                 "--normalize", "cifar10", "--resize", "32", "--baselines", "none",
                 "--out", tmp_path / "scan")
    assert result.exit_code == 0, result.output
    assert "--normalize and --resize apply to images only and were ignored" in result.output
    audit = json.loads((tmp_path / "scan" / "audit.json").read_text())
    assert audit["probe"]["normalize"] == "none" and audit["probe"]["resize"] is None
    model = load_checkpoint(tabular["sgd"], arch=MLP).model
    right = (_predict(model, tabular["x"]) == tabular["y"]).float().mean().item()
    assert audit["probe"]["accuracy"] == pytest.approx(right)  # the rows as stored


def test_compare_fix_and_gate_on_the_mlp(tabular, tmp_path):
    probe = ("--arch", MLP, "--probe", tabular["probe"])
    flagged = {}
    for name in ("sgd", "adam"):
        result = run("scan", tabular[name], *probe, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        flagged[name] = json.loads((tmp_path / name / "audit.json").read_text())["flagged"]

    # compare: the two checkpoints, each scanned again on the probe
    result = run("compare", tabular["sgd"], tabular["adam"], *probe, "--resamples", "200",
                 "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert cmp["groups"] == ["fc1", "fc2", "fc3", "head"]
    assert cmp["flagged"]["a"] == flagged["sgd"] and cmp["flagged"]["b"] == flagged["adam"]
    a, b = set(flagged["sgd"]), set(flagged["adam"])
    assert cmp["jaccard"] == pytest.approx(len(a & b) / len(a | b))

    # fix: the flagged groups retrained on a disjoint repair split
    fixed = tmp_path / "fixed.safetensors"
    result = run("fix", tabular["sgd"], *probe, "--train", tabular["repair"], "--output", fixed,
                 "--out", tmp_path / "fix", "--audit", tmp_path / "sgd" / "audit.json",
                 "--steps", "40", "--controls", "random", "--write-anyway")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "fix" / "fix.json").read_text())
    assert report["selection"]["groups"] == flagged["sgd"]
    before = _predict(load_checkpoint(tabular["sgd"], arch=MLP).model, tabular["x"])
    after = _predict(load_checkpoint(fixed, arch=MLP).model, tabular["x"])
    y = tabular["y"]
    assert report["accuracy"]["after"] == pytest.approx((after == y).float().mean().item())
    assert report["fixed"] == int(((before != y) & (after == y)).sum())
    assert report["broken"] == int(((before == y) & (after != y)).sum())
    html = (tmp_path / "fix" / "report.html").read_text()
    assert "<img" not in html and f"({len(y)} inputs)" in html
    assert "<th>inputs</th>" in html and "probe images" not in html
    assert "on the same probe inputs" in result.output
    if report["images"]["fixed"]:
        first = report["images"]["fixed"][0]["index"]
        row = " ".join(format(v, ".3g") for v in tabular["x"][first][:16].tolist())
        assert f'<code class="values">{row} … (64 values)</code>' in html

    # the probe itself as repair data: refused, nothing written
    result = run("fix", tabular["sgd"], *probe, "--train", tabular["probe"], "--output",
                 tmp_path / "no.safetensors", "--out", tmp_path / "nofix", "--layers", "head")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{len(y)} probe input(s) also appear in the repair data" in result.output
    assert not (tmp_path / "no.safetensors").exists() and not (tmp_path / "nofix").exists()

    # gate: passes (with the regression checks against the Adam scan and a sanity check that
    # plants faults in the MLP), then fails on an accuracy it does not reach
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nmin_accuracy = 0.8\nmax_flagged = 4\nmin_overlap = 0.0\n"
                      "min_sanity_top1 = 0.01\n")
    summary = tmp_path / "summary.md"
    result = run("gate", tabular["sgd"], *probe, "--policy", policy, "--baseline",
                 tmp_path / "adam" / "audit.json", "--summary", summary,
                 "--out", tmp_path / "gate")
    assert result.exit_code == 0, result.output
    gate = json.loads((tmp_path / "gate" / "gate.json").read_text())
    checks = {c["name"]: c for c in gate["checks"]}
    assert checks["min_sanity_top1"]["passed"] and checks["min_overlap"]["passed"]
    accuracy = (before == y).float().mean().item()
    assert checks["min_accuracy"]["value"] == pytest.approx(accuracy)
    assert f"Probe: {len(y)} inputs, accuracy {100 * accuracy:.2f}%" in summary.read_text()
    policy.write_text("[policy]\nmin_accuracy = 0.999\n")
    result = run("gate", tabular["sgd"], *probe, "--policy", policy,
                 "--out", tmp_path / "gate2")
    assert result.exit_code == 1, result.output  # the accuracy check fails, as it must
    gate = json.loads((tmp_path / "gate2" / "gate.json").read_text())
    assert [c["message"] for c in gate["checks"] if c["name"] == "min_accuracy"] == [
        f"accuracy {100 * accuracy:.2f}% < 99.90% on {len(y)} inputs"]


# ------------------------------------------------------------------------------------------
# token ids


def test_token_ids_stay_integers_and_input_path_baselines_are_left_out(tmp_path):
    import nonimage_models
    gen = torch.Generator().manual_seed(0)
    n, length, classes = 600, 12, 4
    y = torch.randint(0, classes, (n,), generator=gen)
    tokens = torch.randint(0, 40, (n, length), generator=gen)
    cue = torch.rand(n, length, generator=gen) < 0.3  # class-specific tokens 10c..10c+9
    tokens[cue] = (10 * y.view(-1, 1) + torch.randint(0, 10, (n, length), generator=gen))[cue]
    torch.manual_seed(0)
    model = nonimage_models.make_bag(classes)
    _train(model, tokens[:400], y[:400], torch.optim.Adam(model.parameters(), lr=1e-2), 40)
    ckpt = tmp_path / "bag.safetensors"
    save_checkpoint(model.state_dict(), ckpt)
    probe = tmp_path / "tokens.safetensors"
    save_file({"inputs": tokens[400:].contiguous(), "labels": y[400:].contiguous()}, str(probe))
    out = tmp_path / "scan"
    result = run("scan", ckpt, "--arch", BAG, "--probe", probe, "--baselines", "all",
                 "--baseline-steps", "4", "--out", out)
    assert result.exit_code == 0, result.output
    assert "conductance, internal_influence left out" in result.output
    audit = json.loads((out / "audit.json").read_text())
    assert audit["probe"]["input_dtype"] == "I64" and audit["probe"]["input_shape"] == [12]
    assert [g["name"] for g in audit["layers"]] == ["embed", "mix", "norm", "head"]
    wrong = torch.nonzero(_predict(model, tokens[400:]) != y[400:]).flatten().tolist()
    assert [m["index"] for m in audit["misclassified"]] == wrong and wrong
    assert set(audit["baselines"]) == {"integrated_gradients", "grad_x_activation",
                                       "activation", "auto_rgn"}
    assert any("conductance, internal_influence left out" in w for w in audit["warnings"])
    html = (out / "report.html").read_text()
    token_row = " ".join(str(int(t)) for t in tokens[400 + wrong[0]])
    assert f'<code class="values">{token_row}</code>' in html and "<img" not in html
    assert "(shape 12, int64)" in html

    # token ids beyond the model's vocabulary: a ProbeError that says so, nothing written
    save_file({"inputs": tokens[400:] + 40, "labels": y[400:].contiguous()},
              str(tmp_path / "oov.safetensors"))
    result = run("scan", ckpt, "--arch", BAG, "--probe", tmp_path / "oov.safetensors",
                 "--out", tmp_path / "oov")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot run on the probe's inputs (shape 12, int64)" in result.output
    assert not (tmp_path / "oov").exists()


# ------------------------------------------------------------------------------------------
# bad probes


@pytest.mark.parametrize("tensors, needle", [
    ({"images": torch.rand(4, 1, 8, 8), "inputs": torch.rand(4, 64), "labels": torch.arange(4)},
     "it has both 'images' and 'inputs'; a tensor probe holds one of them"),
    ({"rows": torch.rand(4, 64), "labels": torch.arange(4)},
     "no 'images' tensor (it has labels, rows); a tensor probe needs images (N,C,H,W) and "
     "labels (N), or inputs (N,...) and labels (N) for a model that does not take images"),
    ({"inputs": torch.rand(4, 64), "targets": torch.arange(4)}, "no 'labels' tensor"),
    ({"inputs": torch.rand(5, 64), "labels": torch.arange(4)},
     "labels must have shape (5,) to match the 5 rows of inputs, got [4]"),
    ({"inputs": torch.rand(4, 64) > 0.5, "labels": torch.arange(4)},
     "inputs must be float (F32, F16, BF16, F64) or integer"),
    ({"inputs": torch.rand(4, 64).index_fill_(0, torch.tensor([1, 3]), float("nan")),
      "labels": torch.arange(4)}, "inputs at index 1, 3 hold NaN or infinite values"),
])
def test_bad_input_probes_are_refused_and_nothing_is_written(tabular, tmp_path, tensors, needle):
    probe = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(probe))
    before = probe.read_bytes()
    out = tmp_path / "out"
    result = run("scan", tabular["sgd"], "--arch", MLP, "--probe", probe, "--out", out)
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists() and probe.read_bytes() == before
