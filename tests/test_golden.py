"""Golden outputs: the JSON that scan, compare, gate, fix and sanity write on the samples,
field by field.

The files under tests/golden/ were recorded before the package was restructured (issue #18;
sanity.json with issue #28), so a change of structure that changes an answer fails here.
Everything but floats is compared exactly: flags, groups, ranks, counts, the schema. Floats are
compared within a tolerance that comes from the numerics, not from one machine:
``|a - b| <= REL_TOLERANCE * (ABS_FLOOR + max(|a|, |b|))`` (``bench/numerics_bench.py``).
``python -m bench numerics`` ran these commands under every CPU kernel set torch can emulate
(``ATEN_CPU_CAPABILITY=default|avx2|avx512``), 1, 2 and 4 threads and both memory layouts:
no field but floats ever differed, and the floats moved by at most about 1e-5 of that scale
(float32 rounding of losses of order 1, and the 6 significant digits the per-image values are
written with); the tolerance is 10x that. Floats of a trained state (fix's validation losses
along a repair, confidences after it) get ``TRAINED_TOLERANCE``: rounding compounds over the
repair's steps (the counts beside them stay exact). Floats of the default metric's group-alone
steps (scores, intervals, per-image reductions) get ``ALONE_TOLERANCE`` for the same reason. Wall times, paths of this run, versions and the
environment are left out.

To record them anew after a deliberate change of behaviour::

    MODEL_AUDIT_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("golden")  # one module fixture: run on one worker
from click.testing import CliRunner

from bench.numerics_bench import GOLDEN_FILES, differences, golden_commands, stable
from model_audit.cli import cli

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("MODEL_AUDIT_UPDATE_GOLDEN") == "1"


def check(name: str, data: dict) -> None:
    path = GOLDEN / f"{name}.json"
    data = stable(data)
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    expected = stable(json.loads(path.read_text()))
    diff = differences(expected, data)
    assert not diff, f"{name}.json differs from its golden copy:\n" + "\n".join(diff[:30])


def invoke(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("golden")
    for args in golden_commands(tmp):
        invoke(args)
    return tmp


def result(outputs, name):
    return json.loads((outputs / GOLDEN_FILES[name]).read_text())


@pytest.mark.parametrize("name", sorted(GOLDEN_FILES))
def test_json_unchanged(outputs, name):
    check(name, result(outputs, name))


def test_golden_ranks_are_separated_by_far_more_than_the_tolerance():
    """Ranks and flags are compared exactly; that is sound only where the golden scores are
    apart by far more than float noise, or another machine could swap two of them."""
    from bench.numerics_bench import ALONE_TOLERANCE
    scores = sorted(layer["score"] for layer in json.loads((GOLDEN / "scan.json").read_text())
                    ["layers"])
    gaps = [b - a for a, b in zip(scores, scores[1:])]
    # the scores come from the group-alone steps: 5x their tolerance, 40x the largest
    # movement measured across threads (bench/numerics_bench.py, ALONE_TOLERANCE)
    assert min(gaps) > 5 * ALONE_TOLERANCE * (1 + max(scores)), gaps


def test_the_files_read_back_into_typed_results(outputs):
    """audit.json -> AuditRecord and compare.json -> CompareResult, field by field."""
    from model_audit.commands.compare import compare
    from model_audit.results.compare import CompareResult
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
    from model_audit.results.compare import CompareResult
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
