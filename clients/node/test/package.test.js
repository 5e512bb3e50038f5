// `npm pack` makes an artifact that installs offline from the file alone and
// works from an application's folder (ESM import by name, types included)
// against a real daemon.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';

import { startDaemon } from './daemon.js';

const PKG = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
let d;
let dir;

before(async () => {
  d = await startDaemon();
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kh-node-pack-'));
});

after(async () => {
  await d?.stop();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

test('npm pack, then an offline install from the tarball, then a real round trip', () => {
  const npm = (args, cwd) => execFileSync('npm', args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const packed = JSON.parse(npm(['pack', '--json', '--pack-destination', dir], PKG));
  const files = packed[0].files.map((f) => f.path).sort();
  assert.ok(files.includes('index.d.ts') && files.includes('src/index.js') && files.includes('README.md'), files.join());
  assert.ok(!files.some((f) => f.startsWith('test/') || f.startsWith('node_modules/')), files.join());
  const tgz = path.join(dir, packed[0].filename);
  const app = path.join(dir, 'app');
  fs.mkdirSync(app);
  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', type: 'module', private: true }));
  npm(['install', '--offline', '--no-audit', '--no-fund', tgz], app);
  assert.ok(fs.existsSync(path.join(app, 'node_modules/keyhaven/index.d.ts')));
  fs.writeFileSync(
    path.join(app, 'main.js'),
    `import { Client, Sealer, sealedToText } from 'keyhaven';
const kh = new Client();
await kh.keyCreate('acme/app');
const { ciphertext } = await kh.encrypt('acme/app', 'from the packed module', { row: '1' });
const a = (await kh.decrypt(ciphertext, { row: '1' })).plaintext.toString();
const s = new Sealer({ seal: { maxAgeMs: 1000, maxMessages: 10, maxBytes: 1000 }, open: { maxAgeMs: 1000, maxEntries: 10 } });
const b = (await s.open(sealedToText(await s.seal('acme/app', 'sealed', {})), {})).toString();
s.close();
await kh.close();
console.log(a + '|' + b);
`,
  );
  const out = execFileSync('node', ['main.js'], { cwd: app, encoding: 'utf8', env: { ...process.env, KEYHAVEN_SOCKET: d.socket } });
  assert.equal(out.trim(), 'from the packed module|sealed');
});
