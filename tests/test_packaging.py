"""What `pip install llamalora` brings must cover what the package imports: a library that is
only in the developers' environment breaks a user's first run (datasets was missing once)."""
import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import names whose distribution is spelled otherwise.
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "flash_attn": "flash-attn-4"}
# Imported only where present: triton comes with CUDA builds of torch (the int8 kernels fall back
# to torch without it).
OPTIONAL_BY_DESIGN = {"triton"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements}


def _imported_modules() -> set[str]:
    names = set()
    for path in (ROOT / "llamalora").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"llamalora", "__future__"}


def test_every_imported_library_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    extras = set().union(*(_requirement_names(v)
                           for v in project["optional-dependencies"].values()))
    missing = sorted(
        name for name in _imported_modules() - OPTIONAL_BY_DESIGN
        if DISTRIBUTION.get(name, name).lower().replace("_", "-") not in core | extras)
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


def test_core_dependencies_are_pinned_for_ci():
    """constraints.txt pins every core dependency, so CI installs the tested versions."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {line.split("==")[0].strip().lower().replace("_", "-")
              for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.lstrip().startswith("#")}
    unpinned = sorted(_requirement_names(project["dependencies"]) - pinned)
    assert not unpinned, f"core dependencies without a pin in constraints.txt: {unpinned}"


def test_every_asset_is_package_data():
    """A file the package reads at run time (the bundled tokenizer, the Llama 3.1 chat template)
    must be in the wheel: setuptools copies only what package-data names."""
    from fnmatch import fnmatch

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["llamalora"]
    assets = [p.relative_to(ROOT / "llamalora").as_posix()
              for p in (ROOT / "llamalora" / "assets").rglob("*") if p.is_file()]
    missing = [a for a in assets if not any(fnmatch(a, pattern) for pattern in patterns)]
    assert assets and not missing, f"not in package-data: {missing}"
