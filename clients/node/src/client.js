// The Client: the operations an application uses, over a small pool of
// pipelined connections that are (re)opened on demand. Results carry the
// wire's field names (PROTOCOL.md §3), with base64 fields decoded to Buffers.

import { Connection } from './connection.js';
import { InvalidInputError, ProtocolError } from './errors.js';
import { b64decode, b64encode, checkName, contextObject, keyPath, toBytes } from './codec.js';

export const SOCKET_ENV = 'KEYHAVEN_SOCKET';
export const DEFAULT_SOCKET = '/run/keyhaven/keyhaven.sock';
export const DEFAULT_CONNECT_TIMEOUT_MS = 5000;
export const DEFAULT_REQUEST_TIMEOUT_MS = 30000;
export const VERSION = '0.1.0';

function timeoutOption(value, fallback, name) {
  if (value === undefined) return fallback;
  if (value === null || value === 0) return null; // wait for ever
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) {
    throw new InvalidInputError('config', `${name} must be a number of milliseconds ≥ 0, or null`);
  }
  return value;
}

export class Client {
  /**
   * @param {object} [opts]
   * @param {string} [opts.socket] the socket; else $KEYHAVEN_SOCKET, else /run/keyhaven/keyhaven.sock
   * @param {number|null} [opts.connectTimeoutMs] connect and `hello`, 5000 by default; null or 0: no limit
   * @param {number|null} [opts.requestTimeoutMs] each answer, 30000 by default; null or 0: no limit
   * @param {number} [opts.connections] connections in the pool, 1..64 (default 2)
   * @param {string} [opts.clientName] sent in `hello`
   */
  constructor(opts = {}) {
    this.socket = opts.socket ?? process.env[SOCKET_ENV] ?? DEFAULT_SOCKET;
    if (typeof this.socket !== 'string' || this.socket === '') {
      throw new InvalidInputError('config', 'socket must be a non-empty path');
    }
    this.connectTimeoutMs = timeoutOption(opts.connectTimeoutMs, DEFAULT_CONNECT_TIMEOUT_MS, 'connectTimeoutMs');
    this.requestTimeoutMs = timeoutOption(opts.requestTimeoutMs, DEFAULT_REQUEST_TIMEOUT_MS, 'requestTimeoutMs');
    const n = opts.connections ?? 2;
    if (!Number.isInteger(n) || n < 1 || n > 64) {
      throw new InvalidInputError('config', 'connections must be an integer from 1 to 64');
    }
    this.clientName = opts.clientName ?? `keyhaven-node/${VERSION}`;
    this.onEvent = opts.onEvent;
    this.slots = new Array(n).fill(null); // each: Promise<Connection> | null
    this.closed = false;
    this.connects = 0;
  }

  /** Connections opened so far (reconnects included). */
  get connectionsOpened() {
    return this.connects;
  }

  #open(i) {
    const slot = { conn: null, promise: null };
    slot.promise = Connection.open({
      socket: this.socket,
      connectTimeoutMs: this.connectTimeoutMs,
      clientName: this.clientName,
      onEvent: this.onEvent,
      onClose: () => {
        if (this.slots[i] === slot) this.slots[i] = null;
      },
    }).then(
      (conn) => {
        slot.conn = conn;
        return conn;
      },
      (err) => {
        if (this.slots[i] === slot) this.slots[i] = null;
        throw err;
      },
    );
    this.connects++;
    this.slots[i] = slot;
    return slot.promise;
  }

  /**
   * A live connection: an idle open one, else a new one in a free slot,
   * else the open one with the fewest requests in flight (pipelining).
   */
  async connection() {
    if (this.closed) throw new InvalidInputError('config', 'the client is closed');
    let best = null;
    let opening = null;
    let free = -1;
    for (let i = 0; i < this.slots.length; i++) {
      const s = this.slots[i];
      if (s !== null && s.conn !== null && s.conn.closed) this.slots[i] = null;
      if (this.slots[i] === null) {
        if (free < 0) free = i;
      } else if (s.conn === null) {
        opening = s;
      } else if (best === null || s.conn.inFlight < best.conn.inFlight) {
        best = s;
      }
    }
    if (best !== null && best.conn.inFlight === 0) return best.conn;
    if (free >= 0 && (best === null || opening === null)) return this.#open(free);
    if (best !== null) return best.conn;
    return opening.promise;
  }

  /** Close every connection; calls in flight fail with `connection_closed`. */
  async close() {
    this.closed = true;
    const slots = this.slots;
    this.slots = slots.map(() => null);
    await Promise.all(
      slots.map(async (s) => {
        if (s === null) return;
        try {
          (await s.promise).destroy(null);
        } catch {
          // it never opened
        }
      }),
    );
  }

  /** Any operation by name (PROTOCOL.md §3): resolves with the `ok` object. */
  async call(op, params) {
    const conn = await this.connection();
    return conn.request(op, params, this.requestTimeoutMs);
  }

  health() {
    return this.call('health');
  }

  /** The Prometheus text exposition (`metrics`, PROTOCOL.md §3.33; needs the `metrics` permission). */
  async metrics() {
    return (await this.call('metrics')).text;
  }

  whoami() {
    return this.call('whoami');
  }

  /**
   * Make a key; `type` is `aes256-gcm` (the daemon's default when omitted),
   * `hmac-sha256` (for `mac`/`macVerify`), `ecdsa-p256`, `ecdsa-p384` or
   * `rsa-3072-pss` (for `sign`/`verify`/`publicKey`) or `rsa-4096-oaep`
   * (PROTOCOL.md §3.3).
   */
  keyCreate(path, { type, rotateEverySecs, idempotencyKey, description, tags } = {}) {
    const params = keyPath(path);
    if (type !== undefined) {
      if (typeof type !== 'string' || type === '') {
        throw new InvalidInputError('bad_request', 'type must be a key type string such as hmac-sha256');
      }
      params.type = type;
    }
    if (rotateEverySecs !== undefined) {
      if (!Number.isSafeInteger(rotateEverySecs) || rotateEverySecs < 0) {
        throw new InvalidInputError('bad_request', 'rotateEverySecs must be a whole number of seconds (0: none)');
      }
      params.rotate_every_secs = rotateEverySecs;
    }
    if (idempotencyKey !== undefined) {
      if (typeof idempotencyKey !== 'string' || !/^[A-Za-z0-9._:-]{1,64}$/.test(idempotencyKey)) {
        throw new InvalidInputError('bad_request', 'idempotencyKey must be 1 to 64 of A-Z a-z 0-9 . _ : -');
      }
      params.idempotency_key = idempotencyKey;
    }
    if (description !== undefined) {
      if (typeof description !== 'string') throw new InvalidInputError('bad_request', 'description must be a string');
      params.description = description;
    }
    if (tags !== undefined) params.tags = tagObject(tags, 'tags');
    return this.call('key_create', params);
  }

  keyShow(path) {
    return this.call('key_show', keyPath(path));
  }

  /**
   * Every key (of one tenant): follows the daemon's pages (PROTOCOL.md §3.4)
   * of at most `pageSize` keys (1..1000; the daemon's default 1000).
   */
  async keyList(tenant, { pageSize, tags } = {}) {
    const params = tenant === undefined || tenant === null ? {} : { tenant: checkName(tenant, 'tenant') };
    if (tags !== undefined) params.tags = tagObject(tags, 'tags');
    if (pageSize !== undefined) {
      if (!Number.isInteger(pageSize) || pageSize < 1 || pageSize > 1000) {
        throw new InvalidInputError('bad_request', 'pageSize must be an integer from 1 to 1000');
      }
      params.limit = pageSize;
    }
    const keys = [];
    for (;;) {
      const ok = await this.call('key_list', params);
      keys.push(...ok.keys);
      if (typeof ok.next !== 'string') return keys;
      if (ok.next === params.after) throw new ProtocolError('`key_list` returned the same page again');
      params.after = ok.next;
    }
  }

  async encrypt(path, plaintext, context) {
    const params = {
      ...keyPath(path),
      plaintext: b64encode(toBytes(plaintext, 'plaintext')),
      context: contextObject(context),
    };
    return this.call('encrypt', params);
  }

  async decrypt(ciphertext, context) {
    if (typeof ciphertext !== 'string') throw new InvalidInputError('bad_request', 'ciphertext must be a khc1: string');
    const ok = await this.call('decrypt', { ciphertext, context: contextObject(context) });
    return { ...ok, plaintext: b64decode(ok.plaintext, 'the plaintext') };
  }

  async datakey(path, context, { includePlaintext = true } = {}) {
    const ok = await this.call('datakey', {
      ...keyPath(path),
      context: contextObject(context),
      include_plaintext: includePlaintext,
    });
    if (ok.plaintext !== undefined) ok.plaintext = b64decode(ok.plaintext, 'the data key');
    return ok;
  }

  async datakeyDecrypt(envelope, context) {
    if (typeof envelope !== 'string') throw new InvalidInputError('bad_request', 'envelope must be a khe1: string');
    const ok = await this.call('datakey_decrypt', { envelope, context: contextObject(context) });
    return { ...ok, plaintext: b64decode(ok.plaintext, 'the data key') };
  }

  rewrap(text, context) {
    if (typeof text !== 'string') throw new InvalidInputError('bad_request', 'text must be a khe1: or khc1: string');
    return this.call('rewrap', { text, context: contextObject(context) });
  }

  /**
   * The HMAC-SHA256 tag (`khm1:`) of `message` under an `hmac-sha256` key,
   * computed in the daemon's token (PROTOCOL.md §3.29). `version`: an older
   * key version, to reproduce the tags it gave (e.g. a blind index made
   * before a rotation). Resolves with `{ tag, key_version }`.
   */
  async mac(path, message, { version } = {}) {
    const params = { ...keyPath(path), message: b64encode(toBytes(message, 'message')) };
    if (version !== undefined) params.version = checkVersion(version);
    return this.call('mac', params);
  }

  /**
   * Whether `tag` is the MAC of `message` under the key version the tag
   * names (PROTOCOL.md §3.30). Resolves with `{ valid, key_version }`; a
   * mismatch is `valid: false`, not an error.
   */
  async macVerify(path, message, tag) {
    if (typeof tag !== 'string') throw new InvalidInputError('bad_request', 'tag must be a khm1: string');
    return this.call('mac_verify', { ...keyPath(path), message: b64encode(toBytes(message, 'message')), tag });
  }

  /**
   * A signature by the current version of a signing key (`ecdsa-p256`,
   * `ecdsa-p384`, `rsa-3072-pss`), made in the token (PROTOCOL.md §3.31).
   * `input`: the message (bytes or a UTF-8 string; the daemon hashes it), or
   * `{ digest }`, its SHA-256 (SHA-384 for P-384) computed by the caller.
   * Resolves with `{ signature: Buffer, key_version, algorithm }`: DER
   * `Ecdsa-Sig-Value` for ECDSA, the 384-byte PSS signature for RSA.
   */
  async sign(path, input) {
    const ok = await this.call('sign', { ...keyPath(path), ...messageOrDigest(input) });
    return { ...ok, signature: b64decode(ok.signature, 'the signature') };
  }

  /**
   * Whether `signature` is a signature of `input` (a message, or
   * `{ digest }`) by a version of a signing key, checked in the token
   * (PROTOCOL.md §3.34). `signature`: bytes as `sign` gave them, or their
   * standard base64. `version`: the version whose public key checks it (the
   * current one by default). Resolves with `{ valid, key_version, algorithm }`;
   * a signature that does not verify is `valid: false`, not an error.
   */
  async verify(path, input, signature, { version } = {}) {
    const params = { ...keyPath(path), ...messageOrDigest(input), signature: signatureText(signature) };
    if (version !== undefined) params.version = checkVersion(version);
    return this.call('verify', params);
  }

  /**
   * The public key of a version (the current one by default) of a signing
   * key or an `rsa-4096-oaep` key (PROTOCOL.md §3.32). Resolves with
   * `{ pem, key_version, type }`: `pem` is a SubjectPublicKeyInfo PEM, which
   * `crypto.createPublicKey` reads (and can `export({ format: 'jwk' })`).
   */
  async publicKey(path, { version } = {}) {
    const params = keyPath(path);
    if (version !== undefined) params.version = checkVersion(version);
    return this.call('public_key', params);
  }

  /**
   * Make `alias` a second name for the key `path` (in the key's tenant;
   * PROTOCOL.md §3.37). Resolves with the AliasInfo.
   */
  async aliasCreate(alias, path) {
    const { tenant, key } = keyPath(path);
    return this.call('alias_create', { tenant, alias: checkName(alias, 'alias'), key });
  }

  /** Move `alias` to the key `path` of the same tenant (§3.38); the answer has `previous_key`. */
  async aliasUpdate(alias, path) {
    const { tenant, key } = keyPath(path);
    return this.call('alias_update', { tenant, alias: checkName(alias, 'alias'), key });
  }

  /** Remove an alias (its key is untouched; §3.39); resolves with the AliasInfo removed. */
  async aliasDelete(tenant, alias) {
    return this.call('alias_delete', { tenant: checkName(tenant, 'tenant'), alias: checkName(alias, 'alias') });
  }

  /** Aliases (of one tenant, else of every tenant), sorted by tenant then alias (§3.40). */
  async aliasList(tenant) {
    const params = tenant === undefined || tenant === null ? {} : { tenant: checkName(tenant, 'tenant') };
    const ok = await this.call('alias_list', params);
    if (!Array.isArray(ok.aliases)) throw new ProtocolError('`alias_list` answered without `aliases`');
    return ok.aliases;
  }

  subscribeRevocations() {
    return this.call('subscribe_revocations');
  }
}

function checkVersion(version) {
  if (!Number.isInteger(version) || version < 1 || version > 0xffffffff) {
    throw new InvalidInputError('bad_request', 'version must be an integer >= 1');
  }
  return version;
}

/** `sign`/`verify` input: the message (bytes or a string), or `{ digest }` of 32 or 48 bytes. */
function messageOrDigest(input) {
  if (input !== null && typeof input === 'object' && !(input instanceof Uint8Array)) {
    const fields = Object.keys(input);
    if (fields.length !== 1 || (fields[0] !== 'digest' && fields[0] !== 'message')) {
      throw new InvalidInputError('bad_request', 'give the message, or exactly one of { message } and { digest }');
    }
    if (fields[0] === 'message') return { message: b64encode(toBytes(input.message, 'message')) };
    if (typeof input.digest === 'string') {
      throw new InvalidInputError('bad_request', 'digest must be bytes (a Buffer or a Uint8Array), not a string');
    }
    const digest = toBytes(input.digest, 'digest');
    if (digest.length !== 32 && digest.length !== 48) {
      throw new InvalidInputError(
        'bad_request',
        `digest of ${digest.length} bytes: a SHA-256 digest has 32, a SHA-384 digest 48`,
      );
    }
    return { digest: b64encode(digest) };
  }
  return { message: b64encode(toBytes(input, 'message')) };
}

/** A signature as the wire takes it: bytes, or a string of standard base64 (checked). */
function signatureText(signature) {
  if (typeof signature === 'string') {
    b64decode(signature, 'signature');
    return signature;
  }
  if (!(signature instanceof Uint8Array)) {
    throw new InvalidInputError('bad_request', 'signature must be a Buffer, a Uint8Array or a base64 string');
  }
  return b64encode(toBytes(signature, 'signature'));
}

/** Tags as the daemon takes them: an object of string values (the daemon checks names and bounds). */
function tagObject(tags, what) {
  if (tags === null || typeof tags !== 'object' || Array.isArray(tags)) {
    throw new InvalidInputError('bad_request', `${what} must be an object of NAME: VALUE strings`);
  }
  for (const [name, value] of Object.entries(tags)) {
    if (typeof value !== 'string') {
      throw new InvalidInputError('bad_request', `${what}: the value of tag ${JSON.stringify(name)} must be a string`);
    }
  }
  return { ...tags };
}
