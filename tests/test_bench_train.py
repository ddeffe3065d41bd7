"""bench train: the device data pipeline, the five methods, the summary, and a tiny real run."""
import json
from argparse import Namespace

import pytest
import torch

from bench import _common as common
from bench import train_bench as tb
from bench.__main__ import main as bench_main
from model_audit.models.checkpoint import load_checkpoint
from model_audit.core.layers import layer_groups
from model_audit.core.schedules import beta_momentum, hybrid_momentum
def _data(n=6, h=5, w=7):
    x = torch.arange(n * 3 * h * w, dtype=torch.int64).remainder(251).add(1).to(torch.uint8)
    return tb.DeviceData(x.view(n, 3, h, w), torch.arange(n), "cpu", (0.5,) * 3, (0.25,) * 3)


def test_augment_is_a_padded_crop_with_optional_flip():
    data = _data()
    out = data.augment(data.x, torch.Generator().manual_seed(0))
    assert out.shape == data.x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(data.x, (tb.PAD,) * 4)
    h, w = data.x.shape[2:]
    seen_flip = seen_plain = False
    for i in range(len(data)):
        matches = [(oy, ox, flip) for oy in range(2 * tb.PAD + 1) for ox in range(2 * tb.PAD + 1)
                   for flip in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(2) if flip else c)(
                       padded[i, :, oy:oy + h, ox:ox + w]))]
        assert matches, f"image {i} is not a crop of the padded original"
        seen_flip |= any(m[2] for m in matches)
        seen_plain |= any(not m[2] for m in matches)
    assert seen_flip and seen_plain
    again = data.augment(data.x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded


def test_epoch_batches_cover_the_data_once_normalised():
    data = _data(n=10)
    batches = list(data.epoch(4, torch.Generator().manual_seed(1)))
    assert [len(y) for _, y in batches] == [4, 4]  # the partial batch is dropped
    labels = torch.cat([y for _, y in batches])
    assert len(set(labels.tolist())) == 8
    x = batches[0][0]
    assert x.dtype == torch.float32 and x.min() >= (0 - 0.5) / 0.25 and x.max() <= 2.0


@pytest.mark.parametrize("method", tb.METHODS)
def test_methods_use_the_products_momentum(method):
    p = torch.nn.Parameter(torch.zeros(2))
    opt, sched = common.make_optimizer(method, [p], lr=0.01, adam_lr=0.001, weight_decay=0.0)
    group = opt.param_groups[0]
    if method == "adam":
        assert isinstance(opt, torch.optim.Adam) and sched is None and group["lr"] == 0.001
        return
    expected = {"sgd": 0.9, "nesterov": 0.9, "beta": beta_momentum(0.01),
                "hybrid": hybrid_momentum(0.01)}[method]
    assert group["momentum"] == pytest.approx(expected)
    assert group["nesterov"] == (method == "nesterov")
    assert (sched is None) == (method in ("sgd", "nesterov"))
    if sched is not None:  # follows the learning rate
        group["lr"] = 0.0001
        sched.step()
        want = beta_momentum(0.0001) if method == "beta" else 0.9
        assert group["momentum"] == pytest.approx(want)


def _run(method, seed, accs):
    return {"method": method, "seed": seed, "final_accuracy": accs[-1],
            "best_accuracy": max(accs), "train_seconds": 10.0 * len(accs),
            "curve": [{"epoch": i + 1, "train_seconds": 10.0 * (i + 1), "test_accuracy": a}
                      for i, a in enumerate(accs)]}


_SETUP = {"arch": "tiny-resnet", "train_images": 100, "test_images": 50, "epochs": 4, "batch": 8,
          "lr": 0.1, "adam_lr": 0.001, "weight_decay": 5e-4, "amp": False, "seeds": [0, 1],
          "scale": "reduced"}


def test_summary_epochs_to_target_and_claims():
    runs = [_run("sgd", 0, [0.5, 0.7, 0.91, 0.96]), _run("sgd", 1, [0.5, 0.8, 0.85, 0.93]),
            _run("beta", 0, [0.6, 0.92, 0.95, 0.95]), _run("beta", 1, [0.9, 0.91, 0.94, 0.94]),
            _run("hybrid", 0, [0.6, 0.9, 0.95, 0.96]), _run("hybrid", 1, [0.6, 0.9, 0.96, 0.96])]
    s = tb.summarize(runs, [0.9, 0.95])
    assert s["methods"]["sgd"]["targets"]["0.9"]["epochs"] == [3, 4]
    assert s["methods"]["sgd"]["targets"]["0.95"]["epochs"] == [4, None]
    assert s["methods"]["sgd"]["targets"]["0.9"]["seconds"] == [30.0, 40.0]
    c = s["claims"]["beta_vs_sgd_speedup"]
    assert c["per_seed_epoch_ratio"] == [1.5, 4.0] and c["mean"] == 2.75 and c["complete"]
    f = s["claims"]["fastest_to_last_target"]
    # hybrid: both seeds at epoch 3; beta: one seed (epoch 3) -> ranks after; sgd one seed
    assert f["ranking"][0] == "hybrid" and f["hybrid_fastest"]
    text = tb.markdown(s, runs, [0.9, 0.95], _SETUP, "python -m bench train", "abc", "cpu")
    assert "| sgd | 3.5 (3.0-4.0) | 35 (30-40) | 4.0, reached by 1/2 |" in text
    assert "**2.75x**" in text and "hybrid strictly fastest: **yes**" in text
    assert "epochs to 90%, 95%, sgd, beta, hybrid, tiny-resnet" in text
    assert "(not run: nesterov, adam)" in text
    # without the hybrid, the claim about it is not judged
    runs = [r for r in runs if r["method"] != "hybrid"]
    s = tb.summarize(runs, [0.9, 0.95])
    text = tb.markdown(s, runs, [0.9, 0.95], _SETUP, "python -m bench train", "abc", "cpu")
    assert "hybrid strictly fastest: **not run**" in text and "hybrid =" not in text


def test_summary_when_nothing_reaches_the_target():
    runs = [_run("sgd", 0, [0.2, 0.3]), _run("hybrid", 0, [0.2, 0.4])]
    s = tb.summarize(runs, [0.9])
    assert s["claims"]["fastest_to_last_target"] == {"target": 0.9, "ranking": [],
                                                     "hybrid_fastest": False}
    text = tb.markdown(s, runs, [0.9], {
        "arch": "a", "train_images": 1, "test_images": 1, "epochs": 2, "batch": 1, "lr": 0.1,
        "adam_lr": 0.001, "weight_decay": 0.0, "amp": False, "seeds": [0], "scale": "x"},
        "cmd", "abc", "cpu")
    assert "no method reached it within the budget" in text
    assert "| sgd | not reached | not reached |" in text


@pytest.mark.slow
def test_tiny_training_run_end_to_end(tmp_path, cifar_archive):
    """Two methods, one epoch each, on a real 200-image CIFAR-10 subset; cached on re-run."""
    out = tmp_path / "RESULTS.md"
    argv = ["train", "--device", "cpu", "--train-per-class", "20", "--test-per-class", "10",
            "--epochs", "2", "--seeds", "1", "--methods", "beta,adam", "--batch", "32",
            "--targets", "0.15", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert bench_main(argv) == 0
    text = out.read_text()
    assert "train: epochs to 15%" in text and "| beta |" in text and "| adam |" in text
    last = json.loads((tmp_path / "cache" / "train" / "last-train.json").read_text())
    assert [r["method"] for r in last["runs"]] == ["beta", "adam"]
    for r in last["runs"]:
        assert [c["epoch"] for c in r["curve"]] == [1, 2]
        assert r["train_images"] == 200 and r["test_images"] == 100
        ckpt = tmp_path / "cache" / "train" / f"{r['name']}.safetensors"
        loaded = load_checkpoint(ckpt)  # the tool's metadata: loads without --arch
        assert loaded.arch == "tiny-resnet" and loaded.num_classes == 10
    beta = last["runs"][0]
    # every SGD step of the beta run is critically damped by construction
    assert beta["regime_steps"]["critical"] == 2 * (200 // 32)
    assert beta["curve"][0]["momentum"] == pytest.approx(
        beta_momentum(beta["curve"][0]["lr"]), abs=1e-6)
    # a second run re-uses the cached checkpoints (no retraining) and appends a section
    mtime = ckpt.stat().st_mtime_ns
    assert bench_main(argv) == 0
    assert ckpt.stat().st_mtime_ns == mtime
    assert out.read_text().count("train: epochs to 15%") == 2
    # the audit benchmark runs on those checkpoints: compare --from-train scans and compares them
    assert bench_main(["compare", "--from-train", "--device", "cpu", "--probe-size", "50",
                       "--resamples", "20", "--cache-dir", str(tmp_path / "cache"),
                       "--out", str(out)]) == 0
    text = out.read_text()
    assert "compare: optimizer vs seed, tiny-resnet, cpu" in text
    assert "| optimizer | beta s0 | adam s0 |" in text and "last `python -m bench train`" in text
    # and baselines: one probe size for both scans runs one scan, with the chosen path method
    assert bench_main(["baselines", "--checkpoint", str(ckpt), "--device", "cpu",
                       "--probe-size", "20", "--path-probe-size", "20", "--path-baselines",
                       "conductance", "--steps", "2", "--train-per-class", "2",
                       "--captum-reference", "3",
                       "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    section = out.read_text().split("own metric vs Captum baselines, tiny-resnet, cpu")[1]
    assert section.count("### probe of 20 images") == 1
    assert "| conductance |" in section and "| grad_x_activation |" in section
    assert "integrated_gradients" not in section and "internal_influence" not in section
    # the captum reference: per-layer LayerConductance gives the shared pass's values, at
    # groups x the passes (3 points per image each: n_steps + 1)
    assert "### captum's LayerConductance one layer at a time vs the shared pass, on 3 of" \
        in section
    diff = float(section.split("per-image group values: ")[1].split(".\n")[0])
    assert diff < 1e-4
    rows = {line.split(" | ")[0]: line.split(" | ") for line in section.splitlines()
            if line.startswith("| captum, one layer") or line.startswith("| tool, all groups")}
    groups = len(layer_groups(load_checkpoint(ckpt).model))
    assert rows["| captum, one layer at a time"][3].strip(" |") == str(3 * groups)
    assert rows["| tool, all groups per pass"][3].strip(" |") == "3"


def test_baselines_bench_refuses_an_unknown_baseline_before_any_work(tmp_path, capsys):
    out, cache = tmp_path / "RESULTS.md", tmp_path / "cache"
    assert bench_main(["baselines", "--path-baselines", "conductance,saliency", "--device", "cpu",
                       "--cache-dir", str(cache), "--out", str(out)]) == 2
    assert "unknown baseline 'saliency'" in capsys.readouterr().err
    assert not out.exists() and not cache.exists()


def test_bad_method_is_refused(tmp_path, capsys):
    args = Namespace(device="cpu", arch=None, epochs=1, train_per_class=1, test_per_class=1,
                     targets="0.5", methods="sgd,rmsprop", seeds=1, amp=None)
    assert tb.run(args) == 2
    assert "methods from sgd, nesterov, beta, hybrid, adam" in capsys.readouterr().err


@pytest.mark.slow
def test_time_budget_stops_between_runs_and_resumes(tmp_path, capsys, cifar_archive):
    out = tmp_path / "RESULTS.md"
    argv = ["train", "--device", "cpu", "--train-per-class", "10", "--test-per-class", "5",
            "--epochs", "1", "--seeds", "1", "--methods", "sgd,hybrid", "--batch", "25",
            "--time-budget", "0.001", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert bench_main(argv) == 3  # the first run always starts; the second would overrun
    assert "1 run(s) not started" in capsys.readouterr().out and not out.exists()
    assert len(list((tmp_path / "cache" / "train").glob("*-sgd-*.safetensors"))) == 1
    assert bench_main(argv) == 0  # sgd from the cache, hybrid trained now
    assert "| sgd |" in out.read_text() and "| hybrid |" in out.read_text()
