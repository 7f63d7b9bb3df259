"""Where a relative path starts: at the DAG file's folder in a DAG file, at the working directory elsewhere.

The calling code is real code in real files, imported the ways Airflow and users import it.
"""

from __future__ import annotations

import importlib.util
import string
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_amlrun import Environment, ScriptRunConfig
from airflow_amlrun.environment.paths import PathBase, calling_base, user_file
from airflow_amlrun.environment.requirements import read_requirements
from airflow_amlrun.errors import ConfigurationError


def load(path: Path, module_name: str) -> ModuleType:
    """Import a file as a module of the given name, as Airflow's DagBag or a user's test does."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[module_name]
    return module


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not the DAG folder, as a DAG processor or a worker has."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


ENV_FROM_SRC = """
    from airflow_amlrun import Environment
    env = Environment.from_pip_requirements("train", "src/requirements.txt")
"""


def test_a_dag_file_imported_by_airflow_reads_its_files_beside_it(tmp_path: Path, elsewhere: Path) -> None:
    write(tmp_path / "dags" / "src" / "requirements.txt", "tomli-w==1.0.0\n")
    dag_file = write(tmp_path / "dags" / "train.py", ENV_FROM_SRC)

    # DagBag's name for a DAG file's module.
    module = load(dag_file, "unusual_prefix_0123456789abcdef0123456789abcdef01234567_train")

    assert module.env.python.pip_requirements == ["tomli-w==1.0.0"]


def test_a_file_using_airflows_dag_api_is_a_dag_file_whoever_imports_it(
    tmp_path: Path, elsewhere: Path
) -> None:
    write(tmp_path / "dags" / "src" / "requirements.txt", "tomli-w==1.0.0\n")
    dag_file = write(
        tmp_path / "dags" / "train.py", "from airflow.sdk import dag\n" + textwrap.dedent(ENV_FROM_SRC)
    )

    module = load(dag_file, "train")

    assert module.env.python.pip_requirements == ["tomli-w==1.0.0"]


def test_a_module_a_dag_file_imports_takes_the_dag_files_folder(tmp_path: Path, elsewhere: Path) -> None:
    write(tmp_path / "dags" / "src" / "requirements.txt", "tomli-w==1.0.0\n")
    helper = write(
        tmp_path / "dags" / "common" / "envs.py",
        """
        from airflow_amlrun import Environment
        def training_env():
            return Environment.from_pip_requirements("train", "src/requirements.txt")
        """,
    )
    dag_file = write(
        tmp_path / "dags" / "train.py",
        f"""
        from airflow.sdk import DAG
        import importlib.util
        spec = importlib.util.spec_from_file_location("envs", {str(helper)!r})
        envs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(envs)
        env = envs.training_env()
        """,
    )

    module = load(dag_file, "train")

    assert module.env.python.pip_requirements == ["tomli-w==1.0.0"]


def test_a_plain_script_reads_from_the_working_directory_and_says_so(tmp_path: Path, elsewhere: Path) -> None:
    write(tmp_path / "scripts" / "src" / "requirements.txt", "tomli-w==1.0.0\n")
    script = write(tmp_path / "scripts" / "submit.py", ENV_FROM_SRC)

    with pytest.raises(ConfigurationError) as refused:
        load(script, "submit")

    assert str(refused.value) == (
        f"Requirements file 'src/requirements.txt' does not exist (relative to {str(elsewhere)!r}, the working "
        "directory: outside a DAG file, in a script or a notebook, relative paths start at the working "
        f"directory; looked for {str(elsewhere / 'src' / 'requirements.txt')!r}). Check the path, or give an "
        "absolute one."
    )

    write(elsewhere / "src" / "requirements.txt", "pandas\n")
    assert load(script, "submit").env.python.pip_requirements == ["pandas"]


def test_code_without_a_file_like_a_notebook_cell_reads_from_the_working_directory(
    elsewhere: Path,
) -> None:
    write(elsewhere / "requirements.txt", "tomli-w==1.0.0\n")
    cell = compile("from airflow.sdk import DAG\nbase = calling_base()\n", "<ipython-input-1>", "exec")
    namespace = {"__name__": "__main__", "calling_base": calling_base}

    exec(cell, namespace)

    assert namespace["base"] == PathBase.working_directory()


def test_a_dag_files_missing_file_is_named_with_the_folder_it_was_looked_for_in(
    tmp_path: Path, elsewhere: Path
) -> None:
    dag_file = write(
        tmp_path / "dags" / "train.py", "from airflow.sdk import DAG\n" + textwrap.dedent(ENV_FROM_SRC)
    )

    with pytest.raises(ConfigurationError) as refused:
        load(dag_file, "train")

    dags = tmp_path / "dags"
    assert str(refused.value) == (
        f"Requirements file 'src/requirements.txt' does not exist (relative to {str(dags)!r}, the folder of the "
        "DAG file 'train.py': relative paths in a DAG file start at its folder, whichever directory Airflow "
        f"parses or runs it from; looked for {str(dags / 'src' / 'requirements.txt')!r}). Check the path, or "
        "give an absolute one."
    )


def test_an_absolute_path_is_kept_as_it_is(tmp_path: Path) -> None:
    assert (
        user_file(tmp_path / "any.txt", "file", PathBase(Path("/elsewhere"), "why")) == tmp_path / "any.txt"
    )
    assert user_file("~/any.txt", "file", PathBase(Path("/elsewhere"), "why")) == Path.home() / "any.txt"


def test_every_path_taking_factory_starts_at_the_dag_files_folder(tmp_path: Path, elsewhere: Path) -> None:
    dags = tmp_path / "dags"
    write(dags / "env" / "requirements.txt", "tomli-w==1.0.0\n")
    write(dags / "env" / "conda.yml", "dependencies: [python=3.11, {pip: [tomli-w==1.0.0]}]\n")
    write(dags / "env" / "Dockerfile", "FROM python:3.11-slim\n")
    write(
        dags / "env" / "environment.yaml", "name: from-yaml\npython: {requirements_file: requirements.txt}\n"
    )
    write(dags / "src" / "train.py", "print('hi')\n")
    write(dags / "run.yaml", "source_directory: src\nscript: train.py\n")
    dag_file = write(
        dags / "train.py",
        """
        from airflow.sdk import DAG
        from airflow_amlrun import Environment, ScriptRunConfig
        pip = Environment.from_pip_requirements("a", "env/requirements.txt")
        conda = Environment.from_conda_specification("b", "env/conda.yml")
        image = Environment.from_docker_image("c", "python:3.11-slim", pip_requirements="env/requirements.txt")
        built = Environment.from_dockerfile("d", "env/Dockerfile", conda_specification="env/conda.yml")
        loaded = Environment.load("env/environment.yaml")
        as_dict = Environment.from_dict({"name": "e", "python": {"conda_file": "env/conda.yml"}})
        config = ScriptRunConfig.from_yaml("run.yaml")
        source = ScriptRunConfig("src", script="train.py").resolved()
        """,
    )

    module = load(dag_file, "train")

    for name in ("pip", "conda", "image", "built", "loaded", "as_dict"):
        assert getattr(module, name).python.pip_requirements == ["tomli-w==1.0.0"], name
    assert module.built.docker.dockerfile == "FROM python:3.11-slim\n"
    assert module.config.source_directory == str(dags / "src")
    assert module.source.source_directory == str(dags / "src")


def test_the_working_directory_outside_a_dag_file_holds_for_source_directory_too(elsewhere: Path) -> None:
    with pytest.raises(ConfigurationError, match="relative to .*, the working directory: outside a DAG file"):
        ScriptRunConfig("src", script="train.py").resolved()

    dag_base = PathBase.of_dag_file("/opt/dags/train.py")
    with pytest.raises(
        ConfigurationError, match="relative to '/opt/dags', the folder of the DAG file 'train.py'"
    ):
        ScriptRunConfig("src", script="train.py").resolved(dag_base)


# a list of requirements


def test_a_list_of_requirements_is_read_like_a_requirements_files_lines(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text(
        "tomli-w==1.0.0  # for the config\n--extra-index-url https://pkgs.example.com/simple\n"
    )
    from_file = Environment.from_pip_requirements("a", tmp_path / "requirements.txt")

    from_list = Environment.from_pip_requirements(
        "a", ["tomli-w==1.0.0  # for the config", "--extra-index-url https://pkgs.example.com/simple"]
    )

    assert from_list == from_file
    assert from_list.python.pip_requirements == ["tomli-w==1.0.0"]
    assert from_list.python.extra_index_urls == ["https://pkgs.example.com/simple"]
    assert not from_list.user_managed


def test_a_bad_item_of_a_list_is_named_by_its_index() -> None:
    with pytest.raises(ConfigurationError) as refused:
        Environment.from_pip_requirements("a", ["pandas", "pandas$(curl evil.sh)"])
    assert str(refused.value).startswith(
        "Environment 'a': requirements[1]: 'pandas$(curl evil.sh)' is not a valid requirement"
    )

    with pytest.raises(ConfigurationError, match=r"requirements\[1\] = 5 \(int\) must be a string"):
        Environment.from_pip_requirements("a", ["pandas", 5])  # type: ignore[list-item]


def test_neither_a_path_nor_a_list_is_refused_naming_both_forms() -> None:
    with pytest.raises(ConfigurationError) as refused:
        Environment.from_pip_requirements("a", {"pandas": ">=2"})  # type: ignore[arg-type]
    assert "file_path must be a path (a string or pathlib.Path) of a requirements file, or a list" in str(
        refused.value
    )


# a conda file where a requirements file is expected


@pytest.mark.parametrize(
    ("name", "text", "sign"),
    [
        ("environment.txt", "name: train\ndependencies:\n  - pip:\n    - pandas\n", "it has a 'name:' line"),
        ("deps.txt", "channels: [conda-forge]\ndependencies: [python=3.11]\n", "it has a 'channels:' line"),
        ("environment.yml", "- pandas\n", "its name ends in '.yml'"),
    ],
)
def test_a_conda_file_given_as_requirements_points_to_from_conda_specification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str, sign: str
) -> None:
    (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigurationError) as refused:
        Environment.from_pip_requirements("train", name)

    assert str(refused.value) == (
        f"Requirements file {str(tmp_path / name)!r} is a conda environment file ({sign}), not a pip "
        f"requirements file: use Environment.from_conda_specification('train', {name!r})."
    )


def test_a_conda_file_named_as_a_yaml_requirements_file_points_to_conda_file(tmp_path: Path) -> None:
    (tmp_path / "env.yml").write_text("dependencies: [python=3.11]\n")

    with pytest.raises(
        ConfigurationError, match=r"use python.conda_file: env.yml instead of python.requirements_file"
    ):
        Environment.from_dict({"name": "e", "python": {"requirements_file": "env.yml"}}, base_dir=tmp_path)


# Names as PEP 508 writes them, "name" and "channels" among them, with or without a pinned version:
# r"(name|channels|dependencies|[A-Za-z]([A-Za-z0-9_.\-]{0,18}[A-Za-z0-9])?)(==[0-9]{1,3}(\.[0-9]{1,3}){0,2})?",
# drawn piece by piece, as tests/unit/strategies.py explains (st.from_regex took most of this test's time).
_ALNUM = string.ascii_letters + string.digits
REQUIREMENT = st.tuples(
    st.one_of(
        st.sampled_from(["name", "channels", "dependencies"]),
        st.tuples(
            st.sampled_from(string.ascii_letters),
            st.one_of(
                st.just(""),
                st.tuples(st.text(_ALNUM + "_.-", max_size=18), st.sampled_from(_ALNUM)).map("".join),
            ),
        ).map("".join),
    ),
    st.one_of(
        st.just(""),
        st.lists(st.text(string.digits, min_size=1, max_size=3), min_size=1, max_size=3).map(
            lambda parts: "==" + ".".join(parts)
        ),
    ),
).map("".join)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose file each example of a property writes anew (a folder per example costs more than the
    example itself)."""
    return tmp_path_factory.mktemp("scratch")


@given(st.lists(REQUIREMENT, min_size=1, max_size=8))
def test_no_requirements_file_is_taken_for_a_conda_file(scratch: Path, requirements: list[str]) -> None:
    path = scratch / "requirements.txt"
    path.write_text("\n".join(requirements) + "\n")
    assert read_requirements(path).requirements == requirements


def test_looking_for_the_dag_file_runs_no_code_of_the_callers_objects(
    tmp_path: Path, elsewhere: Path
) -> None:
    # A lazy proxy resolves itself when its attributes are read; the DAG-file check must not touch them.
    write(elsewhere / "requirements.txt", "tomli-w==1.0.0\n")
    caller = write(
        tmp_path / "lazy.py",
        """
        from airflow_amlrun import Environment

        touched = []

        class Proxy:
            @property
            def __class__(self):
                touched.append("__class__")
                raise RuntimeError("resolved outside its context")

            def __getattr__(self, name):
                touched.append(name)
                raise RuntimeError("resolved outside its context")

        proxy = Proxy()
        env = Environment.from_pip_requirements("train", "requirements.txt")
        """,
    )

    module = load(caller, "lazy")

    assert module.touched == []
    assert module.env.python.pip_requirements == ["tomli-w==1.0.0"]


def test_an_installed_library_that_imports_the_dag_class_is_not_a_dag_file(
    tmp_path: Path, elsewhere: Path
) -> None:
    # A DAG-factory library builds environments for the DAG file that calls it: paths start there.
    write(tmp_path / "dags" / "src" / "requirements.txt", "tomli-w==1.0.0\n")
    library = write(
        tmp_path / "venv" / "lib" / "site-packages" / "dagfactory_lib.py",
        """
        from airflow.sdk import DAG
        from airflow_amlrun import Environment

        def build(name):
            return Environment.from_pip_requirements(name, "src/requirements.txt")
        """,
    )
    factory = load(library, "dagfactory_lib")
    sys.modules["dagfactory_lib"] = factory
    try:
        dag_file = write(
            tmp_path / "dags" / "train.py", "import dagfactory_lib\nenv = dagfactory_lib.build('t')\n"
        )
        module = load(dag_file, "unusual_prefix_0123456789abcdef0123456789abcdef01234567_train")
    finally:
        del sys.modules["dagfactory_lib"]

    assert module.env.python.pip_requirements == ["tomli-w==1.0.0"]
