"""Check, before any benchmark starts, that the installed packages satisfy what the benchmarked packages declare.

bench/run_gpu.sh installs the carried wheels with ``--no-deps`` on top of a GPU image's packages, so nothing
checks e.g. that datasets' ``pyarrow>=24`` or ``fsspec<=2026.9.0`` holds there; a step would then fail minutes
later inside an import. This lists every unmet or missing requirement of the named distributions (extras
ignored, environment markers evaluated) and exits 1 if there is any.

    python bench/check_deps.py                      # datasets trl transformers peft accelerate bitsandbytes
    python bench/check_deps.py datasets trl
"""

from __future__ import annotations

import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.version import Version

DEFAULT = ("datasets", "trl", "transformers", "peft", "accelerate", "bitsandbytes")


def problems(names) -> list[str]:
    out = []
    for name in names:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            out.append(f"{name}: not installed")
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra, or not for this platform/Python
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                out.append(f"{name} {dist.version} needs {req}: {req.name} is not installed")
                continue
            if req.specifier and not req.specifier.contains(Version(have), prereleases=True):
                out.append(f"{name} {dist.version} needs {req}: {req.name} {have} is installed")
    return out


def main(argv: list[str]) -> int:
    found = problems(argv or DEFAULT)
    for line in found:
        print(f"unmet requirement: {line}")
    print("dependencies: OK" if not found else f"dependencies: {len(found)} unmet (install the versions above)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
