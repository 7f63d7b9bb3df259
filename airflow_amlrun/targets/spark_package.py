"""The ``airflow_amlrun/__init__.py`` of the run's code archive (code.zip) that the Spark target ships with
`--py-files`, beside a copy of run_context.

The archive is on the Python path of the driver and of every executor ahead of their site-packages, so that
the script's ``from airflow_amlrun.run_context import Run`` works on a node that lacks airflow-amlrun. Where
airflow-amlrun is installed, this file hands its place over to the installed package while it is being
imported: the script then gets that package whole (its run_context and everything else), and the archive
shadows nothing. A copy of this file (another run's archive, a second path entry of the same one) is passed
over, never handed to.

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


def installed_package() -> ModuleSpec | None:
    """The spec of the airflow_amlrun package installed on this node (not a shipped copy), or None."""
    for entry in sys.path:
        spec = importlib.machinery.PathFinder.find_spec(PACKAGE, [entry])
        if _installed(spec):
            return spec
    # An editable install may be found by a finder of its own rather than by a path entry.
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec(PACKAGE, None)
        except Exception:
            continue
        if _installed(spec):
            return spec
    return None


def _installed(spec: ModuleSpec | None) -> bool:
    """Whether spec is a package's __init__ other than a copy of this file."""
    if spec is None or spec.loader is None or not spec.origin or spec.submodule_search_locations is None:
        return False
    get_data = getattr(spec.loader, "get_data", None)
    if get_data is None:
        return True
    try:
        return SHIPPED_MARK.encode() not in get_data(spec.origin)
    except OSError:
        return False


def _hand_over() -> None:
    spec = installed_package()
    if spec is None or spec.loader is None:
        return  # not installed here: this package, with the shipped run_context, is the one
    shipped = sys.modules[PACKAGE]
    installed = importlib.util.module_from_spec(spec)
    # The import system returns what sys.modules holds under the name once this file has run.
    sys.modules[PACKAGE] = installed
    try:
        spec.loader.exec_module(installed)
    except BaseException:
        sys.modules[PACKAGE] = shipped
        raise


if __name__ == PACKAGE:
    _hand_over()
