import { useState } from "react";

import { apiUrl, enc, getText, type Json, type RunDetail } from "../api";
import { Code } from "../components/Code";
import { ErrorBox, formatValue, Section, ValuesTable } from "../components/common";
import { useApi } from "../hooks";

/** The command line the run ran: its command, or python and its script, then its arguments as a shell takes them. */
export function commandLine(run: RunDetail): string {
  return [run.command ?? `python ${run.script ?? ""}`, ...run.arguments.map(quoteArgument)].join(" ");
}

function quoteArgument(value: Json): string {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replace(/'/g, "'\\''")}'`;
}

/** The command line the run ran, and the parameters read from its arguments. */
export function ArgumentsSection({ run }: { run: RunDetail }) {
  const entries = Object.entries(run.parameters);
  return (
    <Section title="Arguments">
      <div className="amlrun-mono amlrun-command">{commandLine(run)}</div>
      {entries.length > 0 && <ValuesTable label="Parameters" entries={entries} />}
    </Section>
  );
}

/** The environment the run used: its name and version, what it was built from, and its lock on demand. */
export function EnvironmentSection({ run }: { run: RunDetail }) {
  const [lock, setLock] = useState<{ text?: string; error?: Error }>();
  const environment = run.environment ?? {};
  const hasLock = typeof environment.lock_digest === "string";
  const showLock = () =>
    getText(`runs/${enc(run.run_id)}/environment/lock`).then(
      (text) => setLock({ text }),
      (error: Error) => setLock({ error }),
    );
  const entries = Object.entries(environment).filter(([k]) => k !== "lock_digest");
  return (
    <Section
      title="Environment"
      actions={
        hasLock && lock === undefined ? (
          <button type="button" className="amlrun-button" onClick={showLock}>
            Show the lock
          </button>
        ) : undefined
      }
    >
      {entries.length === 0 ? (
        <div className="amlrun-muted">No environment recorded (the worker's own Python).</div>
      ) : (
        <ValuesTable label="Environment" entries={entries} />
      )}
      <ErrorBox error={lock?.error} />
      {lock?.text !== undefined && <Code path="requirements.lock.txt" text={lock.text} />}
    </Section>
  );
}

// Hosts whose commit pages are known: <repository>/commit/<sha> (Bitbucket: /commits/).
const COMMIT_PATHS: Record<string, string> = {
  "github.com": "commit",
  "gitlab.com": "-/commit",
  "codeberg.org": "commit",
  "bitbucket.org": "commits",
};

/** The web page of a commit, for a repository on a known host (https or scp-like ssh address); else null. */
export function commitUrl(repository: string, commit: string): string | null {
  const scp = /^[\w.-]+@([\w.-]+):(.+)$/.exec(repository);
  let host: string;
  let path: string;
  if (scp) {
    [, host = "", path = ""] = scp;
  } else {
    try {
      const url = new URL(repository);
      host = url.hostname;
      path = url.pathname;
    } catch {
      return null;
    }
  }
  const commitPath = COMMIT_PATHS[host.toLowerCase()];
  if (commitPath === undefined || !/^[0-9a-f]{7,40}$/i.test(commit)) return null;
  const project = path.replace(/^\/+/, "").replace(/\.git$/, "").replace(/\/+$/, "");
  if (!project) return null;
  return `https://${host}/${project}/${commitPath}/${commit}`;
}

export function GitSection({ git }: { git: Record<string, Json> | null }) {
  return (
    <Section title="Git">
      {git === null || Object.keys(git).length === 0 ? (
        <div className="amlrun-muted">The code was not in a git checkout.</div>
      ) : (
        <GitTable git={git} />
      )}
    </Section>
  );
}

/** Where the code came from: its repository, branch and commit (a link where the host is known), and whether it
 * had uncommitted changes. */
export function GitTable({ git }: { git: Record<string, Json> }) {
  const repository = typeof git.repository_uri === "string" ? git.repository_uri : null;
  const commit = typeof git.commit === "string" ? git.commit : null;
  const link = repository && commit ? commitUrl(repository, commit) : null;
  return (
    <table className="amlrun-table amlrun-compact" aria-label="Git">
      <tbody>
        <tr>
          <th>repository</th>
          <td className="amlrun-mono">{repository ?? "—"}</td>
        </tr>
        <tr>
          <th>branch</th>
          <td className="amlrun-mono">{formatValue(git.branch)}</td>
        </tr>
        <tr>
          <th>commit</th>
          <td className="amlrun-mono">
            {link ? (
              <a className="amlrun-link" href={link} target="_blank" rel="noopener noreferrer">
                {commit}
              </a>
            ) : (
              (commit ?? "—")
            )}
            {git.dirty === true && <span className="amlrun-warning"> (with uncommitted changes)</span>}
          </td>
        </tr>
      </tbody>
    </table>
  );
}

/** The files the run left in outputs/, each a download. */
export function OutputsSection({ run }: { run: RunDetail }) {
  const outputs = useApi<{ path: string }[]>(run.has_outputs ? `runs/${enc(run.run_id)}/outputs` : null);
  const files = outputs.data ?? [];
  return (
    <Section title="Outputs">
      <ErrorBox error={outputs.error} />
      {files.length === 0 ? (
        <div className="amlrun-muted">{run.has_outputs ? "The run left no files in outputs/." : "No outputs collected (yet)."}</div>
      ) : (
        <ul className="amlrun-files" aria-label="Outputs">
          {files.map((f) => (
            <li key={f.path}>
              <a className="amlrun-link amlrun-mono" href={apiUrl(`runs/${enc(run.run_id)}/outputs/${f.path.split("/").map(enc).join("/")}`)} download>
                {f.path}
              </a>
            </li>
          ))}
        </ul>
      )}
    </Section>
  );
}
