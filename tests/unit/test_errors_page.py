"""The documentation's page of errors (docs/reference/errors.md) shows every error a user can meet: each public
class deriving from AmlRunError, in any module of the package, is named by a `:::` line of its own or by the
module its line names."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import airflow_amlrun

PACKAGE = Path(airflow_amlrun.__file__).parent
PAGE = PACKAGE.parent / "docs" / "reference" / "errors.md"
# Errors that never leave the package, each with where it is caught.
HANDLED_INSIDE = {
    "airflow_amlrun.run.state.PartlyCollectedError": "raised by run.outputs.collect_outputs, caught by ScriptRun._finish",
}


@functools.cache
def error_classes() -> frozenset[str]:
    """The dotted paths of the classes that derive from AmlRunError, read from the package's source (once)."""
    classes: list[tuple[str, str, set[str]]] = []  # (name, dotted path, its bases' names)
    for file in PACKAGE.rglob("*.py"):
        module = ".".join(file.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(file.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                names = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                classes.append((node.name, f"{module}.{node.name}", names))
    errors = {"AmlRunError"}
    while grown := {name for name, _, of in classes if name not in errors and errors & of}:
        errors |= grown
    found = [path for name, path, _ in classes if name in errors]
    # A base is known by its name alone here: two errors of one name would make that ambiguous.
    assert len({path.rsplit(".", 1)[1] for path in found}) == len(found), f"errors of the same name: {found}"
    return frozenset(found)


def documented() -> set[str]:
    """The classes the page shows: those its `:::` lines name, and every class of a module one names."""
    shown: set[str] = set()
    classes = error_classes()
    for path in re.findall(r"^::: *(\S+)$", PAGE.read_text(encoding="utf-8"), re.M):
        is_module = PACKAGE.parent.joinpath(*path.split(".")).with_suffix(".py").is_file()
        shown |= {c for c in classes if c.rsplit(".", 1)[0] == path} if is_module else {path}
    return shown


def test_the_errors_page_shows_every_error_a_user_can_meet() -> None:
    public = {
        path
        for path in error_classes()
        if not path.rsplit(".", 1)[1].startswith("_") and path not in HANDLED_INSIDE
    }

    missing = sorted(public - documented())

    assert not missing, f"docs/reference/errors.md lacks a `::: path` line for: {', '.join(missing)}"
    assert set(HANDLED_INSIDE) <= error_classes(), "HANDLED_INSIDE names a class that is no longer an error"
