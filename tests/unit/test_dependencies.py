"""Every third-party package the programs import is declared in pyproject.toml
(docs/security.md): found by walking the packages' syntax trees, so an import added
anywhere (inside a function too) is seen; mapped to its distribution through
the installed metadata. Nothing may arrive only because another package
happens to pull it in."""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("rbee", "rbee_keeper", "rbee_queen", "rbee_hive", "rbee_worker")
# Code that only runs where an extra is installed, and those extras. Such code
# may also use what the extra's own distributions require (the engine brings
# its torch and transformers, at the versions it pins).
EXTRA_USERS = {
    "rbee_worker/": ("cpu", "cuda"),
    "rbee_hive/gguf_import.py": ("gguf",),
}


def third_party_imports() -> dict[str, set[str]]:
    """Imported module name (full dotted name) -> files importing it."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in PACKAGES or top == "__future__":
                        continue
                    found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


@cache
def _owners() -> dict[str, list[str]]:
    return md.packages_distributions()


def distribution_of(module: str) -> str:
    """The distribution installing ``module``: by its top-level name, and by
    the file itself when several share it (``google`` is protobuf's and
    googleapis-common-protos')."""
    top = module.split(".")[0]
    candidates = sorted(set(_owners().get(top, [])))
    assert candidates, f"{module} is imported but no installed distribution provides it"
    if len(candidates) == 1:
        return canonicalize_name(candidates[0])
    folder = module.replace(".", "/")
    owners = [
        dist for dist in candidates
        if any(str(f).startswith(f"{folder}/") or str(f) == f"{folder}.py" for f in md.distribution(dist).files or [])
    ]  # fmt: skip
    assert len(owners) == 1, f"cannot tell which of {candidates} provides {module}: {owners}"
    return canonicalize_name(owners[0])


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    extras = {
        extra: {canonicalize_name(Requirement(r).name) for r in reqs}
        for extra, reqs in project.get("optional-dependencies", {}).items()
    }
    return base, extras


def brought_by(dists: set[str]) -> set[str]:
    """What the installed ``dists`` themselves require (unconditionally or for this platform)."""
    out: set[str] = set()
    for dist in dists:
        try:
            requires = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue  # e.g. the CUDA engine on a CPU machine: its own extra is checked where it is installed
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                out.add(canonicalize_name(req.name))
    return out


def allowed_for(path: str, base: set[str], extras: dict[str, set[str]]) -> set[str]:
    allowed = set(base)
    for prefix, names in EXTRA_USERS.items():
        if path.startswith(prefix):
            for name in names:
                allowed |= extras.get(name, set())
                allowed |= brought_by(extras.get(name, set()))
    return allowed


def test_every_imported_third_party_package_is_declared():
    base, extras = declared()
    missing: dict[str, set[str]] = {}
    for module, files in third_party_imports().items():
        dist = distribution_of(module)
        for path in files:
            if dist not in allowed_for(path, base, extras):
                missing.setdefault(dist, set()).add(path)
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(
        f"  {dist}: imported by {', '.join(sorted(paths))}" for dist, paths in sorted(missing.items())
    )


def test_the_walk_sees_imports_inside_functions_and_maps_shared_top_level_names():
    imports = third_party_imports()
    assert "torch" in imports and "rbee_hive/gguf_import.py" in imports["torch"], "imported inside a function"
    assert distribution_of("google.protobuf") == "protobuf"
    assert distribution_of("google.rpc") == "googleapis-common-protos"
    assert distribution_of("pydantic_settings") == "pydantic-settings"
