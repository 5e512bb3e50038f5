// The Sealer: seals and opens records and streams in this process with data
// keys from the daemon, caching them (cache.js) as the Rust crate's
// client/src/sealer.rs does. Its own connection subscribes to revocation
// events (PROTOCOL.md §3.26, §6): an event drops every cached key in scope
// at once; a lost connection drops them all, and until it has reconnected
// and subscribed again nothing is cached. A key fetched while an event came
// in is used for its one call and not cached.

import { Transform } from 'node:stream';
import { inspect } from 'node:util';

import { b64decode, contextObject, encodeContext, keyPath, toBytes } from './codec.js';
import { Connection } from './connection.js';
import { InvalidInputError, ProtocolError } from './errors.js';
import { OpenCache, SealCache, openLimits, sealLimits } from './cache.js';
import {
  ChunkCipher,
  DEFAULT_CHUNK,
  checkChunkSize,
  envelopeFromText,
  envelopeToText,
  openRecord,
  parseEnvelope,
  parseRecord,
  parseStreamHeader,
  sealRecord,
  sealedFromText,
  streamHeader,
} from './seal.js';
import { DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_REQUEST_TIMEOUT_MS, DEFAULT_SOCKET, SOCKET_ENV, VERSION } from './client.js';

const TAG = 16;

export class Sealer {
  /**
   * @param {object} opts
   * @param {{maxAgeMs: number, maxMessages: number, maxBytes: number}} opts.seal required
   * @param {{maxAgeMs: number, maxEntries: number}} opts.open required
   */
  constructor(opts = {}) {
    if (!opts.seal || !opts.open) {
      throw new InvalidInputError('config', 'a Sealer needs its seal and open cache limits: there are no defaults');
    }
    this.socket = opts.socket ?? process.env[SOCKET_ENV] ?? DEFAULT_SOCKET;
    this.connectTimeoutMs = opts.connectTimeoutMs === undefined ? DEFAULT_CONNECT_TIMEOUT_MS : opts.connectTimeoutMs;
    this.requestTimeoutMs = opts.requestTimeoutMs === undefined ? DEFAULT_REQUEST_TIMEOUT_MS : opts.requestTimeoutMs;
    this.sealCache = new SealCache(sealLimits(opts.seal));
    this.openCache = new OpenCache(openLimits(opts.open));
    this.live = false;
    this.epoch = 0;
    this.generation = 0;
    this.conn = null;
    this.connecting = null;
    this.stats = { datakeys: 0, unwraps: 0, sealHits: 0, openHits: 0, revoked: 0, events: 0, connections: 0 };
  }

  /** The socket, liveness and counts: never key material. */
  [inspect.custom]() {
    return `Sealer { socket: ${JSON.stringify(this.socket)}, live: ${this.live}, sealKeys: ${this.sealCache.size}, openKeys: ${this.openCache.size} }`;
  }

  toJSON() {
    return { socket: this.socket, live: this.live, ...this.getStats() };
  }

  /** Counters, and the keys held now. */
  getStats() {
    return { ...this.stats, sealKeys: this.sealCache.size, openKeys: this.openCache.size };
  }

  /** Empty both caches (keys wiped). */
  clear() {
    this.epoch++;
    this.sealCache.revoke(null);
    this.openCache.revoke(null);
  }

  #apply(generation, event) {
    if (event.event === 'revoked' || event.event === 'lagged') {
      this.epoch++;
      this.stats.events++;
      const scope = event.event === 'revoked' ? event.scope : undefined;
      this.stats.revoked += this.sealCache.revoke(scope) + this.openCache.revoke(scope);
    }
    // Other events: ignored (PROTOCOL.md §6).
  }

  #closed(generation) {
    this.epoch++;
    if (generation === this.generation) this.live = false;
    this.sealCache.revoke(null);
    this.openCache.revoke(null);
  }

  /** The subscribed connection, (re)opened when needed. */
  async connection() {
    if (this.conn && !this.conn.closed) return this.conn;
    if (this.connecting) return this.connecting;
    this.connecting = (async () => {
      const generation = ++this.generation;
      this.live = false;
      this.clear();
      const conn = await Connection.open({
        socket: this.socket,
        connectTimeoutMs: this.connectTimeoutMs,
        clientName: `keyhaven-node/${VERSION} sealer`,
        onEvent: (e) => this.#apply(generation, e),
        onClose: () => this.#closed(generation),
      });
      try {
        await conn.request('subscribe_revocations', {}, this.requestTimeoutMs);
      } catch (e) {
        conn.destroy(null);
        throw e;
      }
      this.stats.connections++;
      this.live = this.generation === generation && !conn.closed;
      this.conn = conn;
      return conn;
    })();
    try {
      return await this.connecting;
    } finally {
      this.connecting = null;
    }
  }

  /** Close the connection; both caches are emptied. */
  close() {
    this.conn?.destroy(null);
    this.clear();
  }

  async #datakey(path, context) {
    const conn = await this.connection();
    const ok = await conn.request(
      'datakey',
      { ...path, context: contextObject(context), include_plaintext: true },
      this.requestTimeoutMs,
    );
    this.stats.datakeys++;
    if (typeof ok.plaintext !== 'string') throw new ProtocolError('`datakey` returned no plaintext key');
    const key = b64decode(ok.plaintext, 'the data key');
    const envelope = envelopeFromText(ok.envelope);
    return { key, envelope, origin: { ...parseEnvelope(envelope) } };
  }

  /** Seal one record; resolves with its bytes (`sealedToText` gives `khs1:` text). */
  async seal(path, plaintext, context) {
    const kp = keyPath(path);
    const data = toBytes(plaintext, 'plaintext');
    const part = SealCache.partition(kp.tenant, kp.key, encodeContext(context));
    await this.connection();
    if (this.live && this.sealCache.admits(data.length)) {
      const hit = this.sealCache.take(part, data.length, Date.now());
      if (hit) {
        this.stats.sealHits++;
        return sealRecord(hit.key, hit.envelope, context, data);
      }
    }
    const epoch = this.epoch;
    const fresh = await this.#datakey(kp, context);
    const created = Date.now();
    try {
      if (this.live && this.epoch === epoch && this.sealCache.admits(data.length)) {
        this.sealCache.insert(part, { ...fresh, key: Buffer.from(fresh.key) }, data.length, created);
      }
      return sealRecord(fresh.key, fresh.envelope, context, data);
    } finally {
      fresh.key.fill(0);
    }
  }

  /** Open a record (bytes or `khs1:` text); resolves with the plaintext Buffer. */
  async open(sealed, context) {
    const bytes = typeof sealed === 'string' ? sealedFromText(sealed) : toBytes(sealed, 'sealed record');
    const record = parseRecord(bytes);
    return this.#withKey(record.envelope, record.envelopeInfo, context, (key) => openRecord(key, record, context));
  }

  /** Runs `use(key)` with the envelope's data key, from the cache or the daemon. */
  async #withKey(envelope, info, context, use) {
    contextObject(context); // validate before anything is sent
    const conn = await this.connection();
    if (this.live) {
      const hit = this.openCache.get(info.id, envelope, Date.now());
      if (hit) {
        this.stats.openHits++;
        return use(hit.key);
      }
    }
    const epoch = this.epoch;
    const ok = await conn.request(
      'datakey_decrypt',
      { envelope: envelopeToText(envelope), context: contextObject(context) },
      this.requestTimeoutMs,
    );
    const created = Date.now();
    const key = b64decode(ok.plaintext, 'the data key');
    try {
      this.stats.unwraps++;
      if (this.live && this.epoch === epoch) {
        this.openCache.insert(
          { key: Buffer.from(key), envelope: Buffer.from(envelope), origin: { ...info } },
          created,
        );
      }
      return use(key);
    } finally {
      key.fill(0);
    }
  }

  /**
   * A Transform that seals what is written to it as one sealed stream under
   * a data key of its own (never cached).
   */
  sealStream(path, context, { chunkSize = DEFAULT_CHUNK } = {}) {
    const kp = keyPath(path);
    checkChunkSize(chunkSize);
    contextObject(context);
    let cipher = null;
    let buf = Buffer.alloc(0);
    const start = async (t) => {
      const fresh = await this.#datakey(kp, context);
      try {
        const header = streamHeader(fresh.envelope, chunkSize);
        cipher = new ChunkCipher(fresh.key, header, context);
        t.push(header);
      } finally {
        fresh.key.fill(0);
      }
    };
    return new Transform({
      transform(chunk, _enc, cb) {
        (async () => {
          if (!cipher) await start(this);
          buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
          // A full chunk is sealed once a byte after it is known to exist.
          while (buf.length > chunkSize) {
            this.push(cipher.seal(buf.subarray(0, chunkSize), false));
            buf = buf.subarray(chunkSize);
          }
        })().then(() => cb(), (e) => {
          cipher?.wipe();
          cb(e);
        });
      },
      flush(cb) {
        (async () => {
          if (!cipher) await start(this);
          this.push(cipher.seal(buf, true));
          cipher.wipe();
        })().then(() => cb(), (e) => {
          cipher?.wipe();
          cb(e);
        });
      },
    });
  }

  /**
   * A Transform that opens a sealed stream written to it. Each chunk's
   * plaintext is pushed once it has authenticated; on an error, discard
   * everything it pushed.
   */
  openStream(context) {
    contextObject(context);
    const sealer = this;
    let cipher = null;
    let header = null;
    let buf = Buffer.alloc(0);
    const drain = (t, final) => {
      const whole = header.chunkSize + TAG;
      while (buf.length > whole) {
        t.push(cipher.open(buf.subarray(0, whole), false));
        buf = buf.subarray(whole);
      }
      if (final) {
        t.push(cipher.open(buf, true));
        buf = Buffer.alloc(0);
      }
    };
    const ready = async () => {
      if (cipher) return true;
      header = parseStreamHeader(buf);
      if (!header) return false;
      buf = buf.subarray(header.header.length);
      const h = Buffer.from(header.header);
      await sealer.#withKey(header.envelope, header.envelopeInfo, context, (key) => {
        cipher = new ChunkCipher(key, h, context);
      });
      return true;
    };
    return new Transform({
      transform(chunk, _enc, cb) {
        (async () => {
          buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
          if (await ready()) drain(this, false);
        })().then(() => cb(), (e) => {
          cipher?.wipe();
          cb(e);
        });
      },
      flush(cb) {
        (async () => {
          if (!(await ready())) {
            throw new InvalidInputError('bad_envelope', 'malformed sealed stream: it ends inside its header');
          }
          drain(this, true);
          cipher.wipe();
        })().then(() => cb(), (e) => {
          cipher?.wipe();
          cb(e);
        });
      },
    });
  }
}
