import { useMemo, useState } from "react";

import type { Run } from "../api";
import { ErrorBox, Loading } from "../components/common";
import { useApi, useInterval } from "../hooks";
import { RunDetail } from "./RunDetail";

interface TaskProps {
  dagId: string;
  runId: string;
  taskId: string;
  mapIndex?: string | number;
}

/** The "Training run" tab of a task instance: the run its latest try submitted (an earlier try's on demand). */
export function TaskRun({ dagId, runId, taskId, mapIndex }: TaskProps) {
  const query = useMemo(() => {
    const q = new URLSearchParams({ dag_id: dagId, run_id: runId, task_id: taskId });
    if (mapIndex !== undefined && mapIndex !== "" && Number(mapIndex) >= 0) q.set("map_index", String(mapIndex));
    return q;
  }, [dagId, runId, taskId, mapIndex]);
  const runs = useApi<Run[]>("task-runs", query);
  const [chosen, setChosen] = useState<string | null>(null);
  // A task that has not submitted its run yet (queued, building its environment) is asked again.
  useInterval(runs.reload, 3000, runs.data !== undefined && runs.data.length === 0);

  if (runs.error) return <ErrorBox error={runs.error} />;
  if (runs.data === undefined) return <Loading />;
  if (runs.data.length === 0) {
    return <div className="amlrun-page amlrun-muted">This task instance has recorded no training run.</div>;
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
