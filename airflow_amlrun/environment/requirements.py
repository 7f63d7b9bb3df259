"""The files users already have: pip requirements files (with ``-r`` includes and index options) and the
pip section of conda environment files, read into requirements an environment can lock."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_amlrun.environment.credentials import check_index_url, check_url_credentials, redact_text
from airflow_amlrun.environment.paths import PathBase, user_file

# Where they were first defined; other modules import them from here.
from airflow_amlrun.environment.paths import as_path as as_path
from airflow_amlrun.environment.paths import check_path_text as check_path_text
from airflow_amlrun.errors import ConfigurationError, shown

_PYTHON_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.\d+)?$")
# No package name or URL comes near this; a longer requirement is a file's content passed by mistake.
_REQUIREMENT_MAX = 4096
# Conda entries that are not packages of their own: the interpreter, pip, and the pip section.
_CONDA_ALLOWED = {"python", "pip"}
# A top-level key of a conda environment file; no line of a requirements file starts so.
_CONDA_KEY = re.compile(r"^(name|channels|dependencies|prefix)\s*:", re.MULTILINE)


@dataclass
class RequirementsFile:
    """The requirements and index options of a pip requirements file, with its ``-r`` includes followed."""

    requirements: list[str]
    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)


def normalize_python_version(value: object, *, where: str) -> str:
    """``"3.11"`` from ``3.11``, ``"3.11"`` or ``"3.11.4"``: environments pin the minor version only."""
    text = str(value).strip()
    match = _PYTHON_VERSION.match(text)
    if match is None or isinstance(value, bool):
        raise ConfigurationError(f"{where} = {shown(value)} is not a Python version; write it as '3.11'.")
    major, minor = int(match.group(1)), int(match.group(2))
    if (major, minor) < (3, 7):
        # YAML reads `version: 3.10` as the float 3.1, which would silently pick another Python.
        hint = " (an unquoted 3.10 is read as the number 3.1)" if isinstance(value, float) else ""
        raise ConfigurationError(
            f"{where} = {value!r} names a Python older than 3.7, which runs need{hint}: write the version "
            "as a string such as '3.11'."
        )
    return f"{major}.{minor}"


def check_requirement(line: str, *, where: str) -> str:
    """The requirement, stripped, if it is valid PEP 508 and its URL (``name @ url``) carries no credential in
    clear; a local path or editable install is refused."""
    from packaging.requirements import InvalidRequirement, Requirement

    if not isinstance(line, str):
        raise ConfigurationError(f"{where}: requirement {shown(line)} must be a string such as 'pandas>=2'.")
    text = " ".join(line.split())
    if len(text) > _REQUIREMENT_MAX:
        raise ConfigurationError(
            f"{where}: requirement {shown(text)} is longer than {_REQUIREMENT_MAX} characters: give one "
            "requirement such as 'pandas>=2' per item (to read a requirements file, use "
            "Environment.from_pip_requirements)."
        )
    try:
        requirement = Requirement(text)
    except InvalidRequirement as err:
        # The line may hold a URL with a password (a bare URL is not a requirement): it is shown redacted.
        raise ConfigurationError(
            f"{where}: {redact_text(text)!r} is not a valid requirement ({redact_text(str(err))}). Write it as "
            "'name', 'name==1.2' or 'name @ https://...'; local paths and editable installs cannot be locked, "
            "so build and publish a wheel instead."
        ) from None
    if requirement.url:
        # Stored like an index URL (spec, lock, image), so a credential in it is a ${VAR} reference too.
        check_url_credentials(
            requirement.url, where=where, what="requirement", variable="PACKAGE_TOKEN", shown=text
        )
    return text


def read_requirements(
    path: Path, *, what: str = "Requirements file", conda_fix: str | None = None
) -> RequirementsFile:
    """Requirements and index options of a pip requirements file, following ``-r`` includes.

    :param what: what the file is to the user (the argument that named it), for messages.
    :param conda_fix: what to use instead when the file is a conda environment file, for the message.
    """
    result = RequirementsFile(requirements=[])
    _read_requirements_into(path, result, seen=[], what=what, conda_fix=conda_fix)
    return result


def read_requirement_lines(lines: object, *, where: str, folder: Path) -> RequirementsFile:
    """Requirements and index options from a list, each item read as a line of a requirements file is.

    :param where: what the list is to the user (the argument that gave it), for messages.
    :param folder: where the path of a ``-r`` item starts.
    """
    if isinstance(lines, str | bytes) or not isinstance(lines, Sequence):
        raise ConfigurationError(
            f"{where} must be a list of requirements such as ['pandas>=2'], not {type(lines).__name__} "
            f"{redact_text(shown(lines))}."
        )
    result = RequirementsFile(requirements=[])
    for index, item in enumerate(lines):
        if not isinstance(item, str):
            raise ConfigurationError(
                f"{where}[{index}] = {redact_text(shown(item))} ({type(item).__name__}) must be a string such "
                "as 'pandas>=2'."
            )
        _add_lines(item, folder, result, where=f"{where}[{index}]", seen=[])
    return result


def _read_requirements_into(
    path: Path,
    result: RequirementsFile,
    seen: list[Path],
    what: str = "Requirements file",
    conda_fix: str | None = None,
) -> None:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in [*seen, resolved])
        raise ConfigurationError(
            f"Requirements files include each other in a loop: {chain}. Remove one -r line."
        )
    text = read_text(path, what)
    conda = _conda_sign(path, text)
    if conda is not None:
        # Only an included file (-r) comes without a fix of its own: -r takes requirements files only.
        fix = conda_fix or "a requirements file in the -r line, listing the conda file's pip packages"
        raise ConfigurationError(
            f"{what} {str(path)!r} is a conda environment file ({conda}), not a pip requirements file: use "
            f"{fix}."
        )
    _add_lines(text, path.parent, result, where=lambda number: f"{path}:{number}", seen=[*seen, resolved])


def _conda_sign(path: Path, text: str) -> str | None:
    """What shows a file to be a conda environment file rather than a requirements file, if anything does."""
    found = _CONDA_KEY.search(text)
    if found is not None:
        return f"it has a '{found.group(1)}:' line"
    if path.suffix.lower() in (".yml", ".yaml"):
        return f"its name ends in {path.suffix!r}"
    return None


def _add_lines(
    text: str, folder: Path, result: RequirementsFile, *, where: str | Callable[[int], str], seen: list[Path]
) -> None:
    """Add the requirements and options of requirements-file text; ``where`` names a line (by its number)."""
    for number, line in _logical_lines(text):
        line_where = where if isinstance(where, str) else where(number)
        if line.startswith("-"):
            _apply_option_line(line, folder, result, where=line_where, seen=seen)
        else:
            # Per-requirement options (--hash=...) are dropped: the lock brings its own hashes.
            requirement = re.split(r"\s+--?[A-Za-z]", line, maxsplit=1)[0]
            result.requirements.append(check_requirement(requirement, where=line_where))


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        # A comment starts at '#' at the line's start or after whitespace ('pkg @ url#egg' keeps its '#').
        line = re.sub(r"(^|\s)#.*$", "", raw)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            lines.append((start, line))
    if pending.strip():
        lines.append((start, pending.strip()))
    return lines


def check_url(value: str, *, where: str, option: str) -> str:
    # ${VAR} stays as written: credentials are expanded only in a resolver's or installer's environment.
    return check_index_url(value, where=where, option=option)


def read_package_file(
    name: str, base: str | os.PathLike[str] | None, *, requirements_file: object, conda_file: object
) -> tuple[str | None, RequirementsFile]:
    """The Python version and requirements of the file an environment's YAML names, if any: its
    ``python.requirements_file`` or its ``python.conda_file`` (relative to base, see ``PathBase.given``),
    not both."""
    start = PathBase.given(base)
    if requirements_file is not None and conda_file is not None:
        raise ConfigurationError(
            f"Environment {name!r} sets both python.requirements_file and python.conda_file: give one."
        )
    if requirements_file is not None:
        where = f"Environment {name!r}: python.requirements_file"
        fix = f"python.conda_file: {requirements_file} instead of python.requirements_file"
        return None, read_requirements(user_file(requirements_file, where, start), what=where, conda_fix=fix)
    if conda_file is not None:
        where = f"Environment {name!r}: python.conda_file"
        return read_conda_specification(user_file(conda_file, where, start), what=where)
    return None, RequirementsFile(requirements=[])


def read_conda_specification(
    path: Path, *, what: str = "Conda environment file"
) -> tuple[str | None, RequirementsFile]:
    """The Python version and pip section of a conda environment file; conda-only packages are refused.

    :param what: what the file is to the user (the argument that named it), for messages.
    """
    import yaml

    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigurationError(f"{what} {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("dependencies") or [], list):
        raise ConfigurationError(f"{what} {str(path)!r} must be a mapping with a 'dependencies' list.")
    version: str | None = None
    pip_lines: list[str] = []
    conda_only: list[str] = []
    for entry in data.get("dependencies") or []:
        if isinstance(entry, Mapping):
            for key, value in entry.items():
                if key != "pip":
                    raise ConfigurationError(
                        f"{what} {str(path)!r}: dependencies entry {key!r} is not "
                        "understood; only a 'pip:' list may be a mapping."
                    )
                pip_lines += string_list(value, f"{what} {str(path)!r}: pip section")
            continue
        spec = str(entry).strip()
        package = re.split(r"[=<>!~\s\[]", spec.split("::")[-1], maxsplit=1)[0].lower()
        if package == "python":
            found = re.search(r"(\d+\.\d+)", spec)
            if found:
                version = normalize_python_version(found.group(1), where=f"{path}: {spec!r}")
        elif package not in _CONDA_ALLOWED:
            conda_only.append(spec)
    if conda_only:
        raise ConfigurationError(
            f"{what} {str(path)!r} lists conda packages {', '.join(conda_only)}: conda "
            "cannot be assumed on a compute target, so only python, pip and the 'pip:' section are used. "
            "Move these packages into the 'pip:' section (under their PyPI names), or use a Docker image "
            "that has them."
        )
    result = RequirementsFile(requirements=[])
    # The pip section may use requirements-file syntax (-r, --extra-index-url) like a file beside it.
    _add_lines(
        "\n".join(pip_lines),
        path.parent,
        result,
        where=lambda number: f"{path}: pip section line {number}",
        seen=[],
    )
    return version, result


def _apply_option_line(
    line: str, folder: Path, result: RequirementsFile, *, where: str, seen: list[Path]
) -> None:
    if line.startswith(("-r", "--requirement")):
        name = re.sub(r"^(-r|--requirement)[=\s]*", "", line).strip()
        if not name:
            raise ConfigurationError(f"{where}: {line!r} needs a file name.")
        include = Path(os.path.expandvars(name)).expanduser()
        _read_requirements_into(include if include.is_absolute() else folder / include, result, seen)
    elif line.startswith(("-i", "--index-url")):
        url = re.sub(r"^(-i|--index-url)[=\s]*", "", line)
        result.index_url = check_url(url, where=where, option="--index-url")
    elif line.startswith("--extra-index-url"):
        url = check_url(
            re.sub(r"^--extra-index-url[=\s]*", "", line), where=where, option="--extra-index-url"
        )
        if url not in result.extra_index_urls:
            result.extra_index_urls.append(url)
    else:
        raise ConfigurationError(
            f"{where}: option {redact_text(line)!r} is not supported in an environment's requirements. Supported: "
            "-r/--requirement, -i/--index-url, --extra-index-url; editable installs (-e), constraints "
            "(-c) and --find-links cannot be locked reproducibly, so publish a wheel to an index instead."
        )


def read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        # Relative paths were made absolute by paths.user_file, whose message says where they start.
        raise ConfigurationError(
            f"{what} {shown(str(path))} does not exist. Check the path, or give an absolute one."
        ) from None
    except IsADirectoryError:
        raise ConfigurationError(
            f"{what} {shown(str(path))} is a directory; name the file inside it."
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigurationError(
            f"{what} {shown(str(path))} is not UTF-8 text (byte {err.start} is "
            f"{err.object[err.start : err.start + 1]!r}): name the text file meant, or save it as UTF-8."
        ) from None
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigurationError(
            f"{what} {shown(str(path))} cannot be read ({reason}). Check the path and its permissions."
        ) from None


def string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        # The value may be an index URL with its credentials: they are not shown.
        raise ConfigurationError(f"{where} must be a list of strings, not {redact_text(shown(value))}.")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigurationError(
                f"{where}[{index}] = {redact_text(shown(item))} ({type(item).__name__}) must be a string; "
                "quote it in YAML."
            )
    return list(value)
