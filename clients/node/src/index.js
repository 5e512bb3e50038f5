// Keyhaven client for Node.js: the daemon's protocol over its Unix socket,
// and (seal.js, sealer.js) client-side sealing compatible with the Rust crate.

export * from './errors.js';
export { Client, SOCKET_ENV, DEFAULT_SOCKET, DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_REQUEST_TIMEOUT_MS, VERSION } from './client.js';
export { encodeContext, contextObject, keyPath } from './codec.js';
export { Sealer } from './sealer.js';
export {
  sealedToText,
  sealedFromText,
  parseRecord,
  parseEnvelope,
  sealRecord,
  openRecord,
  streamHeader,
  parseStreamHeader,
  ChunkCipher,
  MAX_MESSAGES_PER_KEY,
  MIN_CHUNK,
  MAX_CHUNK,
  DEFAULT_CHUNK,
} from './seal.js';
export { EncryptedColumn, BlindIndex, normaliseText, reindexBlindIndex } from './fields.js';
export { parseMacTag, parseStoredTag, MAC_TAG_PREFIX, MAC_TAG_LENGTH } from './mactag.js';
