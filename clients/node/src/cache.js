// Data-key caches of the Sealer (ENVELOPE.md §10.3), as the Rust crate's
// client/src/cache.rs: a sealing cache partitioned by tenant, key and C(ctx)
// with required limits (age, messages, bytes), and an opening cache by
// envelope id (age, entries). A key leaving either cache is overwritten
// with zeros in its Buffer.

import { inspect } from 'node:util';

import { InvalidInputError } from './errors.js';
import { MAX_MESSAGES_PER_KEY } from './seal.js';

function positive(v, name, max = Number.MAX_SAFE_INTEGER) {
  if (!Number.isSafeInteger(v) || v < 1 || v > max) {
    throw new InvalidInputError('config', `${name} must be an integer from 1 to ${max}, not ${v}`);
  }
  return v;
}

/** Checked sealing limits: all three are required. */
export function sealLimits({ maxAgeMs, maxMessages, maxBytes } = {}) {
  return {
    maxAgeMs: positive(maxAgeMs, 'seal.maxAgeMs'),
    maxMessages: positive(maxMessages, 'seal.maxMessages', MAX_MESSAGES_PER_KEY),
    maxBytes: positive(maxBytes, 'seal.maxBytes'),
  };
}

/** Checked opening limits; `maxEntries: 0` turns the opening cache off. */
export function openLimits({ maxAgeMs, maxEntries } = {}) {
  if (!Number.isSafeInteger(maxEntries) || maxEntries < 0) {
    throw new InvalidInputError('config', `open.maxEntries must be an integer ≥ 0, not ${maxEntries}`);
  }
  if (maxEntries > 0) positive(maxAgeMs, 'open.maxAgeMs');
  return { maxAgeMs: maxAgeMs ?? 0, maxEntries };
}

/** Whether a cached key (its origin) is covered by a revocation scope; no scope covers all. */
export function inScope(origin, scope) {
  if (!scope) return true;
  switch (scope.kind) {
    case 'all':
      return true;
    case 'tenant':
      return origin.tenant === scope.tenant;
    case 'key':
      return (
        origin.tenant === scope.tenant &&
        origin.key === scope.key &&
        (scope.version === undefined || scope.version === null || scope.version === origin.version)
      );
    case 'datakey':
      return origin.id === scope.envelope_id;
    default:
      return true; // a scope this client does not know: drop everything
  }
}

export class SealCache {
  constructor(limits) {
    this.limits = limits;
    this.entries = new Map(); // partition -> {key, envelope, origin, created, messages, bytes}
  }

  static partition(tenant, key, ctx) {
    return `${tenant}/${key}\u0000${ctx.toString('hex')}`;
  }

  admits(len) {
    return len <= this.limits.maxBytes;
  }

  /** The cached key of a partition counted for one more record of `len` bytes, or null. */
  take(part, len, now) {
    const e = this.entries.get(part);
    if (!e) return null;
    const fits =
      now - e.created < this.limits.maxAgeMs &&
      e.messages < this.limits.maxMessages &&
      e.bytes + len <= this.limits.maxBytes;
    if (!fits) {
      this.#drop(part, e);
      return null;
    }
    e.messages++;
    e.bytes += len;
    return e;
  }

  insert(part, entry, len, created) {
    const old = this.entries.get(part);
    if (old) this.#drop(part, old);
    this.entries.set(part, { ...entry, created, messages: 1, bytes: len });
  }

  revoke(scope) {
    let n = 0;
    for (const [part, e] of this.entries) {
      if (inScope(e.origin, scope)) {
        this.#drop(part, e);
        n++;
      }
    }
    return n;
  }

  #drop(part, e) {
    e.key.fill(0);
    this.entries.delete(part);
  }

  get size() {
    return this.entries.size;
  }

  /** Counts and limits only: never key material. */
  [inspect.custom]() {
    return `SealCache { keys: ${this.entries.size}, limits: ${JSON.stringify(this.limits)} }`;
  }

  toJSON() {
    return { keys: this.entries.size, limits: this.limits };
  }
}

export class OpenCache {
  constructor(limits) {
    this.limits = limits;
    this.entries = new Map(); // envelope id -> {key, envelope, origin, created}; insertion order = age
  }

  get(id, envelope, now) {
    const e = this.entries.get(id);
    if (!e) return null;
    if (now - e.created >= this.limits.maxAgeMs) {
      this.#drop(id, e);
      return null;
    }
    return e.envelope.equals(envelope) ? e : null;
  }

  insert(entry, created) {
    if (this.limits.maxEntries === 0) {
      entry.key.fill(0);
      return;
    }
    const old = this.entries.get(entry.origin.id);
    if (old) this.#drop(entry.origin.id, old);
    this.entries.set(entry.origin.id, { ...entry, created });
    while (this.entries.size > this.limits.maxEntries) {
      const [id, e] = this.entries.entries().next().value;
      this.#drop(id, e);
    }
  }

  revoke(scope) {
    let n = 0;
    for (const [id, e] of this.entries) {
      if (inScope(e.origin, scope)) {
        this.#drop(id, e);
        n++;
      }
    }
    return n;
  }

  #drop(id, e) {
    e.key.fill(0);
    this.entries.delete(id);
  }

  get size() {
    return this.entries.size;
  }

  /** Counts and limits only: never key material. */
  [inspect.custom]() {
    return `OpenCache { keys: ${this.entries.size}, limits: ${JSON.stringify(this.limits)} }`;
  }

  toJSON() {
    return { keys: this.entries.size, limits: this.limits };
  }
}
