// Test helper: a real keyhavend in dev mode (its own SoftHSM2 token, store
// and socket in a temporary folder), started per test file and stopped after.

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const KEYHAVEND = path.join(ROOT, 'target/debug/keyhavend');
export const KEYHAVEN = path.join(ROOT, 'target/debug/keyhaven');

/** PostgreSQL's server binaries (initdb, pg_ctl) for the tests that make a throwaway cluster:
 * $KEYHAVEN_PG_BIN, else the newest /usr/lib/postgresql/N/bin. */
export const PG_BIN = (() => {
  if (process.env.KEYHAVEN_PG_BIN) return process.env.KEYHAVEN_PG_BIN;
  const base = '/usr/lib/postgresql';
  const versions = fs.existsSync(base) ? fs.readdirSync(base).filter((v) => /^\d+$/.test(v)) : [];
  versions.sort((a, b) => Number(a) - Number(b));
  return path.join(base, versions.at(-1) ?? '15', 'bin');
})();

/** Start a dev daemon; `dir` reuses the install of an earlier one (a restart). */
export async function startDaemon(dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kh-node-'))) {
  const child = spawn(KEYHAVEND, ['dev', '--dir', path.join(dir, 'dev')], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => {
    stderr += d;
  });
  const socket = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`keyhavend did not start in 60 s:\n${stderr}`)), 60000);
    child.stdout.on('data', (d) => {
      out += d;
      const m = /export KEYHAVEN_SOCKET=(\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`keyhavend exited with ${code}:\n${stderr}`));
    });
  });
  return {
    socket,
    dir,
    child,
    /** Run the Rust CLI against this daemon. */
    cli(args, input) {
      return execFileSync(KEYHAVEN, ['--socket', socket, ...args], { input, maxBuffer: 64 << 20 });
    },
    /** Stop it; `keep` leaves its folder for a restart. */
    async stop({ keep = false } = {}) {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await exited;
      }
      if (!keep) fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
