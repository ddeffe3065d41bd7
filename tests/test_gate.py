"""gate: policy validation, every check passing and failing, exit codes, JUnit and Markdown."""
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import snapshot, write_tensor_probe
from model_audit.cli import cli
from model_audit.errors import ConfigError
from model_audit.policy import EXAMPLE_POLICY, load_policy
def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def policy(tmp_path: Path, body: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text("[policy]\n" + body)
    return path


@pytest.fixture
def inputs(sgd_checkpoint, digits_probe):
    return sgd_checkpoint, digits_probe


def gate(tmp_path, ckpt, probe, pol, *extra):
    out = tmp_path / "out"
    result = run(["gate", ckpt, "--probe", probe, "--policy", pol, "--out", out,
                  "--junit", tmp_path / "junit.xml", "--summary", tmp_path / "summary.md",
                  "--quiet", *extra])
    data = json.loads((out / "gate.json").read_text()) if (out / "gate.json").exists() else None
    return result, data


def checks(data):
    return {c["name"]: c for c in data["checks"]}


def test_all_checks_pass_exit_0(tmp_path, inputs):
    pol = policy(tmp_path, "min_accuracy = 0.9\nmin_class_accuracy = 0.8\nmax_flagged = 3\n"
                           "max_scan_seconds = 600\n")
    result, data = gate(tmp_path, *inputs, pol)
    assert result.exit_code == 0, result.output
    assert data["verdict"] == "pass" and data["failed"] == []
    names = set(checks(data))
    assert {"file_format", "loads_safely", "finite_tensors", "min_accuracy", "min_class_accuracy",
            "max_flagged", "max_scan_seconds"} <= names
    assert all(c["passed"] for c in data["checks"])
    out = tmp_path / "out"
    assert (out / "audit.json").exists() and (out / "report.html").exists()
    html = (out / "report.html").read_text()
    assert "PASS" in html and "min_class_accuracy" in html  # passed checks are listed too
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and len(suite.findall("testcase")) == len(data["checks"])
    assert "| min_accuracy | pass |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("body,name,needle", [
    ("min_accuracy = 0.99\n", "min_accuracy", "96.11% < 99.00%"),
    ("min_class_accuracy = 0.95\n", "min_class_accuracy", "classes below the minimum"),
    ("max_flagged = 1\n", "max_flagged", "3 flagged group(s): conv1, layer1, layer2"),
    ("max_scan_seconds = 0\n", "max_scan_seconds", "scan took"),
])
def test_each_result_check_fails_exit_1(tmp_path, inputs, body, name, needle):
    result, data = gate(tmp_path, *inputs, policy(tmp_path, body))
    assert result.exit_code == 1, result.output
    c = checks(data)[name]
    assert c["passed"] is False and needle in c["message"]
    assert data["failed"] == [name]
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1"
    failed = [tc.get("name") for tc in suite.findall("testcase") if tc.find("failure") is not None]
    assert failed == [name]
    assert f"| {name} | **FAIL** |" in (tmp_path / "summary.md").read_text()


def test_pt_format_refused_by_default_and_allowed_weights_only(tmp_path, inputs):
    from model_audit.io.tensors import read_tensors
    state, _ = read_tensors(inputs[0])
    pt = tmp_path / "model.pt"
    torch.save(state, pt)
    result, data = gate(tmp_path, pt, inputs[1], policy(tmp_path, ""), "--arch", "tiny-resnet")
    assert result.exit_code == 1
    assert checks(data)["file_format"]["passed"] is False
    result, data = gate(tmp_path, pt, inputs[1], policy(tmp_path, 'formats = ["pt"]\n'),
                        "--arch", "tiny-resnet", "--normalize", "0.3,0.35")
    assert result.exit_code == 0, result.output
    assert "weights-only" in checks(data)["loads_safely"]["message"]


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/model-audit-gate-marker"),))


def test_unsafe_pickle_fails_the_gate_and_runs_nothing(tmp_path, inputs):
    marker = Path("/tmp/model-audit-gate-marker")
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": _Payload()}, evil)
    result, data = gate(tmp_path, evil, inputs[1], policy(tmp_path, 'formats = ["pt"]\n'))
    assert result.exit_code == 1, result.output
    assert checks(data)["loads_safely"]["passed"] is False
    assert "refused" in checks(data)["loads_safely"]["message"]
    assert not marker.exists()


def test_nonfinite_tensors_fail_and_are_named(tmp_path, inputs):
    from model_audit.io.tensors import read_tensors
    from model_audit.models.checkpoint import save_checkpoint
    state, meta = read_tensors(inputs[0])
    state["fc.bias"][0] = float("inf")
    bad = tmp_path / "inf.safetensors"
    save_checkpoint(state, bad, metadata=meta)
    result, data = gate(tmp_path, bad, inputs[1], policy(tmp_path, "min_accuracy = 0.5\n"))
    assert result.exit_code == 1
    c = checks(data)["finite_tensors"]
    assert c["passed"] is False and "fc.bias" in c["message"]
    assert checks(data)["min_accuracy"]["passed"] is None  # not run, and the gate fails


def test_baseline_regression(tmp_path, inputs, adam_checkpoint):
    base_dir = tmp_path / "base"
    assert run(["scan", inputs[0], "--probe", inputs[1], "--out", base_dir, "-q"]).exit_code == 0
    pol = policy(tmp_path, "no_new_flags = true\nmin_overlap = 0.5\nmin_rank_correlation = 0.8\n")
    # the same model against its own baseline passes
    result, data = gate(tmp_path, inputs[0], inputs[1], pol, "--baseline", base_dir / "audit.json")
    assert result.exit_code == 0, result.output
    assert checks(data)["min_overlap"]["value"] == 1.0
    # a baseline that flagged less: the new flags are a regression
    audit = json.loads((base_dir / "audit.json").read_text())
    audit["flagged"] = ["layer1"]
    for layer in audit["layers"]:
        layer["flagged"] = layer["name"] == "layer1"
    (tmp_path / "old.json").write_text(json.dumps(audit))
    result, data = gate(tmp_path, inputs[0], inputs[1], pol, "--baseline", tmp_path / "old.json")
    assert result.exit_code == 1
    assert checks(data)["no_new_flags"]["value"] == ["conv1", "layer2"]
    assert "layer2" in checks(data)["no_new_flags"]["message"]


def test_baseline_checks_without_baseline_fail(tmp_path, inputs):
    result, data = gate(tmp_path, *inputs, policy(tmp_path, "min_overlap = 0.5\n"))
    assert result.exit_code == 1
    assert "--baseline" in checks(data)["min_overlap"]["message"]


def test_nothing_audited_exit_3(tmp_path, inputs):
    empty = write_tensor_probe(tmp_path / "empty.safetensors",
                               torch.zeros(0, 1, 8, 8, dtype=torch.uint8),
                               torch.zeros(0, dtype=torch.int64))
    result, data = gate(tmp_path, inputs[0], empty, policy(tmp_path, "min_accuracy = 0.5\n"))
    assert result.exit_code == 3, result.output
    assert data["verdict"] == "nothing audited" and "no images" in data["error"]
    assert checks(data)["min_accuracy"]["passed"] is None
    (tmp_path / "emptydir").mkdir()
    result, _ = gate(tmp_path, inputs[0], tmp_path / "emptydir", policy(tmp_path, ""))
    assert result.exit_code == 3
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "none.safetensors"))
    result, _ = gate(tmp_path, tmp_path / "none.safetensors", inputs[1], policy(tmp_path, ""))
    assert result.exit_code == 3


@pytest.mark.parametrize("body,needle", [
    ("min_acuracy = 0.9\n", "unknown policy key 'min_acuracy'"),
    ('min_accuracy = "high"\n', "min_accuracy (minimum probe accuracy (0..1)) must be"),
    ("min_accuracy = 1.5\n", "between 0 and 1"),
    ("max_flagged = true\n", "max_flagged"),
    ('formats = ["onnx"]\n', "formats must be a non-empty list"),
    ("= broken", "invalid TOML"),
])
def test_bad_policy_exit_2_and_nothing_written(tmp_path, inputs, body, needle):
    pol = policy(tmp_path, body)
    before = snapshot(tmp_path)
    result, data = gate(tmp_path, *inputs, pol)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert "Traceback" not in result.output and data is None
    assert snapshot(tmp_path) == before


def test_bad_probe_is_exit_2(tmp_path, inputs):
    result, data = gate(tmp_path, inputs[0], tmp_path / "missing", policy(tmp_path, ""))
    assert result.exit_code == 2 and "does not exist" in result.output and data is None


def test_init_writes_a_valid_commented_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(["gate", "--init"])
    assert result.exit_code == 0
    text = (tmp_path / "model-audit-policy.toml").read_text()
    assert text == EXAMPLE_POLICY and text.count("#") > 5
    assert load_policy(tmp_path / "model-audit-policy.toml").min_accuracy == 0.9
    again = run(["gate", "--init"])
    assert again.exit_code == 2 and "exists" in again.output


def test_top_level_keys_outside_policy_table_are_refused(tmp_path):
    (tmp_path / "p.toml").write_text("min_accuracy = 0.9\n")
    with pytest.raises(ConfigError, match="under \\[policy\\]"):
        load_policy(tmp_path / "p.toml")
