"""bench distributed: 1 process against 2 torchrun ranks, on the digits samples.

The scans only (``--fix-steps 0``): each setting is a process launch of several seconds, and
a repair under torchrun against one process is checked weight for weight in
``test_distributed.py``."""
import re

from bench.__main__ import main as bench_main
from conftest import SAMPLES


def test_bench_distributed_times_and_checks_the_answer(tmp_path):
    out = tmp_path / "results.md"
    assert bench_main(["distributed", "--checkpoint", str(SAMPLES / "digits-sgd.safetensors"),
                       "--probe", str(SAMPLES / "digits-probe.safetensors"),
                       "--train", str(SAMPLES / "digits-train.safetensors"),
                       "--repeats", "1", "--fix-steps", "0",
                       "--no-memory", "--device", "cpu", "--extra", "--baselines none",
                       "--out", str(out)]) == 0
    text = out.read_text()
    flags = set()
    for name in ("1 process, 1 thread", "1 process, 2 threads", "torchrun, 2 ranks x 1 thread"):
        row = re.search(rf"\| {re.escape(name)} \| [\d.]+ \([\d.]+\) \| [\d.]+ \| "
                        r"([\d.]+)x \| ([\d.]+) \| ([\w, ]+) \| ([\deE.+-]+) \|", text)
        assert row, (name, text)
        flags.add(row.group(3))
        assert float(row.group(4)) < 1e-4  # the same scores as one process
    assert len(flags) == 1  # the same groups flagged in every setting
    assert "Probe: 540 images" in text
    assert "`fix --layers" not in text  # no fix runs were asked for
