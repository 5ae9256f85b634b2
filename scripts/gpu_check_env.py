"""The environment of the GPU check: which interpreter's packages, which wheels, and that
everything the check imports imports.

scripts/gpu_check.sh runs this with the interpreter it will measure (PYTHON=...), before
anything else, using the standard library only, because the point is to tell what that
interpreter lacks. It decides:

- PyTorch always comes from the interpreter: the GPU machine's CUDA build is the thing
  to measure, and the wheel folder never holds torch.
- Every other distribution comes from the interpreter when it is installed there, and
  otherwise from the wheel folder (scripts/gpu_check_wheels.sh builds it). A wheel is
  "installed" by unpacking it, a zip file, into a directory put on PYTHONPATH: no pip,
  no network, nothing written into the interpreter's own environment. Packages the
  interpreter already has are left alone, so a vLLM installed there keeps the
  transformers it was installed with.
- distillcache is imported from this checkout, through a package tree of symlinks (the
  repository maps shared/, services/ and trainer/ into the package), so it is always the
  code being checked out, never a stale install.

Then it imports what gpu_check.py imports. A failure is one message naming the
interpreter, the missing or unusable module, where it was looked for, and the fix; the
exit status is then 3. On success it prints one line per distribution it supplied and
the PYTHONPATH to use, as the last line of its output.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import re
import sys
import sysconfig
import zipfile
from pathlib import Path

# What gpu_check.py and bench/loss.py import, beyond the standard library.
REQUIRED = (
    "torch",
    "numpy",
    "transformers",
    "distillcache.services.teacher.backend_transformers",
    "distillcache.shared.tiny_models",
    "distillcache.trainer.sparse_kd",
)
MIN_PYTHON = (3, 11)  # pyproject.toml's requires-python
_WHEEL = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(?:-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)


class EnvironmentProblem(Exception):
    """What is wrong with the interpreter or the wheel folder, and the fix, in one message."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _wheel_fits(py: str, abi: str, plat: str) -> bool:
    """Whether a wheel's tags suit this interpreter (CPython on Linux, which is what the
    folder is built for). Compressed tag sets ("cp310.cp311") are read as alternatives."""
    ours = f"cp{sys.version_info.major}{sys.version_info.minor}"
    python_ok = any(
        tag in ("py3", "py2.py3", ours)
        or tag.startswith("py3")
        or (abi == "abi3" and tag.startswith("cp3") and int(tag[3:] or 0) <= sys.version_info.minor)
        for tag in py.split(".")
    )
    abi_ok = any(tag in ("none", "abi3", ours) for tag in abi.split("."))
    machine = platform.machine()
    plat_ok = any(
        tag == "any" or ("linux" in tag and tag.endswith(machine)) for tag in plat.split(".")
    )
    return python_ok and abi_ok and plat_ok


def unpack_missing_wheels(wheels: Path, site: Path) -> list[str]:
    """Unpack into `site` each wheel of `wheels` whose distribution the interpreter lacks;
    return "name version" for each. A wheel built for another Python or platform is an
    EnvironmentProblem naming it and the command that builds the right folder."""
    supplied = []
    for wheel in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
        match = _WHEEL.match(wheel.name)
        if match is None:
            raise EnvironmentProblem(f"{wheel}: not a wheel file name; rebuild {wheels}")
        name = _normalize(match["name"])
        if name == "torch" or _installed(name):
            continue
        if not _wheel_fits(match["py"], match["abi"], match["plat"]):
            raise EnvironmentProblem(
                f"{wheel.name} in {wheels} is not for this interpreter ({sys.executable}: "
                f"Python {platform.python_version()}, {platform.machine()}); rebuild the "
                f"folder for it where PyPI is reachable: PYTHON_VERSION="
                f"{sys.version_info.major}.{sys.version_info.minor} bash scripts/gpu_check_wheels.sh"
            )
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        supplied.append(f"{name} {match['version']}")
    return supplied


def link_checkout(repo: Path, tree: Path) -> None:
    """The distillcache package as the repository maps it (pyproject's package-dir)."""
    package = tree / "distillcache"
    package.mkdir(parents=True)
    for module in (repo / "distillcache").glob("*.py"):
        (package / module.name).symlink_to(module)
    for part in ("shared", "services", "trainer"):
        (package / part).symlink_to(repo / part)


def check_imports(wheels: Path) -> None:
    for module in REQUIRED:
        try:
            importlib.import_module(module)
        except ImportError as error:
            missing = getattr(error, "name", None) or module
            if missing == "torch" or module == "torch":
                fix = "set PYTHON= to the interpreter that has CUDA PyTorch"
            elif not isinstance(error, ModuleNotFoundError):
                fix = "it is there but does not import (a version the others do not accept?)"
            else:
                fix = (
                    f"it is neither installed there nor in the wheel folder {wheels}; build "
                    f"the folder where PyPI is reachable (PYTHON_VERSION="
                    f"{sys.version_info.major}.{sys.version_info.minor} bash "
                    "scripts/gpu_check_wheels.sh) and copy it beside scripts/"
                )
            where = "" if missing == module else f" (needed by {module})"
            raise EnvironmentProblem(
                f"{sys.executable} cannot import {missing}{where}: {fix}; ({error})"
            ) from error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="the checkout to import")
    parser.add_argument("--wheels", type=Path, required=True, help="the wheel folder")
    parser.add_argument("--into", type=Path, required=True, help="an empty directory to fill")
    args = parser.parse_args()
    try:
        if sys.version_info < MIN_PYTHON:
            raise EnvironmentProblem(
                f"{sys.executable} is Python {platform.python_version()}; distillcache needs "
                f"{'.'.join(map(str, MIN_PYTHON))} or newer: set PYTHON= to another interpreter"
            )
        site, tree = args.into / "site", args.into / "src"
        site.mkdir(parents=True)
        supplied = unpack_missing_wheels(args.wheels.resolve(), site)
        link_checkout(args.repo.resolve(), tree)
        sys.path[:0] = [str(tree), str(site)]
        importlib.invalidate_caches()
        check_imports(args.wheels)
    except EnvironmentProblem as problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 3
    print(
        f"python {platform.python_version()} ({sys.executable}, "
        f"{sysconfig.get_platform()}); from the wheel folder: {', '.join(supplied) or 'nothing'}"
    )
    print(f"{tree}:{site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
