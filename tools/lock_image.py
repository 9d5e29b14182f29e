#!/usr/bin/env python3
"""Pin every package the container image installs: ``docker/constraints.txt``.

    python tools/lock_image.py           # resolve afresh on the package index, rewrite the file
    python tools/lock_image.py --check   # exit 1 unless the committed pins resolve and are complete

The image installs ``tractoscale[cuda,dask]`` (docker/install.sh's default extras) on the Python of
its base image (3.12); CI tests on the oldest Python the project supports (3.11). docker/install.sh
and the Makefile (so CI) both install with ``-c docker/constraints.txt``, so the versions the tests
run on are the versions the image ships, whatever the newest release is on the day of a build. One
set of pins must therefore install on both Pythons: it is resolved for the oldest, then completed
for the image's. pip resolves for a Python and platform other than its own (``--python-version``,
``--platform``, wheels only) and installs nothing, so any Python >= 3.11 can run this.

``--check`` fails when the pins do not resolve on one of those Pythons, when the image would install
a package that is not pinned (a dependency added without relocking), or when a pin is no longer
used.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "docker" / "constraints.txt"
# The base image's Python and C library (nvidia/cuda:12.x-base-ubuntu24.04: Python 3.12, glibc 2.39).
IMAGE_PYTHON = "3.12"
IMAGE_GLIBC = (2, 39)
IMAGE_EXTRAS = ("cuda", "dask")
# pip itself is upgraded by docker/install.sh before it installs the app: pin it too.
TOOLS = ("pip",)
# pip says this when it cannot reach the index (checks skip on it rather than fail)
OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
                     r"resolution|Network is unreachable|No route to host|ConnectTimeout|Max retries exceeded")


class LockError(RuntimeError):
    """The resolution failed; ``offline`` when pip could not reach the package index."""

    def __init__(self, message: str, offline: bool = False):
        super().__init__(message)
        self.offline = offline


def normalise(name: str) -> str:
    """The PEP 503 form of a distribution name (``PyYAML`` -> ``pyyaml``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]


def image_requirements() -> list[str]:
    """What docker/install.sh asks pip for: the project's dependencies and its image extras."""
    project = _project()
    reqs = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return reqs + list(TOOLS)


def lock_pythons() -> tuple[str, str]:
    """(the oldest Python the project supports, the image's): the pins must install on both."""
    oldest = re.fullmatch(r">=\s*(3\.\d+)", _project()["requires-python"].strip())
    if not oldest:
        raise LockError(f"cannot read the oldest Python from requires-python {_project()['requires-python']!r}")
    return oldest.group(1), IMAGE_PYTHON


def platform_options() -> list[str]:
    """pip's --platform list for the image: every manylinux tag its glibc accepts (pip does not
    expand one tag into the older ones it implies)."""
    major, minor = IMAGE_GLIBC
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return [opt for tag in tags for opt in ("--platform", tag)]


def resolve(requirements: list[str], constraints: Path | None = None,
            python: str = IMAGE_PYTHON) -> dict[str, str]:
    """``{normalised name: version}`` that pip would install for ``python`` on the image's platform."""
    abi = "cp" + python.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--report", str(report), "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp", "--abi", abi, *platform_options()]
        if constraints is not None:
            cmd += ["-c", str(constraints)]
        proc = subprocess.run(cmd + requirements, capture_output=True, text=True)
        if proc.returncode != 0 or not report.exists():
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or \
                proc.stderr.strip().splitlines()[-5:]
            raise LockError(f"pip cannot resolve the image's packages for Python {python}:\n  "
                            + "\n  ".join(errors), offline=bool(OFFLINE.search(proc.stderr)))
        installs = json.loads(report.read_text())["install"]
    return {normalise(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalise(name)] = version.strip()
    return pins


def render(pins: dict[str, str]) -> str:
    oldest, image = lock_pythons()
    head = [
        "# Every package the container image installs, pinned (generated: python tools/lock_image.py).",
        f"# tractoscale[{','.join(IMAGE_EXTRAS)}] resolved for Python {oldest} (CI) and completed for Python "
        f"{image} (the image), x86_64, glibc {IMAGE_GLIBC[0]}.{IMAGE_GLIBC[1]}.",
        "# pip constraints for docker/install.sh and the Makefile, so CI tests the versions the image ships.",
        "# tests/test_container.py fails when these pins stop resolving or leave a package unpinned.",
    ]
    return "\n".join(head + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n"


def lock() -> dict[str, str]:
    """Fresh pins: the newest versions that install on the oldest Python, plus what the image's
    Python needs on top (packages behind ``python_version`` markers)."""
    oldest, image = lock_pythons()
    pins = resolve(image_requirements(), python=oldest)
    with tempfile.TemporaryDirectory() as tmp:
        partial = Path(tmp) / "constraints.txt"
        partial.write_text(render(pins))
        for name, version in resolve(image_requirements(), constraints=partial, python=image).items():
            pins.setdefault(name, version)
    return pins


def check(path: Path = LOCK, pythons: tuple[str, ...] | None = None) -> list[str]:
    """What is wrong with the pins in ``path`` (empty: they are current), checked on ``pythons``
    (default: :func:`lock_pythons`; unused pins are reported only then). Raises :class:`LockError`
    when the pins do not resolve."""
    pins = read_lock(path)
    used = set()
    problems = []
    for python in pythons or lock_pythons():
        got = resolve(image_requirements(), constraints=path, python=python)
        used |= set(got)
        problems += [f"{name}=={version} is installed on Python {python} but not pinned"
                     for name, version in sorted(got.items()) if name not in pins]
    if pythons is None:
        problems += [f"{name}=={pins[name]} is pinned but no longer installed"
                     for name in sorted(set(pins) - used)]
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check the committed pins")
    ap.add_argument("-o", "--output", type=Path, default=LOCK, help="default: docker/constraints.txt")
    args = ap.parse_args(argv)
    try:
        if args.check:
            problems = check(args.output)
            for p in problems:
                print(f"{args.output.name}: {p}", file=sys.stderr)
            if problems:
                print("run python tools/lock_image.py", file=sys.stderr)
                return 1
            print(f"{args.output}: the pins resolve on Python {' and '.join(lock_pythons())} "
                  "and cover every package")
            return 0
        pins = lock()
        args.output.write_text(render(pins))
    except LockError as exc:
        print(f"lock_image: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({len(pins)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
