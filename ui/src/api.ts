// The run-history API of the plugin (airflow_amlrun/plugin/runs_api.py), as the pages read it. The browser
// sends the Airflow UI's sign-in cookie with every request: the API answers with what that user may see.

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface AirflowTask {
  dag_id: string | null;
  task_id: string | null;
  run_id: string | null;
  map_index: number | null;
  try_number: number | null;
}

export interface Run {
  run_id: string;
  experiment: string;
  status: string;
  target: string;
  created_at: string;
  start: string | null;
  end: string | null;
  duration_seconds: number | null;
  airflow: AirflowTask;
  parameters: Record<string, Json>;
  tags: Record<string, Json>;
  metrics: Record<string, Json>;
}

export interface RunPage {
  runs: Run[];
  next_cursor: string | null;
}

export interface MetricSummary {
  name: string;
  count: number;
  numeric_count: number;
  last_step: number | null;
  last: Json;
  min: number | null;
  max: number | null;
}

export interface RunDetail extends Run {
  script: string | null;
  command: string | null;
  arguments: Json[];
  environment: Record<string, Json> | null;
  snapshot_id: string | null;
  git: Record<string, Json> | null;
  error: string | null;
  heartbeat_at: string | null;
  max_run_duration_seconds: number | null;
  parent_run_id: string | null;
  rerun_of: string | null;
  has_log: boolean;
  has_outputs: boolean;
  metric_summaries: MetricSummary[];
  sweep: Sweep | null;
}

/** How a sweep searched, as its parent run recorded it (runs_api.py SweepOut). */
export interface Sweep {
  sampling: string;
  seed: number | null;
  parameter_space: Record<string, string>;
  drawn_arguments: string[];
  primary_metric_name: string;
  primary_metric_goal: string;
  policy: string | null;
  max_total_runs: number;
  max_concurrent_runs: number | null;
  max_duration_minutes: number | null;
  /** The git state every run of the sweep recorded, when it is the same for all of them. */
  git: Record<string, Json> | null;
}

export interface Series {
  name: string;
  x: number[];
  values: number[];
  points: number;
  sampled: boolean;
}

export interface Comparison {
  runs: { run_id: string; experiment: string; status: string; parameters: Record<string, Json>; metrics: Record<string, Json> }[];
  differing_parameters: string[];
  differing_metrics: string[];
  series: { run_id: string; series: Series[] }[];
}

export interface LogChunk {
  lines: string[];
  target_offset: number;
  store_offset: number;
  ended: boolean;
  status: string;
}

export interface SnapshotFile {
  path: string;
  size: number;
  digest: string | null;
  link: string | null;
}

export interface SnapshotDiff {
  run_a: string;
  run_b: string;
  added: string[];
  removed: string[];
  changed: string[];
  path: string | null;
  diff: string | null;
}

export interface Experiment {
  name: string;
  runs: number;
  created_at: string;
  last_run_at: string | null;
}

export const FINISHED = new Set(["Completed", "Failed", "Canceled"]);

// The target a sweep's parent run records (airflow_amlrun/runconfig.py SWEEP_TARGET): it runs no code of its own.
export const SWEEP_TARGET = "hyperdrive";

/** The address of a path of the plugin's app, under whatever base the Airflow UI is served from. */
export function apiUrl(path: string, query?: URLSearchParams): string {
  const url = new URL(`amlrun/api/${path}`, document.baseURI);
  if (query !== undefined) url.search = query.toString();
  return url.toString();
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export async function getJson<T>(path: string, query?: URLSearchParams, signal?: AbortSignal): Promise<T> {
  const answer = await fetch(apiUrl(path, query), { credentials: "same-origin", signal });
  if (!answer.ok) {
    let detail = answer.statusText;
    try {
      const body = (await answer.json()) as { detail?: unknown };
      if (typeof body.detail === "string") detail = body.detail;
    } catch {
      // Not JSON: the status text says it.
    }
    throw new ApiError(answer.status, detail);
  }
  return (await answer.json()) as T;
}

export async function getText(path: string): Promise<string> {
  const answer = await fetch(apiUrl(path), { credentials: "same-origin" });
  if (!answer.ok) throw new ApiError(answer.status, answer.statusText);
  return answer.text();
}

export const enc = encodeURIComponent;
