import { useMemo, useRef, useState } from "react";

import { enc, type Run } from "../api";
import { ErrorBox, Loading } from "../components/common";
import { useApi, useShownInterval } from "../hooks";
import { RunDetail } from "./RunDetail";

interface TaskProps {
  dagId: string;
  runId: string;
  taskId: string;
  mapIndex?: string | number;
}

// The states of a task instance that stay as they are unless someone clears it: it will record no run.
const ENDED_STATES = new Set(["success", "failed", "skipped", "upstream_failed", "removed"]);
// How often the tab asks again while its task instance goes on (or is not known to have ended): its state, then
// its runs (a new try's run, the statuses of the ones shown).
const ASK_MS = 3000;
// How often, once the task instance ended, the tab asks whether it was cleared to run again: its state and try
// only, of Airflow's API. A clear (from this very page, whose tab stays shown) is seen within this much.
const ENDED_ASK_MS = 15_000;

/** A task instance's latest try as Airflow sees it. */
interface Try {
  state: string | null;
  tryNumber: number | null;
}

/** The latest try of a task instance, as Airflow's own API gives it to the same sign-in; null if it gives none. */
async function latestTry(dagId: string, runId: string, taskId: string, mapIndex: number | null): Promise<Try | null> {
  const path = `api/v2/dags/${enc(dagId)}/dagRuns/${enc(runId)}/taskInstances/${enc(taskId)}${mapIndex === null ? "" : `/${mapIndex}`}`;
  try {
    // Not waited for past the next turns: an API server that does not answer is asked again later.
    const answer = await fetch(new URL(path, document.baseURI), {
      credentials: "same-origin",
      signal: AbortSignal.timeout(10_000),
    });
    if (!answer.ok) return null;
    const body = (await answer.json()) as { state?: unknown; try_number?: unknown };
    return {
      state: typeof body.state === "string" ? body.state : null,
      tryNumber: typeof body.try_number === "number" ? body.try_number : null,
    };
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
  // The latest try of the task instance shown (its query's), as last seen.
  const [seen, setSeen] = useState<(Try & { of: string }) | null>(null);
  const latest = seen !== null && seen.of === query.toString() ? seen : null;
  const endedState = latest?.state != null && ENDED_STATES.has(latest.state) ? latest.state : null;
  // While the task instance goes on, its runs are read again at every turn: a try records its run once it has
  // built its environment, and a retry records another. Its state is read before its runs: a task records its
  // run before it ends, so the runs read after it has ended are all that try will have. Once it ended, only its
  // state is asked, more slowly: a clear makes it run again (a new try, in a new state), and its runs are read
  // again then. Tabs at rest on ended tasks (the common case) cost Airflow's API a small question every
  // ENDED_ASK_MS; a hidden page asks nothing, and asks at once when shown again.
  // One question at a time: on a slow API server, ticks neither pile requests up nor cut short the one on its
  // way (a reload asked before the last was answered would abort it).
  const asking = useRef(false);
  useShownInterval(
    async () => {
      if (asking.current || runs.pending) return;
      asking.current = true;
      try {
        const of = query.toString();
        const now = await latestTry(dagId, runId, taskId, mapped);
        if (now === null) {
          // Not known: asked again at the next turn; its runs meanwhile as those of a task that goes on.
          if (endedState === null) runs.reload();
          return;
        }
        const ended = now.state !== null && ENDED_STATES.has(now.state);
        const changed = latest === null || latest.state !== now.state || latest.tryNumber !== now.tryNumber;
        if (!ended || changed) runs.reload();
        setSeen({ of, ...now });
      } finally {
        asking.current = false;
      }
    },
    endedState === null ? ASK_MS : ENDED_ASK_MS,
    runs.data !== undefined,
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
    <div className="amlrun-task-run" data-task-state={endedState ?? undefined}>
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
