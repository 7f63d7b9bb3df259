"""The ``airflow_amlrun/__init__.py`` every run ships beside its copy of run_context: a stand-in for the
package that gives way to an installed airflow_amlrun.

A run's script imports ``airflow_amlrun.run_context`` wherever it runs, so each target puts a copy of it ahead
of the interpreter's site-packages: the run folder's pylib on the PYTHONPATH of a local, Docker or SSH run
(common.write_run_context_package, with the MLflow capture), and the code archive (code.zip) the Spark target
ships with `--py-files` to the driver and every executor. On an interpreter that lacks airflow-amlrun, that
copy is the package. Where airflow-amlrun is installed and its run_context speaks the worker's run protocol
(it declares the same ``RUN_PROTOCOL`` as the run_context shipped beside this file), this file hands its
place over to the installed package while it is being imported: the script then gets that package whole (its
run_context, ``Workspace`` and everything else), and the copy shadows nothing, whatever the two versions.
Where the installed run_context declares another protocol, or none (a release older than the number), the
copy stays the package (and says so on stderr): that run_context may not know how the worker hands a run
its events file, and would print the script's metrics rather than record them. Both numbers are read from the
files' text: nothing of the installed package runs before it is chosen.

More than one stand-in may be on the path (a Spark driver has the archive twice, and the run folder's pylib
when it runs on another interpreter than the worker's): the first one imported hands over, to none of the
others. Their folders are added to the package's path after the installed package's own, so that what the
installed package lacks, or all of it where none is installed, comes from them.

It runs on the script's interpreter: it imports only the standard library, and runs on Python 3.7 and newer.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys

# Not typing: nothing is imported that the script did not ask for (mypy reads any TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

# The name a run ships this file under, and what marks it as the stand-in in its own text (so in any copy of
# it).
PACKAGE = "airflow_amlrun"
SHIPPED_MARK = "airflow-amlrun: shipped stand-in package"
# How a package's __init__ names its version, and its run_context the run protocol it speaks (run_context.py's
# RUN_PROTOCOL), read from their text.
_VERSION_LINE = re.compile(rb"""^__version__\s*=\s*["']([^"'\s]+)["']""", re.MULTILINE)
_PROTOCOL_LINE = re.compile(rb"^RUN_PROTOCOL\s*=\s*([0-9]+)\s*(?:#.*)?$", re.MULTILINE)


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
    """Whether spec's __init__ is a stand-in, a copy of this file (the package's own is not)."""
    get_data = getattr(spec.loader, "get_data", None)
    if get_data is None or spec.origin is None:
        return False
    try:
        source = get_data(spec.origin)
    except OSError:
        return True  # unreadable: not one to hand over to
    return SHIPPED_MARK.encode() in source


def installed_version(spec: ModuleSpec) -> str | None:
    """The ``__version__`` an installed airflow_amlrun's __init__ sets (None if it sets none this file can
    read)."""
    found = _VERSION_LINE.search(_package_file(spec, "__init__.py") or b"")
    return found.group(1).decode("utf-8", "replace") if found else None


def run_protocol(spec: ModuleSpec) -> int | None:
    """The ``RUN_PROTOCOL`` the run_context.py of a package (installed, or a stand-in) declares; None if it has
    no run_context.py, or declares none (releases before the number)."""
    found = _PROTOCOL_LINE.search(_package_file(spec, "run_context.py") or b"")
    return int(found.group(1)) if found else None


def _package_file(spec: ModuleSpec, name: str) -> bytes | None:
    """The bytes of a file of the package spec is for (in a folder or a zip archive), None if it has none."""
    get_data = getattr(spec.loader, "get_data", None)
    if get_data is None or spec.origin is None:
        return None
    try:
        data = get_data(os.path.join(os.path.dirname(spec.origin), name))
    except OSError:
        return None
    return data if isinstance(data, bytes) else None


def _hand_over() -> None:
    shipped = sys.modules[PACKAGE]
    installed, standins = find_package()
    if installed is not None and installed.loader is not None:
        # The worker's protocol is that of the run_context shipped beside this file: the one the script gets
        # unless this hands over.
        worker = run_protocol(shipped.__spec__) if shipped.__spec__ is not None else None
        theirs = run_protocol(installed)
        if theirs is None or theirs != worker:
            speaks = f"speaks run protocol {theirs}" if theirs is not None else "declares no run protocol"
            sys.stderr.write(
                "airflow-amlrun: this interpreter has airflow-amlrun "
                f"{installed_version(installed) or '(version unknown)'} installed ({installed.origin}), whose "
                f"run_context {speaks}, and the worker that started the run speaks run protocol {worker}: the "
                "script gets the worker's airflow_amlrun.run_context, not the installed package. For the rest "
                "of the package, install on this interpreter the worker's version of airflow-amlrun (or another "
                f"whose run_context.py declares RUN_PROTOCOL = {worker}).\n"
            )
            installed = None
    if installed is None or installed.loader is None:
        # None installed (or one of another protocol): this package it is, with every stand-in's modules.
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
