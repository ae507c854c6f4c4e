"""What a user who installs the package from a wheel or an sdist (not from this checkout) gets: every subpackage,
console scripts that resolve, and a build requirement that can read pyproject.toml. Offline and fast: nothing is
installed, and the sdist is built from a copy of the tree."""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import setuptools

from clip.config import TrainConfig, load_config
from clip.config_io import ConfigError
from clip.evaluation.config import ZeroShotRunConfig

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def packages_the_wheel_takes() -> set[str]:
    return set(setuptools.find_packages(where=str(REPO), **PYPROJECT["tool"]["setuptools"]["packages"]["find"]))


def test_every_folder_of_modules_under_clip_is_a_package_the_wheel_takes():
    # setuptools' find (not find_namespace) skips a folder without __init__.py, and with it the folder's modules:
    # the checkout imports them as a namespace package, the wheel lacks them
    found = packages_the_wheel_takes()
    folders = {".".join(path.parent.relative_to(REPO).parts)
               for top in ("clip", "clip_commands") for path in (REPO / top).rglob("*.py")}
    assert folders <= found, f"not in the wheel: {sorted(folders - found)}"


def test_every_console_script_names_a_function_of_the_package():
    found = packages_the_wheel_takes()
    for name, target in PYPROJECT["project"]["scripts"].items():
        module_name, _, function = target.partition(":")
        assert module_name.rpartition(".")[0] in found or module_name in found, name
        assert callable(getattr(importlib.import_module(module_name), function)), name


def test_the_build_requirement_reads_the_license_expression():
    # `license = "MIT"` (an SPDX expression, PEP 639) is refused by setuptools before 77 as an invalid table
    assert isinstance(PYPROJECT["project"]["license"], str)
    (floor,) = [re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requirement)
                for requirement in PYPROJECT["build-system"]["requires"] if requirement.startswith("setuptools")]
    assert floor is not None and int(floor.group(1)) >= 77


def build(kind: str, source: Path, into: Path) -> Path:
    """setuptools' PEP 517 hook run in `source`, as pip or `python -m build` runs it (without isolation: offline)."""
    into.mkdir()
    command = f"import setuptools.build_meta as backend; print(backend.build_{kind}({str(into)!r}))"
    done = subprocess.run([sys.executable, "-c", command], cwd=source, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return into / done.stdout.strip().splitlines()[-1]


def test_the_sdist_holds_the_tests_with_what_they_read_and_builds_the_wheel_again(tmp_path):
    tree = tmp_path / "tree"
    caches = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    tree.mkdir()
    for name in ["pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"]:
        shutil.copy2(REPO / name, tree / name)
    for name in ["clip", "clip_commands", "tests", "configs", "scripts", "benchmarks", "docs"]:
        shutil.copytree(REPO / name, tree / name, ignore=caches)
    (tree / "tests" / "__pycache__").mkdir(exist_ok=True)
    (tree / "tests" / "__pycache__" / "stale.cpython-311.pyc").write_bytes(b"")

    sdist = build("sdist", tree, tmp_path / "sdist")
    with tarfile.open(sdist) as archive:
        top = f"{sdist.name.removesuffix('.tar.gz')}/"
        names = {member.name.removeprefix(top) for member in archive.getmembers() if member.isfile()}
        archive.extractall(tmp_path / "unpacked", filter="data")
    wanted = {"pyproject.toml", "README.md", "LICENSE"} | {
        path.relative_to(tree).as_posix() for folder in ["clip", "clip_commands", "tests", "configs", "scripts"]
        for path in (tree / folder).rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert wanted <= names, f"not in the sdist: {sorted(wanted - names)}"
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]

    wheel = build("wheel", tmp_path / "unpacked" / top, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        modules = {name for name in archive.namelist() if ".dist-info/" not in name}
    assert modules == {path.relative_to(tree).as_posix()
                       for top in ("clip", "clip_commands") for path in (tree / top).rglob("*.py")}


def strings_the_package_says() -> list[tuple[str, int, str]]:
    """Every string literal in clip/ but docstrings (read by developers in the source), with its file and line."""
    said = []
    for path in sorted([*(REPO / "clip").rglob("*.py"), *(REPO / "clip_commands").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        said += [(path.relative_to(REPO).as_posix(), node.lineno, node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]
    return said


def test_no_message_sends_an_installed_user_to_a_script_of_the_checkout():
    # A wheel has no scripts/: `python scripts/make_shards.py --index ...` in the shard loader's errors named a
    # file that a user who installed the package does not have; clip-make-shards is installed with it
    assert not [(path, line) for path, line, text in strings_the_package_says() if "scripts/" in text]


def test_messages_that_name_a_recipe_of_configs_say_it_is_the_repository_s():
    assert not [(path, line) for path, line, text in strings_the_package_says()
                if "configs/" in text and "repository" not in text]


def test_a_readme_recipe_missing_where_the_package_is_installed_says_where_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a wheel user's folder: no configs/ there
    for path, schema in [("configs/demo.toml", TrainConfig), ("configs/eval/zeroshot_demo.toml", ZeroShotRunConfig)]:
        with pytest.raises(ConfigError, match=r"does not exist; configs/ is the source repository's folder of recipes"):
            load_config(path, [], schema)
    with pytest.raises(ConfigError, match=r"^config file 'mine\.toml' does not exist$"):
        load_config("mine.toml", [], TrainConfig)
