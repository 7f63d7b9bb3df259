"""The README's "Your first DAG", followed as a new user would, from the README's own text.

The commands, the files and what the user is told to expect are read from README.md, from the fenced
block after each `<!-- first-dag: ... -->` marker, so the README cannot drift from what works:

* `setup` and `run`: shell commands, run in that order in one bash session, in a fresh home folder, with
  the two files written in between at the paths their markers name (`$AIRFLOW_HOME/dags/my_dag.py`);
* `output of COMMAND`: lines the user sees among what COMMAND prints; `…` stands for what differs from run
  to run, and a run of spaces for any run of spaces (a table's padding);
* `XCom of DAG.TASK`: the task's `return_value`, as Airflow keeps it for the UI's XCom tab.

The README's `pip install 'airflow-amlrun[...]'` installs this checkout instead of the released package,
with uv (warm cache: seconds, where pip would download everything again), into the virtualenv the README
makes; everything else runs as written.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK = re.compile(r"^<!-- first-dag: (?P<name>.+?) -->\n```[\w-]*\n(?P<body>.*?)^```$", re.M | re.S)
# A table border drawn by the CLI: its length follows the column widths, so it is not compared.
BORDER = re.compile(r"^[\s\u2500-\u257f]*$")
# The shell's trace of a command the session runs (`set -x`, first level).
TRACE = "+ "
PACKAGE = "airflow-amlrun"
END_OF_FILE = "AMLRUN_README_END_OF_FILE"


def readme_blocks() -> dict[str, str]:
    """The README's first-dag blocks by marker name, in the README's order."""
    blocks = {m["name"]: m["body"] for m in BLOCK.finditer(README.read_text(encoding="utf-8"))}
    for needed in ("setup", "run"):
        assert needed in blocks, (
            f"README.md has no `<!-- first-dag: {needed} -->` block before a fenced block"
        )
    return blocks


def session_script(blocks: dict[str, str], checkout: Path, uv: Path, result: Path) -> str:
    """One bash session: the setup commands, the files, the run commands, as the user types them."""
    files = {name: body for name, body in blocks.items() if "/" in name}
    assert files, "README.md's first DAG names no file (`<!-- first-dag: $AIRFLOW_HOME/dags/... -->`)"
    lines = [
        "set -e",
        # The README's `pip install 'airflow-amlrun[extras]'`, of this checkout, into the active Python.
        "pip() {",
        '  [ "$1" = install ] || { echo "the first DAG runs pip only to install" >&2; return 2; }',
        "  shift",
        "  local args=() arg found=",
        '  for arg in "$@"; do',
        f'    if [[ $arg == {PACKAGE} || $arg == {PACKAGE}\\[* ]]; then arg="$CHECKOUT${{arg#{PACKAGE}}}"; found=1; fi',
        '    args+=("$arg")',
        "  done",
        f'  [ -n "$found" ] || {{ echo "pip install names no {PACKAGE}: $*" >&2; return 2; }}',
        '  "$UV" pip install --quiet --compile-bytecode --python "$(command -v python3)" "${args[@]}"',
        "}",
        f"CHECKOUT={_quote(str(checkout))} UV={_quote(str(uv))}",
        "set -x",
        blocks["setup"],
        "set +x",
    ]
    for path, body in files.items():
        assert END_OF_FILE not in body
        lines += [f"cat > \"{path}\" <<'{END_OF_FILE}'", body + END_OF_FILE]
    lines += ["set -x", blocks["run"], "set +x", f'printf %s "$AIRFLOW_HOME" > {_quote(str(result))}']
    return "\n".join(lines) + "\n"


def new_user_environment(home: Path, python_dir: Path) -> dict[str, str]:
    """A login of a user who has never used Airflow: an empty home, a system Python 3, no Airflow settings.

    The machine's own settings (CA bundle, proxies) stay, as a shell of theirs would have them.
    """
    dropped = ("AIRFLOW", "_AIRFLOW", "AMLRUN", "VIRTUAL_ENV", "PYTHON", "PYENV", "CONDA", "UV_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
    # uv's cache stays the machine's (an empty home would make it download everything again).
    cache = subprocess.run(
        [str(Path(sys.executable).parent / "uv"), "cache", "dir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.update(HOME=str(home), PATH=f"{python_dir}:{system_path}", UV_CACHE_DIR=cache)
    return env


def command_output(transcript: str, command: str) -> list[str]:
    """What one command of the session printed: the lines after its trace, up to the next command's."""
    lines = transcript.splitlines()
    start = [i for i, line in enumerate(lines) if line == TRACE + command]
    assert start, f"the session never ran `{command}`; its transcript ends:\n" + "\n".join(lines[-40:])
    rest = lines[start[0] + 1 :]
    end = next((i for i, line in enumerate(rest) if line.startswith(TRACE)), len(rest))
    return rest[:end]


def shows(expected: str, seen: str) -> bool:
    """Whether `seen` shows `expected`: its parts between `…` in order, any run of spaces as one."""
    position = 0
    for part in _squeeze(expected).split("…"):
        found = _squeeze(seen).find(part, position)
        if found < 0:
            return False
        position = found + len(part)
    return True


def assert_shows(expected_block: str, seen: list[str], what: str) -> None:
    """Every line of the README's block is among the lines seen, in the README's order."""
    at = 0
    for expected in expected_block.splitlines():
        if not expected.strip() or BORDER.match(expected):
            continue
        match = next((i for i in range(at, len(seen)) if shows(expected, seen[i])), None)
        assert match is not None, (
            f"The README says {what} shows\n    {expected.strip()}\nbut it printed:\n" + "\n".join(seen[-60:])
        )
        at = match + 1


def xcom(airflow_home: Path, dag_id: str, task_id: str) -> str:
    """The task's return value as Airflow stored it (the UI's XCom tab shows this value)."""
    with sqlite3.connect(airflow_home / "airflow.db") as db:
        rows = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = 'return_value'",
            (dag_id, task_id),
        ).fetchall()
    assert len(rows) == 1, f"{dag_id}.{task_id} returned {len(rows)} XCom values, not one"
    return json.dumps(json.loads(rows[0][0]))


def test_a_new_user_runs_the_readme_first_dag_in_a_fresh_airflow(tmp_path: Path) -> None:
    blocks = readme_blocks()
    home = tmp_path / "home"
    home.mkdir()
    python_dir = tmp_path / "python"
    python_dir.mkdir()
    (python_dir / "python3").symlink_to(Path(getattr(sys, "_base_executable", sys.executable)).resolve())
    uv = Path(sys.executable).parent / "uv"
    result = tmp_path / "airflow_home"

    script = session_script(blocks, REPO, uv, result)
    session = subprocess.run(
        ["bash", "-c", script],
        cwd=home,
        env=new_user_environment(home, python_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=420,
    )
    transcript = session.stdout
    assert session.returncode == 0, (
        f"The README's first DAG failed (exit status {session.returncode}); the session ends:\n"
        + "\n".join(transcript.splitlines()[-60:])
    )

    airflow_home = Path(result.read_text())
    assert airflow_home.is_relative_to(home), f"AIRFLOW_HOME {airflow_home} is not in the new user's home"
    # The run history is the embedded workspace the README names, in that Airflow's home.
    assert (airflow_home / "amlrun" / "history.db").is_file()

    outputs = {
        name[len("output of ") :]: body for name, body in blocks.items() if name.startswith("output of ")
    }
    assert outputs, "README.md's first DAG shows no output (`<!-- first-dag: output of COMMAND -->`)"
    for command, expected in outputs.items():
        assert_shows(expected, command_output(transcript, command), f"`{command}`")

    xcoms = {name[len("XCom of ") :]: body for name, body in blocks.items() if name.startswith("XCom of ")}
    assert xcoms, "README.md's first DAG shows no XCom (`<!-- first-dag: XCom of DAG.TASK -->`)"
    for task, expected in xcoms.items():
        dag_id, task_id = task.split(".")
        value = xcom(airflow_home, dag_id, task_id)
        assert shows(expected, value), f"The README says {task}'s XCom is\n{expected}\nbut it is\n{value}"


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
