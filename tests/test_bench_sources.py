"""bench sources: the timm and transformers run, on one model of each."""
import pytest

from bench.__main__ import main as bench_main

pytest.importorskip("timm")
pytest.importorskip("transformers")


def test_bench_sources_scans_and_guesses(tmp_path):
    out = tmp_path / "results.md"
    code = bench_main(["sources", "--only-timm", "test_byobnet", "--only-hf",
                       "ConvNextForImageClassification", "--out", str(out)])
    text = out.read_text()
    assert code == 0, text
    assert "2 of 2 scanned" in text and "model itself for 1 of 1" in text
    assert "| timm | test_byobnet |" in text and "| transformers | ConvNextForImageClassification |" in text
