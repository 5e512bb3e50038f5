// Types of the `keyhaven` package (hand-written: the package ships the
// JavaScript it is tested with, no build step; `npm run typecheck` checks
// these declarations and test/types.ts, which uses every export).

/// <reference types="node" />

/** Codes that only this client produces (never sent by the daemon). */
export declare const CLIENT_CODES: readonly ['connect_failed', 'connection_closed', 'timeout', 'protocol', 'config'];

/** A wire error code (PROTOCOL.md §4); unknown codes are passed through. */
export type WireCode =
  | 'bad_request' | 'unknown_operation' | 'unsupported_protocol' | 'frame_too_large' | 'payload_too_large'
  | 'bad_envelope' | 'integrity' | 'not_found' | 'already_exists' | 'key_exhausted' | 'key_disabled'
  | 'version_retired' | 'permission_denied' | 'invalid_config' | 'revoked' | 'busy' | 'hsm_unavailable'
  | 'hsm_login_failed' | 'master_key_unavailable' | 'store_unavailable' | 'internal' | 'wrong_key_type'
  | (string & {});

export type ErrorCode = WireCode | (typeof CLIENT_CODES)[number];

export declare class KeyhavenError extends Error {
  constructor(code: string, message: string, options?: ErrorOptions);
  readonly code: ErrorCode;
}
/** The daemon answered with an error; `code` is its wire code. */
export declare class DaemonError extends KeyhavenError {
  constructor(code: string, message: string);
}
/** `connect_failed` */
export declare class ConnectError extends KeyhavenError {
  constructor(socket: string, cause: unknown);
  readonly socket: string;
}
/** `timeout` */
export declare class TimeoutError extends KeyhavenError {
  constructor(what: string, afterMs: number);
  readonly afterMs: number;
}
/** `connection_closed`: the outcome of the request is unknown; the next call reconnects. */
export declare class ConnectionClosedError extends KeyhavenError {
  constructor(message?: string);
}
/** A bad argument caught before anything was sent: `bad_request`, `bad_envelope` or `config`. */
export declare class InvalidInputError extends KeyhavenError {
  constructor(code: string, message: string);
}
/** `integrity`: local decryption failed to authenticate. */
export declare class IntegrityError extends KeyhavenError {
  constructor(message: string);
}
/** `protocol`: the daemon sent something unreadable. */
/** A database column holds a malformed value (`bad_request`); `column` names it. */
export declare class BadStoredValueError extends InvalidInputError {
  constructor(column: string, reason: string);
  readonly column: string;
  readonly reason: string;
}
export declare class ProtocolError extends KeyhavenError {
  constructor(message: string);
}

/** `"tenant/key"` or `{tenant, key}`. */
export type KeyPathLike = string | { tenant: string; key: string };
/** An encryption context: string pairs (ENVELOPE.md §4). */
export type EncryptionContext = Record<string, string> | Map<string, string>;
/** Plaintext input: bytes, or a string taken as UTF-8. */
export type BytesLike = Buffer | Uint8Array | string;

export declare const SOCKET_ENV: 'KEYHAVEN_SOCKET';
export declare const DEFAULT_SOCKET: '/run/keyhaven/keyhaven.sock';
export declare const DEFAULT_CONNECT_TIMEOUT_MS: 5000;
export declare const DEFAULT_REQUEST_TIMEOUT_MS: 30000;
export declare const VERSION: string;

/** `C(ctx)`: the canonical encoding of ENVELOPE.md §4.2. */
export declare function encodeContext(context?: EncryptionContext | null): Buffer;
/** The context as the wire's object, keys in canonical (UTF-8 byte) order; validated. */
export declare function contextObject(context?: EncryptionContext | null): Record<string, string>;
/** Checks and splits a key path. */
export declare function keyPath(path: KeyPathLike): { tenant: string; key: string };

export interface ClientOptions {
  /** The socket; else `$KEYHAVEN_SOCKET`, else `/run/keyhaven/keyhaven.sock`. */
  socket?: string;
  /** Connect and `hello`; 5000 by default; `null` or `0`: no limit. */
  connectTimeoutMs?: number | null;
  /** Each answer; 30000 by default; `null` or `0`: no limit. */
  requestTimeoutMs?: number | null;
  /** Connections in the pool, 1..64; 2 by default. */
  connections?: number;
  /** Sent in `hello`. */
  clientName?: string;
  /** Event frames (PROTOCOL.md §6), on connections that subscribed. */
  onEvent?: (event: RevocationEvent) => void;
}

export interface RevocationScope {
  kind: 'datakey' | 'key' | 'tenant' | 'all' | (string & {});
  envelope_id?: string;
  tenant?: string;
  key?: string;
  version?: number;
}
export interface RevocationEvent {
  event: 'revoked' | 'lagged' | (string & {});
  scope?: RevocationScope;
}

export interface KeyInfo {
  tenant: string;
  key: string;
  current_version: number;
  versions: number[];
  created_at: number;
  /** The key's type (PROTOCOL.md §3.3; absent from daemons that predate key types). */
  type?: KeyType | string;
  /** Whether the key may be used (PROTOCOL.md §3.17); absent from older daemons. */
  state?: KeyStatus | string;
  /** The revocation in force that covers the whole key, if any. */
  revocation?: Record<string, unknown>;
  /** The automatic rotation period in seconds, if any. */
  rotate_every_secs?: number;
  /** When the next automatic rotation is due, Unix seconds. */
  next_rotation_at?: number;
  /** Versions below it are refused for decryption (hello feature `key_shape`; absent from older daemons). */
  min_decryption_version?: number;
  /** When a scheduled deletion happens, Unix seconds. */
  deletion_at?: number;
  /** What the key is for, if said (hello feature `key_labels`). */
  description?: string;
  /** Its tags, by name; absent when it has none. */
  tags?: Record<string, string>;
  [field: string]: unknown;
}
/** One version in KeyDetails (PROTOCOL.md §3.17). */
export interface VersionDetails {
  version: number;
  state: 'current' | 'active' | 'retired' | 'destroyed' | (string & {});
  created_at: number;
  master_key_version: number;
  /** The version's nonce budget reserved so far: an upper bound on its wraps (hello feature `key_shape`). */
  wrap_budget_reserved?: number;
  /** @deprecated The same figure as `wrap_budget_reserved` (PROTOCOL.md §5). */
  wraps: number;
  decryptions: number;
  rewraps: number;
  last_used_at?: number;
  [field: string]: unknown;
}
/** A key in full (`keyShow`): the fields of KeyInfo, with `versions` as objects (PROTOCOL.md §3.3 "One key shape"). */
export interface KeyDetails extends Omit<KeyInfo, 'versions'> {
  min_decryption_version: number;
  versions: VersionDetails[];
}
export type KeyStatus = 'enabled' | 'disabled' | 'pending_deletion' | 'deleted' | 'suspended' | 'destroyed';
export type KeyType = 'aes256-gcm' | 'hmac-sha256' | 'ecdsa-p256' | 'ecdsa-p384' | 'rsa-3072-pss' | 'rsa-4096-oaep';
/** What `sign` and `verify` take: the message (the daemon hashes it), or the caller's digest of it. */
export type SignInput = BytesLike | { message: BytesLike } | { digest: Buffer | Uint8Array };
export type SignatureAlgorithm = 'ecdsa-p256-sha256' | 'ecdsa-p384-sha384' | 'rsa-3072-pss-sha256' | (string & {});
export interface SignResult {
  /** DER `Ecdsa-Sig-Value` (ECDSA), or the 384-byte RSASSA-PSS signature (PROTOCOL.md §3.31). */
  signature: Buffer;
  key_version: number;
  algorithm: SignatureAlgorithm;
}
export interface VerifyResult {
  valid: boolean;
  /** The version whose public key checked the signature. */
  key_version: number;
  algorithm: SignatureAlgorithm;
}
export interface PublicKeyResult {
  /** PEM `PUBLIC KEY` (SubjectPublicKeyInfo). */
  pem: string;
  key_version: number;
  type: KeyType | (string & {});
}
/** An alias: a second name for a key of the same tenant (PROTOCOL.md §3.37). */
export interface AliasInfo {
  tenant: string;
  alias: string;
  /** The key it names, within the tenant. */
  key: string;
  created_at: number;
  /** When it was last moved; absent if never. */
  updated_at?: number;
  /** `aliasUpdate` only: the key it named before. */
  previous_key?: string;
  [field: string]: unknown;
}
/** A `khm1:` tag, parsed: the key version that made it and the 32 MAC bytes. */
export interface MacTag {
  version: number;
  mac: Buffer;
}
export declare const MAC_TAG_PREFIX: 'khm1:';
export declare const MAC_TAG_LENGTH: 53;
/** Parse a `khm1:` tag strictly; a bad one throws InvalidInputError `bad_request`. */
export declare function parseMacTag(text: string): MacTag;
/**
 * A stored blind-index tag: parseMacTag's strict parse, and exactly the 53
 * characters (no surrounding whitespace); anything else throws a
 * BadStoredValueError naming `column`, never echoing the value.
 */
export declare function parseStoredTag(value: unknown, column: string): MacTag;
export interface MacResult {
  /** `khm1:` text form, 53 characters (PROTOCOL.md §3.29). */
  tag: string;
  key_version: number;
}
export interface MacVerifyResult {
  valid: boolean;
  key_version: number;
}
export interface EncryptResult {
  ciphertext: string;
  envelope_id: string;
  key_version: number;
}
export interface DecryptResult {
  plaintext: Buffer;
  tenant: string;
  key: string;
  key_version: number;
  envelope_id: string;
}
export interface DatakeyResult {
  envelope: string;
  envelope_id: string;
  key_version: number;
  /** The 32-byte data key; absent with `includePlaintext: false`. */
  plaintext?: Buffer;
}
export interface RewrapResult {
  text: string;
  from_version: number;
  key_version: number;
  envelope_id: string;
}

export declare class Client {
  constructor(opts?: ClientOptions);
  readonly socket: string;
  readonly connectTimeoutMs: number | null;
  readonly requestTimeoutMs: number | null;
  /** Connections opened so far, reconnects included. */
  readonly connectionsOpened: number;
  /** Any operation by name (PROTOCOL.md §3); resolves with the `ok` object. */
  call(op: string, params?: Record<string, unknown>): Promise<Record<string, any>>;
  close(): Promise<void>;
  health(): Promise<Record<string, any>>;
  /** The Prometheus text exposition (`metrics`; needs the `metrics` permission). */
  metrics(): Promise<string>;
  whoami(): Promise<Record<string, any>>;
  /** `rotateEverySecs`: rotate automatically this often, set in the same request (0: none). */
  /** `idempotencyKey`: a retry with the same key answers as the first call did (PROTOCOL.md §3.3). */
  keyCreate(
    path: KeyPathLike,
    opts?: {
      type?: KeyType;
      rotateEverySecs?: number;
      idempotencyKey?: string;
      /** What the key is for, at most 256 bytes (hello feature `key_labels`). */
      description?: string;
      /** Tags, NAME: VALUE (at most 50; PROTOCOL.md §3.3). */
      tags?: Record<string, string>;
    },
  ): Promise<KeyInfo>;
  /** KeyDetails (PROTOCOL.md §3.17). */
  keyShow(path: KeyPathLike): Promise<KeyDetails>;
  /** Every key (of one tenant), following the daemon's pages of at most `pageSize` (1..1000). */
  /** `tags`: only keys with every one of these tags (hello feature `key_labels`). */
  keyList(tenant?: string | null, opts?: { pageSize?: number; tags?: Record<string, string> }): Promise<KeyInfo[]>;
  encrypt(path: KeyPathLike, plaintext: BytesLike, context?: EncryptionContext): Promise<EncryptResult>;
  decrypt(ciphertext: string, context?: EncryptionContext): Promise<DecryptResult>;
  datakey(path: KeyPathLike, context?: EncryptionContext, opts?: { includePlaintext?: boolean }): Promise<DatakeyResult>;
  datakeyDecrypt(envelope: string, context?: EncryptionContext): Promise<DecryptResult & { plaintext: Buffer }>;
  rewrap(text: string, context?: EncryptionContext): Promise<RewrapResult>;
  mac(path: KeyPathLike, message: BytesLike, opts?: { version?: number }): Promise<MacResult>;
  macVerify(path: KeyPathLike, message: BytesLike, tag: string): Promise<MacVerifyResult>;
  /** Sign with the current version of an `ecdsa-p256`, `ecdsa-p384` or `rsa-3072-pss` key (PROTOCOL.md §3.31). */
  sign(path: KeyPathLike, input: SignInput): Promise<SignResult>;
  /** Check a signature in the daemon (§3.34); `signature`: bytes, or their standard base64. */
  verify(path: KeyPathLike, input: SignInput, signature: Buffer | Uint8Array | string, opts?: { version?: number }): Promise<VerifyResult>;
  /** A version's public key (§3.32); the current version by default. */
  publicKey(path: KeyPathLike, opts?: { version?: number }): Promise<PublicKeyResult>;
  /** `alias` becomes a name for `path` in the key's tenant (§3.37). */
  aliasCreate(alias: string, path: KeyPathLike): Promise<AliasInfo>;
  /** Move `alias` to another key of its tenant (§3.38). */
  aliasUpdate(alias: string, path: KeyPathLike): Promise<AliasInfo>;
  /** Remove an alias; resolves with what it was (§3.39). */
  aliasDelete(tenant: string, alias: string): Promise<AliasInfo>;
  /** Aliases of one tenant, or of every tenant (§3.40). */
  aliasList(tenant?: string | null): Promise<AliasInfo[]>;
  subscribeRevocations(): Promise<{ subscribed: boolean }>;
}

// ---- Local sealing (ENVELOPE.md §10) ----

export declare const MAX_MESSAGES_PER_KEY: number;
export declare const MIN_CHUNK: 1024;
export declare const MAX_CHUNK: 16777216;
export declare const DEFAULT_CHUNK: 65536;

/** Required limits of the sealing cache, per data key. */
export interface SealLimits {
  /** From when the daemon returned the key; ≥ 1. */
  maxAgeMs: number;
  /** Records per key, 1..2^31. */
  maxMessages: number;
  /** Plaintext bytes per key, ≥ 1; a larger record gets a key of its own. */
  maxBytes: number;
}
/** Limits of the opening cache; `maxEntries: 0` turns it off. */
export interface OpenLimits {
  maxAgeMs?: number;
  maxEntries: number;
}
export interface SealerOptions {
  socket?: string;
  connectTimeoutMs?: number | null;
  requestTimeoutMs?: number | null;
  seal: SealLimits;
  open: OpenLimits;
}
export interface SealerStats {
  datakeys: number;
  unwraps: number;
  sealHits: number;
  openHits: number;
  revoked: number;
  events: number;
  connections: number;
  sealKeys: number;
  openKeys: number;
}

export declare class Sealer {
  constructor(opts: SealerOptions);
  readonly socket: string;
  /** Seal one record; `sealedToText` gives its `khs1:` text. */
  seal(path: KeyPathLike, plaintext: BytesLike, context?: EncryptionContext): Promise<Buffer>;
  /** Open a record, as bytes or `khs1:` text. */
  open(sealed: Buffer | Uint8Array | string, context?: EncryptionContext): Promise<Buffer>;
  /** A Transform sealing its input as one sealed stream (a data key of its own). */
  sealStream(path: KeyPathLike, context?: EncryptionContext, opts?: { chunkSize?: number }): import('node:stream').Transform;
  /** A Transform opening a sealed stream; on error, discard what it pushed. */
  openStream(context?: EncryptionContext): import('node:stream').Transform;
  getStats(): SealerStats;
  /** Empty both caches (keys overwritten). */
  clear(): void;
  /** Close the connection and empty both caches. */
  close(): void;
}

export interface EnvelopeInfo {
  tenant: string;
  key: string;
  version: number;
  /** 32 lowercase hex digits. */
  id: string;
}
export interface ParsedRecord {
  header: Buffer;
  envelope: Buffer;
  envelopeInfo: EnvelopeInfo;
  nonce: Buffer;
  payload: Buffer;
}
export interface ParsedStreamHeader {
  header: Buffer;
  envelope: Buffer;
  envelopeInfo: EnvelopeInfo;
  chunkSize: number;
}
export declare function sealedToText(bytes: Buffer): string;
export declare function sealedFromText(text: string): Buffer;
/** Structural parse; the fields are claims until the daemon unwraps the key. */
export declare function parseEnvelope(bytes: Buffer): EnvelopeInfo;
export declare function parseRecord(bytes: Buffer): ParsedRecord;
/** Low level: seal a record with a data key you hold (`nonce` for test vectors only). */
export declare function sealRecord(key: Buffer, envelope: Buffer, context: EncryptionContext | undefined | null, plaintext: Buffer, nonce?: Buffer): Buffer;
export declare function openRecord(key: Buffer, record: ParsedRecord, context?: EncryptionContext | null): Buffer;
export declare function streamHeader(envelope: Buffer, chunkSize: number): Buffer;
/** `null` while more bytes are needed. */
export declare function parseStreamHeader(bytes: Buffer): ParsedStreamHeader | null;
export declare class ChunkCipher {
  constructor(key: Buffer, header: Buffer, context?: EncryptionContext | null);
  seal(plaintext: Buffer, last: boolean): Buffer;
  open(sealed: Buffer, last: boolean): Buffer;
  wipe(): void;
}

// ---- Field encryption for SQL rows (src/fields.js) ----

/** A row's primary key: a value, or the values of a composite key (joined with `/`). */
export type RowId = string | number | bigint | ReadonlyArray<string | number | bigint>;
/** NFKC, surrounding space removed, lower-cased: the default normalisation of a blind index. */
export declare function normaliseText(value: string): string;
/** Encrypts one column's values through the daemon, bound to `{table, column, row}`. */
export declare class EncryptedColumn {
  constructor(client: Client, key: KeyPathLike, table: string, column: string);
  readonly table: string;
  readonly column: string;
  context(row: RowId): { table: string; column: string; row: string };
  encrypt(row: RowId, value: string | null | undefined): Promise<string | null>;
  /** A value moved from another row or column rejects with a DaemonError `integrity`. */
  decrypt(row: RowId, stored: string | null | undefined): Promise<string | null>;
}
/** `khm1:` tags of normalised values under an `hmac-sha256` key, for equality lookups. */
export declare class BlindIndex {
  constructor(client: Client, key: KeyPathLike, opts?: { normalise?: (value: string) => string });
  /** The current version's tag (what a write stores). */
  tag(value: string | null | undefined): Promise<string | null>;
  /** The tag under every version the key still has (or `versions`): `WHERE col = ANY($1)`. */
  tags(value: string, versions?: number[]): Promise<string[]>;
}
/** What `reindexBlindIndex` did; `lastKey` is where to resume (`after`). */
export interface ReindexReport {
  /** The index key's current version when the run began: every tag written names it. */
  targetVersion: number;
  /** Rows whose tag was recomputed. */
  updated: number;
  /** Rows whose tag already named the target version (or a later one). */
  current: number;
  /** Rows written by someone else between the read and the update: left to that writer. */
  changed: number;
  /** Rows with no value (NULL). */
  empty: number;
  batches: number;
  /** The primary key (one value per column) of the last row looked at. */
  lastKey: unknown[] | null;
  /** The end of the table was reached (not stopped by `maxBatches`). */
  done: boolean;
}
/** A node-postgres Pool, or a Client used by nothing else during the run. */
export interface Queryable {
  query(text: string, values?: unknown[]): Promise<{ rows: Record<string, unknown>[]; rowCount: number | null }>;
}
export interface ReindexOptions {
  /** The encrypted column (its `table` and `column` are the SQL names unless `table` is given). */
  column: EncryptedColumn;
  index: BlindIndex;
  /** The SQL column holding the tags. */
  indexColumn: string;
  /** The primary-key column(s), in order; default `id`. */
  primaryKey?: string | string[];
  /** The SQL table (`['schema', 'table']` for a qualified name); default `column.table`. */
  table?: string | string[];
  /** Rows a batch (one transaction); default 500. */
  batchSize?: number;
  /** Resume after this primary key (a report's `lastKey`). */
  after?: unknown | unknown[] | null;
  maxBatches?: number;
  /** Daemon calls at once; default 8. */
  concurrency?: number;
  /** Called with a copy of the report after each committed batch (to persist `lastKey`). */
  onBatch?: (report: ReindexReport) => void | Promise<void>;
}
/**
 * Recompute a blind-index column under the index key's current version, in
 * batches, after a rotation of that key: idempotent, resumable, a row written
 * meanwhile keeps its writer's tag. Lookups with `BlindIndex.tags` keep finding
 * every row while it runs.
 */
export declare function reindexBlindIndex(db: Queryable, opts: ReindexOptions): Promise<ReindexReport>;
