// Every code example of clients/node/README.md (and the JavaScript of the
// top-level README.md) runs as written, in README order, against a real
// `keyhavend dev` and, for the node-postgres examples, a throwaway
// PostgreSQL: each ```js block as an ES module importing 'keyhaven' from an
// application folder, each ```sh block with `sh -e` and the CLI on PATH.
// A block must exit 0, and print what its `// prints: TEXT` comments say,
// line for line. A block that is not meant to run as it stands is marked
// `<!-- readme-test: fragment -->` on the line before it (none today).
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { PG_BIN, ROOT, startDaemon } from './daemon.js';

const PKG = path.join(ROOT, 'clients/node');
const RUNNABLE = new Set(['js', 'javascript', 'mjs', 'ts', 'sh']);

/** The fenced blocks of a Markdown file: {lang, code, line, marker}. */
function codeBlocks(file) {
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  const blocks = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\S*)\s*$/.exec(lines[i]);
    if (!open) continue;
    let j = i + 1;
    while (j < lines.length && lines[j] !== '```') j++;
    assert.ok(j < lines.length, `${file}:${i + 1}: a code block that never closes`);
    let k = i - 1;
    while (k >= 0 && lines[k].trim() === '') k--;
    const marker = k >= 0 ? /^<!-- readme-test: (.*?) -->$/.exec(lines[k].trim())?.[1] ?? null : null;
    blocks.push({ lang: open[1], code: lines.slice(i + 1, j).join('\n') + '\n', line: i + 1, marker });
    i = j;
  }
  return blocks;
}

/** What a block says it prints: the TEXT of each `// prints: TEXT`, in order. */
function expectedOutput(code) {
  return [...code.matchAll(/\/\/ prints: (.*)$/gm)].map((m) => m[1]);
}

const blocks = [
  ...codeBlocks(path.join(PKG, 'README.md')).map((b) => ({ ...b, file: 'clients/node/README.md' })),
  ...codeBlocks(path.join(ROOT, 'README.md'))
    .filter((b) => ['js', 'javascript', 'mjs', 'ts'].includes(b.lang))
    .map((b) => ({ ...b, file: 'README.md' })),
].filter((b) => RUNNABLE.has(b.lang));

// PostgreSQL's server binaries (PG_BIN, test/daemon.js), as test/fields.test.js uses them.
const pgMissing = !fs.existsSync(path.join(PG_BIN, 'initdb'))
  ? `PostgreSQL is not installed: no ${PG_BIN}/initdb (apt-get install postgresql, or set KEYHAVEN_PG_BIN)`
  : !fs.existsSync(path.join(PKG, 'node_modules/pg'))
    ? 'the pg package is not installed (npm ci installs it: a devDependency)'
    : false;
const asNobody = process.getuid() === 0 ? ['runuser', '-u', 'nobody', '--'] : [];

let d;
let app; // the application folder the examples run in
let pgDir = null;
let env;

function pgRun(bin, ...args) {
  const [cmd, ...rest] = [...asNobody, path.join(PG_BIN, bin), ...args];
  execFileSync(cmd, rest, { cwd: pgDir, stdio: ['ignore', 'pipe', 'pipe'] });
}

before(async () => {
  d = await startDaemon();
  app = fs.mkdtempSync(path.join(os.tmpdir(), 'kh-node-readme-'));
  // An application that installed the package (and pg): node_modules links.
  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  fs.mkdirSync(path.join(app, 'node_modules'));
  fs.symlinkSync(PKG, path.join(app, 'node_modules/keyhaven'));
  if (fs.existsSync(path.join(PKG, 'node_modules/pg'))) {
    fs.symlinkSync(path.join(PKG, 'node_modules/pg'), path.join(app, 'node_modules/pg'));
  }
  env = {
    ...process.env,
    KEYHAVEN_SOCKET: d.socket,
    PATH: `${path.join(ROOT, 'target/debug')}:${process.env.PATH}`,
  };
  if (!pgMissing) {
    pgDir = fs.mkdtempSync(path.join(os.tmpdir(), 'kh-pg-readme-'));
    if (asNobody.length) execFileSync('chown', ['nobody:nogroup', pgDir]);
    pgRun('initdb', '-D', path.join(pgDir, 'data'), '-U', 'kh', '-A', 'trust', '--no-sync', '-E', 'UTF8');
    pgRun('pg_ctl', 'start', '-w', '-D', path.join(pgDir, 'data'), '-l', path.join(pgDir, 'log'),
      '-o', `-k ${pgDir} -c listen_addresses= -c fsync=off`);
    Object.assign(env, { PGHOST: pgDir, PGUSER: 'kh', PGDATABASE: 'postgres' });
  }
});

after(async () => {
  await d?.stop();
  if (pgDir) {
    try {
      pgRun('pg_ctl', 'stop', '-m', 'fast', '-w', '-D', path.join(pgDir, 'data'));
    } finally {
      fs.rmSync(pgDir, { recursive: true, force: true });
    }
  }
  if (app) fs.rmSync(app, { recursive: true, force: true });
});

test('the READMEs have the examples this test runs', () => {
  const run = blocks.filter((b) => b.marker !== 'fragment');
  assert.ok(run.filter((b) => b.file === 'clients/node/README.md' && b.lang === 'js').length >= 4);
  assert.ok(run.some((b) => b.file === 'README.md'), 'the top-level README has a JavaScript example');
  for (const b of blocks) {
    assert.ok(b.marker === null || b.marker === 'fragment', `${b.file}:${b.line}: unknown marker ${b.marker}`);
  }
});

for (const [n, b] of blocks.entries()) {
  const usesPg = /from 'pg'/.test(b.code);
  const skip = b.marker === 'fragment' ? 'marked as a fragment' : usesPg && pgMissing;
  test(`${b.file}:${b.line} (${b.lang}) runs as written`, { skip }, () => {
    if (b.code.includes("'backup.tar'")) {
      // The Sealer example streams a file the user has: make one (1 MiB and a bit).
      fs.writeFileSync(path.join(app, 'backup.tar'), randomBytes((1 << 20) + 123));
    }
    if (b.code.includes('reindexBlindIndex(')) {
      // Re-indexing is for after a rotation of the index key: rotate it, as a user would.
      execFileSync('keyhaven', ['key', 'rotate', 'acme/email-index'], { env, stdio: 'ignore' });
    }
    let r;
    if (b.lang === 'sh') {
      r = spawnSync('sh', ['-e', '-c', b.code], { cwd: app, env, encoding: 'utf8', timeout: 20000 });
    } else {
      const file = path.join(app, `example-${n}.mjs`);
      fs.writeFileSync(file, b.code);
      r = spawnSync(process.execPath, [file], { cwd: app, env, encoding: 'utf8', timeout: 20000 });
    }
    assert.equal(r.status, 0, `exit ${r.status} ${r.signal ?? ''}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
    if (b.lang !== 'sh') {
      assert.deepEqual(r.stdout.split('\n').filter((l) => l !== ''), expectedOutput(b.code), r.stderr);
    }
    if (b.code.includes("'backup.tar'")) {
      assert.ok(fs.readFileSync(path.join(app, 'restored.tar')).equals(fs.readFileSync(path.join(app, 'backup.tar'))));
      assert.ok(fs.statSync(path.join(app, 'backup.tar.khs')).size > (1 << 20));
    }
  });
}
