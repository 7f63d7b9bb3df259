"""Follows a run that `amlrun submit` (without --wait) started, in a process of its own, to its end:
``python -m airflow_amlrun.cli.follow RUN_ID STATE [--conn-id ID]``, where STATE is the JSON of what the
submitting process handed over (``ScriptRun.hand_over``). It records the outcome as a task would."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from airflow_amlrun.run import FollowState, ScriptRun
    from airflow_amlrun.workspace import Workspace

    parser = argparse.ArgumentParser(prog="python -m airflow_amlrun.cli.follow")
    parser.add_argument("run_id")
    parser.add_argument("state", help="the JSON of the FollowState handed over")
    parser.add_argument("--conn-id", default=None)
    args = parser.parse_args(argv)
    run = ScriptRun.resumed(
        Workspace.get(args.conn_id), args.run_id, FollowState.from_json(json.loads(args.state))
    )
    record = run.wait_for_completion(show_output=False, raise_on_error=False)
    print(f"Run {record.id} {record.status}{': ' + record.error if record.error else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
