import type { ReactNode } from "react";
import { useNavigate } from "react-router-dom";

import { FINISHED, type Run, type RunDetail } from "../api";
import { formatValue, RunLink, Section, StatusBadge } from "../components/common";
import { pagePath } from "../routes";
import { commandLine, GitTable } from "./RunSections";

// The sections of a sweep's parent run (target hyperdrive). A sweep runs no code of its own: it starts runs, each
// of which runs the recorded command with the values it drew added, takes a snapshot of its code and writes its
// log. Where a run's page shows what it ran, a sweep's says so and leads to its runs.

/** Where the sweep's runs are, for a section that has nothing of the sweep's own to show: its first and best runs
 * linked, and how many it has (`runs`: the sweep's, oldest first; undefined while they are read). */
function SweepRunLinks({ run, runs, label }: { run: RunDetail; runs: Run[] | undefined; label: string }) {
  const first = runs?.[0]?.run_id;
  const best = typeof run.tags.best_run_id === "string" ? run.tags.best_run_id : null;
  if (runs === undefined) return null;
  if (first === undefined) {
    return <div className="amlrun-muted">{FINISHED.has(run.status) ? "It recorded no runs." : "None of its runs is recorded yet."}</div>;
  }
  return (
    <dl className="amlrun-facts" aria-label={label}>
      <div>
        <dt>First run</dt>
        <dd>
          <RunLink runId={first} />
        </dd>
      </div>
      {best !== null && (
        <div>
          <dt>Best run</dt>
          <dd>
            <RunLink runId={best} />
          </dd>
        </div>
      )}
      <div>
        <dt>All runs</dt>
        <dd>{runs.length}, under Sweep runs above</dd>
      </div>
    </dl>
  );
}

/** The code section of a sweep, which has no snapshot: each of its runs took its own as it was submitted. */
export function SweepCode({ run, runs }: { run: RunDetail; runs: Run[] | undefined }) {
  return (
    <Section title="Code">
      <div className="amlrun-muted">
        A sweep runs no code of its own, so it has no snapshot: each of its runs ran the code of a snapshot of its own,
        shown on that run's page.
      </div>
      <SweepRunLinks run={run} runs={runs} label="Code of the sweep's runs" />
    </Section>
  );
}

/** The log section of a sweep, which writes none: each of its runs has its log. */
export function SweepLog({ run, runs }: { run: RunDetail; runs: Run[] | undefined }) {
  return (
    <Section title="Log">
      <div className="amlrun-muted">A sweep runs no code of its own, so it has no log: each of its runs has its log, shown on that run's page.</div>
      <SweepRunLinks run={run} runs={runs} label="Logs of the sweep's runs" />
    </Section>
  );
}

/** The git section of a sweep, which has no git state: each of its runs recorded that of the code it ran. */
export function SweepGit({ run, runs }: { run: RunDetail; runs: Run[] | undefined }) {
  return (
    <Section title="Git">
      <div className="amlrun-muted">
        A sweep runs no code of its own, so it has no git state: each of its runs records that of its code, shown on that run's page
        {run.sweep?.git ? ". All of them ran this code:" : "."}
      </div>
      {run.sweep?.git && <GitTable git={run.sweep.git} />}
      <SweepRunLinks run={run} runs={runs} label="Git state of the sweep's runs" />
    </Section>
  );
}

/** The arguments section of a sweep: the command each of its runs runs, the values it draws left open, and how
 * the sweep draws them, as it recorded it. */
export function SweepArguments({ run }: { run: RunDetail }) {
  const sweep = run.sweep;
  const facts: [string, ReactNode][] =
    sweep === null
      ? []
      : [
          ["Sampling", sweep.seed === null ? sweep.sampling : `${sweep.sampling}, seed ${sweep.seed}`],
          ["Primary metric", `${sweep.primary_metric_name}, ${sweep.primary_metric_goal}`],
          ["Early termination", sweep.policy ?? "none: every run goes on to its end"],
          ["Runs", `at most ${sweep.max_total_runs}, ${sweep.max_concurrent_runs ?? 1} at a time`],
          ["Time limit", sweep.max_duration_minutes === null ? "none" : `${formatValue(sweep.max_duration_minutes)} minutes`],
        ];
  return (
    <Section title="Arguments">
      <div className="amlrun-muted">
        A sweep runs no command of its own. Each of its runs runs this one,{" "}
        {sweep === null ? "with the values it drew added" : "with a value it drew for each parameter of the search space below"}; a
        run's page shows its values.
      </div>
      <div className="amlrun-mono amlrun-command" aria-label="Each run's command">
        {[commandLine(run), ...(sweep?.drawn_arguments ?? [])].join(" ")}
      </div>
      {sweep !== null && (
        <>
          <table className="amlrun-table amlrun-compact" aria-label="Search space">
            <thead>
              <tr>
                <th>Parameter</th>
                <th>Values</th>
              </tr>
            </thead>
            <tbody>
              {Object.entries(sweep.parameter_space).map(([name, values]) => (
                <tr key={name}>
                  <td className="amlrun-mono">{name}</td>
                  <td className="amlrun-mono">{values}</td>
                </tr>
              ))}
            </tbody>
          </table>
          <dl className="amlrun-facts" aria-label="How the sweep searched">
            {facts.map(([k, v]) => (
              <div key={k}>
                <dt>{k}</dt>
                <dd>{v}</dd>
              </div>
            ))}
          </dl>
        </>
      )}
    </Section>
  );
}

/** The runs of a sweep, with a link to compare them all; nothing for a run that has none. */
export function SweepRuns({ runs }: { runs: Run[] }) {
  const navigate = useNavigate();
  if (runs.length === 0) return null;
  const metrics = [...new Set(runs.flatMap((r) => Object.keys(r.metrics)))].slice(0, 6);
  return (
    <Section
      title={`Sweep runs (${runs.length})`}
      actions={
        <button type="button" className="amlrun-button amlrun-primary" onClick={() => navigate(pagePath.compare(runs.slice(0, 100).map((r) => r.run_id)))}>
          Compare the sweep's runs
        </button>
      }
    >
      <table className="amlrun-table amlrun-compact" aria-label="Sweep runs">
        <thead>
          <tr>
            <th>Run</th>
            <th>Status</th>
            <th>Parameters</th>
            {metrics.map((m) => (
              <th key={m}>{m}</th>
            ))}
          </tr>
        </thead>
        <tbody>
          {runs.map((r) => (
            <tr key={r.run_id}>
              <td>
                <RunLink runId={r.run_id} />
              </td>
              <td>
                <StatusBadge status={r.status} />
              </td>
              <td className="amlrun-params">
                {Object.entries(r.parameters)
                  .map(([k, v]) => `${k}=${formatValue(v)}`)
                  .join(" ")}
              </td>
              {metrics.map((m) => (
                <td key={m} className="amlrun-number">
                  {formatValue(r.metrics[m])}
                </td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
    </Section>
  );
}
