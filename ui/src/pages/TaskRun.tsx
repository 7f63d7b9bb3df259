import { useMemo, useRef, useState } from "react";

import { enc, type Run } from "../api";
import { ErrorBox, Loading } from "../components/common";
import { useApi, useInterval } from "../hooks";
import { RunDetail } from "./RunDetail";

interface TaskProps {
  dagId: string;
  runId: string;
  taskId: string;
  mapIndex?: string | number;
}

// The states of a task instance that stay as they are unless someone clears it: it will record no run.
const ENDED_STATES = new Set(["success", "failed", "skipped", "upstream_failed", "removed"]);

/** The state of a task instance, as Airflow's own API gives it to the same sign-in; null if it gives none. */
async function taskInstanceState(dagId: string, runId: string, taskId: string, mapIndex: number | null): Promise<string | null> {
  const path = `api/v2/dags/${enc(dagId)}/dagRuns/${enc(runId)}/taskInstances/${enc(taskId)}${mapIndex === null ? "" : `/${mapIndex}`}`;
  try {
    // Not waited for past the next turns: an API server that does not answer is asked again later.
    const answer = await fetch(new URL(path, document.baseURI), {
      credentials: "same-origin",
      signal: AbortSignal.timeout(10_000),
    });
    if (!answer.ok) return null;
    const body = (await answer.json()) as { state?: unknown };
    return typeof body.state === "string" ? body.state : null;
  } catch {
    return null; // Unknown: asked again at the next turn.
  }
}

/** The "Training run" tab of a task instance: the run its latest try submitted (an earlier try's on demand). */
export function TaskRun({ dagId, runId, taskId, mapIndex }: TaskProps) {
  const mapped = mapIndex !== undefined && mapIndex !== "" && Number(mapIndex) >= 0 ? Number(mapIndex) : null;
  const query = useMemo(() => {
    const q = new URLSearchParams({ dag_id: dagId, run_id: runId, task_id: taskId });
    if (mapped !== null) q.set("map_index", String(mapped));
    return q;
  }, [dagId, runId, taskId, mapped]);
  const runs = useApi<Run[]>("task-runs", query);
  const [chosen, setChosen] = useState<string | null>(null);
  // The final state of the task instance shown (its query's), once it has one.
  const [ended, setEnded] = useState<{ of: string; state: string } | null>(null);
  const endedState = ended !== null && ended.of === query.toString() ? ended.state : null;
  // A task that has not submitted its run yet (queued, building its environment) is asked again, until it
  // ends. Its state is read before its runs: a task records its run before it ends, so the runs read after
  // it has ended are all it will have.
  // One question at a time: on a slow API server, ticks neither pile requests up nor cut short the one on its
  // way (a reload asked before the last was answered would abort it).
  const asking = useRef(false);
  useInterval(
    async () => {
      if (asking.current || runs.pending) return;
      asking.current = true;
      try {
        const of = query.toString();
        const state = await taskInstanceState(dagId, runId, taskId, mapped);
        runs.reload();
        if (state !== null && ENDED_STATES.has(state)) setEnded({ of, state });
      } finally {
        asking.current = false;
      }
    },
    3000,
    runs.data !== undefined && runs.data.length === 0 && endedState === null,
  );

  if (runs.error) return <ErrorBox error={runs.error} />;
  if (runs.data === undefined) return <Loading />;
  if (runs.data.length === 0) {
    return (
      <div className="amlrun-page amlrun-muted" data-task-state={endedState ?? undefined}>
        {endedState === null
          ? "This task instance has recorded no training run yet."
          : `This task instance ended (${endedState}) without recording a training run.`}
      </div>
    );
  }
  const shown = chosen ?? runs.data[0]!.run_id;
  return (
    <div className="amlrun-task-run">
      {runs.data.length > 1 && (
        <label className="amlrun-muted">
          run of{" "}
          <select value={shown} onChange={(e) => setChosen(e.target.value)} aria-label="Run of try">
            {runs.data.map((r) => (
              <option key={r.run_id} value={r.run_id}>
                try {r.airflow.try_number ?? "?"}: {r.run_id} ({r.status})
              </option>
            ))}
          </select>
        </label>
      )}
      <RunDetail runId={shown} embedded />
    </div>
  );
}
