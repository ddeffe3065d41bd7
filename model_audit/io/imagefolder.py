"""ImageFolder probes: ``<root>/<class>/<image>`` (JPEG or PNG), decoded per batch with Pillow."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from ..errors import EmptyProbeError, ProbeError
from .probe_set import (IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, Normalization, ProbeSet)


class ImageFolderProbe(ProbeSet):
    """``<root>/<class>/<image>`` directory; images decoded per batch with Pillow."""

    kind = "imagefolder"  # type: ignore[assignment]

    def __init__(self, root: Path, *, channels: int, normalization: Normalization,
                 resize: Optional[Tuple[int, int]]) -> None:
        root = Path(root)
        real_root = root.resolve()
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise EmptyProbeError(
                f"probe directory {root} has no class sub-directories; expected "
                "<root>/<class>/<image>.jpg (an ImageFolder layout)")
        files: List[Path] = []
        labels: List[int] = []
        self.ignored: List[str] = []
        for label, cdir in enumerate(class_dirs):
            found = 0
            for path in sorted(cdir.rglob("*")):
                if path.name.startswith(".") or path.is_dir():
                    continue
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    self.ignored.append(str(path))
                    continue
                real = path.resolve()
                if real_root not in real.parents:
                    raise ProbeError(
                        f"{path} points outside the probe directory ({real}); links that leave "
                        f"{root} are not followed")
                files.append(path)
                labels.append(label)
                found += 1
            if found == 0:
                raise ProbeError(
                    f"class folder {cdir} has no images (.jpg, .jpeg, .png); remove it or add "
                    "images, since an empty class would shift every label after it")
        self.files = files
        super().__init__(str(root), [d.name for d in class_dirs], torch.tensor(labels),
                         channels=channels, normalization=normalization, resize=resize)

    def _decode(self, path: Path) -> torch.Tensor:
        return decode_file(path, self.channels)

    def _load_raw(self, source_indices: Sequence[int]) -> torch.Tensor:
        images = []
        for i in source_indices:
            x = self._decode(self.files[i]).unsqueeze(0)
            if self.resize is not None:
                x = self._resize(x)
            else:
                self._check_size(x, str(self.files[i]))
            images.append(x)
        return torch.cat(images) if images else torch.empty(0, self.channels, 1, 1)

    def describe(self) -> Dict[str, object]:
        info = super().describe()
        info["ignored_files"] = len(self.ignored)
        return info


# ------------------------------------------------------------------------------------------
# Tensor file


def decode_file(path: Path, channels: int) -> torch.Tensor:
    """An image file as a float (C, H, W) tensor in [0, 1] with ``channels`` channels; a
    ProbeError naming the file when it cannot be decoded or is too large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return pil_to_tensor(img, channels, str(path))
    except ProbeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ProbeError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ProbeError(f"{path}: cannot decode image ({exc}); remove or replace the file") from exc


def pil_to_tensor(img: Image.Image, channels: int, where: str) -> torch.Tensor:
    """A Pillow image as a float (C, H, W) tensor in [0, 1] (gray or RGB, as the model takes).

    Raises:
        ProbeError: naming ``where``: too many pixels, a 16/32-bit mode, a model that takes
            neither 1 nor 3 channels.
    """
    if channels not in (1, 3):
        raise ProbeError(f"the model takes {channels}-channel input; images give 1 or 3")
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ProbeError(f"{where}: {w}x{h} pixels exceeds the {MAX_IMAGE_PIXELS}-pixel limit "
                         "(possible decompression bomb)")
    img.load()
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I", "F"):
        raise ProbeError(f"{where}: {img.mode}-mode images (16/32-bit) are not supported")
    img = img.convert("L" if channels == 1 else "RGB")
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(h, w, -1).permute(2, 0, 1).float().div_(255.0)
