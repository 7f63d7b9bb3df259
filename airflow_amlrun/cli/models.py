"""`amlrun models`: registered models, their versions, and their files."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from airflow_amlrun.cli.bars import ProgressBars
from airflow_amlrun.cli.common import cell, fmt, folder, print_json, text, workspace
from airflow_amlrun.errors import AmlRunError

if TYPE_CHECKING:
    from airflow_amlrun.model import Model


def _as_dict(model: Model) -> dict[str, Any]:
    return {
        "name": model.name,
        "version": model.version,
        "labels": model.labels,
        "run_id": model.run_id,
        "path": model.path,
        "tags": model.tags,
        "properties": model.properties,
        "created": model.created_at.isoformat(),
        "snapshot_id": model.snapshot_id,
        "run": model.run_info,
    }


def _model(args: argparse.Namespace) -> Model:
    from airflow_amlrun.model import Model, ModelNotFoundError

    try:
        return Model(workspace(args), args.name, version=args.version, label=args.label)
    except ModelNotFoundError as err:
        # Said as any other error of the command line, with its exit status.
        raise AmlRunError(str(err)) from None


def cmd_models_list(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun.model import Model

    models = Model.list(workspace(args), args.name)
    if args.json:
        print_json(console, [_as_dict(m) for m in models])
        return 0
    title = f"Versions of model {args.name}" if args.name else "Models (latest versions)"
    table = Table(title=title)
    for column in ("name", "version", "labels", "run id", "path", "created", "tags"):
        table.add_column(column, overflow="fold")
    for m in models:
        table.add_row(
            m.name,
            str(m.version),
            ", ".join(m.labels),
            m.run_id,
            m.path,
            m.created_at.isoformat(timespec="seconds"),
            cell(", ".join(f"{k}={v}" for k, v in sorted(m.tags.items()))),
        )
    console.print(table)
    if not models:
        console.print("No model is registered: run.register_model(name, 'outputs/model.pkl') registers one.")
    return 0


def cmd_models_show(args: argparse.Namespace, console: Console) -> int:
    model = _model(args)
    if args.json:
        print_json(console, _as_dict(model))
        return 0
    table = Table(title=f"Model {model.name} version {model.version}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    info = model.run_info
    rows = [
        ("labels", ", ".join(model.labels) or "none"),
        ("run", f"{model.run_id} (experiment {info.get('experiment')}, target {info.get('target')})"),
        ("path", model.path),
        ("created", model.created_at.isoformat(timespec="seconds")),
        ("tags", ", ".join(f"{k}={v}" for k, v in sorted(model.tags.items())) or "none"),
        ("properties", ", ".join(f"{k}={v}" for k, v in sorted(model.properties.items())) or "none"),
        (
            "metrics",
            ", ".join(f"{k}={fmt(v)}" for k, v in sorted((info.get("metrics") or {}).items())) or "none",
        ),
        ("files", f"snapshot {model.snapshot_id} (`amlrun models download` writes them)"),
        ("code", f"snapshot {info.get('snapshot_id')}"),
        ("environment", str((info.get("environment") or {}).get("name"))),
    ]
    for key, value in rows:
        table.add_row(key, cell(value))
    console.print(table, highlight=False)
    return 0


def cmd_models_download(args: argparse.Namespace, console: Console) -> int:
    from airflow_amlrun import progress

    model = _model(args)
    with progress.reporting(ProgressBars()):
        path = model.download(args.target_dir, exist_ok=args.exist_ok)
    console.print(f"Model {model.name} version {model.version} written to {path}", highlight=False)
    return 0


def _version_or_label(parser: argparse.ArgumentParser) -> None:
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--version", type=int, default=None, help="a version number (default: the latest)")
    chosen.add_argument("--label", type=text("label"), default=None, help="a label, such as production")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `models list|show|download`."""
    models = sub.add_parser("models", help="registered models").add_subparsers(
        dest="models_command", required=True
    )
    listing = models.add_parser("list", help="the latest version of each model, or every version of one")
    listing.add_argument("name", nargs="?", default=None, help="list this model's versions, newest first")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_models_list)
    show = models.add_parser("show", help="one version of a model: its labels, run, metrics and files")
    show.add_argument("name", type=text("model name"))
    _version_or_label(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_models_show)
    download = models.add_parser("download", help="write a model's files into a folder, each checked")
    download.add_argument("name", type=text("model name"))
    download.add_argument("target_dir", type=folder, help="the folder to write into (created if missing)")
    _version_or_label(download)
    download.add_argument(
        "--exist-ok", action="store_true", help="write into a folder that holds other files (replacing none)"
    )
    download.set_defaults(func=cmd_models_download)
