"""The README's and the documentation's examples hold: Python blocks run as written (on the
committed samples), and the scan table the README shows is what the tool prints today."""
import re

import pytest
from click.testing import CliRunner

from conftest import ROOT

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
BLOCKS = [(page, block) for page in PAGES
          for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"{p.relative_to(ROOT)}-{i}" for i, (p, _) in enumerate(BLOCKS)])
def test_python_block_runs(index, tmp_path, monkeypatch):
    page, block = BLOCKS[index]
    code = block.replace('"samples/', f'"{ROOT / "samples"}/')
    monkeypatch.chdir(tmp_path)  # outputs such as reports/mine land in the temp directory
    exec(compile(code, f"{page.name} python block {index}", "exec"), {})


def test_the_docs_have_python_examples():
    assert len(BLOCKS) >= 2


def test_the_readme_scan_table_is_what_the_tool_prints(tmp_path, monkeypatch):
    """The README's first output block (the scan of the digits sample) line for line: the
    numbers are printed with 3 decimals, far above the float32 differences between machines
    (1e-7, bench numerics)."""
    from model_audit.cli import cli

    shown = re.search(r"\$ model-audit (scan .*?)\n(.*?)```", (ROOT / "README.md").read_text(),
                      flags=re.S)
    monkeypatch.chdir(ROOT)
    run = CliRunner().invoke(cli, shown.group(1).split() + ["--out", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    printed = [line.rstrip() for line in run.output.splitlines()]
    for line in shown.group(2).strip().splitlines():
        assert line.rstrip() in printed, f"the README shows {line!r}; the tool prints:\n{run.output}"


def test_the_readme_frame_output_is_what_to_frame_gives():
    """The DataFrame the README prints after its Python block, to 1e-5 (float32 rounding of
    the scores is about 1e-7; pandas prints 6 digits)."""
    from safetensors.torch import load_file
    from model_audit import load_checkpoint, scan

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```\n( +group +score .*?)```", text, flags=re.S).group(1)
    rows = [line.split() for line in block.strip().splitlines()[1:]]
    model = load_checkpoint(ROOT / "samples" / "digits-sgd.safetensors").model
    t = load_file(ROOT / "samples" / "digits-probe.safetensors")
    frame = scan(model, ((t["images"].float() / 255 - 0.3056) / 0.3760, t["labels"])).to_frame()
    assert [r[1] for r in rows] == list(frame["group"])
    for r, (_, row) in zip(rows, frame.iterrows()):
        assert [float(v) for v in r[2:5]] == pytest.approx(
            [row["score"], row["score_low"], row["score_high"]], abs=1e-5)
        assert r[5] == str(bool(row["flagged"]))
