// The language-neutral vectors of tests/conformance/vectors.json (written by
// an independent generator): contexts, envelopes, records and streams.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { encodeContext } from '../src/index.js';
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
import { ROOT } from './daemon.js';

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
