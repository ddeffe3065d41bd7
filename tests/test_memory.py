"""Models and data already in memory: an nn.Module, a Dataset, a DataLoader or a pair of
tensors give the answers of the same weights and data read from files; the module is never
modified; bad objects get clear errors; results show themselves in a notebook."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from conftest import ROOT, SESSION_THREADS
from model_audit import (CheckpointError, ConfigError, FixConfig, ProbeError, ScanConfig,
                         compare, fix, load_checkpoint, scan)
from model_audit.errors import EmptyProbeError
from model_audit.io.memory import DATASET_TRANSFORM
from model_audit.render.notebook import compare_view

SAMPLES = ROOT / "samples"
MODEL, PROBE, TRAIN = (SAMPLES / "digits-sgd.safetensors", SAMPLES / "digits-probe.safetensors",
                       SAMPLES / "digits-train.safetensors")
FAST = ScanConfig(bootstrap=50)


def _tensors(path):
    """The sample's images normalised as the checkpoint's metadata says (0.3056, 0.3760)."""
    t = load_file(path)
    return (t["images"].float() / 255 - 0.3056) / 0.3760, t["labels"]


@pytest.fixture(scope="module")
def module():
    return load_checkpoint(MODEL).model


@pytest.fixture(scope="module")
def from_files():
    # a module fixture is made before the per-test thread fixture: use the tests' thread
    # count, so that the file and the in-memory scans are computed alike
    torch.set_num_threads(SESSION_THREADS)
    return scan(MODEL, PROBE, FAST)


class Named(TensorDataset):
    classes = [f"digit {i}" for i in range(10)]


def test_scan_in_memory_gives_the_files_answer_and_leaves_the_module_alone(module, from_files):
    before = {k: v.clone() for k, v in module.state_dict().items()}
    mode = module.training
    result = scan(module, _tensors(PROBE), FAST)
    assert result.flagged == from_files.flagged
    assert [la.score for la in result.layers] == [lb.score for lb in from_files.layers]
    assert result.evaluation.misclassified == from_files.evaluation.misclassified
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert module.training == mode and all(p.device.type == "cpu" for p in module.parameters())
    data = result.to_dict()
    assert data["probe"]["normalize"] == DATASET_TRANSFORM
    assert data["model"]["arch"] == "module:model_audit.models.tiny.TinyResNet"


@pytest.mark.parametrize("wrap", ["dataset", "loader", "path-model"])
def test_datasets_and_loaders_and_a_checkpoint_path(module, from_files, wrap):
    x, y = _tensors(PROBE)
    data = Named(x, y)
    if wrap == "loader":
        data = DataLoader(data, batch_size=7, shuffle=True)  # its order is not the probe's
    model = MODEL if wrap == "path-model" else module
    result = scan(model, data, FAST)
    assert [la.score for la in result.layers] == pytest.approx(
        [lb.score for lb in from_files.layers], abs=1e-6)
    assert result.probe.classes == tuple(Named.classes)


def test_limit_takes_a_stratified_subset_of_an_in_memory_probe(module):
    result = scan(module, _tensors(PROBE), ScanConfig(bootstrap=0, baselines=(),
                                                      options=FAST.options.__class__(limit=100)))
    assert result.evaluation.n == 100


def test_fix_in_memory_returns_the_repaired_module_and_writes_what_the_files_write(
        module, tmp_path):
    config = FixConfig(controls=(), steps=30, write_anyway=True)
    a = fix(MODEL, TRAIN, PROBE, tmp_path / "a.safetensors", config)
    b = fix(module, _tensors(TRAIN), _tensors(PROBE), tmp_path / "b.safetensors", config)
    assert (a.selection.net, a.selection.groups) == (b.selection.net, b.selection.groups)
    sa, sb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert set(sa) == set(sb) and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)
    assert isinstance(b.repaired, nn.Module) and b.repaired is not module
    again = scan(b.repaired, _tensors(PROBE), ScanConfig(bootstrap=0, baselines=()))
    assert again.evaluation.accuracy == pytest.approx(b.selection.after.accuracy)
    none = fix(module, _tensors(TRAIN), _tensors(PROBE), None,
               FixConfig(controls=(), steps=30))
    assert none.repaired is None and not none.repair_found and not none.written


def test_compare_of_two_in_memory_scans_gives_the_files_answer(module, from_files):
    adam = SAMPLES / "digits-adam.safetensors"
    in_memory = compare(scan(module, _tensors(PROBE), FAST),
                        scan(load_checkpoint(adam).model, _tensors(PROBE), FAST))
    files = compare(from_files, scan(adam, PROBE, FAST))
    assert (in_memory.jaccard, in_memory.flagged_a, in_memory.flagged_b) == (
        files.jaccard, files.flagged_a, files.flagged_b)
    assert in_memory.correlation == files.correlation


class Pairs(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class NotLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.fc(x)}


@pytest.mark.parametrize("model, data, error, message", [
    ("sample", (torch.rand(5, 3, 8, 8), torch.zeros(5, dtype=torch.long)), ProbeError,
     "cannot take the probe's inputs of shape \\(3, 8, 8\\)"),
    ("sample", (torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 12])), ProbeError,
     "labels up to 12 but the model's head has 10 outputs"),
    ("sample", (torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), EmptyProbeError,
     "empty"),
    ("sample", Pairs([("not a tensor", 0)]), ProbeError, "must be a tensor"),
    ("sample", Pairs([torch.rand(1, 8, 8)]), ProbeError, "yields \\(input, label\\) pairs"),
    ("sample", (torch.rand(5, 1, 8, 8), torch.rand(5)), ProbeError, "float type"),
    ("sample", (torch.rand(5, 1, 8, 8), torch.zeros(4, dtype=torch.long)), ProbeError,
     "5 inputs"),
    ("sample", 42, ConfigError, "the data is a int"),
    (NotLogits(), (torch.rand(5, 4), torch.zeros(5, dtype=torch.long)), CheckpointError,
     "output on one input is a dict"),
    (object(), (torch.rand(5, 4), torch.zeros(5, dtype=torch.long)), ConfigError,
     "the model is a object: give a checkpoint path, a LoadedCheckpoint or a torch.nn.Module"),
])
def test_bad_objects_are_refused_clearly_and_nothing_changes(module, model, data, error,
                                                             message):
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error, match=message):
        scan(module if isinstance(model, str) and model == "sample" else model, data, FAST)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_results_show_themselves_in_a_notebook(module, from_files):
    html = from_files._repr_html_()
    assert "<svg" in html and "<script" not in html.lower() and "layer1" in html
    frame = from_files.to_frame()
    assert list(frame["group"]) == [layer.name for layer in from_files.layers]
    assert frame["flagged"].sum() == len(from_files.flagged)
    assert repr(from_files).startswith("<ScanResult: 6 rows")
    assert "<script" not in compare(from_files, from_files)._repr_html_().lower()


def test_the_views_escape_what_comes_from_files(from_files):
    data = compare(from_files, from_files).to_dict()
    data["a"]["source"] = "<script>alert(1)</script>"
    view = compare_view(data)
    assert "<script>" not in view and "&lt;script&gt;" in view


def test_to_frame_without_pandas_says_how_to_get_it(from_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ConfigError, match="model-audit\\[pandas\\]"):
        from_files.to_frame()


def test_the_example_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("<svg" in o.get("data", {}).get("text/html", "") for o in outputs)


def test_the_gate_takes_a_module_and_data_in_memory(module, tmp_path):
    import copy

    from model_audit import check_gate, load_policy
    policy = load_policy(_write(tmp_path / "p.toml", "[policy]\nmin_accuracy = 0.9\n"
                                "max_flagged = 3\n"))
    result = check_gate(module, _tensors(PROBE), policy, scan_config=FAST)
    checks = {c.name: c for c in result.checks}
    assert result.exit_code == 0 and checks["file_format"].passed is None
    assert checks["min_accuracy"].passed and checks["finite_tensors"].passed
    broken = copy.deepcopy(module)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("nan")
    failed = check_gate(broken, _tensors(PROBE), policy, scan_config=FAST)
    assert failed.exit_code == 1
    assert {c.name: c.passed for c in failed.checks}["finite_tensors"] is False


def _write(path, text):
    path.write_text(text)
    return path
