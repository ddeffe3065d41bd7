"""torch.distributed: 2 CPU ranks (torchrun, gloo) give the answer of one process; a failure on
one rank stops both with one message and writes nothing; the environment is checked; probes
decode in DataLoader workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from model_audit import distributed
from model_audit.cli import cli
from model_audit.errors import ConfigError, ProbeError
from model_audit.io.probe import open_probe

from conftest import SAMPLES

#: the module fixtures launch torchrun; on one pytest-xdist worker they run once
pytestmark = pytest.mark.xdist_group("distributed")

SGD = SAMPLES / "digits-sgd.safetensors"
ADAM = SAMPLES / "digits-adam.safetensors"
PROBE = SAMPLES / "digits-probe.safetensors"
TRAIN = SAMPLES / "digits-train.safetensors"
MODEL_AUDIT = Path(sys.executable).parent / "model-audit"


def torchrun(args, ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N --no-python model-audit ARGS``, as a user
    runs it (stdout and stderr together)."""
    if not MODEL_AUDIT.exists():
        pytest.skip(f"{MODEL_AUDIT} is not installed (pip install -e .)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(ranks), "--no-python", str(MODEL_AUDIT),
           *[str(a) for a in args]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def one_process(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def output(run: subprocess.CompletedProcess) -> str:
    return run.stdout + run.stderr


# ------------------------------------------------------------------------------------------
# The same answer


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dscan")
    args = ["scan", SGD, "--probe", PROBE, "--quiet", "--baselines", "all"]
    one_process(args + ["--out", tmp / "one"])
    run = torchrun(args + ["--out", tmp / "two"])
    assert run.returncode == 0, output(run)
    return (json.loads((tmp / "one/audit.json").read_text()),
            json.loads((tmp / "two/audit.json").read_text()), run)


def test_scan_two_ranks_equals_one_process(scans):
    one, two, _ = scans
    assert two["flagged"] == one["flagged"] and one["flagged"]
    assert one["probe"]["misclassified"] == two["probe"]["misclassified"] > 0
    assert [m["index"] for m in one["misclassified"]] == [m["index"] for m in two["misclassified"]]
    for a, b in zip(one["layers"], two["layers"]):
        assert a["name"] == b["name"] and a["flagged"] == b["flagged"]
        assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-7)
        assert a["flag_frequency"] == b["flag_frequency"]
        for name, value in a["baselines"].items():
            assert value == pytest.approx(b["baselines"][name], rel=1e-4, abs=1e-6), name
    np.testing.assert_allclose(one["per_image"]["reduction"], two["per_image"]["reduction"],
                               rtol=1e-4, atol=1e-5)
    assert one["replay"]["peak_lr"] == two["replay"]["peak_lr"]
    assert one["replay"]["initial_loss"] == pytest.approx(two["replay"]["initial_loss"], 1e-6)
    # the passes are those of the whole probe, not of one rank's shard
    assert one["passes"] == two["passes"]
    assert {n: c["forward_images"] for n, c in one["cost"].items()} == \
        {n: c["forward_images"] for n, c in two["cost"].items()}


def test_the_audit_says_it_ran_on_two_ranks(scans):
    one, two, _ = scans
    assert two["environment"]["distributed"] == {"world_size": 2, "rank": 0, "backend": "gloo"}
    assert one["environment"]["distributed"] == {"world_size": 1, "rank": 0, "backend": None}
    assert two["environment"]["threads"] == 1  # OMP_NUM_THREADS=1 on each rank
    for env in (one["environment"], two["environment"]):
        assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert env["libraries"]["torch"] == torch.__version__


def test_rank_0_prints_the_others_are_quiet(scans):
    _, _, run = scans
    text = output(run)
    assert text.count("flagged: ") == 1 and text.count("group      params %") == 1


@pytest.fixture(scope="module")
def fixes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dfix")
    args = ["fix", SGD, "--train", TRAIN, "--probe", PROBE, "--steps", "20", "--quiet",
            "--write-anyway"]
    one_process(args + ["--output", tmp / "one.safetensors", "--out", tmp / "one"])
    run = torchrun(args + ["--output", tmp / "two.safetensors", "--out", tmp / "two"])
    assert run.returncode == 0, output(run)
    return tmp, run


def test_fix_two_ranks_equals_one_process(fixes):
    """DistributedDataParallel with each step's batch split over the ranks, BatchNorm
    statistics over the whole batch: the repair of one process, weight for weight."""
    tmp, _ = fixes
    one = json.loads((tmp / "one/fix.json").read_text())
    two = json.loads((tmp / "two/fix.json").read_text())
    assert two["environment"]["distributed"]["world_size"] == 2
    assert one["selection"]["groups"] == two["selection"]["groups"]
    for key in ("fixed", "broken", "net"):
        assert one[key] == two[key]
    # the controls' repaired weights are not written; their probe counts may differ by one
    # image: the ranks' gradient all-reduce sums in another order, and under some CPU kernels
    # (ATEN_CPU_CAPABILITY=default) the full fine-tune's 20 steps then put one probe image on
    # the other side of its decision boundary (the selection's written weights: below)
    assert [c["name"] for c in one["controls"]] == [c["name"] for c in two["controls"]]
    for a, b in zip(one["controls"], two["controls"]):
        assert all(abs(a[k] - b[k]) <= 1 for k in ("fixed", "broken")), (a["name"], a, b)
    a, b = load_file(tmp / "one.safetensors"), load_file(tmp / "two.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # BatchNorm running statistics included
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5)
    identical = [d["output"]["verified_identical_tensors"] for d in (one, two)]
    assert identical[0] == identical[1] > 0


def test_compare_and_gate_under_torchrun(tmp_path):
    run = torchrun(["compare", SGD, ADAM, "--probe", PROBE, "--quiet", "--out", tmp_path / "c"])
    assert run.returncode == 0, output(run)
    one = one_process(["compare", SGD, ADAM, "--probe", PROBE, "--quiet",
                       "--out", tmp_path / "c1"])
    two = json.loads((tmp_path / "c/compare.json").read_text())
    assert two == json.loads((tmp_path / "c/compare.json").read_text())
    assert one.output.count("flagged") == output(run).count("flagged")
    first = json.loads((tmp_path / "c1/compare.json").read_text())
    assert two["flagged"] == first["flagged"]
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nmin_accuracy = 0.9\nmax_flagged = 3\n")
    run = torchrun(["gate", SGD, "--probe", PROBE, "--policy", policy, "--quiet",
                    "--out", tmp_path / "g", "--junit", tmp_path / "junit.xml"])
    assert run.returncode == 0, output(run)
    assert json.loads((tmp_path / "g/gate.json").read_text())["verdict"] == "pass"
    assert (tmp_path / "junit.xml").exists()


def test_sanity_under_torchrun(tmp_path):
    from bench.numerics_bench import ALONE_TOLERANCE
    args = ["sanity", SGD, "--probe", PROBE, "--groups", "layer1,fc", "--defects",
            "noise,labelswap", "--quiet"]
    run = torchrun(args + ["--out", tmp_path / "two", "--keep-damaged", tmp_path / "kept"])
    assert run.returncode == 0, output(run)
    # the session's thread count (2 on a 2-core machine) against 1 thread per rank: the
    # labelswap fine-tune runs in float64, so its severity no longer depends on the threads
    one_process(args + ["--out", tmp_path / "one"])
    one = json.loads((tmp_path / "one/sanity.json").read_text())
    two = json.loads((tmp_path / "two/sanity.json").read_text())
    assert [(c["severity"], c["top_group"], c["flagged"]) for c in one["cases"]] == \
        [(c["severity"], c["top_group"], c["flagged"]) for c in two["cases"]]
    for a, b in zip(one["cases"], two["cases"]):
        # the group-alone steps amplify float32 rounding (bench/numerics_bench.py)
        np.testing.assert_allclose(a["scores"]["alone_net"], b["scores"]["alone_net"],
                                   rtol=0, atol=ALONE_TOLERANCE)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == \
        ["fc-labelswap-s0.safetensors", "fc-noise-s0.safetensors",
         "layer1-labelswap-s0.safetensors", "layer1-noise-s0.safetensors"]


# ------------------------------------------------------------------------------------------
# Failures


def digits_folder(root: Path, corrupt: int = -1) -> Path:
    """The digits probe as an ImageFolder of PNGs; image ``corrupt`` (in probe order) is not
    an image."""
    data = load_file(PROBE)
    classes = json.loads('["0","1","2","3","4","5","6","7","8","9"]')
    order = sorted(range(len(data["labels"])), key=lambda i: (int(data["labels"][i]), i))
    for k, i in enumerate(order):
        folder = root / classes[int(data["labels"][i])]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:04d}.png"
        if k == corrupt:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(data["images"][i, 0].numpy()).save(path)
    return root


def test_a_failure_on_one_rank_stops_both_with_one_message(tmp_path):
    """The last image (rank 1's block) is broken: rank 0 does not wait for rank 1 in a
    collective; both stop; the message is printed once; nothing is written."""
    folder = digits_folder(tmp_path / "probe", corrupt=539)
    out = tmp_path / "out"
    run = torchrun(["scan", SGD, "--probe", folder, "--out", out, "--quiet"], timeout=180)
    text = output(run)
    assert run.returncode != 0
    assert text.count("cannot decode image") == 1, text
    # rank 1 failed and is quiet: the message comes from rank 0, which learnt it from rank 1
    assert text.startswith("Error: ") or "\nError: " in text
    assert "model_audit/" not in text  # no traceback of ours
    # torchrun's report: a rank exited 2 (it stops the other as soon as one has exited, so
    # whether the second is listed with 2 or as terminated is a race)
    assert "exitcode  : 2" in text
    assert not out.exists()


def test_an_error_writing_on_rank_0_stops_every_rank(tmp_path):
    out = tmp_path / "file"
    out.write_text("not a directory")
    run = torchrun(["scan", SGD, "--probe", PROBE, "--out", out, "--quiet", "--bootstrap", "0",
                    "--baselines", "none"], timeout=180)
    text = output(run)
    assert run.returncode != 0
    assert text.count("exists and is not a directory") == 1, text
    assert "exitcode  : 2" in text and "model_audit/" not in text
    assert out.read_text() == "not a directory"


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2"}, "RANK and LOCAL_RANK not set"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2 is outside 0..1"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "", "MASTER_PORT": ""},
     "cannot join the process group of WORLD_SIZE=2 (gloo)"),
])
def test_a_broken_environment_is_refused(tmp_path, env, message):
    result = CliRunner().invoke(cli, ["scan", str(SGD), "--probe", str(PROBE), "--device", "cpu",
                                      "--out", str(tmp_path / "o")], env=env)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_from_env_and_blocks():
    assert distributed.from_env({}) == distributed.Context()
    assert distributed.from_env({"WORLD_SIZE": "1"}).world_size == 1
    ctx = distributed.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.active) == (3, 4, 1, False)
    with pytest.raises(ConfigError, match="RANK and LOCAL_RANK not set"):
        distributed.from_env({"WORLD_SIZE": "3"})
    assert distributed.block_sizes(10, 4) == [3, 3, 2, 2]
    assert distributed.block_sizes(1, 3) == [1, 0, 0]
    assert [len(distributed.block(10, distributed.Context(r, 4, r, "gloo"))) for r in range(4)] \
        == [3, 3, 2, 2]
    assert distributed.block(10, distributed.Context(2, 4, 2, "gloo")) == range(6, 8)
    # one process: everything is the identity, nothing touches torch.distributed
    assert distributed.local_part([5, 6, 7]) == [5, 6, 7]
    t = torch.arange(3.0)
    assert distributed.gather_rows(t, 3) is t
    assert distributed.sum_values(1.5, 2) == (1.5, 2.0)
    with distributed.agree():
        pass
    assert distributed.on_main(lambda v: v + 1, 1) == 2


# ------------------------------------------------------------------------------------------
# DataLoader workers


def test_workers_decode_the_same_batches(tmp_path):
    folder = digits_folder(tmp_path / "probe")
    probe = open_probe(folder, channels=1, normalize="none")
    probe.workers = 0
    plain = list(probe.batches(64))
    probe.workers = 2
    assert probe.decode_workers(9) == 2
    pooled = list(probe.batches(64))
    assert [b[0] for b in plain] == [b[0] for b in pooled]
    for a, b in zip(plain, pooled):
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    probe.workers = None  # the default: an ImageFolder of several batches, tensor files never
    assert probe.decode_workers(1) == 0
    assert probe.decode_workers(9) == max(0, min(4, (os.cpu_count() or 1) - 1, 8))
    assert open_probe(PROBE, channels=1).decode_workers(9) == 0


def test_a_worker_error_keeps_its_message(tmp_path):
    folder = digits_folder(tmp_path / "probe", corrupt=100)
    probe = open_probe(folder, channels=1, normalize="none")
    probe.workers = 2
    with pytest.raises(ProbeError, match=r"cannot decode image .*remove or replace the file") \
            as info:
        list(probe.batches(64))
    assert "DataLoader worker" not in str(info.value)


def test_negative_workers_are_refused(tmp_path):
    result = CliRunner().invoke(cli, ["scan", str(SGD), "--probe", str(PROBE), "--workers", "-1",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "workers must be >= 0" in result.output
    assert not (tmp_path / "o").exists()


def test_workers_keep_one_image_size(tmp_path):
    """Each worker checks the sizes it decodes; the main process checks across workers."""
    folder = digits_folder(tmp_path / "probe")
    odd = sorted(folder.rglob("*.png"))[-1]  # the last batch's
    Image.open(odd).resize((9, 9)).save(odd)
    probe = open_probe(folder, channels=1, normalize="none")
    probe.workers = 2
    with pytest.raises(ProbeError, match=r"is 9x9 but earlier images are 8x8; give --resize"):
        list(probe.batches(64))
