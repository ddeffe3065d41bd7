"""Golden outputs: the JSON that scan, compare, gate and fix write on the samples, field by field.

The files under tests/golden/ were recorded before the package was restructured (issue #18), so
a change of structure that changes an answer fails here. Floats are compared within a relative
tolerance (a statistics library may move the last digits); everything else exactly. Wall-time
fields, paths of this run and version strings are left out.

To record them anew after a deliberate change of behaviour::

    MODEL_AUDIT_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SAMPLES
from model_audit.cli import cli

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("MODEL_AUDIT_UPDATE_GOLDEN") == "1"
# fields that differ from run to run or machine to machine, never part of the answer
VOLATILE = {"timing", "seconds", "relative_to_own", "created", "version", "path", "paths",
            "out_dir", "output", "report", "torch", "python", "platform", "device", "threads",
            "duration", "wall_seconds", "scan_seconds", "cost"}
REL, ABS = 1e-6, 1e-9

POLICY = """[policy]
min_accuracy = 0.5
min_class_accuracy = 0.2
max_flagged = 3
min_overlap = 0.3
min_rank_correlation = 0.0
no_new_flags = true
"""


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return Path(value).name  # where this run's files were: only the name is the answer
    return value


def differences(expected, got, where="$"):
    """Every place where ``got`` differs from ``expected`` (floats within REL/ABS)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        out = [f"{where}: keys {sorted(set(expected) ^ set(got))} differ"] \
            if set(expected) != set(got) else []
        for k in sorted(set(expected) & set(got)):
            out += differences(expected[k], got[k], f"{where}.{k}")
        return out
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{where}: length {len(expected)} != {len(got)}"]
        return [d for i, (e, g) in enumerate(zip(expected, got))
                for d in differences(e, g, f"{where}[{i}]")]
    if isinstance(expected, float) or isinstance(got, float):
        if isinstance(expected, (int, float)) and isinstance(got, (int, float)) \
                and not isinstance(expected, bool) and not isinstance(got, bool):
            if math.isclose(expected, got, rel_tol=REL, abs_tol=ABS) or \
                    (math.isnan(expected) and math.isnan(got)):
                return []
        return [f"{where}: {expected!r} != {got!r}"]
    return [] if expected == got else [f"{where}: {expected!r} != {got!r}"]


def check(name: str, data: dict) -> None:
    path = GOLDEN / f"{name}.json"
    data = stable(data)
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    expected = json.loads(path.read_text())
    diff = differences(expected, data)
    assert not diff, f"{name}.json differs from its golden copy:\n" + "\n".join(diff[:30])


def invoke(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("golden")
    sgd, adam = SAMPLES / "digits-sgd.safetensors", SAMPLES / "digits-adam.safetensors"
    probe, train = SAMPLES / "digits-probe.safetensors", SAMPLES / "digits-train.safetensors"
    invoke(["scan", sgd, "--probe", probe, "--out", tmp / "sgd", "--quiet",
            "--baselines", "all", "--baseline-steps", "4", "--bootstrap", "50"])
    invoke(["scan", adam, "--probe", probe, "--out", tmp / "adam", "--quiet",
            "--bootstrap", "50"])
    invoke(["compare", tmp / "sgd" / "audit.json", tmp / "adam" / "audit.json",
            "--out", tmp / "compare", "--resamples", "100"])
    (tmp / "policy.toml").write_text(POLICY)
    invoke(["gate", sgd, "--probe", probe, "--policy", tmp / "policy.toml",
            "--baseline", tmp / "adam" / "audit.json", "--out", tmp / "gate", "--quiet"])
    invoke(["fix", sgd, "--train", train, "--probe", probe, "--output", tmp / "fixed.safetensors",
            "--out", tmp / "fix",
            "--layers", "layer2,fc", "--steps", "20", "--controls", "all,random,rgn",
            "--quiet"])
    return tmp


def test_scan_json_unchanged(outputs):
    check("scan", json.loads((outputs / "sgd" / "audit.json").read_text()))


def test_compare_json_unchanged(outputs):
    check("compare", json.loads((outputs / "compare" / "compare.json").read_text()))


def test_gate_json_unchanged(outputs):
    check("gate", json.loads((outputs / "gate" / "gate.json").read_text()))


def test_fix_json_unchanged(outputs):
    fixes = sorted(outputs.glob("**/fix.json"))
    assert fixes, sorted(str(p) for p in outputs.rglob("*"))
    check("fix", json.loads(fixes[0].read_text()))


def test_the_files_read_back_into_typed_results(outputs):
    """audit.json -> AuditRecord and compare.json -> CompareResult, field by field."""
    from model_audit.commands.compare import CompareResult, compare
    from model_audit.io.records import AuditRecord

    audit = json.loads((outputs / "sgd" / "audit.json").read_text())
    record = AuditRecord.read(outputs / "sgd" / "audit.json")
    assert record.flagged == tuple(audit["flagged"])
    assert [layer.to_dict() for layer in record.layers] == audit["layers"]
    assert record.sha256 == audit["model"]["sha256"] and record.probe_n == audit["probe"]["n"]
    assert record.per_image_reduction.shape == (len(audit["per_image"]["index"]),
                                                len(audit["layers"]))
    assert record.to_dict() == audit
    written = json.loads((outputs / "compare" / "compare.json").read_text())
    back = CompareResult.read(outputs / "compare" / "compare.json")
    assert json.loads(json.dumps(back.to_dict())) == written
    # a record compares like the file it came from
    assert compare(record, record).jaccard == 1.0


def test_a_file_of_the_wrong_kind_is_refused_by_name(outputs):
    from model_audit.commands.compare import CompareResult
    from model_audit.errors import ConfigError
    from model_audit.io.records import AuditRecord, SanityRecord

    with pytest.raises(ConfigError, match="is not an audit.json written by model-audit scan"):
        AuditRecord.read(outputs / "compare" / "compare.json")
    with pytest.raises(ConfigError, match="is not a compare.json written by model-audit compare"):
        CompareResult.read(outputs / "sgd" / "audit.json")
    with pytest.raises(ConfigError, match="is not a sanity.json"):
        SanityRecord.read(outputs / "sgd" / "audit.json")
    with pytest.raises(ConfigError, match="does not exist"):
        AuditRecord.read(outputs / "missing.json")
