// The `khm1:` text form of a MAC tag (PROTOCOL.md §3.29): the key version
// (4 bytes, big-endian, >= 1) and HMAC-SHA256 of the message (32 bytes),
// unpadded canonical base64url. A tag names no key: only the version that
// made it. Applications that store tags (a blind index) can read that
// version, e.g. to find the rows to re-index before retiring it.

import { BadStoredValueError, InvalidInputError } from './errors.js';
import { b64urlDecode } from './codec.js';

export const MAC_TAG_PREFIX = 'khm1:';
export const MAC_TAG_LENGTH = 53;

/**
 * Parse a tag as the daemon does: surrounding whitespace removed, the exact
 * prefix, strict base64url, 36 bytes, version >= 1. A bad tag throws an
 * InvalidInputError with code `bad_request` (what `mac_verify` answers for it).
 * @param {string} text
 * @returns {{ version: number, mac: Buffer }}
 */
export function parseMacTag(text) {
  if (typeof text !== 'string') throw new InvalidInputError('bad_request', 'a MAC tag must be a khm1: string');
  const t = text.trim();
  if (!t.startsWith(MAC_TAG_PREFIX)) {
    throw new InvalidInputError('bad_request', `MAC tag: text form must start with \`${MAC_TAG_PREFIX}\``);
  }
  const raw = b64urlDecode(t.slice(MAC_TAG_PREFIX.length), 'MAC tag', 'bad_request');
  if (raw.length !== 36) throw new InvalidInputError('bad_request', `MAC tag: ${raw.length} bytes, a tag has 36`);
  const version = raw.readUInt32BE(0);
  if (version === 0) throw new InvalidInputError('bad_request', 'MAC tag: key version 0 (versions start at 1)');
  return { version, mac: Buffer.from(raw.subarray(4)) };
}

/**
 * A stored blind-index tag (a column's value), parsed as strictly as
 * parseMacTag and exact: the 53 characters of the canonical tag, no
 * surrounding whitespace. Anything else throws a BadStoredValueError naming
 * `column` (never the value).
 * @param {unknown} value
 * @param {string} column
 */
export function parseStoredTag(value, column) {
  if (typeof value !== 'string') {
    throw new BadStoredValueError(column, `a blind-index tag must be a khm1: string, not ${value === null ? 'null' : typeof value}`);
  }
  if (value.length !== MAC_TAG_LENGTH || value.trim() !== value) {
    throw new BadStoredValueError(column, `not a khm1: tag (${value.length} characters, a tag has ${MAC_TAG_LENGTH})`);
  }
  try {
    return parseMacTag(value);
  } catch (e) {
    if (e instanceof InvalidInputError) throw new BadStoredValueError(column, `not a khm1: tag: ${e.message.replace(` (${e.code})`, '')}`);
    throw e;
  }
}
