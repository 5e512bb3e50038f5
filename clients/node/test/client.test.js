// The Client against a real daemon (dev mode: SoftHSM2 token, real socket).
import assert from 'node:assert/strict';
import net from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { Client, DaemonError, InvalidInputError, KeyhavenError, encodeContext } from '../src/index.js';
import { startDaemon } from './daemon.js';

let d;
let kh;

before(async () => {
  d = await startDaemon();
  kh = new Client({ socket: d.socket });
  await kh.keyCreate('acme/pii');
});

after(async () => {
  await kh?.close();
  await d?.stop();
});

async function rejectsWith(promise, code, cls = KeyhavenError) {
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof cls, `${e} is not a ${cls.name}`);
    assert.equal(e.code, code, String(e));
    return true;
  });
}

test('health, whoami, key create/show/list', async () => {
  const h = await kh.health();
  assert.equal(h.status, 'ok');
  assert.equal(h.token.ok, true);
  const metrics = await kh.metrics();
  assert.match(metrics, /^# HELP /m);
  assert.match(metrics, /^keyhaven_requests_total\{operation="health",outcome="ok"\} [1-9]/m);
  const me = await kh.whoami();
  assert.equal(me.uid, process.getuid());
  const info = await kh.keyCreate({ tenant: 'acme', key: 'smtp' });
  assert.deepEqual([info.tenant, info.key, info.current_version], ['acme', 'smtp', 1]);
  const shown = await kh.keyShow('acme/smtp');
  assert.equal(shown.state, 'enabled');
  // One key shape (PROTOCOL.md §3.3): the same field names, `versions` aside.
  const names = (o) => Object.keys(o).filter((f) => f !== 'versions').sort();
  assert.deepEqual(names(info), names(shown));
  assert.equal(info.min_decryption_version, 1);
  assert.equal(shown.versions[0].wrap_budget_reserved, shown.versions[0].wraps);
  const labelled = await kh.keyCreate('acme/labelled', { description: 'for tests', tags: { team: 'qa' } });
  assert.deepEqual([labelled.description, labelled.tags], ['for tests', { team: 'qa' }]);
  assert.deepEqual((await kh.keyList('acme', { tags: { team: 'qa' } })).map((k) => k.key), ['labelled']);
  await rejectsWith(kh.keyCreate('acme/bad-tag', { tags: { 'a b': 'v' } }), 'bad_request', DaemonError);
  assert.throws(() => kh.keyCreate('acme/bad-tag', { tags: { a: 1 } }), InvalidInputError);
  const keys = await kh.keyList('acme');
  assert.deepEqual(
    keys.map((k) => k.key),
    ['labelled', 'pii', 'smtp'],
  );
  await rejectsWith(kh.keyCreate('acme/smtp'), 'already_exists', DaemonError);
  await rejectsWith(kh.keyShow('acme/nope'), 'not_found', DaemonError);
  const auto = await kh.keyCreate('sched/auto', { rotateEverySecs: 86400 });
  assert.deepEqual([auto.state, auto.rotate_every_secs, auto.next_rotation_at], ['enabled', 86400, auto.created_at + 86400]);
  assert.throws(() => kh.keyCreate('sched/bad', { rotateEverySecs: -1 }), InvalidInputError);
  const once = await kh.keyCreate('sched/once', { idempotencyKey: 'req-1' });
  assert.equal((await kh.keyCreate('sched/once', { idempotencyKey: 'req-1' })).created_at, once.created_at);
  await rejectsWith(kh.keyCreate('sched/once'), 'already_exists', DaemonError);
  assert.throws(() => kh.keyCreate('sched/bad', { idempotencyKey: 'has space' }), InvalidInputError);
});

test('encrypt and decrypt, with the context in any order', async () => {
  const ctx = { table: 'users', column: 'email', row: '42' };
  const enc = await kh.encrypt('acme/pii', 'alice@example.com', ctx);
  assert.match(enc.ciphertext, /^khc1:/);
  assert.match(enc.envelope_id, /^[0-9a-f]{32}$/);
  const dec = await kh.decrypt(enc.ciphertext, new Map([['row', '42'], ['column', 'email'], ['table', 'users']]));
  assert.equal(dec.plaintext.toString(), 'alice@example.com');
  assert.deepEqual([dec.tenant, dec.key, dec.key_version, dec.envelope_id], ['acme', 'pii', 1, enc.envelope_id]);
  // Another context, a missing one, an altered ciphertext: integrity.
  await rejectsWith(kh.decrypt(enc.ciphertext, { ...ctx, row: '43' }), 'integrity', DaemonError);
  await rejectsWith(kh.decrypt(enc.ciphertext), 'integrity', DaemonError);
  const flipped = enc.ciphertext.slice(0, -3) + (enc.ciphertext.at(-3) === 'A' ? 'B' : 'A') + enc.ciphertext.slice(-2);
  await rejectsWith(kh.decrypt(flipped, ctx), 'integrity', DaemonError);
  await rejectsWith(kh.decrypt('khe1:AAAA', ctx), 'bad_envelope', DaemonError);
  // Binary plaintext, empty plaintext.
  const bin = Buffer.from([0, 255, 1, 254]);
  assert.deepEqual((await kh.decrypt((await kh.encrypt('acme/pii', bin)).ciphertext)).plaintext, bin);
  assert.equal((await kh.decrypt((await kh.encrypt('acme/pii', Buffer.alloc(0))).ciphertext)).plaintext.length, 0);
});

test('characters above U+FFFF sort by their UTF-8 bytes, not as JavaScript sorts strings', async () => {
  // U+FF61 is EF BD A1 in UTF-8 and sorts before U+1F600 (F0 ...); as
  // UTF-16, U+1F600 (D83D ...) sorts first.
  const ctx = { '\u{1F600}': 'a', '\uFF61': 'b' };
  assert.deepEqual(Object.keys(ctx).sort(), ['\u{1F600}', '\uFF61']);
  const c = encodeContext(ctx);
  assert.equal(c.toString('hex'), '0002' + '0003efbda1' + '000162' + '0004f09f9880' + '000161');
  const enc = await kh.encrypt('acme/pii', 'x', ctx);
  assert.equal((await kh.decrypt(enc.ciphertext, ctx)).plaintext.toString(), 'x');
});

test('bad input is refused before anything is sent, with the code the daemon would give', async () => {
  const sent = kh.connectionsOpened;
  await rejectsWith(kh.encrypt('Acme/pii', 'x'), 'bad_request', InvalidInputError);
  await rejectsWith(kh.encrypt('acme', 'x'), 'bad_request', InvalidInputError);
  await rejectsWith(kh.encrypt('acme/pii/x', 'x'), 'bad_request', InvalidInputError);
  await rejectsWith(kh.encrypt('acme/' + 'x'.repeat(64), 'x'), 'bad_request', InvalidInputError);
  await rejectsWith(kh.encrypt('acme/pii', 'x', { k: 1 }), 'bad_request', InvalidInputError);
  await rejectsWith(kh.encrypt('acme/pii', 'x', { '': 'v' }), 'bad_request', InvalidInputError);
  await rejectsWith(kh.encrypt('acme/pii', 'x', { k: 'v'.repeat(1025) }), 'bad_request', InvalidInputError);
  const many = Object.fromEntries(Array.from({ length: 33 }, (_, i) => [`k${i}`, 'v']));
  await rejectsWith(kh.encrypt('acme/pii', 'x', many), 'bad_request', InvalidInputError);
  await rejectsWith(kh.encrypt('acme/pii', 'x', { k: '\uD800' }), 'bad_request', InvalidInputError);
  await rejectsWith(kh.encrypt('acme/pii', '\uDFFF'), 'bad_request', InvalidInputError);
  await rejectsWith(kh.encrypt('acme/pii', 42), 'bad_request', InvalidInputError);
  await rejectsWith(kh.decrypt(42), 'bad_request', InvalidInputError);
  // Over 1 MiB once framed: refused here, the connection stays usable.
  await rejectsWith(kh.encrypt('acme/pii', Buffer.alloc(800 * 1024)), 'frame_too_large', InvalidInputError);
  // Limits of the daemon come back typed.
  await rejectsWith(kh.encrypt('acme/pii', Buffer.alloc(65537)), 'payload_too_large', DaemonError);
  await rejectsWith(kh.encrypt('acme/nope', 'x'), 'not_found', DaemonError);
  assert.equal((await kh.health()).status, 'ok');
  assert.ok(kh.connectionsOpened <= sent + 1);
});

test('datakey, datakey_decrypt and rewrap', async () => {
  const ctx = { app: 'billing' };
  const dk = await kh.datakey('acme/pii', ctx);
  assert.equal(dk.plaintext.length, 32);
  assert.match(dk.envelope, /^khe1:/);
  const back = await kh.datakeyDecrypt(dk.envelope, ctx);
  assert.deepEqual(back.plaintext, dk.plaintext);
  assert.equal(back.envelope_id, dk.envelope_id);
  const only = await kh.datakey('acme/pii', ctx, { includePlaintext: false });
  assert.equal(only.plaintext, undefined);
  await rejectsWith(kh.datakeyDecrypt(dk.envelope, {}), 'integrity', DaemonError);
  await kh.keyCreate('acme/rot');
  const enc = await kh.encrypt('acme/rot', 'secret', ctx);
  await kh.call('key_rotate', { tenant: 'acme', key: 'rot' });
  const re = await kh.rewrap(enc.ciphertext, ctx);
  assert.deepEqual([re.from_version, re.key_version, re.envelope_id], [1, 2, enc.envelope_id]);
  assert.equal((await kh.decrypt(re.text, ctx)).plaintext.toString(), 'secret');
});

test('strict base64: the plaintext the daemon returns is checked', async () => {
  const { b64decode } = await import('../src/codec.js');
  assert.deepEqual(b64decode('aGk=', 'x'), Buffer.from('hi'));
  for (const bad of ['aGk', 'aGl=', 'aG k=', 'aGk==', 'a-k=', 'aGk=\n']) {
    assert.throws(() => b64decode(bad, 'x'), (e) => e.code === 'bad_request', bad);
  }
});

test('pipelining: 300 requests on one connection, answered in any order', async () => {
  const one = new Client({ socket: d.socket, connections: 1 });
  try {
    const inputs = Array.from({ length: 300 }, (_, i) => `secret-${i}`);
    const encs = await Promise.all(inputs.map((p, i) => one.encrypt('acme/pii', p, { i: String(i) })));
    const decs = await Promise.all(encs.map((e, i) => one.decrypt(e.ciphertext, { i: String(i) })));
    assert.deepEqual(
      decs.map((x) => x.plaintext.toString()),
      inputs,
    );
    assert.equal(one.connectionsOpened, 1);
  } finally {
    await one.close();
  }
});

test('a pool spreads concurrent calls over its connections', async () => {
  const pool = new Client({ socket: d.socket, connections: 4 });
  try {
    await Promise.all(Array.from({ length: 64 }, () => pool.encrypt('acme/pii', 'x')));
    assert.equal(pool.connectionsOpened, 4);
    await Promise.all(Array.from({ length: 64 }, () => pool.encrypt('acme/pii', 'x')));
    assert.equal(pool.connectionsOpened, 4);
  } finally {
    await pool.close();
  }
});

test('the socket comes from KEYHAVEN_SOCKET when not given', async () => {
  const saved = process.env.KEYHAVEN_SOCKET;
  process.env.KEYHAVEN_SOCKET = d.socket;
  try {
    const c = new Client();
    assert.equal(c.socket, d.socket);
    assert.equal((await c.health()).status, 'ok');
    await c.close();
    delete process.env.KEYHAVEN_SOCKET;
    assert.equal(new Client().socket, '/run/keyhaven/keyhaven.sock');
  } finally {
    if (saved === undefined) delete process.env.KEYHAVEN_SOCKET;
    else process.env.KEYHAVEN_SOCKET = saved;
  }
});

test('reconnects after the connection is lost', async () => {
  const c = new Client({ socket: d.socket, connections: 1 });
  try {
    await c.health();
    (await c.connection()).sock.destroy(); // as when the daemon drops an idle connection
    await new Promise((r) => setTimeout(r, 20));
    assert.equal((await c.health()).status, 'ok');
    assert.equal(c.connectionsOpened, 2);
  } finally {
    await c.close();
  }
});

test('connect failures and timeouts are typed', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kh-node-silent-'));
  try {
    await rejectsWith(new Client({ socket: path.join(dir, 'none.sock') }).health(), 'connect_failed');
    // A peer that accepts and never answers: the connect (hello) times out.
    const silent = path.join(dir, 'silent.sock');
    const sockets = [];
    const server = net.createServer((s) => sockets.push(s));
    await new Promise((r) => server.listen(silent, r));
    const t0 = Date.now();
    await rejectsWith(new Client({ socket: silent, connectTimeoutMs: 300 }).health(), 'timeout');
    assert.ok(Date.now() - t0 < 3000);
    // A peer that answers hello and then nothing: the request times out.
    const mute = path.join(dir, 'mute.sock');
    const server2 = net.createServer((s) => {
      sockets.push(s);
      s.once('data', (b) => {
        const id = JSON.parse(b.subarray(4).toString()).id;
        const body = Buffer.from(JSON.stringify({ id, ok: { protocol: 1, server: 'mute' } }));
        const head = Buffer.alloc(4);
        head.writeUInt32BE(body.length);
        s.write(Buffer.concat([head, body]));
      });
    });
    await new Promise((r) => server2.listen(mute, r));
    const c = new Client({ socket: mute, requestTimeoutMs: 300 });
    await rejectsWith(c.health(), 'timeout');
    await c.close();
    for (const s of sockets) s.destroy();
    await new Promise((r) => server.close(r));
    await new Promise((r) => server2.close(r));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('bad options are refused', () => {
  assert.throws(() => new Client({ connections: 0 }), (e) => e.code === 'config');
  assert.throws(() => new Client({ requestTimeoutMs: -1 }), (e) => e.code === 'config');
  assert.throws(() => new Client({ socket: '' }), (e) => e.code === 'config');
});

test('events reach onEvent; a listener that throws harms nothing', async () => {
  const seen = [];
  const c = new Client({
    socket: d.socket,
    connections: 1,
    onEvent: (e) => {
      seen.push(e);
      throw new Error('listener bug');
    },
  });
  try {
    await kh.keyCreate('acme/evt');
    assert.deepEqual(await c.subscribeRevocations(), { subscribed: true });
    await kh.call('revoke', { scope: { kind: 'key', tenant: 'acme', key: 'evt' }, reason: 'unspecified' });
    const t0 = Date.now();
    while (seen.length === 0 && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 5));
    assert.deepEqual(seen, [{ event: 'revoked', scope: { kind: 'key', tenant: 'acme', key: 'evt' } }]);
    assert.equal((await c.health()).status, 'ok');
    assert.equal(c.connectionsOpened, 1);
  } finally {
    await c.close();
  }
});

test('a daemon restart: calls fail typed while it is down, and the same Client carries on after', async () => {
  const d2 = await startDaemon();
  const c = new Client({ socket: d2.socket, connections: 2, connectTimeoutMs: 2000 });
  let d3;
  try {
    await c.keyCreate('acme/restart');
    const enc = await c.encrypt('acme/restart', 'survives', { r: '1' });
    await d2.stop({ keep: true });
    // Down: a connection the client had not yet seen close fails as
    // `connection_closed`, a new one as `connect_failed`.
    await assert.rejects(c.health(), (e) => ['connect_failed', 'connection_closed'].includes(e.code));
    await rejectsWith(c.health(), 'connect_failed');
    d3 = await startDaemon(d2.dir);
    assert.equal(d3.socket, d2.socket);
    assert.equal((await c.decrypt(enc.ciphertext, { r: '1' })).plaintext.toString(), 'survives');
  } finally {
    await c.close();
    if (d3) await d3.stop();
    else await d2.stop();
  }
});

test('a peer that sends an oversized or unreadable frame fails the calls with `protocol`', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kh-node-hostile-'));
  const sockets = [];
  const servers = [];
  try {
    for (const [name, reply] of [
      ['huge', () => Buffer.from([0x00, 0x20, 0x00, 0x00])], // announces 2 MiB
      ['garbage', () => Buffer.concat([Buffer.from([0, 0, 0, 3]), Buffer.from('{x}')])],
    ]) {
      const p = path.join(dir, `${name}.sock`);
      const server = net.createServer((s) => {
        sockets.push(s);
        let hello = true;
        s.on('data', (b) => {
          if (hello) {
            hello = false;
            const id = JSON.parse(b.subarray(4).toString()).id;
            const body = Buffer.from(JSON.stringify({ id, ok: { protocol: 1, server: name } }));
            const head = Buffer.alloc(4);
            head.writeUInt32BE(body.length);
            s.write(Buffer.concat([head, body]));
          } else {
            s.write(reply());
          }
        });
      });
      servers.push(server);
      await new Promise((r) => server.listen(p, r));
      const c = new Client({ socket: p, requestTimeoutMs: 5000 });
      await rejectsWith(c.health(), 'protocol');
      await c.close();
    }
  } finally {
    for (const s of sockets) s.destroy();
    for (const s of servers) await new Promise((r) => s.close(r));
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('keyList follows the daemon\'s pages to the end', async () => {
  const names = ['a1', 'a2', 'a3', 'a4', 'a5'];
  for (const n of names) await kh.keyCreate(`paged/${n}`);
  const keys = await kh.keyList('paged', { pageSize: 2 });
  assert.deepEqual(
    keys.map((k) => k.key),
    names,
  );
  assert.deepEqual(
    (await kh.keyList('paged')).map((k) => k.key),
    names,
  );
  const all = await kh.keyList(undefined, { pageSize: 3 });
  assert.ok(all.some((k) => k.tenant === 'acme') && all.filter((k) => k.tenant === 'paged').length === 5);
  await rejectsWith(kh.keyList('paged', { pageSize: 0 }), 'bad_request', InvalidInputError);
  await rejectsWith(kh.keyList('paged', { pageSize: 1001 }), 'bad_request', InvalidInputError);
});

test('mac and macVerify with an hmac-sha256 key; wrong_key_type on an AES key', async () => {
  const info = await kh.keyCreate('acme/email-index', { type: 'hmac-sha256' });
  assert.equal(info.type, 'hmac-sha256');
  assert.equal((await kh.keyShow('acme/pii')).type, 'aes256-gcm');
  const m = await kh.mac('acme/email-index', 'alice@example.com');
  assert.match(m.tag, /^khm1:[A-Za-z0-9_-]{48}$/);
  assert.equal(m.key_version, 1);
  // Deterministic: the same message gives the same tag (what a blind index needs).
  assert.equal((await kh.mac('acme/email-index', Buffer.from('alice@example.com'))).tag, m.tag);
  assert.notEqual((await kh.mac('acme/email-index', 'bob@example.com')).tag, m.tag);
  // The tag is HMAC-SHA256 of the message alone: check it against node:crypto would need the key,
  // which never leaves the token; instead check the layout: version 1 then 32 MAC bytes.
  const raw = Buffer.from(m.tag.slice(5), 'base64url');
  assert.equal(raw.length, 36);
  assert.equal(raw.readUInt32BE(0), 1);

  assert.deepEqual(await kh.macVerify('acme/email-index', 'alice@example.com', m.tag), { valid: true, key_version: 1 });
  assert.equal((await kh.macVerify('acme/email-index', 'alice@example.con', m.tag)).valid, false);
  assert.equal((await kh.macVerify('acme/email-index', '', m.tag)).valid, false);
  const flipped = Buffer.from(raw);
  flipped[20] ^= 1;
  const bad = `khm1:${flipped.toString('base64url')}`;
  assert.equal((await kh.macVerify('acme/email-index', 'alice@example.com', bad)).valid, false);
  await kh.keyCreate('acme/other-index', { type: 'hmac-sha256' });
  assert.equal((await kh.macVerify('acme/other-index', 'alice@example.com', m.tag)).valid, false);

  await rejectsWith(kh.mac('acme/pii', 'alice@example.com'), 'wrong_key_type', DaemonError);
  await rejectsWith(kh.macVerify('acme/pii', 'alice@example.com', m.tag), 'wrong_key_type', DaemonError);
  await rejectsWith(kh.encrypt('acme/email-index', 'x'), 'wrong_key_type', DaemonError);
  await rejectsWith(kh.keyCreate('acme/k3', { type: 'rot13' }), 'bad_request', DaemonError);
  await rejectsWith(kh.macVerify('acme/email-index', 'x', 'khm1:AAAA'), 'bad_request', DaemonError);
  await rejectsWith(kh.mac('acme/email-index', 'x', { version: 0 }), 'bad_request', InvalidInputError);
  await rejectsWith(kh.mac('acme/email-index', 'x', { version: 2 }), 'not_found', DaemonError);
  await rejectsWith(kh.macVerify('acme/email-index', 'x', 42), 'bad_request', InvalidInputError);
  assert.throws(() => kh.keyCreate('acme/k4', { type: 7 }), InvalidInputError);
});
