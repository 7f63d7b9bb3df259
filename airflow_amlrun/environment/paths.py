"""Where a relative path a user gives starts: in a DAG file, at the DAG file's folder; elsewhere (a script,
a notebook), at the working directory. One rule for every path: source folders, requirements and conda
files, Dockerfiles, YAML configurations.

A DAG file is parsed by processes whose working directory says nothing about it (the DAG processor, a
worker, ``airflow dags test`` run from anywhere), so a path in it can only mean something relative to the
file itself. Airflow names a DAG's file (``dag.fileloc``) by the code that constructs the DAG; the path
factories here name it the same way, by the code that calls them, as they run before any DAG exists.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_amlrun.errors import ConfigurationError, shown

if TYPE_CHECKING:
    from collections.abc import Mapping

# A path the kernel accepts: at most PATH_MAX bytes (with its NUL), NAME_MAX bytes per file or folder name.
_PATH_MAX = 4095
_NAME_MAX = 255
# Airflow imports a DAG file under a module name of this prefix (its DagBag), wherever it parses one.
_DAG_MODULE_PREFIX = "unusual_prefix_"
# The names under which Airflow's DAG class and @dag decorator are defined.
_DAG_API = frozenset({"DAG", "dag"})


@dataclass(frozen=True)
class PathBase:
    """The folder relative paths start at, and why they start there (what a message about a path says).

    It is a path itself, so it goes wherever a ``base_dir`` folder does.
    """

    folder: Path
    why: str

    @classmethod
    def of_dag_file(cls, dag_file: str | os.PathLike[str]) -> PathBase:
        """Paths in the DAG file ``dag_file`` (a DAG's ``fileloc``)."""
        path = Path(os.path.abspath(dag_file))
        return cls(
            path.parent,
            f"the folder of the DAG file {path.name!r}: relative paths in a DAG file start at its folder, "
            "whichever directory Airflow parses or runs it from",
        )

    @classmethod
    def of_file(cls, path: str | os.PathLike[str], kind: str) -> PathBase:
        """Paths named inside a file (a YAML configuration), which start beside it."""
        path = Path(os.path.abspath(path))
        return cls(path.parent, f"the folder of the {kind} {path.name!r}, where the paths it names start")

    @classmethod
    def working_directory(cls) -> PathBase:
        return cls(
            Path.cwd(),
            "the working directory: outside a DAG file, in a script or a notebook, relative paths start at the "
            "working directory",
        )

    @classmethod
    def given(cls, folder: str | os.PathLike[str] | None) -> PathBase:
        """The base for a ``base_dir`` argument: as given, or found from the calling code when None."""
        if isinstance(folder, PathBase):
            return folder
        if folder is None:
            return calling_base()
        return cls(Path(os.path.abspath(folder)), "the base_dir given")

    def __fspath__(self) -> str:
        return str(self.folder)

    def explain(self) -> str:
        return f"relative to {str(self.folder)!r}, {self.why}"


def calling_base() -> PathBase:
    """The base for paths given by the code calling into this package: the folder of the DAG file that code
    is in, or the working directory.

    The calling code is the innermost frame outside this package and Airflow; frames further out count too,
    so a module a DAG file imports (``dags/common/envs.py``) takes the DAG file's rule.
    """
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        dag_file = _dag_file_of(frame)
        if dag_file is not None:
            return PathBase.of_dag_file(dag_file)
        frame = frame.f_back
    return PathBase.working_directory()


def user_file(value: object, what: str, base: PathBase | None = None) -> Path:
    """The absolute path of an existing file or folder a user named; a relative path starts at ``base``
    (default: the calling code's, see ``calling_base``).

    :param what: what the path is to the user (the argument that named it), for messages.
    """
    path = as_path(value, what).expanduser()
    if path.is_absolute():
        return path
    base = base or calling_base()
    full = base.folder / path
    if not os.path.lexists(full):
        raise ConfigurationError(
            f"{what} {shown(str(path))} does not exist ({base.explain()}; looked for {str(full)!r}). Check "
            "the path, or give an absolute one."
        )
    return full


def _dag_file_of(frame: types.FrameType) -> str | None:
    """The file of the frame's module, if that module is a DAG file: one Airflow imported as such, or one
    holding Airflow's DAG class, @dag decorator or a DAG (imported by a test, or run as ``python dag.py``).
    Installed packages (a DAG-factory library that imports the DAG class) are never DAG files."""
    module_globals = frame.f_globals
    name = module_globals.get("__name__")
    if not isinstance(name, str) or name.split(".", 1)[0] in ("airflow", "airflow_amlrun"):
        return None
    # Code without a file of its own (a notebook cell, `python -c`) is never a DAG file.
    path = module_globals.get("__file__")
    if not isinstance(path, str) or not path:
        return None
    if name.startswith(_DAG_MODULE_PREFIX):
        return path
    if not _installed(path) and _uses_dag_api(module_globals):
        return path
    return None


def _installed(path: str) -> bool:
    """Whether a module file belongs to the standard library or an installed package."""
    folder = os.path.abspath(path)
    return folder.startswith(_installed_roots()) or "site-packages" in Path(folder).parts


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    """The folders of the standard library and installed packages (looked up once: every frame is asked)."""
    paths = sysconfig.get_paths()
    keys = ("stdlib", "platstdlib", "purelib", "platlib")
    return tuple({os.path.join(paths[key], "") for key in keys if key in paths})


def _uses_dag_api(module_globals: Mapping[str, object]) -> bool:
    # Compared by identity and by exact type only: nothing here calls into the module's objects (a lazy
    # proxy's attributes, a property named __class__ would run code).
    definitions = sys.modules.get("airflow.sdk.definitions.dag")
    if definitions is None:
        return False
    dag_api = [vars(definitions).get(name) for name in _DAG_API]
    dag_class = vars(definitions).get("DAG")
    for value in list(module_globals.values()):
        if any(value is api for api in dag_api if api is not None):
            return True
        if isinstance(dag_class, type) and dag_class in type(value).__mro__:
            return True
    return False


def as_path(value: object, what: str) -> Path:
    """The path a user gave for a file or folder, checked: a string or path, not empty, one a file system
    can hold. `what` names the argument in messages."""
    if not isinstance(value, str | os.PathLike):
        raise ConfigurationError(
            f"{what} must be a path (a string or pathlib.Path), not {type(value).__name__} {shown(value)}."
        )
    text = os.fsdecode(os.fspath(value))
    if not text.strip():
        raise ConfigurationError(f"{what} is empty: give the path of the file or folder.")
    check_path_text(text, what)
    return Path(text)


def check_path_text(path: str, name: str) -> None:
    """Refuse a path no file system holds: a NUL byte, text that is not Unicode, or longer than Linux allows."""
    if "\0" in path:
        raise ConfigurationError(
            f"{name} {shown(path)} holds a NUL byte (\\0), which no file name can: fix the path."
        )
    try:
        data = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"{name} {shown(path)} is not valid Unicode text (a lone surrogate): fix the path."
        ) from None
    longest = max((len(part) for part in data.split(b"/")), default=0)
    if len(data) > _PATH_MAX or longest > _NAME_MAX:
        raise ConfigurationError(
            f"{name} {shown(path)} is too long for a path: at most {_PATH_MAX} bytes, and {_NAME_MAX} per file "
            "or folder name. Check that the value is the path meant (not a file's content)."
        )
