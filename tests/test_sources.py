"""Checkpoints from other libraries, each saved by its own library and scanned: a timm tiny
model (a state dict without metadata, and timm's ``save_for_hf`` directory), Hugging Face
transformers classifiers with tiny configs (``save_pretrained`` directories), and the errors
a user meets on the way (missing files, missing extras, custom code, wrong keys)."""
import json
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import snapshot
from model_audit.cli import cli
from model_audit.core.layers import layer_groups
from model_audit.errors import ArchitectureError
from model_audit.models.checkpoint import load_checkpoint

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

DIGITS = [str(i) for i in range(10)]


def _scan(args, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["scan", *map(str, args), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "audit.json").read_text()), result.output


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path_factory.mktemp("timm") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_timm_state_dict_is_guessed_and_grouped_as_timm_does(timm_file, digits_probe, tmp_path):
    audit, output = _scan([timm_file, "--probe", digits_probe, "--limit", "20"], tmp_path)
    assert audit["model"]["arch"] == "timm:test_resnet"
    assert "match timm:test_resnet only" in output
    # stem, one group per stage, head: timm's own split (model.group_matcher)
    assert [g["name"] for g in audit["layers"]] == ["stem", "layer1", "layer2", "layer3",
                                                    "layer4", "head"]
    # normalisation and input size from timm's pretrained config (no metadata in the file)
    assert audit["probe"]["resize"] == [160, 160]
    assert audit["probe"]["normalize"] == "0.5,0.5,0.5,0.5,0.5,0.5"
    assert "timm's pretrained config of test_resnet" in output


def test_timm_arch_option_and_user_preprocessing_win(timm_file, digits_probe, tmp_path):
    audit, _ = _scan([timm_file, "--probe", digits_probe, "--limit", "20", "--arch",
                      "timm:test_resnet", "--resize", "32", "--normalize", "none",
                      "--granularity", "block"], tmp_path)
    assert audit["probe"]["resize"] == [32, 32]
    assert audit["probe"]["normalize"] == "none"
    assert audit["layers"][0]["name"] == "stem"
    assert {g["name"] for g in audit["layers"]} >= {"layer1.0", "layer4.0", "head"}


def test_unknown_timm_name_is_refused_with_a_suggestion(timm_file, digits_probe, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["scan", str(timm_file), "--probe", str(digits_probe),
                                      "--arch", "timm:test_resnett", "--out", str(out)])
    assert result.exit_code == 2
    assert "timm has no model 'test_resnett'" in result.output
    assert "timm:test_resnet" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_timm_groups_of_other_families():
    vit = timm.create_model("test_vit", num_classes=3)
    names = [g.name for g in layer_groups(vit)]
    assert names[0] == "stem" and names[-1] == "head"
    assert names[1:-1] == [f"blocks.{i}" for i in range(len(names) - 2)]
    convnext = timm.create_model("test_convnext", num_classes=3)
    assert [g.name for g in layer_groups(convnext)] == [
        "stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"]
    fine = [g.name for g in layer_groups(convnext, "block")]
    assert len(fine) > 6 and fine[0] == "stem" and fine[-1] == "head"


def test_timm_save_for_hf_directory(digits_probe, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    folder = tmp_path / "timm-dir"
    timm.models.save_for_hf(model, str(folder), model_config={"label_names": DIGITS},
                            safe_serialization=True)
    ckpt = load_checkpoint(folder)
    assert ckpt.arch == "timm:test_resnet" and ckpt.classes == tuple(DIGITS)
    assert ckpt.input_size == (160, 160) and ckpt.weights_file.endswith("model.safetensors")
    audit, _ = _scan([folder, "--probe", digits_probe, "--limit", "20", "--resize", "32"],
                     tmp_path)
    assert audit["model"]["path"] == str(folder)


def test_timm_file_fixed_keeps_its_architecture_in_metadata(timm_file, digits_probe, tmp_path):
    train = tmp_path / "train.safetensors"
    data = load_file("samples/digits-train.safetensors")
    save_file({"images": data["images"][:200].contiguous(),
               "labels": data["labels"][:200].contiguous()}, str(train))
    fixed = tmp_path / "fixed.safetensors"
    result = CliRunner().invoke(cli, [
        "fix", str(timm_file), "--probe", str(digits_probe), "--train", str(train),
        "--output", str(fixed), "--out", str(tmp_path / "fix"), "--resize", "32",
        "--layers", "head", "--steps", "20", "--controls", "random", "--write-anyway"])
    assert result.exit_code == 0, result.output
    back = load_checkpoint(fixed)  # no --arch: the metadata names it
    assert back.arch == "timm:test_resnet" and not back.guessed


# -- Hugging Face transformers ---------------------------------------------------------------


def _vit(folder, processor=True):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8, num_labels=10,
                       id2label=dict(enumerate(DIGITS)),
                       label2id={c: i for i, c in enumerate(DIGITS)})
    ViTForImageClassification(config).save_pretrained(str(folder))
    if processor:
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.4, 0.4],
                          image_std=[0.2, 0.2, 0.2]).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return _vit(tmp_path_factory.mktemp("hf") / "vit")


def test_vit_directory_scans_with_its_labels_and_preprocessing(vit_dir, digits_probe, tmp_path):
    before = snapshot(vit_dir)
    audit, output = _scan([vit_dir, "--probe", digits_probe, "--limit", "40"], tmp_path)
    assert audit["model"]["arch"] == "hf:ViTForImageClassification"
    assert [g["name"] for g in audit["layers"]] == [
        "vit.embeddings", "vit.layers.0", "vit.layers.1", "vit.layernorm", "classifier"]
    assert audit["probe"]["normalize"] == "0.4,0.4,0.4,0.2,0.2,0.2"
    assert audit["probe"]["resize"] == [32, 32]
    assert audit["probe"]["classes"] == DIGITS
    assert "preprocessor_config.json" in output and "Loading weights" not in output
    assert snapshot(vit_dir) == before  # the input directory is never written


def test_hf_model_gives_logits_and_matches_transformers(vit_dir):
    from transformers import ViTForImageClassification

    ckpt = load_checkpoint(vit_dir)
    x = torch.rand(3, 3, 32, 32)
    reference = ViTForImageClassification.from_pretrained(str(vit_dir)).eval()
    with torch.no_grad():
        assert torch.allclose(ckpt.model(x), reference(x).logits, atol=1e-6)
    assert ckpt.num_classes == 10 and ckpt.classes == tuple(DIGITS)


def test_convnext_directory_is_grouped_by_stage(digits_probe, tmp_path):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    folder = tmp_path / "convnext"
    ConvNextForImageClassification(ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=10)).save_pretrained(
            str(folder))
    audit, output = _scan([folder, "--probe", digits_probe, "--limit", "20", "--resize", "32"],
                          tmp_path)
    assert [g["name"] for g in audit["layers"]] == (
        ["convnext.embeddings"] + [f"convnext.encoder.stages.{i}" for i in range(4)]
        + ["convnext.layernorm", "classifier"])
    # no image-processor config: nothing to take preprocessing from; LABEL_i are not names
    assert "no normalisation given" in output and "preprocessing from" not in output
    assert load_checkpoint(folder).classes is None


def test_fix_of_a_model_directory_writes_a_model_directory(vit_dir, digits_probe, tmp_path):
    fixed = tmp_path / "fixed"
    result = CliRunner().invoke(cli, [
        "fix", str(vit_dir), "--probe", str(digits_probe),
        "--train", "samples/digits-train.safetensors", "--output", str(fixed),
        "--out", str(tmp_path / "fix"), "--layers", "classifier", "--steps", "40",
        "--controls", "random", "--write-anyway"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in fixed.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    assert (fixed / "config.json").read_bytes() == (vit_dir / "config.json").read_bytes()
    report = json.loads((tmp_path / "fix" / "fix.json").read_text())
    audit, _ = _scan([fixed, "--probe", digits_probe], tmp_path)
    # the written directory is the repaired model: its accuracy is fix's "after"
    assert audit["probe"]["accuracy"] == pytest.approx(
        report["accuracy"]["after"], abs=1e-9)
    from transformers import ViTForImageClassification
    ViTForImageClassification.from_pretrained(str(fixed))  # and transformers reads it


def _refused(args, tmp_path, *needles):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["scan", *map(str, args), "--out", str(out)])
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_model_directory_errors(vit_dir, digits_probe, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused([empty, "--probe", digits_probe], tmp_path, "without config.json")

    bin_only = _vit(tmp_path / "bin")
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    _refused([bin_only, "--probe", digits_probe], tmp_path, "has no model.safetensors",
             "pytorch_model.bin", "safe_serialization=True")

    nothing = _vit(tmp_path / "nothing")
    (nothing / "model.safetensors").unlink()
    _refused([nothing, "--probe", digits_probe], tmp_path, "nothing is fetched from a hub")

    custom = _vit(tmp_path / "custom")
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.Evil"}
    (custom / "config.json").write_text(json.dumps(cfg))
    _refused([custom, "--probe", digits_probe], tmp_path, "never runs code")

    unknown = _vit(tmp_path / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForImageClassification"]
    (unknown / "config.json").write_text(json.dumps(cfg))
    _refused([unknown, "--probe", digits_probe], tmp_path, "NoSuchModelForImageClassification")

    missing = _vit(tmp_path / "missing")
    state = load_file(str(missing / "model.safetensors"))
    del state["classifier.weight"]
    save_file(state, str(missing / "model.safetensors"), metadata={"format": "pt"})
    _refused([missing, "--probe", digits_probe], tmp_path, "missing keys", "classifier.weight")

    _refused([vit_dir, "--probe", digits_probe, "--arch", "resnet18"], tmp_path,
             "hf:ViTForImageClassification", "leave out --arch")


def test_missing_extras_say_what_to_install(vit_dir, timm_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(ArchitectureError, match=r"pip install 'model-audit\[hf\]'"):
        load_checkpoint(vit_dir)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ArchitectureError, match=r"pip install 'model-audit\[timm\]'"):
        load_checkpoint(timm_file, arch="timm:test_resnet")
    with pytest.raises(ArchitectureError, match=r"timm is not installed, so its architectures"):
        load_checkpoint(timm_file)  # without timm nothing matches: asked for --arch


def test_hf_encoder_with_a_block_list_and_more_is_split_by_block():
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    model = EfficientNetForImageClassification(EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
        num_labels=3))
    names = [g.name for g in layer_groups(model)]
    assert names[0] == "efficientnet.embeddings" and names[-1] == "classifier"
    assert "efficientnet.encoder.blocks.0" in names and "efficientnet.encoder.top_conv" in names
    assert "efficientnet.encoder" not in names
