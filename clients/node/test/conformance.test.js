// The language-neutral vectors of tests/conformance/vectors.json (written by
// an independent generator): contexts, envelopes, records, streams and MAC tags.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { Client, encodeContext, parseMacTag } from '../src/index.js';
import {
  ChunkCipher,
  envelopeFromText,
  openRecord,
  parseEnvelope,
  parseRecord,
  parseStreamHeader,
  sealRecord,
  sealedFromText,
  sealedToText,
  streamHeader,
} from '../src/seal.js';
import { ROOT, startDaemon } from './daemon.js';

const V = JSON.parse(fs.readFileSync(path.join(ROOT, 'tests/conformance/vectors.json'), 'utf8'));
const hex = (s) => Buffer.from(s, 'hex');
// A Map cannot hold a key twice; such vectors are for APIs that take pairs.
const hasDuplicates = (pairs) => new Set(pairs.map((p) => p[0])).size !== pairs.length;
const ctx = (pairs) => new Map(pairs);

function codeOf(fn) {
  try {
    fn();
  } catch (e) {
    return e.code;
  }
  return 'ok';
}

test('contexts encode canonically; bad ones are refused', () => {
  for (const v of V.contexts) {
    assert.equal(encodeContext(ctx(v.pairs)).toString('hex'), v.encoded, v.name);
    assert.equal(encodeContext(Object.fromEntries(v.pairs)).toString('hex'), v.encoded, v.name);
  }
  for (const v of V.bad_contexts) {
    if (hasDuplicates(v.pairs)) continue;
    assert.equal(codeOf(() => encodeContext(ctx(v.pairs))), 'bad_request', v.name);
  }
});

test('envelopes parse to their fields; bad ones are bad_envelope', () => {
  for (const v of V.envelopes) {
    const info = parseEnvelope(envelopeFromText(v.text));
    assert.deepEqual(info, { tenant: v.tenant, key: v.key, version: v.version, id: v.id }, v.name);
  }
  for (const v of V.bad_envelopes) {
    assert.equal(codeOf(() => parseEnvelope(envelopeFromText(v.text))), 'bad_envelope', v.name);
  }
});

test('records: sealed byte for byte, opened; bad ones refused with their class', () => {
  for (const v of V.records) {
    const env = envelopeFromText(v.envelope);
    const sealed = sealRecord(hex(v.dek), env, ctx(v.context), hex(v.plaintext), hex(v.nonce));
    assert.equal(sealedToText(sealed), v.text, v.name);
    const rec = parseRecord(sealedFromText(v.text));
    assert.equal(openRecord(hex(v.dek), rec, ctx(v.context)).toString('hex'), v.plaintext, v.name);
  }
  const dek = hex(V.records[0].dek);
  for (const v of V.bad_records) {
    const code = codeOf(() => openRecord(dek, parseRecord(sealedFromText(v.text)), ctx(v.context)));
    assert.equal(code, v.error, v.name);
  }
});

function openStream(dek, bytes, context) {
  const h = parseStreamHeader(bytes);
  if (!h) throw Object.assign(new Error('ends inside its header'), { code: 'bad_envelope' });
  const c = new ChunkCipher(dek, h.header, context);
  const w = h.chunkSize + 16;
  let rest = bytes.subarray(h.header.length);
  const out = [];
  while (rest.length > w) {
    out.push(c.open(rest.subarray(0, w), false));
    rest = rest.subarray(w);
  }
  out.push(c.open(rest, true));
  return Buffer.concat(out);
}

test('streams: sealed byte for byte, opened; reordered, cut or extended ones refused', () => {
  for (const v of V.streams) {
    const header = streamHeader(envelopeFromText(v.envelope), v.chunk_size);
    const c = new ChunkCipher(hex(v.dek), header, ctx(v.context));
    const pt = hex(v.plaintext);
    const parts = [header];
    if (pt.length === 0) parts.push(c.seal(pt, true));
    for (let i = 0; i < pt.length; i += v.chunk_size) {
      parts.push(c.seal(pt.subarray(i, i + v.chunk_size), i + v.chunk_size >= pt.length));
    }
    assert.equal(Buffer.concat(parts).toString('hex'), v.stream, v.name);
    assert.equal(openStream(hex(v.dek), hex(v.stream), ctx(v.context)).toString('hex'), v.plaintext, v.name);
  }
  const dek = hex(V.streams[0].dek);
  for (const v of V.bad_streams) {
    assert.equal(codeOf(() => openStream(dek, hex(v.stream), ctx(v.context))), v.error, v.name);
  }
});

test('MAC tags parse to their version and MAC; bad ones are bad_request', () => {
  for (const v of V.mac_tags) {
    const tag = parseMacTag(v.text);
    assert.deepEqual([tag.version, tag.mac.toString('hex')], [v.version, v.mac], v.name);
    // The MAC is HMAC-SHA256 of the message alone under the version's secret.
    assert.equal(crypto.createHmac('sha256', hex(v.key)).update(hex(v.message)).digest('hex'), v.mac, v.name);
  }
  for (const v of V.bad_mac_tags) {
    assert.equal(codeOf(() => parseMacTag(v.text)), v.error, v.name);
  }
});

test('MAC tags: the daemon makes the vectors\' tags from their secrets (imported, PROTOCOL.md §3.36)', async () => {
  const d = await startDaemon();
  const kh = new Client({ socket: d.socket });
  try {
    // Versions 1 and 2 of one key: each vector's secret imported as that version.
    const byVersion = new Map();
    for (const v of V.mac_tags) if (v.version <= 2 && !byVersion.has(v.version)) byVersion.set(v.version, v.key);
    for (const version of [1, 2]) {
      const p = await kh.call('key_import_params', { tenant: 'vec', key: 'mac', type: 'hmac-sha256' });
      const wrapped = crypto.publicEncrypt(
        { key: p.public_key, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha1' },
        hex(byVersion.get(version)),
      );
      const info = await kh.call('key_import', {
        tenant: 'vec',
        key: 'mac',
        import_token: p.import_token,
        wrapped: wrapped.toString('base64'),
      });
      assert.equal(info.current_version, version);
    }
    let checked = 0;
    for (const v of V.mac_tags) {
      if (v.version > 2) continue;
      const m = await kh.mac('vec/mac', hex(v.message), { version: v.version });
      assert.equal(m.tag, v.text.trim(), v.name);
      assert.equal((await kh.macVerify('vec/mac', hex(v.message), v.text)).valid, true, v.name);
      checked++;
    }
    assert.ok(checked >= 4, `${checked} vectors checked against the daemon`);
    for (const v of V.bad_mac_tags) {
      await assert.rejects(kh.macVerify('vec/mac', 'x', v.text), (e) => e.code === v.error, v.name);
    }
  } finally {
    await kh.close();
    await d.stop();
  }
});
