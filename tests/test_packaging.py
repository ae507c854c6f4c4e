"""What a user who installs the package from a wheel or an sdist (not from this checkout) gets: every subpackage,
console scripts that resolve, and a build requirement that can read pyproject.toml. Offline and fast: nothing is
installed, and the sdist is built from a copy of the tree."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import setuptools

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_folder_of_modules_under_clip_is_a_package_the_wheel_takes():
    # setuptools' find (not find_namespace) skips a folder without __init__.py, and with it the folder's modules:
    # the checkout imports them as a namespace package, the wheel lacks them
    found = set(setuptools.find_packages(where=str(REPO), **PYPROJECT["tool"]["setuptools"]["packages"]["find"]))
    folders = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "clip").rglob("*.py")}
    assert folders <= found, f"not in the wheel: {sorted(folders - found)}"


def test_every_console_script_names_a_function_of_the_package():
    for name, target in PYPROJECT["project"]["scripts"].items():
        module_name, _, function = target.partition(":")
        assert module_name.split(".")[0] == "clip", name
        assert callable(getattr(importlib.import_module(module_name), function)), name


def test_the_build_requirement_reads_the_license_expression():
    # `license = "MIT"` (an SPDX expression, PEP 639) is refused by setuptools before 77 as an invalid table
    assert isinstance(PYPROJECT["project"]["license"], str)
    (floor,) = [re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requirement)
                for requirement in PYPROJECT["build-system"]["requires"] if requirement.startswith("setuptools")]
    assert floor is not None and int(floor.group(1)) >= 77
