"""`amlrun envs`: registered and curated environments, their locks, and their builds."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from airflow_amlrun.cli.bars import ProgressBars
from airflow_amlrun.cli.common import print_json, text, workspace
from airflow_amlrun.errors import ConfigurationError

if TYPE_CHECKING:
    from airflow_amlrun.environment import Environment


def _pinned(lock: str | None) -> list[str]:
    """The packages a lock pins, as ``name==version`` lines."""
    return [
        line.split(" ")[0]
        for line in (lock or "").splitlines()
        if "==" in line and not line.startswith(("#", " "))
    ]


def _kind(spec: Environment) -> str:
    from airflow_amlrun.environment.registry import curated_names

    return "curated" if spec.name in curated_names() else "registered"


def cmd_envs_list(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun.environment import Environment

    specs = Environment.list(workspace(args), args.name)
    if args.json:
        print_json(console, [{**spec.to_dict(), "kind": _kind(spec)} for spec in specs])
        return 0
    table = Table(
        title=f"Versions of environment {args.name}" if args.name else "Environments (latest versions)"
    )
    for column in ("name", "version", "kind", "python", "packages"):
        table.add_column(column, overflow="fold")
    for spec in specs:
        packages = (
            "as the interpreter has them" if spec.user_managed else ", ".join(spec.python.pip_requirements)
        )
        table.add_row(
            spec.name,
            spec.version or "",
            _kind(spec),
            spec.python.version or "the worker's",
            packages or "none",
        )
    console.print(table)
    return 0


def cmd_envs_show(args: argparse.Namespace, console: Console) -> int:
    import yaml

    from airflow_amlrun.environment import Environment, registry
    from airflow_amlrun.environment.resolve import parse_reference

    ws = workspace(args)
    name, version, label = parse_reference(args.reference)
    stored = registry.lookup(Environment, ws, name, version=version, label=label)
    labels = registry.labels(ws, name)
    if args.json:
        data: dict[str, Any] = {"spec": stored.spec.to_dict(), "lock": stored.lock, "labels": labels}
        print_json(console, data)
        return 0
    spec = stored.spec
    console.print(
        f"Environment {spec.name} version {spec.version} ({_kind(spec)})", style="bold", highlight=False
    )
    console.print(Syntax(yaml.safe_dump(spec.to_dict(), sort_keys=False), "yaml"))
    mine = sorted(label for label, v in labels.items() if v == spec.version)
    console.print(f"labels: {', '.join(mine) or 'none'}", highlight=False)
    pinned = _pinned(stored.lock)
    if stored.lock is None:
        console.print("lock: none (user-managed: the interpreter's packages as they are)", highlight=False)
    else:
        console.print(f"lock: {len(pinned)} packages pinned: {escape(', '.join(pinned))}", highlight=False)
    return 0


def cmd_envs_build(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun import progress
    from airflow_amlrun.config import load_settings
    from airflow_amlrun.environment import ensure_local_python, resolve_environment
    from airflow_amlrun.targets.registry import resolve_target

    ws = workspace(args)
    bars = ProgressBars()
    with progress.reporting(bars):
        resolved = resolve_environment(ws, args.reference)
        target = resolve_target(args.target, load_settings(), ws.cache_dir)
        what = f"Environment {resolved.name} version {resolved.version}"
        if resolved.user_managed:
            console.print(f"{what} is user-managed: there is nothing to build.", highlight=False)
            return 0
        if target.kind == "local":
            python = ensure_local_python(resolved, ws.cache_dir)
            console.print(f"{what} is built for local runs: {python}", highlight=False)
        elif target.kind == "docker":
            from airflow_amlrun.environment.build_image import ensure_image

            docker: Any = target
            image = ensure_image(
                docker.client,
                resolved,
                default_image=docker.options.default_image,
                default_image_base=docker.options.default_image_base,
                daemon=docker.daemon.base_url,
                lock_dir=docker.cache_dir / "docker-builds",
                output=lambda line: bars.console.print(escape(line), style="dim", highlight=False),
            )
            console.print(f"{what} is built for {args.target}: image {image.reference}", highlight=False)
        else:
            raise ConfigurationError(
                f"--target {args.target!r} is a {target.kind} target, whose builds happen when a run starts there: "
                "`amlrun envs build` builds for the local target and Docker targets."
            )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `envs list|show|build`."""
    envs = sub.add_parser("envs", help="environments").add_subparsers(dest="envs_command", required=True)
    listing = envs.add_parser("list", help="the latest version of each environment, or every version of one")
    listing.add_argument(
        "name", nargs="?", default=None, help="list this environment's versions, newest first"
    )
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_envs_list)
    show = envs.add_parser("show", help="one version of an environment: its spec, labels and lock")
    show.add_argument("reference", type=text("environment"), metavar="NAME[:VERSION|@LABEL]")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_envs_show)
    build = envs.add_parser(
        "build", help="build an environment for a target ahead of its runs (a virtualenv, or a Docker image)"
    )
    build.add_argument("reference", type=text("environment"), metavar="NAME[:VERSION|@LABEL]")
    build.add_argument(
        "--target",
        type=text("compute target"),
        default="local",
        help="'local' (default), 'docker' or a Docker connection",
    )
    build.set_defaults(func=cmd_envs_build)
