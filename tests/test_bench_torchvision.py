"""bench torchvision: the every-classifier run, on two small models."""
from bench.__main__ import main as bench_main


def test_bench_torchvision_scans_and_guesses(tmp_path, capsys):
    out = tmp_path / "results.md"
    code = bench_main(["torchvision", "--only", "shufflenet_v2_x0_5,mnasnet0_5", "--out", str(out)])
    text = out.read_text()
    assert code == 0, text
    assert "2 of 2 scanned with `--arch`" in text and "model itself for 2 of 2" in text
    assert "| mnasnet0_5 |" in text and "| shufflenet_v2_x0_5 |" in text
