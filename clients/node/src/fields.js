// Field encryption for SQL rows (node-postgres or any driver): a field is
// encrypted by the daemon with the context {table, column, row}, so a value
// copied to another row or column does not decrypt; a blind index holds the
// daemon's `mac` tag of the normalised value, so `WHERE email_bidx = ANY($1)`
// finds rows by equality without decrypting. Driver-neutral on purpose: it
// makes the values and the parameters, the application keeps its SQL.

import { DaemonError, InvalidInputError } from './errors.js';

/** The default normalisation of a blind index: NFKC, surrounding space removed, lower-cased. */
export function normaliseText(value) {
  return value.normalize('NFKC').trim().toLowerCase();
}

function rowId(row) {
  const parts = Array.isArray(row) ? row : [row];
  if (parts.length === 0 || parts.some((p) => p === null || p === undefined || p === '')) {
    throw new InvalidInputError('bad_request', "the row's primary key must be set before its fields are encrypted");
  }
  return parts.map(String).join('/');
}

/** Encrypts and decrypts one column's values, bound to table, column and row. */
export class EncryptedColumn {
  constructor(client, key, table, column) {
    if (typeof table !== 'string' || table === '' || typeof column !== 'string' || column === '') {
      throw new InvalidInputError('config', 'table and column must be non-empty strings');
    }
    this.client = client;
    this.key = key;
    this.table = table;
    this.column = column;
  }

  /** `{table, column, row}`; `row` is the primary key (an array for a composite one, joined with `/`). */
  context(row) {
    return { table: this.table, column: this.column, row: rowId(row) };
  }

  /** The `khc1:` ciphertext to store for `value` (a string) in row `row`; null stays null. */
  async encrypt(row, value) {
    if (value === null || value === undefined) return null;
    if (typeof value !== 'string') throw new InvalidInputError('bad_request', `${this.column} must be a string or null`);
    const ctx = this.context(row);
    return (await this.client.encrypt(this.key, value, ctx)).ciphertext;
  }

  /** The value stored in row `row`; a value moved from elsewhere is a DaemonError `integrity`. */
  async decrypt(row, stored) {
    if (stored === null || stored === undefined) return null;
    const { plaintext } = await this.client.decrypt(stored, this.context(row));
    try {
      return plaintext.toString('utf8');
    } finally {
      plaintext.fill(0);
    }
  }
}

/**
 * Tags of normalised values under an `hmac-sha256` key. The whole `khm1:` tag
 * is stored: it names the key version, so after a rotation `tags()` asks for
 * every version the key still has and rows indexed earlier are still found.
 */
export class BlindIndex {
  constructor(client, key, { normalise = normaliseText } = {}) {
    this.client = client;
    this.key = key;
    this.normalise = normalise;
  }

  message(value) {
    if (typeof value !== 'string') throw new InvalidInputError('bad_request', 'a blind-indexed value must be a string');
    return Buffer.from(this.normalise(value), 'utf8');
  }

  /** The tag under the key's current version (what a write stores); null stays null. */
  async tag(value) {
    if (value === null || value === undefined) return null;
    return (await this.client.mac(this.key, this.message(value))).tag;
  }

  /** Tags under `versions` (default: every version the key has, retired ones skipped): a lookup's parameter. */
  async tags(value, versions) {
    const message = this.message(value);
    const list = versions ?? (await this.client.keyShow(this.key)).versions.map((v) => v.version);
    const out = [];
    for (const version of list) {
      try {
        out.push((await this.client.mac(this.key, message, { version })).tag);
      } catch (e) {
        if (!(e instanceof DaemonError && e.code === 'version_retired')) throw e;
      }
    }
    return out;
  }
}
