// Typed errors. A daemon error carries the wire code of PROTOCOL.md §4 in
// `code`; errors found in this process carry the code the daemon would give
// for the same fault (`bad_request`, `bad_envelope`, `integrity`) or one of
// the client-only codes below, which never appear on the wire.

/** Codes that only this client produces (never sent by the daemon). */
export const CLIENT_CODES = Object.freeze([
  'connect_failed',
  'connection_closed',
  'timeout',
  'protocol',
  'config',
]);

export class KeyhavenError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message, options) {
    super(`${message} (${code})`, options);
    this.name = 'KeyhavenError';
    this.code = code;
  }
}

/** The daemon answered with an error; `code` is its wire code. */
export class DaemonError extends KeyhavenError {
  constructor(code, message) {
    super(code, message);
    this.name = 'DaemonError';
  }
}

/** The daemon could not be reached (`connect_failed`). */
export class ConnectError extends KeyhavenError {
  constructor(socket, cause) {
    super('connect_failed', `daemon not reachable at ${socket}: ${cause?.message ?? cause}`, { cause });
    this.name = 'ConnectError';
    this.socket = socket;
  }
}

/** A connect or a request took longer than its timeout (`timeout`). */
export class TimeoutError extends KeyhavenError {
  constructor(what, afterMs) {
    super('timeout', `timed out after ${afterMs / 1000} s waiting for ${what}`);
    this.name = 'TimeoutError';
    this.afterMs = afterMs;
  }
}

/**
 * The connection closed with this request in flight (`connection_closed`):
 * its outcome is unknown. The next call reconnects.
 */
export class ConnectionClosedError extends KeyhavenError {
  constructor(message = 'the daemon closed the connection') {
    super('connection_closed', message);
    this.name = 'ConnectionClosedError';
  }
}

/** A bad argument, caught before anything was sent (`bad_request`, `bad_envelope`, `config`). */
export class InvalidInputError extends KeyhavenError {
  constructor(code, message) {
    super(code, message);
    this.name = 'InvalidInputError';
  }
}

/** Local decryption failed to authenticate (`integrity`). */
export class IntegrityError extends KeyhavenError {
  constructor(message) {
    super('integrity', message);
    this.name = 'IntegrityError';
  }
}

/** The daemon sent something this client cannot read (`protocol`). */
export class ProtocolError extends KeyhavenError {
  constructor(message) {
    super('protocol', message);
    this.name = 'ProtocolError';
  }
}

/**
 * A value read from a database column is not what the column holds, e.g. a
 * blind-index column with a malformed `khm1:` tag (`bad_request`). `column`
 * names the column; the value itself is never in the message.
 */
export class BadStoredValueError extends InvalidInputError {
  constructor(column, reason) {
    super('bad_request', `column ${column}: ${reason}`);
    this.name = 'BadStoredValueError';
    this.column = column;
    this.reason = reason;
  }
}
