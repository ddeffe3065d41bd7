"""bench cuda: refuses cleanly without a GPU; the score comparison it reports."""
import math

import pytest
import torch

from bench import cuda_bench
from bench.__main__ import main as bench_main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_refuses_without_cuda_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    assert bench_main(["cuda", "--out", str(out)]) == 2
    assert "no CUDA device here" in capsys.readouterr().err
    assert not out.exists()


def test_max_difference_counts_a_missing_score_as_disagreement():
    assert cuda_bench._max_diff([0.1, 0.2], [0.1, 0.25]) == pytest.approx(0.05)
    assert cuda_bench._max_diff([0.1, None], [0.1, None]) == 0.0
    assert math.isinf(cuda_bench._max_diff([0.1, None], [0.1, 0.3]))
