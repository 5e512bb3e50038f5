// Compiled by `npm run typecheck` (tsc --noEmit), never run: uses the
// declarations the way an application would, so that a wrong or missing
// declaration fails the check.
import {
  Client,
  DaemonError,
  KeyhavenError,
  encodeContext,
  contextObject,
  keyPath,
  type DecryptResult,
  type EncryptResult,
  type ErrorCode,
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
  void [v, c, p];
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
