// One connection to the daemon: frames (PROTOCOL.md §1), pipelined requests
// paired with their answers by id (§2.3), and event frames (§6) handed to a
// listener. A connection that closes fails its requests in flight; the
// Client above opens a new one for the next call.

import net from 'node:net';

import {
  ConnectError,
  ConnectionClosedError,
  DaemonError,
  InvalidInputError,
  ProtocolError,
  TimeoutError,
} from './errors.js';

export const MAX_FRAME = 1024 * 1024;
export const PROTOCOL_VERSION = 1;

export class Connection {
  /**
   * Connect and send `hello`; resolves once the daemon has answered it.
   * @param {{socket: string, connectTimeoutMs: number|null, clientName: string, onEvent?: Function, onClose?: Function}} opts
   */
  static open(opts) {
    return new Promise((resolve, reject) => {
      const conn = new Connection(opts);
      let timer = null;
      const fail = (err) => {
        if (timer) clearTimeout(timer);
        conn.destroy(err);
        reject(err);
      };
      if (opts.connectTimeoutMs) {
        timer = setTimeout(
          () => fail(new TimeoutError(`connecting to the daemon at ${opts.socket}`, opts.connectTimeoutMs)),
          opts.connectTimeoutMs,
        );
      }
      conn.sock.once('error', (e) => fail(new ConnectError(opts.socket, e)));
      conn.sock.once('connect', () => {
        conn.request('hello', { protocol: PROTOCOL_VERSION, client: opts.clientName }, null).then(
          (ok) => {
            if (timer) clearTimeout(timer);
            if (ok.protocol !== PROTOCOL_VERSION) {
              fail(new ProtocolError(`the daemon speaks protocol ${ok.protocol}, not ${PROTOCOL_VERSION}`));
              return;
            }
            conn.server = ok.server;
            resolve(conn);
          },
          fail,
        );
      });
    });
  }

  constructor({ socket, onEvent, onClose }) {
    this.socket = socket;
    this.onEvent = onEvent;
    this.onClose = onClose;
    this.pending = new Map();
    this.nextId = 1;
    this.closed = false;
    this.closeError = null;
    this.corked = false;
    this.buf = Buffer.alloc(0);
    this.sock = net.createConnection({ path: socket });
    this.sock.on('data', (chunk) => this.#onData(chunk));
    this.sock.on('error', (e) => this.destroy(new ConnectionClosedError(`socket error: ${e.message}`)));
    this.sock.on('close', () => this.destroy(null));
  }

  /** Requests sent and not yet answered. */
  get inFlight() {
    return this.pending.size;
  }

  /** Send one request; resolves with its `ok` object, rejects with a typed error. */
  request(op, params, timeoutMs) {
    if (this.closed) return Promise.reject(this.closeError ?? new ConnectionClosedError());
    const id = this.nextId++;
    const json = JSON.stringify(params === undefined ? { id, op } : { id, op, params });
    const length = Buffer.byteLength(json, 'utf8');
    if (length > MAX_FRAME) {
      return Promise.reject(
        new InvalidInputError(
          'frame_too_large',
          `a request of ${length} bytes is over the frame limit of ${MAX_FRAME} bytes`,
        ),
      );
    }
    // One buffer a frame (length prefix and body), no concatenation.
    const frame = Buffer.allocUnsafe(4 + length);
    frame.writeUInt32BE(length, 0);
    frame.write(json, 4, 'utf8');
    return new Promise((resolve, reject) => {
      const entry = { resolve, reject, timer: null };
      if (timeoutMs) {
        entry.timer = setTimeout(() => {
          this.pending.delete(id);
          if (this.pending.size === 0) this.sock.unref();
          reject(new TimeoutError(`the answer to \`${op}\``, timeoutMs));
        }, timeoutMs);
      }
      this.pending.set(id, entry);
      this.sock.ref();
      // Requests made in the same tick leave in one write (writev), not one syscall each.
      if (!this.corked) {
        this.corked = true;
        this.sock.cork();
        process.nextTick(() => {
          this.corked = false;
          this.sock.uncork();
        });
      }
      this.sock.write(frame);
    });
  }

  #onData(chunk) {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    while (this.buf.length >= 4) {
      const n = this.buf.readUInt32BE(0);
      if (n > MAX_FRAME) {
        this.destroy(new ProtocolError(`the daemon sent a frame of ${n} bytes, over the limit of ${MAX_FRAME}`));
        return;
      }
      if (this.buf.length < 4 + n) return;
      const body = this.buf.subarray(4, 4 + n);
      this.buf = this.buf.subarray(4 + n);
      let msg;
      try {
        msg = JSON.parse(body.toString('utf8'));
      } catch {
        this.destroy(new ProtocolError('the daemon sent a frame that is not JSON'));
        return;
      }
      this.#dispatch(msg);
    }
  }

  #dispatch(msg) {
    if (msg === null || typeof msg !== 'object') {
      this.destroy(new ProtocolError('the daemon sent a frame that is not an object'));
      return;
    }
    if (!('id' in msg) && typeof msg.event === 'string') {
      try {
        this.onEvent?.(msg);
      } catch {
        // A throwing listener must not take the connection (or the process) down.
      }
      return;
    }
    if (msg.id === null) {
      // Not tied to a request (a frame the daemon could not read, `busy` at
      // the connection limit): the daemon closes the connection after it.
      const e = msg.error ?? {};
      this.closeError = new DaemonError(String(e.code ?? 'internal'), String(e.message ?? ''));
      return;
    }
    const entry = this.pending.get(msg.id);
    if (!entry) return; // a request that timed out: its late answer is dropped
    this.pending.delete(msg.id);
    if (entry.timer) clearTimeout(entry.timer);
    // An idle connection does not keep the process alive.
    if (this.pending.size === 0) this.sock.unref();
    if (msg.error && typeof msg.error === 'object') {
      entry.reject(new DaemonError(String(msg.error.code), String(msg.error.message ?? '')));
    } else if (msg.ok && typeof msg.ok === 'object') {
      entry.resolve(msg.ok);
    } else {
      entry.reject(new ProtocolError('an answer with neither `ok` nor `error`'));
    }
  }

  /** Close, failing every request in flight with `err` (or why the daemon closed). */
  destroy(err) {
    if (this.closed) return;
    this.closed = true;
    const reason = this.closeError ?? err ?? new ConnectionClosedError();
    this.closeError = reason;
    for (const entry of this.pending.values()) {
      if (entry.timer) clearTimeout(entry.timer);
      entry.reject(reason);
    }
    this.pending.clear();
    this.sock.destroy();
    this.onClose?.(this);
  }
}
