"""bench numerics: how two runs' result files are compared (the golden tests' rule)."""
import math

from bench.numerics_bench import (ABS_FLOOR, REL_TOLERANCE, differences, float_distance, leaves,
                                   spread, stable)


def test_floats_within_the_tolerance_everything_else_exactly():
    a = {"flagged": ["layer1"], "n": 3, "score": 0.5, "tiny": 3e-4, "name": "x"}
    near = {**a, "score": 0.5 + 0.9 * REL_TOLERANCE * (ABS_FLOOR + 0.5),
            "tiny": 3e-4 + 0.5 * REL_TOLERANCE}   # small values: absolute noise
    assert differences(a, near) == []
    far = {**a, "score": 0.5 + 2 * REL_TOLERANCE * (ABS_FLOOR + 0.5)}
    assert [d.split(":")[0] for d in differences(a, far)] == ["$.score"]
    assert differences(a, {**a, "flagged": ["layer2"]}) == ["$.flagged[0]: 'layer1' != 'layer2'"]
    assert differences(a, {**a, "n": 4}) == ["$.n: 3 != 4"]   # counts exactly
    assert differences(a, {k: v for k, v in a.items() if k != "name"})  # a missing key
    assert differences({"v": [1.0, 2.0]}, {"v": [1.0]}) == ["$.v length: 2 != 1"]
    assert differences({"b": True}, {"b": 1}) != []  # a boolean is not a number


def test_float_distance():
    assert float_distance(1.0, 1.0) == 0.0
    assert float_distance(math.nan, math.nan) == 0.0 and float_distance(1.0, math.nan) == math.inf
    assert math.isclose(float_distance(3.0, 3.0004), 0.0004 / (ABS_FLOOR + 3.0004))


def test_spread_reports_the_largest_movement_and_every_exact_difference():
    files = {"scan": {"score": 0.25, "flagged": ["a"], "timing": {"total_s": 1.0}},
             "compare": {}, "gate": {}, "fix": {"net": 2}, "sanity": {}}
    other = {**files, "scan": {"score": 0.2500001, "flagged": ["a"], "timing": {"total_s": 9}},
             "fix": {"net": 3}}
    s = spread(files, other)
    assert math.isclose(s["scan"]["max_abs"], 1e-7, rel_tol=1e-3)
    assert s["scan"]["exact"] == []  # wall times are left out
    assert s["fix"]["exact"] == ["$.net: 2 vs 3"]
    kinds = {w: k for k, w, _, _ in leaves(stable(files["scan"]), stable(other["scan"]))}
    assert kinds == {"$.score": "float", "$.flagged[0]": "equal"}
