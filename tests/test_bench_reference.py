"""bench compare / fix / scan on CIFAR-10 checkpoints: the reference mode end to end, tiny."""
from __future__ import annotations

import json

import pytest
import torch

from bench import _common as common
from bench.cifar import CIFAR10_CLASSES
from bench.__main__ import main as bench_main
from model_audit.models.checkpoint import audit_metadata, save_checkpoint
from model_audit.models.registry import build_model


def _tiny(path, seed):
    torch.manual_seed(seed)
    model = build_model("tiny-resnet", 10)
    save_checkpoint(model.state_dict(), path,
                    metadata=audit_metadata("tiny-resnet", 10, normalize="cifar10",
                                            classes=list(CIFAR10_CLASSES)))
    return path


def test_reference_names_resolve_to_the_shared_models():
    path, arch, normalize = common.resolve_checkpoint("reference-adam")
    assert path.name == "resnet18-cifar-adam.safetensors"
    assert (arch, normalize) == ("resnet18-cifar", "cifar10")
    assert common.resolve_checkpoint("reference-sgd", "x", "y")[1:] == ("x", "y")


def test_a_missing_checkpoint_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    for bench in ("compare", "fix", "localize"):
        flag = "--checkpoints" if bench == "compare" else "--checkpoint"
        value = f"reference-sgd,{tmp_path}/nope.safetensors" if bench == "compare" \
            else str(tmp_path / "nope.safetensors")
        assert bench_main([bench, flag, value, "--out", str(out),
                           "--cache-dir", str(tmp_path / "c")]) == 2
        assert "nope.safetensors does not exist; give reference-sgd, reference-adam" in \
            capsys.readouterr().err
    assert bench_main(["compare", "--checkpoints", "reference-sgd", "--out", str(out)]) == 2
    assert "--checkpoints takes two checkpoints" in capsys.readouterr().err
    assert bench_main(["fix", "--lr", "0.01,0.1", "--out", str(out)]) == 2
    assert "need --sweep" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "c").exists()


def test_compare_two_checkpoints_on_the_whole_split_and_disjoint_probes(tmp_path,
                                                                         cifar_archive):
    a, b = _tiny(tmp_path / "a.safetensors", 0), _tiny(tmp_path / "b.safetensors", 1)
    out = tmp_path / "RESULTS.md"
    cache = tmp_path / "cache"
    assert bench_main(["compare", "--checkpoints", f"{a},{b}", "--whole", "30", "--splits",
                       "2", "--split-size", "10", "--resamples", "20", "--device", "cpu",
                       "--out", str(out), "--cache-dir", str(cache)]) == 0
    text = out.read_text()
    assert "| whole (30) |" in text and "| split 1 (10) |" in text and "| split 2 (10) |" in text
    assert "over the 2 disjoint probes: Jaccard mean" in text
    rows = json.loads((cache / "compare" / "last-compare-checkpoints.json").read_text())["rows"]
    assert [r["probe"] for r in rows] == ["whole (30)", "split 1 (10)", "split 2 (10)"]
    for r in rows:
        both = set(r["flagged"][0]) & set(r["flagged"][1])
        union = set(r["flagged"][0]) | set(r["flagged"][1])
        assert r["jaccard"] == pytest.approx(len(both) / len(union) if union else 1.0)
        assert 0 <= r["p_value"] <= 1
    # the two splits are disjoint: no image file in common
    names = [sorted(p.name for p in (cache / d).rglob("*.jpg"))
             for d in ("test-1", "test-1-from1")]
    assert len(names[0]) == len(names[1]) == 10
    for cls in CIFAR10_CLASSES:
        first = {p.read_bytes() for p in (cache / "test-1" / cls).glob("*.jpg")}
        second = {p.read_bytes() for p in (cache / "test-1-from1" / cls).glob("*.jpg")}
        assert first and second and not first & second


def test_fix_on_test_halves_with_controls_and_the_sweep(tmp_path, cifar_archive):
    ckpt = _tiny(tmp_path / "t.safetensors", 0)
    out = tmp_path / "RESULTS.md"
    common = ["--checkpoint", str(ckpt), "--half", "5", "--steps", "3", "--batch", "8",
              "--device", "cpu", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
              "--validation", "0.5"]  # 5 per class: fix's validation part needs 20 images
    assert bench_main(["fix", *common, "--seeds", "2"]) == 0
    text = out.read_text()
    assert "repair: the first 5 CIFAR-10 test images per class" in text
    assert "probe: the next 5 per class (disjoint, checked by content hash)" in text
    for name in ("flagged", "all", "random", "rgn"):
        assert f"| 1 | {name} |" in text
    assert "wall time of the flagged repair / the full fine-tune's, per seed:" in text
    assert bench_main(["fix", *common, "--seeds", "1", "--sweep", "--lr", "0.001,0.01",
                       "--batchnorm", "train,frozen"]) == 0
    text = out.read_text()
    assert "fix: repair settings on a validation split" in text
    assert "validation: the next 1 per class" in text
    assert text.count("| 3 | natural |") == 4
    assert "- best by mean validation net" in text
