"""The folders are packages under ``distillcache``; importing them by folder name fails loudly.

Without the guard, ``import shared.manifest`` from the repository root loads a second
copy of the module, whose ``DatasetError`` is another class: an ``except`` for one never
catches the other. The guard turns that silent trap into an ImportError naming the fix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("folder_import", "package"),
    [
        ("shared.manifest", "distillcache.shared"),
        ("services.teacher.limits", "distillcache.services"),
        ("trainer.config", "distillcache.trainer"),
    ],
)
def test_importing_a_folder_by_its_own_name_fails_naming_the_package(folder_import, package):
    result = subprocess.run(
        [sys.executable, "-c", f"import {folder_import}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert f"ImportError: import {package}, not " in result.stderr


def test_the_packages_import_under_distillcache():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import distillcache.shared.manifest, distillcache.services.teacher.limits, "
            "distillcache.trainer.config",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
