// Local sealing against a real daemon: records, caches and their limits,
// revocation events, streams, and the Rust CLI opening what Node sealed.
import assert from 'node:assert/strict';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { after, before, test } from 'node:test';

import { Client, KeyhavenError, Sealer, parseRecord, sealedFromText, sealedToText } from '../src/index.js';
import { startDaemon } from './daemon.js';

let d;
let kh;
const LIMITS = { seal: { maxAgeMs: 60000, maxMessages: 1000, maxBytes: 1 << 20 }, open: { maxAgeMs: 60000, maxEntries: 100 } };

before(async () => {
  d = await startDaemon();
  kh = new Client({ socket: d.socket });
  for (const k of ['acme/pii', 'acme/files', 'acme/rev', 'globex/pii']) await kh.keyCreate(k);
});

after(async () => {
  await kh?.close();
  await d?.stop();
});

function sealer(limits = {}) {
  return new Sealer({ socket: d.socket, seal: { ...LIMITS.seal, ...limits.seal }, open: { ...LIMITS.open, ...limits.open } });
}

async function rejectsCode(p, code) {
  await assert.rejects(p, (e) => {
    assert.ok(e instanceof KeyhavenError, String(e));
    assert.equal(e.code, code, String(e));
    return true;
  });
}

const idOf = (rec) => parseRecord(rec).envelopeInfo.id;

async function until(cond, ms = 5000) {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 2));
  }
  return Date.now() - t0;
}

test('records round-trip, share a cached data key, and open from the cache', async () => {
  const s = sealer();
  try {
    const ctx = { table: 'users', column: 'email' };
    const recs = [];
    for (let i = 0; i < 20; i++) recs.push(await s.seal('acme/pii', `user${i}@example.com`, ctx));
    assert.equal(s.getStats().datakeys, 1);
    assert.equal(s.getStats().sealHits, 19);
    assert.equal(new Set(recs.map(idOf)).size, 1);
    const text = sealedToText(recs[3]);
    assert.match(text, /^khs1:[A-Za-z0-9_-]+$/);
    assert.deepEqual(sealedFromText(text), recs[3]);
    for (let i = 0; i < 20; i++) assert.equal((await s.open(i % 2 ? sealedToText(recs[i]) : recs[i], ctx)).toString(), `user${i}@example.com`);
    assert.equal(s.getStats().unwraps, 1);
    assert.equal(s.getStats().openHits, 19);
    // Every record has its own nonce.
    assert.equal(new Set(recs.map((r) => parseRecord(r).nonce.toString('hex'))).size, 20);
  } finally {
    s.close();
  }
});

test('the cache limits are exact, and partitions are by key and context', async () => {
  const s = sealer({ seal: { maxMessages: 3, maxBytes: 100 } });
  try {
    const ids = [];
    for (let i = 0; i < 7; i++) ids.push(idOf(await s.seal('acme/pii', 'x', {})));
    assert.deepEqual([ids[0] === ids[2], ids[2] !== ids[3], ids[3] === ids[5], ids[5] !== ids[6]], [true, true, true, true]);
    // Bytes: 60 + 40 fit in 100, the next 1 does not.
    const b = [await s.seal('acme/pii', 'a'.repeat(60), { p: 'b' }), await s.seal('acme/pii', 'a'.repeat(40), { p: 'b' }), await s.seal('acme/pii', 'a', { p: 'b' })].map(idOf);
    assert.deepEqual([b[0] === b[1], b[1] !== b[2]], [true, true]);
    // A record over max_bytes gets a key of its own, not cached.
    const big1 = idOf(await s.seal('acme/pii', 'a'.repeat(101), { p: 'big' }));
    const big2 = idOf(await s.seal('acme/pii', 'a'.repeat(101), { p: 'big' }));
    assert.notEqual(big1, big2);
    // Partitions: another context, another key, another tenant.
    const p = [
      await s.seal('acme/pii', 'x', { row: '1' }),
      await s.seal('acme/pii', 'x', { row: '2' }),
      await s.seal('acme/files', 'x', { row: '1' }),
      await s.seal('globex/pii', 'x', { row: '1' }),
    ].map(idOf);
    assert.equal(new Set(p).size, 4);
  } finally {
    s.close();
  }
  const aged = sealer({ seal: { maxAgeMs: 50 } });
  try {
    const a = idOf(await aged.seal('acme/pii', 'x', {}));
    const b = idOf(await aged.seal('acme/pii', 'x', {}));
    await new Promise((r) => setTimeout(r, 80));
    const c = idOf(await aged.seal('acme/pii', 'x', {}));
    assert.deepEqual([a === b, b !== c], [true, true]);
  } finally {
    aged.close();
  }
});

test('opening checks the context, every byte, and the record type', async () => {
  const s = sealer();
  try {
    const rec = await s.seal('acme/pii', 'secret', { row: '1' });
    // Not cached yet in a fresh opener: the daemon refuses the unwrap.
    const fresh = sealer();
    await rejectsCode(fresh.open(rec, { row: '2' }), 'integrity');
    assert.equal((await fresh.open(rec, { row: '1' })).toString(), 'secret');
    // Cached now: the local tag check refuses.
    await rejectsCode(fresh.open(rec, { row: '2' }), 'integrity');
    fresh.close();
    // Every single-byte change is refused, as bad_envelope or integrity.
    for (let i = 0; i < rec.length; i++) {
      const bad = Buffer.from(rec);
      bad[i] ^= 0x01;
      await assert.rejects(s.open(bad, { row: '1' }), (e) => ['bad_envelope', 'integrity', 'not_found'].includes(e.code), `byte ${i}`);
    }
    for (const n of [0, 4, 7, 50, rec.length - 17, rec.length - 1]) {
      await assert.rejects(s.open(rec.subarray(0, n), { row: '1' }), (e) => ['bad_envelope', 'integrity'].includes(e.code), `cut at ${n}`);
    }
    await rejectsCode(s.open(Buffer.concat([rec, Buffer.from([0])]), { row: '1' }), 'integrity');
    await rejectsCode(s.open('khc1:' + sealedToText(rec).slice(5), { row: '1' }), 'bad_envelope');
    await rejectsCode(s.open(sealedToText(rec) + '=', { row: '1' }), 'bad_envelope');
    // A ciphertext made by the daemon is not a record.
    const khc = (await kh.encrypt('acme/pii', 'x')).ciphertext;
    await rejectsCode(s.open(khc), 'bad_envelope');
  } finally {
    s.close();
  }
});

test('a revocation empties the caches at once; a lost connection empties them too', async () => {
  const s = sealer();
  try {
    const rec = await s.seal('acme/rev', 'before', {});
    await s.open(rec, {});
    await s.seal('acme/pii', 'other', {});
    assert.deepEqual([s.getStats().sealKeys, s.getStats().openKeys], [2, 1]);
    const t0 = Date.now();
    await kh.call('revoke', { scope: { kind: 'key', tenant: 'acme', key: 'rev' }, reason: 'key-compromise' });
    const waited = await until(() => s.getStats().sealKeys === 1 && s.getStats().openKeys === 0);
    assert.ok(Date.now() - t0 < 2000, `the cache emptied ${waited} ms after the revoke answered`);
    // The other key stays cached; the revoked one cannot be used again.
    assert.equal(s.getStats().sealKeys, 1);
    await rejectsCode(s.seal('acme/rev', 'after', {}), 'revoked');
    await rejectsCode(s.open(rec, {}), 'revoked');
    await kh.call('revoke_lift', { scope: { kind: 'key', tenant: 'acme', key: 'rev' }, reason: 'unspecified' });
    assert.equal((await s.open(rec, {})).toString(), 'before');
    // Revoking one data key drops exactly that key.
    const r2 = await s.seal('acme/pii', 'x', { d: '1' });
    const before = s.getStats().sealKeys;
    await kh.call('revoke', { scope: { kind: 'datakey', envelope_id: idOf(r2) }, reason: 'unspecified' });
    await until(() => s.getStats().sealKeys === before - 1);
    await rejectsCode(s.open(r2, { d: '1' }), 'revoked');
    // The connection is lost: nothing stays cached; the next call reconnects.
    await s.seal('acme/pii', 'x', {});
    assert.ok(s.getStats().sealKeys > 0);
    s.conn.sock.destroy();
    await until(() => s.getStats().sealKeys === 0 && s.getStats().openKeys === 0);
    await s.seal('acme/pii', 'x', {});
    assert.equal(s.getStats().connections, 2);
  } finally {
    s.close();
  }
});

async function collect(readable) {
  const parts = [];
  await pipeline(readable, new Writable({ write(c, _e, cb) { parts.push(c); cb(); } }));
  return Buffer.concat(parts);
}

const sealBytes = (s, data, ctx, chunkSize) => collect(Readable.from([data]).pipe(s.sealStream('acme/files', ctx, { chunkSize })));
const openBytes = (s, data, ctx) => collect(Readable.from(data.length ? [data] : []).pipe(s.openStream(ctx)));

test('streams round-trip at every chunk boundary, and refuse reordering, truncation and extension', async () => {
  const s = sealer();
  try {
    const C = 1024;
    for (const n of [0, 1, C - 1, C, C + 1, 3 * C, 3 * C + 5]) {
      const data = Buffer.alloc(n, n % 251);
      const sealed = await sealBytes(s, data, { f: 'x' }, C);
      const chunks = Math.max(1, Math.ceil(n / C));
      assert.equal(sealed.length, parseStreamLen(sealed) + n + 16 * chunks, `size ${n}`);
      assert.deepEqual(await openBytes(s, sealed, { f: 'x' }), data, `size ${n}`);
    }
    const data = Buffer.alloc(3 * C + 10, 7);
    const sealed = await sealBytes(s, data, { f: 'x' }, C);
    const h = parseStreamLen(sealed);
    const W = C + 16;
    const chunk = (i) => sealed.subarray(h + i * W, h + (i + 1) * W);
    const swapped = Buffer.concat([sealed.subarray(0, h), chunk(1), chunk(0), sealed.subarray(h + 2 * W)]);
    await rejectsCode(openBytes(s, swapped, { f: 'x' }), 'integrity');
    await rejectsCode(openBytes(s, sealed.subarray(0, h + 3 * W), { f: 'x' }), 'integrity'); // cut at a boundary
    await rejectsCode(openBytes(s, sealed.subarray(0, sealed.length - 1), { f: 'x' }), 'integrity');
    await rejectsCode(openBytes(s, Buffer.concat([sealed, chunk(0)]), { f: 'x' }), 'integrity'); // extended
    await rejectsCode(openBytes(s, sealed.subarray(0, h), { f: 'x' }), 'integrity'); // no chunk at all
    await rejectsCode(openBytes(s, sealed.subarray(0, h - 1), { f: 'x' }), 'bad_envelope');
    await rejectsCode(openBytes(s, sealed, { f: 'y' }), 'integrity');
    // A bad chunk size is refused.
    assert.throws(() => s.sealStream('acme/files', {}, { chunkSize: 1023 }), (e) => e.code === 'bad_request');
  } finally {
    s.close();
  }
});

function parseStreamLen(b) {
  return 11 + b.readUInt16BE(9);
}

test('the Rust CLI opens what Node sealed, and Node opens what the CLI sealed', async () => {
  const s = sealer();
  try {
    const ctx = { file: 'backup.tar', 'ü': 'ß' };
    const data = Buffer.alloc(200000, 3);
    const sealed = await sealBytes(s, data, ctx, 4096);
    const args = Object.entries(ctx).flatMap(([k, v]) => ['--context', `${k}=${v}`]);
    assert.deepEqual(d.cli(['open', ...args], sealed), data);
    const rec = await s.seal('acme/pii', 'a record from node', ctx);
    assert.equal(d.cli(['open', ...args], sealedToText(rec)).toString(), 'a record from node');
    const fromCli = d.cli(['seal', 'acme/files', ...args, '--chunk-size', '1024'], data);
    assert.deepEqual(await openBytes(s, fromCli, ctx), data);
  } finally {
    s.close();
  }
});

test('a Sealer needs every cache limit, within bounds', () => {
  const bad = [
    {},
    { seal: LIMITS.seal },
    { seal: { ...LIMITS.seal, maxMessages: 2 ** 31 + 1 }, open: LIMITS.open },
    { seal: { ...LIMITS.seal, maxAgeMs: 0 }, open: LIMITS.open },
    { seal: { ...LIMITS.seal, maxBytes: undefined }, open: LIMITS.open },
    { seal: LIMITS.seal, open: { maxEntries: 5 } },
  ];
  for (const opts of bad) assert.throws(() => new Sealer({ socket: '/nonexistent', ...opts }), (e) => e.code === 'config', JSON.stringify(opts));
});

test('cached keys are overwritten when they leave a cache, and never printed', async () => {
  const { inspect } = await import('node:util');
  const s = sealer({ seal: { maxMessages: 2 } });
  try {
    const keysOf = (cache) => [...cache.entries.values()].map((e) => e.key);
    const rec = await s.seal('acme/pii', 'x', { w: '1' });
    await s.open(rec, { w: '1' });
    const [sealKey] = keysOf(s.sealCache);
    const [openKey] = keysOf(s.openCache);
    assert.ok(sealKey.some((b) => b !== 0) && openKey.some((b) => b !== 0));
    // Nothing that prints the sealer or its caches shows key bytes.
    const hexKey = sealKey.toString('hex');
    for (const shown of [inspect(s, { depth: 10 }), JSON.stringify(s), inspect(s.sealCache), inspect(s.openCache)]) {
      assert.ok(!shown.includes(hexKey) && !shown.includes(sealKey.toString('base64')), shown);
      assert.ok(!/<Buffer/.test(shown), shown);
    }
    // A limit: the third record needs a new key; the old one is zeroed.
    await s.seal('acme/pii', 'x', { w: '1' });
    await s.seal('acme/pii', 'x', { w: '1' });
    assert.ok(sealKey.every((b) => b === 0), 'evicted at its message limit');
    // clear() zeroes the opening cache's key, and the new sealing key.
    const [sealKey2] = keysOf(s.sealCache);
    s.clear();
    assert.ok(openKey.every((b) => b === 0) && sealKey2.every((b) => b === 0));
    // A revocation event zeroes the keys in scope.
    await s.seal('acme/files', 'x', {});
    const [filesKey] = keysOf(s.sealCache);
    await kh.call('revoke', { scope: { kind: 'key', tenant: 'acme', key: 'files' }, reason: 'unspecified' });
    await until(() => filesKey.every((b) => b === 0));
    await kh.call('revoke_lift', { scope: { kind: 'key', tenant: 'acme', key: 'files' }, reason: 'unspecified' });
    // close() zeroes everything.
    await s.seal('acme/pii', 'y', {});
    const [last] = keysOf(s.sealCache);
    s.close();
    assert.ok(last.every((b) => b === 0));
  } finally {
    s.close();
  }
});
