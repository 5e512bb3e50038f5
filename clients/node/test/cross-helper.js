// The Node.js side of the cross-language tests (clients/python/tests/test_cross.py).
//   node cross-helper.js SOCKET seal-record TENANT/KEY CONTEXT_JSON   stdin plaintext -> khs1: text
//   node cross-helper.js SOCKET open-record CONTEXT_JSON              stdin khs1: text -> plaintext
//   node cross-helper.js SOCKET seal-stream TENANT/KEY CONTEXT_JSON CHUNK   stdin -> sealed stream
//   node cross-helper.js SOCKET open-stream CONTEXT_JSON              stdin sealed stream -> plaintext
import fs from 'node:fs';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

import { Sealer, sealedToText } from '../src/index.js';

const [socket, cmd, ...rest] = process.argv.slice(2);
const sealer = new Sealer({
  socket,
  seal: { maxAgeMs: 60000, maxMessages: 1000, maxBytes: 1 << 20 },
  open: { maxAgeMs: 60000, maxEntries: 100 },
});
const input = fs.readFileSync(0);
try {
  if (cmd === 'seal-record') {
    process.stdout.write(sealedToText(await sealer.seal(rest[0], input, JSON.parse(rest[1]))) + '\n');
  } else if (cmd === 'open-record') {
    process.stdout.write(await sealer.open(input.toString('utf8').trim(), JSON.parse(rest[0])));
  } else if (cmd === 'seal-stream') {
    await pipeline(Readable.from([input]), sealer.sealStream(rest[0], JSON.parse(rest[1]), { chunkSize: Number(rest[2]) }), process.stdout);
  } else if (cmd === 'open-stream') {
    await pipeline(Readable.from([input]), sealer.openStream(JSON.parse(rest[0])), process.stdout);
  } else {
    throw new Error(`unknown command ${cmd}`);
  }
} catch (e) {
  process.stderr.write(`cross-helper: ${e.message}\n`);
  process.exitCode = 1;
} finally {
  sealer.close();
}
