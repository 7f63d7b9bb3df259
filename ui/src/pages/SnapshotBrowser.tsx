import { useMemo, useState } from "react";

import { enc, type SnapshotFile } from "../api";
import { Code } from "../components/Code";
import { ErrorBox, formatBytes, Section } from "../components/common";
import { useApi } from "../hooks";

interface FileText {
  path: string;
  size: number;
  text: string | null;
}

/** The code the run ran, as its snapshot holds it: the files, and one of them highlighted. */
export function SnapshotBrowser({ runId, hasSnapshot }: { runId: string; hasSnapshot: boolean }) {
  const snapshot = useApi<{ snapshot_id: string; files: SnapshotFile[] }>(hasSnapshot ? `runs/${enc(runId)}/snapshot` : null);
  const files = snapshot.data?.files ?? [];
  const [chosen, setChosen] = useState<string | null>(null);
  // The script first, else the first file: something to read at once.
  const shown = chosen ?? files.find((f) => f.path.endsWith(".py"))?.path ?? files[0]?.path ?? null;
  const query = useMemo(() => (shown === null ? undefined : new URLSearchParams({ path: shown })), [shown]);
  const file = useApi<FileText>(shown === null ? null : `runs/${enc(runId)}/snapshot/file`, query);

  if (!hasSnapshot) {
    return (
      <Section title="Code">
        <div className="amlrun-muted">No code snapshot (the run did not start).</div>
      </Section>
    );
  }
  return (
    <Section title={`Code${snapshot.data ? ` · snapshot ${snapshot.data.snapshot_id.slice(0, 12)}` : ""}`}>
      <ErrorBox error={snapshot.error} />
      <div className="amlrun-browser">
        <ul className="amlrun-file-list" aria-label="Files">
          {files.map((f) => (
            <li key={f.path}>
              <button
                type="button"
                className={`amlrun-file${f.path === shown ? " amlrun-file-on" : ""}`}
                aria-current={f.path === shown}
                onClick={() => setChosen(f.path)}
                title={f.link ? `link to ${f.link}` : formatBytes(f.size)}
              >
                <span className="amlrun-mono">{f.path}</span>
                <span className="amlrun-muted">{f.link ? "link" : formatBytes(f.size)}</span>
              </button>
            </li>
          ))}
        </ul>
        <div className="amlrun-file-view">
          <ErrorBox error={file.error} />
          {file.data && file.data.path === shown && (
            file.data.text === null ? (
              <div className="amlrun-muted">
                {file.data.path}: {formatBytes(file.data.size)}, not shown (binary, or over 1 MiB).
              </div>
            ) : (
              <Code path={file.data.path} text={file.data.text} />
            )
          )}
        </div>
      </div>
    </Section>
  );
}
