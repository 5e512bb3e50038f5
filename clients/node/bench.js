// Measures this client against a running daemon, as `keyhaven bench` does for
// the Rust client: ops/s and p50/p99 per op and concurrency. Concurrent
// callers share one Client (pipelined on its pool); seal/open run in this
// process with a Sealer's caches. `cpu us/op` is this process's CPU time
// (user and system) per operation: less sensitive to other load on the
// machine than ops/s.
//   node bench.js [--socket S] [--duration-ms 3000] [--concurrency 1,16] [--payload 32]
import { performance } from 'node:perf_hooks';

import { Client, Sealer } from './src/index.js';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const durationMs = Number(args['duration-ms'] ?? 3000);
const levels = (args.concurrency ?? '1,16').split(',').map(Number);
const payload = Buffer.alloc(Number(args.payload ?? 32), 0x61);
const kh = new Client({ socket: args.socket });
const key = 'bench/node';
try {
  await kh.keyCreate(key);
} catch (e) {
  if (e.code !== 'already_exists') throw e;
}
const ct = (await kh.encrypt(key, payload)).ciphertext;
const sealer = new Sealer({
  socket: args.socket,
  seal: { maxAgeMs: 300000, maxMessages: 1 << 30, maxBytes: 2 ** 40 },
  open: { maxAgeMs: 300000, maxEntries: 1000 },
});
const record = await sealer.seal(key, Buffer.alloc(1024, 0x62));
const kib = Buffer.alloc(1024, 0x62);

const ops = {
  encrypt: () => kh.encrypt(key, payload),
  decrypt: () => kh.decrypt(ct),
  'seal 1KiB': () => sealer.seal(key, kib),
  'open 1KiB': () => sealer.open(record),
};

function pct(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

console.log('op          conc      ops/s   p50 ms   p99 ms  cpu us/op');
for (const [name, op] of Object.entries(ops)) {
  for (const c of levels) {
    const lat = [];
    const end = performance.now() + durationMs;
    const cpu0 = process.cpuUsage();
    await Promise.all(
      Array.from({ length: c }, async () => {
        while (performance.now() < end) {
          const t0 = performance.now();
          await op();
          lat.push(performance.now() - t0);
        }
      }),
    );
    const cpu = process.cpuUsage(cpu0);
    lat.sort((a, b) => a - b);
    const rate = lat.length / (durationMs / 1000);
    const cpuPerOp = (cpu.user + cpu.system) / Math.max(lat.length, 1);
    console.log(
      `${name.padEnd(11)} ${String(c).padStart(4)} ${rate.toFixed(0).padStart(10)} ${pct(lat, 50).toFixed(2).padStart(8)} ${pct(lat, 99).toFixed(2).padStart(8)} ${cpuPerOp.toFixed(1).padStart(10)}`,
    );
  }
}
// Revocation delay: from the answer to `revoke` until the Sealer's cache no
// longer holds the key (the event has arrived and been applied).
const rounds = Number(args['revoke-rounds'] ?? 20);
const revKey = { tenant: 'bench', key: 'node-rev' };
try {
  await kh.keyCreate(revKey);
} catch (e) {
  if (e.code !== 'already_exists') throw e;
}
const delays = [];
for (let i = 0; i < rounds; i++) {
  await sealer.seal(revKey, 'x');
  const scope = { kind: 'key', ...revKey };
  await kh.call('revoke', { scope, reason: 'unspecified' });
  const t0 = performance.now();
  while (sealer.getStats().sealKeys > 1) await new Promise((r) => setImmediate(r));
  delays.push(performance.now() - t0);
  await kh.call('revoke_lift', { scope, reason: 'unspecified' });
}
delays.sort((a, b) => a - b);
console.log(
  `revoke -> cache empty, ${rounds} rounds: p50 ${pct(delays, 50).toFixed(2)} ms, max ${delays.at(-1).toFixed(2)} ms`,
);
sealer.close();
await kh.close();
