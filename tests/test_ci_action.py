"""The ready CI action for the gate: action.yml's inputs reach ci/gate.sh, and the script, run
as the action runs it (its variables set), gates the samples, writes the job summary, the
JUnit file and the step output, and exits with the gate's code."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SCRIPT = ROOT / "ci" / "gate.sh"
BIN = Path(sys.executable).parent / "model-audit"


def _policy(path: Path, min_accuracy: float) -> Path:
    path.write_text(f"[policy]\nformats = [\"safetensors\"]\nmin_accuracy = {min_accuracy}\n"
                    "max_flagged = 3\n")
    return path


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    summary, output = tmp_path / "step-summary.md", tmp_path / "github-output"
    full = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MODEL_AUDIT_BIN": str(BIN),
            "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(output),
            "MODEL_AUDIT_OUT": str(tmp_path / "gate-report"), **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)


def _samples(policy: Path) -> dict:
    return {"MODEL_AUDIT_CHECKPOINT": str(ROOT / "samples" / "digits-sgd.safetensors"),
            "MODEL_AUDIT_PROBE": str(ROOT / "samples" / "digits-probe.safetensors"),
            "MODEL_AUDIT_POLICY": str(policy)}


@pytest.mark.parametrize("min_accuracy, code, verdict", [(0.9, 0, "PASS"), (0.99, 1, "FAIL")])
def test_the_gate_script_writes_summary_junit_and_output(tmp_path, min_accuracy, code, verdict):
    run = _run(tmp_path, **_samples(_policy(tmp_path / "policy.toml", min_accuracy)))
    assert run.returncode == code, run.stdout + run.stderr
    summary = (tmp_path / "step-summary.md").read_text()
    assert f"## model-audit gate: {verdict} (exit {code})" in summary
    assert (tmp_path / "github-output").read_text().strip() == f"exit-code={code}"
    suite = ET.parse(tmp_path / "gate-report" / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) == (1 if code else 0)
    assert (tmp_path / "gate-report" / "gate.json").is_file()


def test_a_bad_input_is_exit_2_and_the_summary_says_there_is_no_verdict(tmp_path):
    env = _samples(tmp_path / "missing-policy.toml")
    run = _run(tmp_path, **env)
    assert run.returncode == 2
    assert "missing-policy.toml" in run.stderr
    assert "no verdict (exit 2)" in (tmp_path / "step-summary.md").read_text()
    assert (tmp_path / "github-output").read_text().strip() == "exit-code=2"


def test_the_script_says_which_variable_is_missing(tmp_path):
    run = _run(tmp_path, MODEL_AUDIT_PROBE="probe/")
    assert run.returncode != 0 and "MODEL_AUDIT_CHECKPOINT" in run.stderr


def test_every_action_input_reaches_the_script():
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    gate = next(s for s in action["runs"]["steps"] if s.get("id") == "gate")
    assert "ci/gate.sh" in gate["run"]
    passed = {value.strip("${} ").split(".")[-1] for value in gate["env"].values()}
    assert passed == set(action["inputs"]) - {"install", "python-version"}
    assert {"checkpoint", "probe"} <= {k for k, v in action["inputs"].items() if v.get("required")}
    script = SCRIPT.read_text()
    assert all(name in script for name in gate["env"])


def test_the_examples_use_the_action_and_the_junit_report():
    workflow = yaml.safe_load((ROOT / "ci" / "examples" / "github-workflow.yml").read_text())
    inputs = set(yaml.safe_load((ROOT / "action.yml").read_text())["inputs"])
    step = next(s for s in workflow["jobs"]["gate"]["steps"] if s.get("id") == "gate")
    assert set(step["with"]) <= inputs
    gitlab = yaml.safe_load((ROOT / "ci" / "examples" / "gitlab-ci.yml").read_text())
    assert gitlab["model-gate"]["artifacts"]["reports"]["junit"] == "gate-report/junit.xml"
