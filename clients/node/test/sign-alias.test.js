// sign, verify, publicKey and the alias operations against a real daemon.
// Every signature is also checked here with node:crypto against the public
// key the daemon served, so a wrong key or a wrong encoding fails the test.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { after, before, test } from 'node:test';

import { Client, DaemonError, InvalidInputError, KeyhavenError, parseMacTag } from '../src/index.js';
import { startDaemon } from './daemon.js';

let d;
let kh;

before(async () => {
  d = await startDaemon();
  kh = new Client({ socket: d.socket });
  await kh.keyCreate('acme/pii');
  await kh.keyCreate('acme/index', { type: 'hmac-sha256' });
  await kh.keyCreate('acme/ec', { type: 'ecdsa-p256' });
  await kh.keyCreate('acme/ec2', { type: 'ecdsa-p256' });
  await kh.keyCreate('acme/rsa', { type: 'rsa-3072-pss' });
});

after(async () => {
  await kh?.close();
  await d?.stop();
});

async function rejectsWith(promise, code, cls = KeyhavenError) {
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof cls, `${e} is not a ${cls.name}`);
    assert.equal(e.code, code, String(e));
    return true;
  });
}

const sha256 = (m) => crypto.createHash('sha256').update(m).digest();
const pss = (pem) => ({ key: pem, padding: crypto.constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 });

test('ecdsa-p256: sign a message and a digest; verify in the daemon and with node:crypto', async () => {
  const message = Buffer.from('{"sub":"alice"}');
  const s = await kh.sign('acme/ec', message);
  assert.ok(Buffer.isBuffer(s.signature));
  assert.equal(s.signature[0], 0x30, 'a DER SEQUENCE');
  assert.deepEqual([s.key_version, s.algorithm], [1, 'ecdsa-p256-sha256']);

  const pk = await kh.publicKey('acme/ec');
  assert.deepEqual([pk.key_version, pk.type], [1, 'ecdsa-p256']);
  assert.match(pk.pem, /^-----BEGIN PUBLIC KEY-----\n[\s\S]+\n-----END PUBLIC KEY-----\n$/);
  const key = crypto.createPublicKey(pk.pem);
  assert.deepEqual([key.asymmetricKeyType, key.asymmetricKeyDetails.namedCurve], ['ec', 'prime256v1']);
  assert.equal((await kh.publicKey({ tenant: 'acme', key: 'ec' }, { version: 1 })).pem, pk.pem);

  // Locally: ECDSA with SHA-256 over the message, DER signature (node's default encoding).
  assert.equal(crypto.verify('sha256', message, pk.pem, s.signature), true);
  assert.equal(crypto.verify('sha256', Buffer.from('{"sub":"mallory"}'), pk.pem, s.signature), false);
  // Another key's public key does not verify it.
  const other = await kh.publicKey('acme/ec2');
  assert.notEqual(other.pem, pk.pem);
  assert.equal(crypto.verify('sha256', message, other.pem, s.signature), false);

  // The caller's digest gives a signature of the same message.
  const sd = await kh.sign('acme/ec', { digest: sha256(message) });
  assert.equal(crypto.verify('sha256', message, pk.pem, sd.signature), true);
  // Randomised: two signatures of one message differ, both valid.
  assert.notDeepEqual(sd.signature, s.signature);
  // A string message is its UTF-8 bytes; { message } is the same as the bare message.
  const ss = await kh.sign('acme/ec', { message: 'héllo' });
  assert.equal(crypto.verify('sha256', Buffer.from('héllo', 'utf8'), pk.pem, ss.signature), true);

  // In the daemon: true, false for a changed message, a changed signature or another key.
  assert.deepEqual(await kh.verify('acme/ec', message, s.signature), {
    valid: true,
    key_version: 1,
    algorithm: 'ecdsa-p256-sha256',
  });
  assert.equal((await kh.verify('acme/ec', message, s.signature.toString('base64'), { version: 1 })).valid, true);
  assert.equal((await kh.verify('acme/ec', { digest: sha256(message) }, sd.signature)).valid, true);
  assert.equal((await kh.verify('acme/ec', Buffer.from('{"sub":"mallory"}'), s.signature)).valid, false);
  const flipped = Buffer.from(s.signature);
  flipped[flipped.length - 1] ^= 1;
  assert.equal((await kh.verify('acme/ec', message, flipped)).valid, false);
  assert.equal((await kh.verify('acme/ec2', message, s.signature)).valid, false);
  assert.equal((await kh.verify('acme/ec', message, Buffer.from('not DER'))).valid, false);
  await rejectsWith(kh.verify('acme/ec', message, s.signature, { version: 2 }), 'not_found', DaemonError);
  await rejectsWith(kh.publicKey('acme/ec', { version: 2 }), 'not_found', DaemonError);
});

test('rsa-3072-pss: sign; verify in the daemon and with node:crypto (PSS, SHA-256, salt 32)', async () => {
  const message = Buffer.from('invoice 2026-0042');
  const s = await kh.sign('acme/rsa', message);
  assert.deepEqual([s.signature.length, s.key_version, s.algorithm], [384, 1, 'rsa-3072-pss-sha256']);
  const pk = await kh.publicKey('acme/rsa');
  assert.equal(pk.type, 'rsa-3072-pss');
  const key = crypto.createPublicKey(pk.pem);
  assert.deepEqual([key.asymmetricKeyType, key.asymmetricKeyDetails.modulusLength], ['rsa', 3072]);

  assert.equal(crypto.verify('sha256', message, pss(pk.pem), s.signature), true);
  assert.equal(crypto.verify('sha256', Buffer.from('invoice 2026-0043'), pss(pk.pem), s.signature), false);
  // Another RSA key (made here) does not verify it.
  const { publicKey: stranger } = crypto.generateKeyPairSync('rsa', { modulusLength: 3072 });
  assert.equal(crypto.verify('sha256', message, { ...pss(pk.pem), key: stranger }, s.signature), false);
  const sd = await kh.sign('acme/rsa', { digest: sha256(message) });
  assert.equal(crypto.verify('sha256', message, pss(pk.pem), sd.signature), true);

  assert.equal((await kh.verify('acme/rsa', message, s.signature)).valid, true);
  assert.equal((await kh.verify('acme/rsa', { digest: sha256(message) }, s.signature)).valid, true);
  assert.equal((await kh.verify('acme/rsa', Buffer.from('invoice 2026-0043'), s.signature)).valid, false);
  // A signature made here with another key is not valid under the daemon's key.
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 3072 });
  const forged = crypto.sign('sha256', message, { ...pss(null), key: privateKey });
  assert.equal((await kh.verify('acme/rsa', message, forged)).valid, false);
});

test('ecdsa-p384 signs a 48-byte SHA-384 digest', async () => {
  await kh.keyCreate('acme/ec384', { type: 'ecdsa-p384' });
  const message = Buffer.from('p384');
  const digest = crypto.createHash('sha384').update(message).digest();
  const s = await kh.sign('acme/ec384', { digest });
  assert.equal(s.algorithm, 'ecdsa-p384-sha384');
  const pk = await kh.publicKey('acme/ec384');
  assert.equal(crypto.verify('sha384', message, pk.pem, s.signature), true);
  assert.equal((await kh.verify('acme/ec384', message, s.signature)).valid, true);
  // A 32-byte digest is the wrong length for P-384: the daemon says so.
  await rejectsWith(kh.sign('acme/ec384', { digest: sha256(message) }), 'bad_request', DaemonError);
});

test('sign, verify, publicKey: wrong key types and bad input are typed', async () => {
  const sig = (await kh.sign('acme/ec', 'x')).signature;
  await rejectsWith(kh.sign('acme/pii', 'x'), 'wrong_key_type', DaemonError);
  await rejectsWith(kh.sign('acme/index', 'x'), 'wrong_key_type', DaemonError);
  await rejectsWith(kh.verify('acme/pii', 'x', sig), 'wrong_key_type', DaemonError);
  await rejectsWith(kh.publicKey('acme/pii'), 'wrong_key_type', DaemonError);
  await rejectsWith(kh.mac('acme/ec', 'x'), 'wrong_key_type', DaemonError);
  await rejectsWith(kh.encrypt('acme/ec', 'x'), 'wrong_key_type', DaemonError);
  await rejectsWith(kh.sign('acme/nope', 'x'), 'not_found', DaemonError);
  await rejectsWith(kh.sign('acme/ec', Buffer.alloc(65537)), 'payload_too_large', DaemonError);

  // Refused here, before anything is sent.
  await rejectsWith(kh.sign('Acme/ec', 'x'), 'bad_request', InvalidInputError);
  await rejectsWith(kh.sign('acme/ec', 42), 'bad_request', InvalidInputError);
  await rejectsWith(kh.sign('acme/ec', {}), 'bad_request', InvalidInputError);
  await rejectsWith(kh.sign('acme/ec', { message: 'x', digest: sha256('x') }), 'bad_request', InvalidInputError);
  await rejectsWith(kh.sign('acme/ec', { digest: Buffer.alloc(31) }), 'bad_request', InvalidInputError);
  await rejectsWith(kh.sign('acme/ec', { digest: sha256('x').toString('hex') }), 'bad_request', InvalidInputError);
  await rejectsWith(kh.verify('acme/ec', 'x', 42), 'bad_request', InvalidInputError);
  await rejectsWith(kh.verify('acme/ec', 'x', 'not base64!'), 'bad_request', InvalidInputError);
  await rejectsWith(kh.verify('acme/ec', 'x', sig, { version: 0 }), 'bad_request', InvalidInputError);
  await rejectsWith(kh.publicKey('acme/ec', { version: 1.5 }), 'bad_request', InvalidInputError);
});

test('aliases: create, use (encrypt, mac, sign), move, list, delete', async () => {
  await kh.keyCreate('acme/web-2025');
  await kh.keyCreate('acme/web-2026');
  const created = await kh.aliasCreate('web', 'acme/web-2025');
  assert.deepEqual([created.tenant, created.alias, created.key], ['acme', 'web', 'web-2025']);
  assert.equal(typeof created.created_at, 'number');
  assert.equal(created.updated_at, undefined);

  // Used through the alias: answers and ciphertexts name the real key.
  const e1 = await kh.encrypt('acme/web', 'card 1', { row: '1' });
  const d1 = await kh.decrypt(e1.ciphertext, { row: '1' });
  assert.deepEqual([d1.plaintext.toString(), d1.key], ['card 1', 'web-2025']);
  assert.equal((await kh.keyShow('acme/web')).key, 'web-2025');
  await kh.aliasCreate('email-idx', { tenant: 'acme', key: 'index' });
  const viaAlias = await kh.mac('acme/email-idx', 'alice@example.com');
  assert.equal(viaAlias.tag, (await kh.mac('acme/index', 'alice@example.com')).tag);
  assert.equal((await kh.macVerify('acme/email-idx', 'alice@example.com', viaAlias.tag)).valid, true);
  assert.equal(parseMacTag(viaAlias.tag).version, viaAlias.key_version);
  await kh.aliasCreate('signer', 'acme/ec');
  const s = await kh.sign('acme/signer', 'through an alias');
  const pk = await kh.publicKey('acme/signer');
  assert.equal(pk.pem, (await kh.publicKey('acme/ec')).pem);
  assert.equal(crypto.verify('sha256', Buffer.from('through an alias'), pk.pem, s.signature), true);
  assert.equal((await kh.verify('acme/signer', 'through an alias', s.signature)).valid, true);

  // Move: new data names the new key; old data still opens.
  const moved = await kh.aliasUpdate('web', 'acme/web-2026');
  assert.deepEqual([moved.key, moved.previous_key], ['web-2026', 'web-2025']);
  assert.equal(typeof moved.updated_at, 'number');
  const e2 = await kh.encrypt('acme/web', 'card 2');
  assert.equal((await kh.decrypt(e2.ciphertext)).key, 'web-2026');
  assert.equal((await kh.decrypt(e1.ciphertext, { row: '1' })).plaintext.toString(), 'card 1');

  // List: sorted by tenant then alias; of one tenant or of all.
  const listed = await kh.aliasList('acme');
  assert.deepEqual(
    listed.map((a) => [a.alias, a.key]),
    [
      ['email-idx', 'index'],
      ['signer', 'ec'],
      ['web', 'web-2026'],
    ],
  );
  assert.deepEqual(await kh.aliasList(), listed);
  assert.deepEqual(await kh.aliasList('other'), []);

  // Delete: answers what it removed; the name is then nothing; the key is untouched.
  const gone = await kh.aliasDelete('acme', 'web');
  assert.deepEqual([gone.alias, gone.key], ['web', 'web-2026']);
  await rejectsWith(kh.encrypt('acme/web', 'x'), 'not_found', DaemonError);
  assert.equal((await kh.decrypt(e2.ciphertext)).plaintext.toString(), 'card 2');
  assert.deepEqual(
    (await kh.aliasList('acme')).map((a) => a.alias),
    ['email-idx', 'signer'],
  );

  // The daemon's refusals, typed.
  await rejectsWith(kh.aliasCreate('pii', 'acme/web-2025'), 'already_exists', DaemonError);
  await rejectsWith(kh.aliasCreate('signer', 'acme/web-2025'), 'already_exists', DaemonError);
  await rejectsWith(kh.keyCreate('acme/signer'), 'already_exists', DaemonError);
  await rejectsWith(kh.aliasCreate('x', 'acme/missing'), 'not_found', DaemonError);
  await rejectsWith(kh.aliasCreate('chain', 'acme/signer'), 'not_found', DaemonError);
  await rejectsWith(kh.aliasUpdate('web', 'acme/web-2025'), 'not_found', DaemonError);
  await rejectsWith(kh.aliasDelete('acme', 'web'), 'not_found', DaemonError);
  // Refused here.
  await rejectsWith(kh.aliasCreate('Web', 'acme/web-2025'), 'bad_request', InvalidInputError);
  await rejectsWith(kh.aliasCreate('web', 'acme'), 'bad_request', InvalidInputError);
  await rejectsWith(kh.aliasDelete('acme', 42), 'bad_request', InvalidInputError);
  await rejectsWith(kh.aliasList('ACME'), 'bad_request', InvalidInputError);
});
