"""bench tabular: the non-image model end to end, on one seed."""
import re

from bench.__main__ import main as bench_main


def test_bench_tabular_runs_every_command(tmp_path):
    out = tmp_path / "results.md"
    assert bench_main(["tabular", "--seeds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "chance top-1 of a planted group 0.25" in text
    row = re.search(r"\| 0 \| (0\.\d+) \| (0\.\d+) \|", text)
    assert row and float(row.group(1)) > 0.8 and float(row.group(2)) > 0.8  # trained MLPs
    assert re.search(r"\| 0 \| flagged \| .+ \| \d+ \| \d+ \| [+-]\d+ \|", text)
    assert "| 0 | random |" in text and "alone_net top-1" in text
