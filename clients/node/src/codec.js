// Strict encodings the daemon expects (PROTOCOL.md §2.5, ENVELOPE.md §5),
// names (ENVELOPE.md §2.3) and the encryption context with its canonical
// encoding (ENVELOPE.md §4). Node's own base64 decoder accepts anything, so
// every decode here re-checks the alphabet, the padding and the trailing bits.

import { InvalidInputError } from './errors.js';

const STD_B64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
const URL_B64 = /^[A-Za-z0-9_-]*$/;
const NAME = /^[a-z0-9][a-z0-9_-]{0,62}$/;

/** Bytes from a Buffer, a Uint8Array or a string (UTF-8). */
export function toBytes(value, what) {
  if (Buffer.isBuffer(value)) return value;
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  if (typeof value === 'string') {
    if (!value.isWellFormed()) {
      throw new InvalidInputError('bad_request', `${what} is a string with a lone surrogate: not UTF-8`);
    }
    return Buffer.from(value, 'utf8');
  }
  throw new InvalidInputError('bad_request', `${what} must be a Buffer, a Uint8Array or a string`);
}

/** Standard base64 with padding (RFC 4648 §4), as the daemon writes it. */
export function b64encode(bytes) {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
}

/** Decode canonical standard base64; anything else is refused. */
export function b64decode(text, what) {
  if (typeof text !== 'string' || !STD_B64.test(text)) {
    throw new InvalidInputError('bad_request', `${what} is not standard padded base64`);
  }
  const out = Buffer.from(text, 'base64');
  if (out.toString('base64') !== text) {
    throw new InvalidInputError('bad_request', `${what} has non-zero trailing bits (not canonical base64)`);
  }
  return out;
}

/** base64url without padding (ENVELOPE.md §5). */
export function b64urlEncode(bytes) {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64url');
}

/** Decode canonical unpadded base64url; `code` names the failure class. */
export function b64urlDecode(text, what, code = 'bad_envelope') {
  if (!URL_B64.test(text) || text.length % 4 === 1) {
    throw new InvalidInputError(code, `${what} is not canonical unpadded base64url`);
  }
  const out = Buffer.from(text, 'base64url');
  if (out.toString('base64url') !== text) {
    throw new InvalidInputError(code, `${what} has non-zero trailing bits (not canonical base64url)`);
  }
  return out;
}

/** Check a tenant or key name (1..63 of a-z 0-9 - _, starting with a letter or digit). */
export function checkName(name, what) {
  if (typeof name !== 'string' || !NAME.test(name)) {
    const shown = typeof name === 'string' ? JSON.stringify(name.slice(0, 70)) : typeof name;
    throw new InvalidInputError(
      'bad_request',
      `invalid ${what} name ${shown}: 1 to 63 of a-z, 0-9, - and _, starting with a letter or a digit`,
    );
  }
  return name;
}

/** `"tenant/key"` or `{tenant, key}` to `{tenant, key}`, checked. */
export function keyPath(path) {
  let tenant;
  let key;
  if (typeof path === 'string') {
    const i = path.indexOf('/');
    if (i < 0) throw new InvalidInputError('bad_request', 'a key is written TENANT/KEY');
    tenant = path.slice(0, i);
    key = path.slice(i + 1);
  } else if (path && typeof path === 'object') {
    ({ tenant, key } = path);
  } else {
    throw new InvalidInputError('bad_request', 'a key is "tenant/key" or {tenant, key}');
  }
  return { tenant: checkName(tenant, 'tenant'), key: checkName(key, 'key') };
}

export const MAX_CONTEXT_PAIRS = 32;
export const MAX_CONTEXT_KEY = 128;
export const MAX_CONTEXT_VALUE = 1024;

/**
 * Validate an encryption context (a plain object or a Map of strings) and
 * return its pairs as UTF-8 bytes, sorted by the key's bytes: JavaScript's
 * default sort compares UTF-16 code units, which differs for characters
 * above U+FFFF against U+E000..U+FFFF, so it is not used.
 */
export function contextPairs(context) {
  if (context === undefined || context === null) return [];
  let entries;
  if (context instanceof Map) entries = [...context.entries()];
  else if (typeof context === 'object' && !Array.isArray(context)) entries = Object.entries(context);
  else throw new InvalidInputError('bad_request', 'invalid encryption context: an object of strings');
  if (entries.length > MAX_CONTEXT_PAIRS) {
    throw new InvalidInputError(
      'bad_request',
      `invalid encryption context: ${entries.length} pairs, at most ${MAX_CONTEXT_PAIRS}`,
    );
  }
  const pairs = entries.map(([k, v]) => {
    if (typeof k !== 'string' || typeof v !== 'string') {
      throw new InvalidInputError('bad_request', 'invalid encryption context: keys and values must be strings');
    }
    if (!k.isWellFormed() || !v.isWellFormed()) {
      throw new InvalidInputError('bad_request', 'invalid encryption context: a lone surrogate is not UTF-8');
    }
    const kb = Buffer.from(k, 'utf8');
    const vb = Buffer.from(v, 'utf8');
    if (kb.length < 1 || kb.length > MAX_CONTEXT_KEY) {
      throw new InvalidInputError(
        'bad_request',
        `invalid encryption context: a key of ${kb.length} bytes (1 to ${MAX_CONTEXT_KEY})`,
      );
    }
    if (vb.length > MAX_CONTEXT_VALUE) {
      throw new InvalidInputError(
        'bad_request',
        `invalid encryption context: the value of ${JSON.stringify(k.slice(0, 40))} has ${vb.length} bytes (at most ${MAX_CONTEXT_VALUE})`,
      );
    }
    return [k, v, kb, vb];
  });
  pairs.sort((a, b) => Buffer.compare(a[2], b[2]));
  for (let i = 1; i < pairs.length; i++) {
    if (Buffer.compare(pairs[i - 1][2], pairs[i][2]) === 0) {
      throw new InvalidInputError('bad_request', 'invalid encryption context: a key given twice');
    }
  }
  return pairs;
}

/** The context as the wire's JSON object, in canonical order. */
export function contextObject(context) {
  const out = {};
  for (const [k, v] of contextPairs(context)) out[k] = v;
  return out;
}

/** `C(ctx)` of ENVELOPE.md §4.2. */
export function encodeContext(context) {
  const pairs = contextPairs(context);
  const parts = [u16(pairs.length)];
  for (const [, , kb, vb] of pairs) parts.push(u16(kb.length), kb, u16(vb.length), vb);
  return Buffer.concat(parts);
}

function u16(n) {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}
