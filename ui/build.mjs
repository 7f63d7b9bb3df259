// Builds the pages into one ES module the Airflow UI imports (see docs/ui.md): React, its JSX runtime and the
// router are the Airflow UI's own (it sets them on globalThis for its plugins), everything else is bundled.
import { build } from "esbuild";
import { fileURLToPath } from "node:url";

const HOST_GLOBALS = {
  react: "React",
  "react-dom": "ReactDOM",
  "react/jsx-runtime": "ReactJSXRuntime",
  "react-router-dom": "ReactRouterDOM",
};

const hostGlobals = {
  name: "host-globals",
  setup(b) {
    b.onResolve({ filter: /^(react|react-dom|react\/jsx-runtime|react-router-dom)$/ }, (args) => ({
      path: args.path,
      namespace: "host-global",
    }));
    b.onLoad({ filter: /.*/, namespace: "host-global" }, (args) => ({
      contents: `module.exports = globalThis.${HOST_GLOBALS[args.path]};`,
      loader: "js",
    }));
  },
};

const outfile = fileURLToPath(new URL("../airflow_amlrun/plugin/static/amlrun-ui.js", import.meta.url));
const result = await build({
  entryPoints: [fileURLToPath(new URL("src/main.tsx", import.meta.url))],
  bundle: true,
  format: "esm",
  target: "es2020",
  minify: true,
  jsx: "automatic",
  // The licenses of the bundled libraries (uPlot, highlight.js) stay with their code.
  legalComments: "eof",
  loader: { ".css": "text" },
  define: { "process.env.NODE_ENV": '"production"' },
  plugins: [hostGlobals],
  outfile,
  metafile: true,
  logLevel: "warning",
});
const size = Object.values(result.metafile.outputs)[0].bytes;
console.log(`${outfile}: ${(size / 1024).toFixed(1)} KiB`);
