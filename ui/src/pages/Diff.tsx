import { useMemo, useState } from "react";

import type { SnapshotDiff } from "../api";
import { ErrorBox, Loading, RunLink, Section } from "../components/common";
import { useApi } from "../hooks";

/** How run B's code differs from run A's: the files added, removed and changed, and one file's unified diff. */
export function Diff({ runA, runB }: { runA: string; runB: string }) {
  const base = useMemo(() => new URLSearchParams({ run_a: runA, run_b: runB }), [runA, runB]);
  const listing = useApi<SnapshotDiff>("diff", base);
  const [chosen, setChosen] = useState<string | null>(null);
  const files = listing.data;
  const shown = chosen ?? files?.changed[0] ?? files?.added[0] ?? files?.removed[0] ?? null;
  const fileQuery = useMemo(() => {
    const q = new URLSearchParams(base);
    if (shown !== null) q.set("path", shown);
    return q;
  }, [base, shown]);
  const file = useApi<SnapshotDiff>(shown === null ? null : "diff", fileQuery);

  if (listing.error) return <ErrorBox error={listing.error} />;
  if (files === undefined) return <Loading />;
  const groups: [string, string[]][] = [
    ["changed", files.changed],
    ["added", files.added],
    ["removed", files.removed],
  ];
  const same = groups.every(([, paths]) => paths.length === 0);
  return (
    <div className="amlrun-page" data-page="diff">
      <header className="amlrun-page-header">
        <h2>
          Code of <RunLink runId={runA} /> → <RunLink runId={runB} />
        </h2>
      </header>
      {same ? (
        <div className="amlrun-muted">The two runs ran the same code.</div>
      ) : (
        <div className="amlrun-browser">
          <ul className="amlrun-file-list" aria-label="Files that differ">
            {groups.flatMap(([kind, paths]) =>
              paths.map((path) => (
                <li key={`${kind}:${path}`}>
                  <button
                    type="button"
                    className={`amlrun-file${path === shown ? " amlrun-file-on" : ""}`}
                    aria-current={path === shown}
                    onClick={() => setChosen(path)}
                  >
                    <span className="amlrun-mono">{path}</span>
                    <span className={`amlrun-diff-kind amlrun-diff-${kind}`}>{kind}</span>
                  </button>
                </li>
              )),
            )}
          </ul>
          <div className="amlrun-file-view">
            <Section title={shown ?? ""}>
              <ErrorBox error={file.error} />
              {file.data?.path === shown &&
                (file.data.diff === null ? (
                  <div className="amlrun-muted">A binary file: no line diff.</div>
                ) : (
                  <UnifiedDiff text={file.data.diff} />
                ))}
            </Section>
          </div>
        </div>
      )}
    </div>
  );
}

function UnifiedDiff({ text }: { text: string }) {
  const lines = text.replace(/\n$/, "").split("\n");
  return (
    <pre className="amlrun-code amlrun-udiff" aria-label="Unified diff">
      {lines.map((line, i) => {
        const kind = line.startsWith("+++") || line.startsWith("---") ? "file" : line.startsWith("@@") ? "hunk" : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "ctx";
        return (
          <span key={i} className={`amlrun-udiff-${kind}`} data-line={kind}>
            {line}
            {"\n"}
          </span>
        );
      })}
    </pre>
  );
}
