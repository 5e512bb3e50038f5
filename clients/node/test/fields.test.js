// Field encryption and a blind index with node-postgres, against a real
// PostgreSQL (a throwaway cluster from the Debian package, Unix socket only,
// in a temp dir) and a real daemon.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { BlindIndex, Client, DaemonError, EncryptedColumn, InvalidInputError } from '../src/index.js';
import { startDaemon } from './daemon.js';

function pgBin() {
  if (process.env.KEYHAVEN_PG_BIN) return process.env.KEYHAVEN_PG_BIN;
  const base = '/usr/lib/postgresql';
  const versions = fs.existsSync(base) ? fs.readdirSync(base).filter((v) => /^\d+$/.test(v)) : [];
  versions.sort((a, b) => Number(a) - Number(b));
  return path.join(base, versions.at(-1) ?? '15', 'bin');
}
const PG_BIN = pgBin();
let pg = null;
try {
  pg = (await import('pg')).default;
} catch {
  pg = null;
}
const missing = !fs.existsSync(path.join(PG_BIN, 'initdb'))
  ? `PostgreSQL is not installed: no ${PG_BIN}/initdb (apt-get install postgresql, or set KEYHAVEN_PG_BIN)`
  : pg === null
    ? 'the pg package is not installed (npm ci installs it: a devDependency)'
    : false;

let d;
let kh;
let dir;
let db;
const asNobody = process.getuid() === 0 ? ['runuser', '-u', 'nobody', '--'] : [];
function run(bin, ...args) {
  const [cmd, ...rest] = [...asNobody, path.join(PG_BIN, bin), ...args];
  execFileSync(cmd, rest, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
}

before(async () => {
  if (missing) return;
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kh-pg-node-'));
  if (asNobody.length) execFileSync('chown', ['nobody:nogroup', dir]);
  run('initdb', '-D', path.join(dir, 'data'), '-U', 'kh', '-A', 'trust', '--no-sync', '-E', 'UTF8');
  run('pg_ctl', 'start', '-w', '-D', path.join(dir, 'data'), '-l', path.join(dir, 'log'),
    '-o', `-k ${dir} -c listen_addresses= -c fsync=off`);
  db = new pg.Client({ host: dir, user: 'kh', database: 'postgres' });
  await db.connect();
  d = await startDaemon();
  kh = new Client({ socket: d.socket });
  await kh.keyCreate('acme/pii');
  await kh.keyCreate('acme/email-index', { type: 'hmac-sha256' });
});

after(async () => {
  await db?.end();
  await kh?.close();
  await d?.stop();
  if (dir) {
    try {
      run('pg_ctl', 'stop', '-m', 'fast', '-w', '-D', path.join(dir, 'data'));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
});

test('encrypted columns and a blind index in PostgreSQL', { skip: missing }, async () => {
  const email = new EncryptedColumn(kh, 'acme/pii', 'users', 'email');
  const note = new EncryptedColumn(kh, 'acme/pii', 'users', 'note');
  const index = new BlindIndex(kh, 'acme/email-index');
  await db.query('CREATE TABLE users (id text PRIMARY KEY, email text, email_bidx text, note text)');
  const insert = async (id, value) =>
    db.query('INSERT INTO users VALUES ($1, $2, $3, $4)', [
      id,
      await email.encrypt(id, value),
      await index.tag(value),
      await note.encrypt(id, 'vip'),
    ]);
  const find = async (value) =>
    (await db.query('SELECT * FROM users WHERE email_bidx = ANY($1)', [await index.tags(value)])).rows;
  const alice = randomUUID();
  const bob = randomUUID();
  await insert(alice, 'Alice@Example.com');
  await insert(bob, 'bob@example.com');

  for (const r of (await db.query('SELECT * FROM users')).rows) {
    assert.match(r.email, /^khc1:/);
    assert.doesNotMatch(r.email.toLowerCase(), /example/);
    assert.match(r.email_bidx, /^khm1:[A-Za-z0-9_-]{48}$/);
  }
  const rows = await find(' alice@EXAMPLE.com');
  assert.deepEqual(rows.map((r) => r.id), [alice]);
  assert.equal(await email.decrypt(alice, rows[0].email), 'Alice@Example.com');
  assert.equal(await note.decrypt(alice, rows[0].note), 'vip');
  assert.deepEqual(await find('carol@example.com'), []);

  // Moved to another row, or to another column: does not decrypt.
  await db.query('UPDATE users SET email = (SELECT email FROM users WHERE id = $1) WHERE id = $2', [alice, bob]);
  const moved = (await db.query('SELECT * FROM users WHERE id = $1', [bob])).rows[0];
  await assert.rejects(email.decrypt(bob, moved.email), (e) => e instanceof DaemonError && e.code === 'integrity');
  await assert.rejects(note.decrypt(alice, rows[0].email), (e) => e instanceof DaemonError && e.code === 'integrity');

  // After a rotation: new tags are version 2, lookups find rows of both versions.
  await kh.call('key_rotate', { tenant: 'acme', key: 'email-index' });
  const carol = randomUUID();
  await insert(carol, 'carol@example.com');
  assert.deepEqual((await find('alice@example.com')).map((r) => r.id), [alice]);
  assert.deepEqual((await find('carol@example.com')).map((r) => r.id), [carol]);
  const only = await db.query('SELECT id FROM users WHERE email_bidx = $1', [await index.tag('alice@example.com')]);
  assert.equal(only.rows.length, 0);

  // Bad input: typed errors.
  await assert.rejects(email.encrypt(null, 'x'), InvalidInputError);
  await assert.rejects(email.encrypt('r1', 42), InvalidInputError);
  await assert.rejects(index.tag(42), InvalidInputError);
  assert.throws(() => new EncryptedColumn(kh, 'acme/pii', '', 'email'), InvalidInputError);
  assert.equal(await email.encrypt('r1', null), null);
});
