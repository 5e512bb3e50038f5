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

import {
  BadStoredValueError,
  BlindIndex,
  Client,
  DaemonError,
  EncryptedColumn,
  InvalidInputError,
  parseMacTag,
  parseStoredTag,
  reindexBlindIndex,
} from '../src/index.js';
import { PG_BIN, startDaemon } from './daemon.js';

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

test('stored tags are parsed strictly, a malformed one names its column', { skip: missing }, async () => {
  const index = new BlindIndex(kh, 'acme/email-index');
  const good = await index.tag('alice@example.com');
  assert.equal(parseStoredTag(good, 't.c').version, parseMacTag(good).version);
  const b64url = (buf) => buf.toString('base64url');
  const malformed = {
    'another prefix': 'khm2:' + good.slice(5),
    'not base64url': good.slice(0, 20) + '!' + good.slice(21),
    'standard base64': good.slice(0, 20) + '+' + good.slice(21),
    '35 bytes': 'khm1:' + b64url(Buffer.alloc(35)),
    'version 0': 'khm1:' + b64url(Buffer.concat([Buffer.alloc(4), Buffer.alloc(32, 7)])),
    'surrounding space': ' ' + good.slice(0, -1),
    'a plaintext': 'alice@example.com',
    empty: '',
  };
  for (const [what, bad] of Object.entries(malformed)) {
    assert.throws(
      () => parseStoredTag(bad, 'users.email_bidx'),
      (e) =>
        e instanceof BadStoredValueError &&
        e instanceof InvalidInputError &&
        e.code === 'bad_request' &&
        e.column === 'users.email_bidx' &&
        (bad.length < 3 || !e.message.includes(bad)),
      what,
    );
  }
  assert.throws(() => parseStoredTag(null, 'c'), BadStoredValueError);
  // A re-index meeting a malformed stored tag stops, naming the column.
  const col = new EncryptedColumn(kh, 'acme/pii', 'tagged', 'email');
  await db.query('CREATE TABLE tagged (id text PRIMARY KEY, email text, email_bidx text)');
  await db.query('INSERT INTO tagged VALUES ($1, $2, $3)', ['r1', await col.encrypt('r1', 'a@b.c'), malformed['version 0']]);
  await assert.rejects(
    reindexBlindIndex(db, { column: col, index, indexColumn: 'email_bidx' }),
    (e) => e instanceof BadStoredValueError && e.column === 'tagged.email_bidx',
  );
});

test('re-index a blind index after rotating its key: batched, resumable, idempotent', { skip: missing }, async () => {
  await kh.keyCreate('acme/people-index', { type: 'hmac-sha256' });
  const race = [];
  const email = new EncryptedColumn(kh, 'acme/pii', 'people', 'email');
  // The real client, with a hook: a writer changes a row while the re-index is
  // between its read and its update (before the re-index's MAC of that value).
  const hooked = {
    keyShow: (key) => kh.keyShow(key),
    mac: async (key, message, o) => {
      if (message.toString() === 'race@example.com' && race.length) await race.pop()();
      return kh.mac(key, message, o);
    },
  };
  const index = new BlindIndex(hooked, 'acme/people-index');
  await db.query('CREATE TABLE people (org int, id text, email text, email_bidx text, PRIMARY KEY (org, id))');
  const write = async (org, id, value) => {
    await db.query(
      'INSERT INTO people VALUES ($1, $2, $3, $4) ON CONFLICT (org, id) DO UPDATE SET email = $3, email_bidx = $4',
      [org, id, await email.encrypt([org, id], value), await index.tag(value)],
    );
  };
  const emails = new Map();
  for (let i = 0; i < 22; i++) emails.set(`p${String(i).padStart(2, '0')}`, `user${i}@example.com`);
  emails.set('p05', 'race@example.com');
  for (const [id, value] of emails) await write(1, id, value);
  await db.query("INSERT INTO people (org, id) VALUES (1, 'p99')");
  await kh.call('key_rotate', { tenant: 'acme', key: 'people-index' });
  await write(2, 'p00', 'late@example.com'); // after the rotation: already version 2
  const versions = async () => {
    const out = new Map();
    for (const r of (await db.query('SELECT org, id, email_bidx FROM people')).rows) {
      out.set(`${r.org}/${r.id}`, r.email_bidx === null ? null : parseMacTag(r.email_bidx).version);
    }
    return out;
  };
  const find = async (value, only) =>
    (await db.query('SELECT id FROM people WHERE email_bidx = ANY($1) ORDER BY org, id', [await index.tags(value, only)])).rows.map((r) => r.id);
  const opts = { column: email, index, indexColumn: 'email_bidx', primaryKey: ['org', 'id'] };

  const seen = [];
  const first = await reindexBlindIndex(db, { ...opts, batchSize: 5, maxBatches: 2, onBatch: (r) => seen.push(r.lastKey) });
  assert.deepEqual(
    [first.targetVersion, first.updated, first.batches, first.done, first.lastKey],
    [2, 10, 2, false, [1, 'p09']],
  );
  assert.deepEqual(seen, [[1, 'p04'], [1, 'p09']]);
  let v = await versions();
  for (let i = 0; i < 22; i++) assert.equal(v.get(`1/p${String(i).padStart(2, '0')}`), i < 10 ? 2 : 1);
  // Half way: lookups find rows of both versions; the new version's tag alone only the re-indexed.
  assert.deepEqual(await find(' USER3@example.com'), ['p03']);
  assert.deepEqual(await find('user15@example.com'), ['p15']);
  assert.deepEqual(await find('user15@example.com', [2]), []);
  assert.deepEqual(await find('user3@example.com', [2]), ['p03']);

  // A row ahead of the cursor with an old tag, changed by a writer during the resumed run.
  await write(1, 'p30', 'race@example.com');
  await kh.call('key_rotate', { tenant: 'acme', key: 'people-index' }); // version 3
  const v1tag = (await kh.mac('acme/people-index', Buffer.from('race@example.com'), { version: 1 })).tag;
  await db.query("UPDATE people SET email_bidx = $1 WHERE org = 1 AND id = 'p30'", [v1tag]);
  race.push(() => write(1, 'p30', 'raced@example.com'));
  const pool = new pg.Pool({ host: dir, user: 'kh', database: 'postgres', max: 2 });
  try {
    const rest = await reindexBlindIndex(pool, {
      ...opts,
      batchSize: 5,
      after: first.lastKey,
    });
    assert.equal(race.length, 0);
    // p10..p21 and 2/p00 (version 2 < 3) updated; p30's race lost to the writer; p99 has no value.
    assert.deepEqual(
      [rest.targetVersion, rest.updated, rest.changed, rest.empty, rest.done, rest.lastKey],
      [3, 13, 1, 1, true, [2, 'p00']],
    );
  } finally {
    await pool.end();
  }
  v = await versions();
  assert.equal(v.get('1/p30'), 3);
  assert.equal(v.get('1/p99'), null);
  // p00..p09 are still at version 2 (re-indexed before the second rotation): a full run finishes them.
  const full = await reindexBlindIndex(db, { ...opts, batchSize: 7 });
  assert.deepEqual([full.updated, full.current, full.empty, full.done], [10, 14, 1, true]);
  assert.deepEqual(new Set([...(await versions()).values()].filter((x) => x !== null)), new Set([3]));
  // Idempotent: nothing left, and no daemon call for rows already current.
  const again = await reindexBlindIndex(db, { ...opts, batchSize: 100 });
  assert.deepEqual([again.updated, again.current, again.changed, again.empty, again.done], [0, 24, 0, 1, true]);
  for (const [id, value] of emails) if (id !== 'p05') assert.deepEqual(await find(value, [3]), [id]);
  assert.deepEqual(await find('race@example.com', [3]), ['p05']);
  assert.deepEqual(await find('raced@example.com', [3]), ['p30']);
  const p30 = (await db.query("SELECT email FROM people WHERE org = 1 AND id = 'p30'")).rows[0];
  assert.equal(await email.decrypt([1, 'p30'], p30.email), 'raced@example.com');

  await assert.rejects(reindexBlindIndex(db, { ...opts, batchSize: 0 }), InvalidInputError);
  await assert.rejects(reindexBlindIndex(db, { ...opts, after: ['only-one'] }), InvalidInputError);
  await assert.rejects(reindexBlindIndex(db, { ...opts, index: null }), InvalidInputError);
});
