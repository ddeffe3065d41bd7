"""Write constraints.txt: the exact versions of a fresh install, for `make demo`/`make test`.

``make lock`` builds a throw-away venv from setup.cfg's open ranges, then runs this with that
venv's Python: ``python tools/constraints.py > constraints.txt``. Every installed distribution
(pip and setuptools included) is pinned with ``==``. torch and torchvision are pinned on
x86_64 only: on other machines pip takes the release that setup.cfg's range and the machine's
own wheels allow (e.g. a CPU build on aarch64).
"""
from __future__ import annotations

import platform
import subprocess
import sys
from datetime import date

ONLY_X86 = {"torch", "torchvision", "triton"}


def main() -> int:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    lines = [
        "# Exact versions that `make demo` and `make test` install (pip install -c constraints.txt).",
        f"# Written by `make lock` on {date.today().isoformat()} from a fresh venv (Python "
        f"{platform.python_version()}, {platform.machine()}); refresh with `make lock`.",
        "# setup.cfg keeps open ranges for users who install model-audit into their own environment.",
    ]
    for line in sorted(frozen, key=str.lower):
        if not line or line.startswith("#") or "==" not in line:
            continue
        name = line.split("==", 1)[0].strip().lower()
        if name.startswith("nvidia-") or name.startswith("cuda-") or name in ONLY_X86:
            line += '; platform_machine == "x86_64"'
        lines.append(line)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
