"""The README's Python examples run as written (on the committed samples)."""
import re

import pytest

from conftest import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index].replace('"samples/', f'"{ROOT / "samples"}/')
    monkeypatch.chdir(tmp_path)  # outputs such as reports/mine land in the temp directory
    exec(compile(code, f"README.md python block {index}", "exec"), {})


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2
