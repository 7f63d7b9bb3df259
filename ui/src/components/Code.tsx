import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import dockerfile from "highlight.js/lib/languages/dockerfile";
import ini from "highlight.js/lib/languages/ini";
import json from "highlight.js/lib/languages/json";
import makefile from "highlight.js/lib/languages/makefile";
import markdown from "highlight.js/lib/languages/markdown";
import python from "highlight.js/lib/languages/python";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";
import { useMemo } from "react";

// The languages of a training run's code: scripts, their configuration and their packaging.
const LANGUAGES = { bash, dockerfile, ini, json, makefile, markdown, python, xml, yaml };
for (const [name, language] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, language);

const BY_EXTENSION: Record<string, string> = {
  py: "python",
  pyi: "python",
  ipynb: "json",
  json: "json",
  yaml: "yaml",
  yml: "yaml",
  toml: "ini",
  cfg: "ini",
  ini: "ini",
  sh: "bash",
  bash: "bash",
  md: "markdown",
  xml: "xml",
  html: "xml",
};

/** The highlight.js language of a file, from its name; undefined for plain text. */
export function languageOf(path: string): string | undefined {
  const name = path.split("/").pop() ?? path;
  if (name === "Dockerfile" || name.endsWith(".dockerfile")) return "dockerfile";
  if (name === "Makefile") return "makefile";
  const extension = name.includes(".") ? name.split(".").pop()!.toLowerCase() : "";
  return BY_EXTENSION[extension];
}

/** A file's text with line numbers, highlighted for its language (highlight.js escapes the text). */
export function Code({ path, text }: { path: string; text: string }) {
  const language = languageOf(path);
  const lines = useMemo(() => {
    const html = language ? hljs.highlight(text, { language, ignoreIllegals: true }).value : escape(text);
    return splitHighlighted(html);
  }, [language, text]);
  return (
    <pre className="amlrun-code hljs" data-language={language ?? "text"} aria-label={`${path} (${language ?? "text"})`}>
      <code>
        {lines.map((line, i) => (
          <span className="amlrun-code-line" key={i}>
            <span className="amlrun-code-number" aria-hidden="true">
              {i + 1}
            </span>
            {/* highlight.js output: the file's text escaped, inside its own <span class="hljs-..."> tags. */}
            <span dangerouslySetInnerHTML={{ __html: line }} />
          </span>
        ))}
      </code>
    </pre>
  );
}

function escape(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

/** Highlighted HTML cut into lines, each closing the spans still open at its end and reopening them on the next. */
function splitHighlighted(html: string): string[] {
  const lines: string[] = [];
  const open: string[] = [];
  let current = "";
  const tokens = html.split(/(<span[^>]*>|<\/span>|\n)/);
  for (const token of tokens) {
    if (token === "\n") {
      lines.push(current + "</span>".repeat(open.length));
      current = open.join("");
    } else if (token.startsWith("<span")) {
      open.push(token);
      current += token;
    } else if (token === "</span>") {
      open.pop();
      current += token;
    } else {
      current += token;
    }
  }
  if (current !== "" || lines.length === 0) lines.push(current + "</span>".repeat(open.length));
  if (lines.length > 1 && lines[lines.length - 1] === "") lines.pop();
  return lines;
}
