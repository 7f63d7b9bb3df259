"""The ``airflow_amlrun/__init__.py`` of the run's code archive (code.zip) that the Spark target ships with
`--py-files`, beside a copy of run_context.

The archive is on the Python path of the driver and of every executor ahead of their site-packages, so that
the script's ``from airflow_amlrun.run_context import Run`` works on a node that lacks airflow-amlrun. Where
airflow-amlrun is installed, this file hands its place over to the installed package while it is being
imported: the script then gets that package whole (its run_context and everything else), and the archive
shadows nothing.

Other stand-ins for the package may be on the path too: another copy of this file (the archive is on a
driver's path twice), and a run folder's copy of run_context with its MLflow capture (common.PYLIB, whose
``__init__.py`` is empty). None of them is handed over to: their folders are added to the package's path
after the installed package's own, so that what the installed package lacks, or all of it where none is
installed, comes from them.

It runs on the node's interpreter: it imports only the standard library, and runs on Python 3.7 and newer.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

# Not typing: nothing is imported that the script did not ask for (mypy reads any TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

# The name the archive ships this file under, and what marks it as the stand-in in its own text (so in any
# copy of it).
PACKAGE = "airflow_amlrun"
SHIPPED_MARK = "airflow-amlrun: shipped stand-in package"


def find_package() -> tuple[ModuleSpec | None, list[str]]:
    """The spec of the airflow_amlrun package installed on this node (None if there is none), and the folders
    of the stand-ins for it on the path, in the path's order."""
    installed = None
    standins: list[str] = []
    for entry in sys.path:
        spec = importlib.machinery.PathFinder.find_spec(PACKAGE, [entry])
        if spec is None or spec.loader is None or not spec.origin or not spec.submodule_search_locations:
            continue
        if _standin(spec):
            standins.extend(folder for folder in spec.submodule_search_locations if folder not in standins)
        elif installed is None:
            installed = spec
    if installed is None:
        # An editable install may be found by a finder of its own rather than by a path entry.
        for finder in sys.meta_path:
            if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
                continue
            try:
                spec = finder.find_spec(PACKAGE, None)
            except Exception:
                continue
            if spec is not None and spec.loader is not None and spec.origin and not _standin(spec):
                installed = spec
                break
    return installed, standins


def _standin(spec: ModuleSpec) -> bool:
    """Whether spec's __init__ is a stand-in: a copy of this file, or an empty one (a run folder's copy of
    run_context); the package's own is neither."""
    get_data = getattr(spec.loader, "get_data", None)
    if get_data is None or spec.origin is None:
        return False
    try:
        source = get_data(spec.origin)
    except OSError:
        return True  # unreadable: not one to hand over to
    return SHIPPED_MARK.encode() in source or not source.strip()


def _hand_over() -> None:
    shipped = sys.modules[PACKAGE]
    installed, standins = find_package()
    if installed is None or installed.loader is None:
        # None installed: this package it is, with every stand-in's modules.
        shipped.__path__.extend(folder for folder in standins if folder not in shipped.__path__)
        return
    if installed.submodule_search_locations is not None:
        installed.submodule_search_locations.extend(
            folder for folder in standins if folder not in installed.submodule_search_locations
        )
    module = importlib.util.module_from_spec(installed)
    # The import system returns what sys.modules holds under the name once this file has run.
    sys.modules[PACKAGE] = module
    try:
        installed.loader.exec_module(module)
    except BaseException:
        sys.modules[PACKAGE] = shipped
        raise


if __name__ == PACKAGE:
    _hand_over()
