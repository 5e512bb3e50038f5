// Field encryption for SQL rows (node-postgres or any driver): a field is
// encrypted by the daemon with the context {table, column, row}, so a value
// copied to another row or column does not decrypt; a blind index holds the
// daemon's `mac` tag of the normalised value, so `WHERE email_bidx = ANY($1)`
// finds rows by equality without decrypting. Driver-neutral on purpose: it
// makes the values and the parameters, the application keeps its SQL.

import { DaemonError, InvalidInputError } from './errors.js';
import { parseStoredTag } from './mactag.js';

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

/** A SQL identifier, quoted: `"name"` (inner quotes doubled); an array is a qualified name. */
function ident(name) {
  const parts = Array.isArray(name) ? name : [name];
  if (parts.length === 0 || parts.some((p) => typeof p !== 'string' || p === '' || p.includes('\0'))) {
    throw new InvalidInputError('config', 'SQL names must be non-empty strings');
  }
  return parts.map((p) => `"${p.replaceAll('"', '""')}"`).join('.');
}

/** Run `fn` over `items`, at most `limit` at once; results in order. */
async function mapLimit(items, limit, fn) {
  const out = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

/**
 * Recompute a blind-index column under the index key's current version, in
 * batches, after a rotation of that key (node-postgres: `db` is a pg.Pool,
 * or a pg.Client used by nothing else meanwhile; anything with
 * `query(text, values)` answering `{rows, rowCount}`).
 *
 * Rows are walked in primary-key order. A row whose stored tag already names
 * the target version (or a later one) costs no daemon call; for the others
 * the value is decrypted with the row's context, its tag made under the
 * target version, and the row updated only if its ciphertext and tag are still
 * those read (a row written meanwhile keeps its writer's tag: `changed`).
 * Each batch is one transaction, opened after the daemon calls. Idempotent,
 * and resumable from a report's `lastKey` (`after`). A malformed stored tag
 * throws a BadStoredValueError naming the column; a value that does not
 * decrypt, the daemon's error.
 */
export async function reindexBlindIndex(db, opts) {
  const {
    column,
    index,
    indexColumn,
    primaryKey = 'id',
    table = column?.table,
    batchSize = 500,
    after = null,
    maxBatches = Infinity,
    concurrency = 8,
    onBatch,
  } = opts ?? {};
  if (!(column instanceof EncryptedColumn) || !(index instanceof BlindIndex)) {
    throw new InvalidInputError('config', 'column must be an EncryptedColumn and index a BlindIndex');
  }
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new InvalidInputError('config', 'batchSize must be an integer >= 1');
  if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 64) {
    throw new InvalidInputError('config', 'concurrency must be an integer from 1 to 64');
  }
  const pk = Array.isArray(primaryKey) ? primaryKey : [primaryKey];
  const pkSql = pk.map((c) => ident(c));
  const t = ident(table);
  const enc = ident(column.column);
  const idx = ident(indexColumn);
  const named = `${Array.isArray(table) ? table.join('.') : table}.${indexColumn}`;
  let last = after === null || after === undefined ? null : Array.isArray(after) ? [...after] : [after];
  if (last !== null && last.length !== pk.length) {
    throw new InvalidInputError('config', `after must have ${pk.length} value(s), one per primary-key column`);
  }
  const target = (await index.client.keyShow(index.key)).current_version;
  const report = { targetVersion: target, updated: 0, current: 0, changed: 0, empty: 0, batches: 0, lastKey: null, done: false };
  const tuple = (offset) => `(${pk.map((_, i) => `$${offset + i}`).join(', ')})`;
  const select = (where) =>
    `SELECT ${pkSql.join(', ')}, ${enc} AS kh_enc, ${idx} AS kh_idx FROM ${t}` +
    `${where} ORDER BY ${pkSql.join(', ')} LIMIT ${batchSize}`;
  const update =
    `UPDATE ${t} SET ${idx} = $1 WHERE (${pkSql.join(', ')}) = ${tuple(4)}` +
    ` AND ${enc} = $2 AND ${idx} IS NOT DISTINCT FROM $3`;
  while (report.batches < maxBatches) {
    const where = last === null ? '' : ` WHERE (${pkSql.join(', ')}) > ${tuple(1)}`;
    const { rows } = await db.query(select(where), last ?? []);
    if (rows.length === 0) {
      report.done = true;
      break;
    }
    const todo = [];
    for (const row of rows) {
      const key = pk.map((c) => row[c]);
      if (row.kh_enc === null) report.empty += 1;
      else if (row.kh_idx !== null && parseStoredTag(row.kh_idx, named).version >= target) report.current += 1;
      else todo.push({ key, enc: row.kh_enc, old: row.kh_idx });
    }
    const tags = await mapLimit(todo, concurrency, async ({ key, enc: stored }) => {
      const { plaintext } = await column.client.decrypt(stored, column.context(key));
      try {
        return (await index.client.mac(index.key, index.message(plaintext.toString('utf8')), { version: target })).tag;
      } finally {
        plaintext.fill(0);
      }
    });
    if (todo.length) {
      const conn = typeof db.connect === 'function' && typeof db.totalCount === 'number' ? await db.connect() : db;
      try {
        await conn.query('BEGIN');
        try {
          for (let i = 0; i < todo.length; i++) {
            const r = await conn.query(update, [tags[i], todo[i].enc, todo[i].old, ...todo[i].key]);
            if (r.rowCount === 1) report.updated += 1;
            else report.changed += 1;
          }
          await conn.query('COMMIT');
        } catch (e) {
          await conn.query('ROLLBACK').catch(() => {});
          throw e;
        }
      } finally {
        if (conn !== db) conn.release();
      }
    }
    last = pk.map((c) => rows.at(-1)[c]);
    report.lastKey = last;
    report.batches += 1;
    await onBatch?.({ ...report });
    if (rows.length < batchSize) {
      report.done = true;
      break;
    }
  }
  return report;
}
