"""The HTML reports: self-contained, escaped, re-renderable, and readable in a real browser."""
import base64
import io
import json
import re
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner

from conftest import write_tensor_probe
from model_audit.cli import cli

HOSTILE = ["<script>alert(1)</script>", '" onmouseover="x', "javascript:alert(1)"]


def _scan(tmp_path, ckpt, probe, out):
    r = CliRunner().invoke(cli, ["scan", str(ckpt), "--probe", str(probe), "--out", str(out),
                                 "--bootstrap", "10", "-q"])
    assert r.exit_code == 0, r.output
    return (out / "report.html").read_text()


def _assert_self_contained(html):
    assert "<script" not in html.lower()
    assert 'http-equiv="Content-Security-Policy"' in html and "default-src 'none'" in html
    # no external resources: every src/href is a data: URI or an in-page anchor
    for ref in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert ref.startswith(("data:image/png;base64,", "#")), ref


def test_hostile_class_names_appear_only_escaped(tmp_path, sgd_checkpoint):
    from model_audit.io.tensors import read_tensors
    # a probe whose class names (metadata) are hostile; labels cover several classes
    images = (torch.rand(30, 1, 8, 8) * 255).to(torch.uint8)
    labels = torch.arange(30) % 10
    classes = HOSTILE + [f"c{i}" for i in range(7)]
    probe = write_tensor_probe(tmp_path / f"{HOSTILE[0][:3]}probe.safetensors", images, labels, classes)
    html = _scan(tmp_path, sgd_checkpoint, probe, tmp_path / "out")
    _assert_self_contained(html)
    for name in HOSTILE[:2]:
        assert name not in html, name
    # "javascript:alert(1)" has nothing to escape: it may appear as text, never in an attribute
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34; onmouseover=&#34;x" in html
    # javascript: only as text, never as an attribute value
    assert not re.search(r'(?:src|href)\s*=\s*"?javascript:', html, re.I)
    # hostile folder names in an ImageFolder probe too
    from PIL import Image

    state, meta = read_tensors(sgd_checkpoint)
    meta.pop("model_audit.classes")  # the folder names are then the class names
    from model_audit.models.checkpoint import save_checkpoint
    plain = tmp_path / "plain.safetensors"
    save_checkpoint(state, plain, metadata=meta)
    root = tmp_path / "folder"
    for i, name in enumerate(["<b>bold<\\b>", "a&b"]):
        (root / name).mkdir(parents=True)
        for j in range(3):
            Image.new("L", (8, 8), color=60 * j + i).save(root / name / f"{j}.png")
    html = _scan(tmp_path, plain, root, tmp_path / "out2")
    assert "<b>bold" not in html and "&lt;b&gt;bold&lt;\\b&gt;" in html and "a&amp;b" in html


def test_report_command_re_renders_from_json(tmp_path, sgd_checkpoint, digits_probe):
    out = tmp_path / "scan"
    first = _scan(tmp_path, sgd_checkpoint, digits_probe, out)
    (out / "report.html").unlink()
    r = CliRunner().invoke(cli, ["report", str(out)])
    assert r.exit_code == 0, r.output
    again = (out / "report.html").read_text()
    assert again == first, _first_difference(first, again)  # same JSON, same probe: same page
    r = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "holds no sanity.json, fix.json, gate.json, compare.json" in r.output


def _first_difference(a, b):
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[max(0, i - 200):i + 200], b[max(0, i - 200):i + 200]


def _data_pngs(html):
    from PIL import Image

    images = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html):
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        img.load()
        images.append(img)
    return images


def test_gallery_images_decode(tmp_path, sgd_checkpoint, digits_probe):
    html = _scan(tmp_path, sgd_checkpoint, digits_probe, tmp_path / "out")
    images = _data_pngs(html)
    audit = json.loads((tmp_path / "out/audit.json").read_text())
    assert len(images) == min(32, audit["probe"]["misclassified"]) > 0
    assert all(img.size == (64, 64) for img in images)


def test_demo_report_renders_in_headless_chromium(tmp_path, sgd_checkpoint, digits_probe):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed and `make test` could not install it "
                    "(apt-get install chromium): the browser rendering test is skipped")
    out = tmp_path / "demo"
    html = _scan(tmp_path, sgd_checkpoint, digits_probe, out)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
         "--window-size=1200,2400", f"--screenshot={shot}", (out / "report.html").as_uri()],
        check=True, timeout=120, capture_output=True)
    from PIL import Image, ImageStat

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2400)
    # not blank: a real page has text, charts and thumbnails, so pixel values vary a lot
    stat = ImageStat.Stat(img)
    assert stat.stddev[0] > 20
    dark = sum(img.histogram()[:128])
    assert dark > 0.01 * img.size[0] * img.size[1]
    # the gallery thumbnails embedded in the page decode
    assert len(_data_pngs(html)) > 0
