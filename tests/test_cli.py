"""The command line, through click's CliRunner: output, files, config defaults, bad inputs."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from conftest import snapshot, write_tensor_probe
from model_audit.cli import cli


def run(args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


@pytest.fixture
def work(tmp_path, sgd_checkpoint, digits_probe):
    """A working directory with copies of the inputs (so we can check they are unchanged)."""
    shutil.copy(sgd_checkpoint, tmp_path / "model.safetensors")
    shutil.copy(digits_probe, tmp_path / "probe.safetensors")
    return tmp_path


def test_every_command_has_help():
    for name, command in cli.commands.items():
        result = run([name, "--help"])
        assert result.exit_code == 0, name
        assert command.help and "Usage" in result.output
    assert run(["--help"]).exit_code == 0
    assert "0.1.0" in run(["--version"]).output


def test_scan_prints_table_and_writes_audit(work):
    before = snapshot(work)
    out = work / "out"
    result = run(["scan", work / "model.safetensors", "--probe", work / "probe.safetensors",
                  "--out", out, "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert "group" in result.output and "flag freq" in result.output and "flagged:" in result.output
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "fc"):
        assert name in result.output
    data = json.loads((out / "audit.json").read_text())
    assert data["schema_version"] == 1 and data["seed"] == 0
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    # inputs unchanged
    after = snapshot(work)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "report.html"]


def test_shared_options_reach_the_scan(work):
    out = work / "o"
    result = run(["scan", work / "model.safetensors", "--probe", work / "probe.safetensors",
                  "--out", out, "--limit", "200", "--seed", "3", "--granularity", "block",
                  "--device", "cpu", "--batch-size", "32", "--bootstrap", "10", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "audit.json").read_text())
    assert data["probe"]["n"] == 200 and data["seed"] == 3 and data["device"] == "cpu"
    assert data["granularity"] == "block" and "layer1.0" in data["flagged"] + [
        layer["name"] for layer in data["layers"]]
    assert "wrote" not in result.output  # --quiet


def test_defaults_from_pyproject(work, monkeypatch):
    monkeypatch.chdir(work)
    (work / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.model-audit]\nprobe = "probe.safetensors"\n'
        'out = "audits/here"\nlimit = 100\nbootstrap = 5\n')
    result = run(["scan", "model.safetensors"])
    assert result.exit_code == 0, result.output
    data = json.loads((work / "audits/here/audit.json").read_text())
    assert data["probe"]["n"] == 100
    # the command line overrides the file
    result = run(["scan", "model.safetensors", "--limit", "150", "--out", "cli-out"])
    assert result.exit_code == 0, result.output
    assert json.loads((work / "cli-out/audit.json").read_text())["probe"]["n"] == 150


def test_defaults_from_model_audit_toml_and_bad_keys(work, monkeypatch):
    monkeypatch.chdir(work)
    (work / "model-audit.toml").write_text('probe = "probe.safetensors"\nbootstrap = 5\n')
    assert run(["scan", "model.safetensors", "--out", "a"]).exit_code == 0
    (work / "model-audit.toml").write_text('probe = "probe.safetensors"\nprobes = 5\n')
    result = run(["scan", "model.safetensors", "--out", "b"])
    assert result.exit_code == 2 and "unknown key 'probes'" in result.output
    (work / "model-audit.toml").write_text('limit = "many"\n')
    result = run(["scan", "model.safetensors", "--out", "b"])
    assert result.exit_code == 2 and "limit must be int" in result.output
    assert not (work / "b").exists()


def test_no_probe_anywhere_says_how_to_give_one(work, monkeypatch):
    monkeypatch.chdir(work)
    result = run(["scan", "model.safetensors"])
    assert result.exit_code == 2
    assert "--probe" in result.output and "[tool.model-audit]" in result.output
    assert not (work / "reports").exists()


def _bad(work, args, *needles):
    before = snapshot(work)
    result = run(["scan", *args, "--out", work / "out"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error:") or "Error:" in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    assert not (work / "out").exists()
    assert snapshot(work) == before
    return result


def test_unknown_arch(work):
    _bad(work, [work / "model.safetensors", "--probe", work / "probe.safetensors",
                "--arch", "resnet19"], "unknown architecture 'resnet19'", "resnet18")


def test_wrong_arch_for_the_weights(work):
    _bad(work, [work / "model.safetensors", "--probe", work / "probe.safetensors",
                "--arch", "resnet18"], "does not match architecture 'resnet18'",
         "missing keys", "layer4.0.conv1.weight", "shape mismatches",
         "did you mean tiny-resnet?")


def test_missing_and_unexpected_keys(work):
    from model_audit.io.tensors import read_tensors
    from model_audit.models.checkpoint import save_checkpoint
    state, meta = read_tensors(work / "model.safetensors")
    state.pop("layer3.1.bn2.weight")
    state["layer3.9.conv1.weight"] = torch.zeros(1)
    save_checkpoint(state, work / "broken.safetensors", metadata=meta)
    _bad(work, [work / "broken.safetensors", "--probe", work / "probe.safetensors"],
         "missing keys (1): layer3.1.bn2.weight", "unexpected keys (1): layer3.9.conv1.weight")


def test_wrong_class_count(work):
    images = torch.zeros(12, 1, 8, 8, dtype=torch.uint8)
    write_tensor_probe(work / "twelve.safetensors", images, torch.arange(12))
    _bad(work, [work / "model.safetensors", "--probe", work / "twelve.safetensors"],
         "labels up to 11", "10 outputs")


def test_empty_probe_dir(work):
    (work / "empty").mkdir()
    _bad(work, [work / "model.safetensors", "--probe", work / "empty"], "no class sub-directories")


def test_corrupt_image(work):
    from PIL import Image

    for cls in ("0", "1"):
        (work / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), color=40 * i).save(work / "imgs" / cls / f"{i}.png")
    (work / "imgs" / "1" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _bad(work, [work / "model.safetensors", "--probe", work / "imgs"], "bad.png", "cannot decode")


def test_missing_files(work):
    _bad(work, [work / "nope.safetensors", "--probe", work / "probe.safetensors"],
         "nope.safetensors does not exist")
    _bad(work, [work / "model.safetensors", "--probe", work / "nope"], "nope does not exist")


def test_out_must_not_be_an_input(work):
    result = run(["scan", work / "model.safetensors", "--probe", work / "probe.safetensors",
                  "--out", work / "model.safetensors"])
    assert result.exit_code == 2 and "not a directory" in result.output


def test_archs_lists_names():
    result = run(["archs"])
    assert result.exit_code == 0
    names = result.output.split()
    assert {"resnet18", "resnet18-cifar", "mobilenet_v3_small", "tiny-resnet"} <= set(names)


def test_scan_baselines_option(work):
    out = work / "b"
    result = run(["scan", work / "model.safetensors", "--probe", work / "probe.safetensors",
                  "--out", out, "--bootstrap", "5", "--baselines", "activation,auto_rgn"])
    assert result.exit_code == 0, result.output
    assert "agreement" in result.output and "spearman" in result.output
    data = json.loads((out / "audit.json").read_text())
    assert set(data["agreement"]) == {"activation", "auto_rgn"}
    result = run(["scan", work / "model.safetensors", "--probe", work / "probe.safetensors",
                  "--out", work / "c", "--baselines", "gradcam"])
    assert result.exit_code == 2 and "gradcam" in result.output and "conductance" in result.output
    assert not (work / "c").exists()
