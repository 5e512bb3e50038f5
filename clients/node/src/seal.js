// Sealed records (`khs1:`) and sealed streams: the formats of ENVELOPE.md §10,
// byte for byte as the Rust crate's client/src/seal.rs writes and reads them,
// with AES-256-GCM from node:crypto. Structural faults are `bad_envelope`;
// a tag that does not verify is `integrity`.

import crypto from 'node:crypto';
import { inspect } from 'node:util';

import { IntegrityError, InvalidInputError } from './errors.js';
import { b64urlDecode, b64urlEncode, checkName, encodeContext } from './codec.js';

export const KIND_ENVELOPE = 0x01;
export const KIND_SEALED = 0x03;
export const KIND_STREAM = 0x04;
export const SEALED_PREFIX = 'khs1:';
export const ENVELOPE_PREFIX = 'khe1:';
export const MAX_RECORD_PLAINTEXT = 2 ** 36 - 32;
export const MAX_MESSAGES_PER_KEY = 2 ** 31;
export const MIN_CHUNK = 1024;
export const MAX_CHUNK = 16 * 1024 * 1024;
export const DEFAULT_CHUNK = 65536;
export const MAX_CHUNKS = 2 ** 32;
const NONCE = 12;
const TAG = 16;

function malformed(what, why) {
  return new InvalidInputError('bad_envelope', `malformed ${what}: ${why}`);
}

function preamble(kind) {
  return Buffer.from([0x4b, 0x48, 0x01, kind, 0x01]);
}

function checkPreamble(what, b, kind) {
  if (b.length < 5) throw malformed(what, `${b.length} bytes, too short`);
  if (b[0] !== 0x4b || b[1] !== 0x48) throw malformed(what, 'bad magic');
  if (b[2] !== 0x01) throw malformed(what, `unknown format version ${b[2]}`);
  if (b[3] !== kind) throw malformed(what, `kind ${b[3]}, not ${kind}`);
  if (b[4] !== 0x01) throw malformed(what, `unknown algorithm ${b[4]}`);
}

/**
 * Parse a data-key envelope (ENVELOPE.md §8 steps 2-10). Its fields are
 * claims until the daemon unwraps it.
 */
export function parseEnvelope(b) {
  const what = 'envelope';
  checkPreamble(what, b, KIND_ENVELOPE);
  let at = 5;
  const name = (field) => {
    if (at >= b.length) throw malformed(what, `truncated before the ${field} length`);
    const n = b[at];
    if (n < 1 || n > 63) throw malformed(what, `${field} length ${n}`);
    if (at + 1 + n > b.length) throw malformed(what, `truncated ${field}`);
    const s = b.subarray(at + 1, at + 1 + n).toString('latin1');
    try {
      checkName(s, field);
    } catch {
      throw malformed(what, `invalid ${field} name`);
    }
    at += 1 + n;
    return s;
  };
  const tenant = name('tenant');
  const key = name('key');
  if (at + 4 > b.length) throw malformed(what, 'truncated key version');
  const version = b.readUInt32BE(at);
  if (version === 0) throw malformed(what, 'key version 0');
  at += 4;
  if (at + 16 + 12 + 48 > b.length) throw malformed(what, 'truncated id, nonce or wrapped key');
  const id = b.subarray(at, at + 16).toString('hex');
  at += 16 + 12 + 48;
  if (at !== b.length) throw malformed(what, `${b.length - at} bytes after the wrapped key`);
  return { tenant, key, version, id };
}

/** Binary envelope from its `khe1:` text (ENVELOPE.md §5). */
export function envelopeFromText(text) {
  return b64urlDecode(stripPrefix(text, ENVELOPE_PREFIX, 'envelope'), 'envelope');
}

export function envelopeToText(bytes) {
  return ENVELOPE_PREFIX + b64urlEncode(bytes);
}

function stripPrefix(text, prefix, what) {
  if (typeof text !== 'string') throw malformed(what, `a ${prefix} string is expected`);
  const t = text.trim();
  if (!t.startsWith(prefix)) throw malformed(what, `the text does not start with ${prefix}`);
  return t.slice(prefix.length);
}

/** A sealed record's bytes as `khs1:` text. */
export function sealedToText(bytes) {
  return SEALED_PREFIX + b64urlEncode(bytes);
}

/** A sealed record's bytes from `khs1:` text. */
export function sealedFromText(text) {
  return b64urlDecode(stripPrefix(text, SEALED_PREFIX, 'sealed record'), 'sealed record');
}

function checkKey(key) {
  if (!Buffer.isBuffer(key) || key.length !== 32) {
    throw new InvalidInputError('bad_request', 'a data key is 32 bytes');
  }
}

/**
 * Seal one record under a data key and its envelope (ENVELOPE.md §10.1-10.2).
 * `nonce` is for test vectors only: leave it out.
 */
export function sealRecord(key, envelope, context, plaintext, nonce) {
  checkKey(key);
  parseEnvelope(envelope);
  if (plaintext.length > MAX_RECORD_PLAINTEXT) {
    throw new InvalidInputError('bad_request', `a record holds at most ${MAX_RECORD_PLAINTEXT} bytes; use a stream`);
  }
  const iv = nonce ?? crypto.randomBytes(NONCE);
  const len = Buffer.alloc(2);
  len.writeUInt16BE(envelope.length);
  const header = Buffer.concat([preamble(KIND_SEALED), len, envelope, iv]);
  const c = crypto.createCipheriv('aes-256-gcm', key, iv, { authTagLength: TAG });
  c.setAAD(Buffer.concat([header, encodeContext(context)]));
  return Buffer.concat([header, c.update(plaintext), c.final(), c.getAuthTag()]);
}

/** Parse a sealed record: `{header, envelope, envelopeInfo, nonce, payload}`. */
export function parseRecord(b) {
  const what = 'sealed record';
  if (!Buffer.isBuffer(b)) throw malformed(what, 'bytes are expected');
  checkPreamble(what, b, KIND_SEALED);
  if (b.length < 7) throw malformed(what, 'truncated envelope length');
  const l = b.readUInt16BE(5);
  if (7 + l > b.length) throw malformed(what, 'truncated envelope');
  const envelope = b.subarray(7, 7 + l);
  const envelopeInfo = parseEnvelope(envelope);
  if (7 + l + NONCE > b.length) throw malformed(what, 'truncated nonce');
  const header = b.subarray(0, 7 + l + NONCE);
  const payload = b.subarray(7 + l + NONCE);
  if (payload.length < TAG) throw malformed(what, `a payload of ${payload.length} bytes, shorter than its tag`);
  return { header, envelope, envelopeInfo, nonce: b.subarray(7 + l, 7 + l + NONCE), payload };
}

/** Open a parsed record with its data key; a failed tag is `integrity`. */
export function openRecord(key, record, context) {
  checkKey(key);
  const d = crypto.createDecipheriv('aes-256-gcm', key, record.nonce, { authTagLength: TAG });
  d.setAAD(Buffer.concat([record.header, encodeContext(context)]));
  const body = record.payload.subarray(0, record.payload.length - TAG);
  d.setAuthTag(record.payload.subarray(record.payload.length - TAG));
  const out = d.update(body);
  try {
    d.final();
  } catch {
    out.fill(0);
    throw new IntegrityError(
      'the sealed record does not authenticate: it was altered, or the encryption context differs',
    );
  }
  return out;
}

export function checkChunkSize(c) {
  if (!Number.isInteger(c) || c < MIN_CHUNK || c > MAX_CHUNK) {
    throw new InvalidInputError('bad_request', `the chunk size must be ${MIN_CHUNK} to ${MAX_CHUNK} bytes, not ${c}`);
  }
}

/** A sealed stream's header (ENVELOPE.md §10.4). */
export function streamHeader(envelope, chunkSize) {
  checkChunkSize(chunkSize);
  parseEnvelope(envelope);
  const fixed = Buffer.alloc(6);
  fixed.writeUInt32BE(chunkSize, 0);
  fixed.writeUInt16BE(envelope.length, 4);
  return Buffer.concat([preamble(KIND_STREAM), fixed, envelope]);
}

/**
 * Parse a stream header from the start of `b`; returns null while more
 * bytes are needed, else `{header, envelope, envelopeInfo, chunkSize}`.
 */
export function parseStreamHeader(b) {
  const what = 'sealed stream';
  if (b.length < 11) {
    if (b.length >= 5) checkPreamble(what, b, KIND_STREAM);
    return null;
  }
  checkPreamble(what, b, KIND_STREAM);
  const chunkSize = b.readUInt32BE(5);
  if (chunkSize < MIN_CHUNK || chunkSize > MAX_CHUNK) throw malformed(what, `chunk size ${chunkSize}`);
  const l = b.readUInt16BE(9);
  if (b.length < 11 + l) return null;
  const envelope = b.subarray(11, 11 + l);
  const envelopeInfo = parseEnvelope(envelope);
  return { header: b.subarray(0, 11 + l), envelope, envelopeInfo, chunkSize };
}

/**
 * The chunk cipher of one stream: chunk i with final flag f uses IV
 * u64(i) || f || 000000 and AAD header || C(ctx) || u64(i) || f. It owns its
 * key (a copy), wiped by `wipe()`.
 */
export class ChunkCipher {
  constructor(key, header, context) {
    checkKey(key);
    this.key = Buffer.from(key);
    this.prefix = Buffer.concat([header, encodeContext(context)]);
    this.index = 0;
    this.done = false;
  }

  #ivAad(last) {
    if (this.done) throw new IntegrityError('the sealed stream goes on after its final chunk');
    if (this.index >= MAX_CHUNKS) throw new InvalidInputError('bad_request', 'a stream holds at most 2^32 chunks');
    const tail = Buffer.alloc(9);
    tail.writeBigUInt64BE(BigInt(this.index), 0);
    tail[8] = last ? 1 : 0;
    const iv = Buffer.concat([tail, Buffer.alloc(3)]);
    this.index++;
    if (last) this.done = true;
    return { iv, aad: Buffer.concat([this.prefix, tail]) };
  }

  seal(plaintext, last) {
    const { iv, aad } = this.#ivAad(last);
    const c = crypto.createCipheriv('aes-256-gcm', this.key, iv, { authTagLength: TAG });
    c.setAAD(aad);
    return Buffer.concat([c.update(plaintext), c.final(), c.getAuthTag()]);
  }

  open(sealed, last) {
    if (sealed.length < TAG) {
      throw new IntegrityError('the sealed stream ends inside a chunk: it was truncated');
    }
    const { iv, aad } = this.#ivAad(last);
    const d = crypto.createDecipheriv('aes-256-gcm', this.key, iv, { authTagLength: TAG });
    d.setAAD(aad);
    d.setAuthTag(sealed.subarray(sealed.length - TAG));
    const out = d.update(sealed.subarray(0, sealed.length - TAG));
    try {
      d.final();
    } catch {
      out.fill(0);
      throw new IntegrityError(
        'a chunk of the sealed stream does not authenticate: it was altered, reordered, truncated or extended, or the context differs',
      );
    }
    return out;
  }

  wipe() {
    this.key.fill(0);
  }

  [inspect.custom]() {
    return `ChunkCipher { index: ${this.index}, done: ${this.done} }`;
  }

  toJSON() {
    return { index: this.index, done: this.done };
  }
}
