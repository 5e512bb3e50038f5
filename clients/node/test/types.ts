// Compiled by `npm run typecheck` (tsc --noEmit), never run: uses the
// declarations the way an application would, so that a wrong or missing
// declaration fails the check.
import {
  BadStoredValueError,
  BlindIndex,
  parseStoredTag,
  reindexBlindIndex,
  type Queryable,
  type ReindexReport,
  Client,
  EncryptedColumn,
  normaliseText,
  DaemonError,
  KeyhavenError,
  encodeContext,
  contextObject,
  keyPath,
  type DecryptResult,
  type EncryptResult,
  type ErrorCode,
  type MacResult,
  type MacVerifyResult,
  parseMacTag,
  type AliasInfo,
  type MacTag,
  type PublicKeyResult,
  type SignResult,
  type VerifyResult,
} from 'keyhaven';

export async function example(): Promise<void> {
  const kh = new Client({ socket: '/tmp/kh.sock', requestTimeoutMs: 1000, connections: 2 });
  const enc: EncryptResult = await kh.encrypt('acme/pii', 'secret', { table: 'users' });
  const dec: DecryptResult = await kh.decrypt(enc.ciphertext, new Map([['table', 'users']]));
  const text: string = dec.plaintext.toString('utf8');
  const dk = await kh.datakey({ tenant: 'acme', key: 'pii' }, {}, { includePlaintext: false });
  const opened = await kh.datakeyDecrypt(dk.envelope);
  const n: number = opened.plaintext.length + text.length;
  const re = await kh.rewrap(enc.ciphertext);
  const keys = await kh.keyList('acme');
  const v: number = keys[0].current_version + re.key_version + n;
  const c: Buffer = encodeContext(contextObject({ a: 'b' }));
  const p: { tenant: string; key: string } = keyPath('acme/pii');
  const idx = await kh.keyCreate('acme/email-index', { type: 'hmac-sha256' });
  const m: MacResult = await kh.mac('acme/email-index', 'alice@example.com', { version: idx.current_version });
  const ok: MacVerifyResult = await kh.macVerify('acme/email-index', Buffer.from('x'), m.tag);
  const valid: boolean = ok.valid && m.key_version === ok.key_version;
  const parsed: MacTag = parseMacTag(m.tag);
  const tagMac: Buffer = parsed.mac;
  await kh.keyCreate('acme/signer', { type: 'ecdsa-p256' });
  const sig: SignResult = await kh.sign('acme/signer', 'payload');
  const sig2: SignResult = await kh.sign({ tenant: 'acme', key: 'signer' }, { digest: Buffer.alloc(32) });
  const checked: VerifyResult = await kh.verify('acme/signer', 'payload', sig.signature, { version: sig.key_version });
  const checked2: VerifyResult = await kh.verify('acme/signer', { digest: Buffer.alloc(32) }, sig2.signature.toString('base64'));
  const pk: PublicKeyResult = await kh.publicKey('acme/signer', { version: 1 });
  const pem: string = pk.pem;
  const created: AliasInfo = await kh.aliasCreate('signing', 'acme/signer');
  const moved: AliasInfo = await kh.aliasUpdate('signing', { tenant: 'acme', key: 'signer' });
  const prev: string | undefined = moved.previous_key;
  const aliases: AliasInfo[] = await kh.aliasList('acme');
  const deleted: AliasInfo = await kh.aliasDelete('acme', 'signing');
  void [parsed.version, tagMac, checked.valid, checked2.algorithm, pem, created.key, prev, aliases, deleted, (await kh.aliasList()).length];
  const col = new EncryptedColumn(kh, 'acme/pii', 'users', 'email');
  const stored: string | null = await col.encrypt(['u1', 2], 'alice@example.com');
  const back: string | null = await col.decrypt('u1/2', stored);
  const bidx = new BlindIndex(kh, 'acme/email-index', { normalise: normaliseText });
  const tags: string[] = await bidx.tags('alice@example.com');
  const t: string | null = await bidx.tag(back);
  void [v, c, p, valid, tags, t];
  const db: Queryable = { query: async () => ({ rows: [], rowCount: 0 }) };
  const report: ReindexReport = await reindexBlindIndex(db, {
    column: col,
    index: bidx,
    indexColumn: 'email_bidx',
    primaryKey: ['org', 'id'],
    batchSize: 100,
    after: report0().lastKey,
    onBatch: async (r: ReindexReport) => void r.lastKey,
  });
  const done: boolean = report.done && report.targetVersion === parseStoredTag(tags[0], 'users.email_bidx').version;
  try {
    parseStoredTag(null, 'users.email_bidx');
  } catch (e) {
    if (e instanceof BadStoredValueError) void [e.column, e.reason, e.code];
  }
  void done;
  try {
    await kh.health();
  } catch (e) {
    if (e instanceof DaemonError) {
      const code: ErrorCode = e.code;
      void code;
    } else if (e instanceof KeyhavenError && e.code === 'timeout') {
      void e;
    }
  }
  await kh.close();
}

import { Sealer, parseRecord, sealedToText, type SealerStats } from 'keyhaven';
import { pipeline } from 'node:stream/promises';
import { Readable, Writable } from 'node:stream';

export async function sealing(): Promise<void> {
  const s = new Sealer({
    seal: { maxAgeMs: 300_000, maxMessages: 10_000, maxBytes: 100 << 20 },
    open: { maxAgeMs: 300_000, maxEntries: 1000 },
  });
  const rec: Buffer = await s.seal('acme/pii', 'x', { column: 'iban' });
  const text: string = sealedToText(rec);
  const plain: Buffer = await s.open(text, { column: 'iban' });
  const id: string = parseRecord(rec).envelopeInfo.id;
  const stats: SealerStats = s.getStats();
  await pipeline(Readable.from([plain]), s.sealStream('acme/files', {}, { chunkSize: 65536 }), new Writable());
  await pipeline(Readable.from([]), s.openStream({}), new Writable());
  void [id, stats.sealKeys];
  s.close();
}

function report0(): ReindexReport {
  return { targetVersion: 1, updated: 0, current: 0, changed: 0, empty: 0, batches: 0, lastKey: null, done: false };
}
