// The language-neutral scenarios of tests/conformance/scenarios.json, run
// through this package's public API against a real dev daemon, one fresh
// tenant per scenario. The Rust crate (tests/tests/conformance.rs) and the
// Python package (clients/python/tests/test_scenarios.py) run the same file;
// the format is in tests/conformance/README.md.
//
// An op, an argument, a check or a result field this runner does not know
// fails the scenario, so that no step is skipped silently.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { Client, DaemonError, IntegrityError, InvalidInputError } from '../src/index.js';
import { ROOT, startDaemon } from './daemon.js';

const S = JSON.parse(fs.readFileSync(path.join(ROOT, 'tests/conformance/scenarios.json'), 'utf8'));
const STEP_FIELDS = new Set(['op', 'note', 'save', 'expect']);

class StepError extends Error {}

/** A `plaintext`/`message` argument: a string, or `{ repeat: S, times: N }`. */
function text(value) {
  if (typeof value === 'string') return value;
  if (value !== null && typeof value === 'object' && Object.keys(value).sort().join() === 'repeat,times') {
    return String(value.repeat).repeat(value.times);
  }
  throw new StepError(`not a text argument: ${JSON.stringify(value)}`);
}

const keyOf = (t, a) => ({ tenant: t, key: a.key });
const versionOf = (a) => (a.version === undefined ? {} : { version: a.version });

// Each op of scenarios.json, through the public API of Client.
const HANDLERS = {
  key_create: (kh, t, a) => kh.keyCreate(keyOf(t, a), a.type === undefined ? {} : { type: a.type }),
  key_show: (kh, t, a) => kh.keyShow(keyOf(t, a)),
  encrypt: (kh, t, a) => kh.encrypt(keyOf(t, a), text(a.plaintext), a.context),
  decrypt: (kh, t, a) => kh.decrypt(a.ciphertext, a.context),
  datakey: (kh, t, a) => kh.datakey(keyOf(t, a), a.context),
  datakey_decrypt: (kh, t, a) => kh.datakeyDecrypt(a.envelope, a.context),
  rewrap: (kh, t, a) => kh.rewrap(a.text, a.context),
  mac: (kh, t, a) => kh.mac(keyOf(t, a), text(a.message), versionOf(a)),
  mac_verify: async (kh, t, a) => ({ valid: (await kh.macVerify(keyOf(t, a), text(a.message), a.tag)).valid }),
  sign: (kh, t, a) => kh.sign(keyOf(t, a), text(a.message)),
  verify: (kh, t, a) => kh.verify(keyOf(t, a), text(a.message), a.signature, versionOf(a)),
  public_key: (kh, t, a) => kh.publicKey(keyOf(t, a), versionOf(a)),
  alias_create: (kh, t, a) => kh.aliasCreate(a.alias, keyOf(t, a)),
  alias_update: (kh, t, a) => kh.aliasUpdate(a.alias, keyOf(t, a)),
  alias_delete: (kh, t, a) => kh.aliasDelete(t, a.alias),
  call: (kh, t, a) => kh.call(a.call, a.params),
};

/** A result as the wire has it: bytes (Buffers) as standard base64, recursively. */
function normalise(value) {
  if (value instanceof Uint8Array) return Buffer.from(value).toString('base64');
  if (Array.isArray(value)) return value.map(normalise);
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, normalise(v)]));
  }
  return value;
}

function field(result, fieldPath) {
  let value = result;
  for (const part of fieldPath.split('.')) {
    if (Array.isArray(value) && /^[0-9]+$/.test(part) && Number(part) < value.length) {
      value = value[Number(part)];
    } else if (value !== null && typeof value === 'object' && !Array.isArray(value) && Object.hasOwn(value, part)) {
      value = value[part];
    } else {
      throw new StepError(`the result has no field \`${fieldPath}\`: ${JSON.stringify(result).slice(0, 400)}`);
    }
  }
  return value;
}

/** `$name` and `$name.field.path` references, recursively. */
function resolve(value, saved) {
  if (typeof value === 'string' && value.startsWith('$')) {
    const dot = value.indexOf('.');
    const name = dot < 0 ? value.slice(1) : value.slice(1, dot);
    if (!Object.hasOwn(saved, name)) throw new StepError(`\`${value}\`: nothing saved as \`${name}\``);
    return dot < 0 ? saved[name] : field(saved[name], value.slice(dot + 1));
  }
  if (Array.isArray(value)) return value.map((v) => resolve(v, saved));
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, resolve(v, saved)]));
  }
  return value;
}

function same(a, b) {
  try {
    assert.deepStrictEqual(a, b);
    return true;
  } catch {
    return false;
  }
}

function decoded(actual) {
  if (typeof actual !== 'string' || !/^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/.test(actual)) {
    throw new StepError(`not a base64 field: ${JSON.stringify(actual)}`);
  }
  return Buffer.from(actual, 'base64');
}

const CHECKS = {
  utf8: (actual, want) => decoded(actual).equals(Buffer.from(String(want), 'utf8')),
  not: (actual, want) => !same(actual, want),
  prefix: (actual, want) => typeof actual === 'string' && actual.startsWith(want),
  bytes: (actual, want) => decoded(actual).length === want,
};

function check(result, fieldPath, want, saved) {
  const actual = field(result, fieldPath);
  if (want !== null && typeof want === 'object') {
    const kinds = Object.keys(want);
    if (kinds.length !== 1) throw new StepError(`check of \`${fieldPath}\`: an object check has exactly one key`);
    const kind = kinds[0];
    if (!Object.hasOwn(CHECKS, kind)) throw new StepError(`check of \`${fieldPath}\`: unknown check \`${kind}\``);
    if (!CHECKS[kind](actual, resolve(want[kind], saved))) {
      throw new StepError(
        `\`${fieldPath}\` is ${JSON.stringify(actual).slice(0, 200)}: fails ${kind} ${JSON.stringify(want[kind])}`,
      );
    }
  } else if (!same(actual, resolve(want, saved))) {
    throw new StepError(
      `\`${fieldPath}\` is ${JSON.stringify(actual).slice(0, 200)}, expected ${JSON.stringify(resolve(want, saved))}`,
    );
  }
}

/** The step's op, arguments and expectation, checked against the file's `ops`. */
function validate(step) {
  const op = step.op;
  if (!Object.hasOwn(S.ops, op) || !Object.hasOwn(HANDLERS, op)) throw new StepError(`unknown op \`${op}\``);
  const spec = S.ops[op];
  const args = Object.fromEntries(Object.entries(step).filter(([k]) => !STEP_FIELDS.has(k)));
  const unknown = Object.keys(args).filter((k) => !spec.args.includes(k) && !spec.optional.includes(k));
  const missing = spec.args.filter((k) => !Object.hasOwn(args, k));
  if (unknown.length || missing.length) {
    throw new StepError(`\`${op}\`: unknown arguments [${unknown}], missing [${missing}]`);
  }
  const expect = step.expect;
  if (expect === null || typeof expect !== 'object' || Object.hasOwn(expect, 'ok') === Object.hasOwn(expect, 'error')) {
    throw new StepError('`expect` must have exactly one of `ok` and `error`');
  }
  const extra = Object.keys(expect).filter((k) => !['ok', 'error', 'by'].includes(k));
  if (extra.length || (Object.hasOwn(expect, 'by') && !Object.hasOwn(expect, 'error'))) {
    throw new StepError(`unknown \`expect\` fields [${Object.keys(expect)}]`);
  }
  if (Object.hasOwn(expect, 'by') && expect.by !== 'client' && expect.by !== 'daemon') {
    throw new StepError(`\`by\` is client or daemon, not ${JSON.stringify(expect.by)}`);
  }
  if (Object.hasOwn(expect, 'ok')) {
    for (const f of Object.keys(expect.ok)) {
      if (!spec.result.includes('*') && !spec.result.includes(f.split('.')[0])) {
        throw new StepError(`\`${op}\` has no result field \`${f}\``);
      }
    }
  } else if (Object.hasOwn(step, 'save')) {
    throw new StepError('a step expecting an error saves nothing');
  }
  return { op, args, expect };
}

async function runStep(kh, tenant, step, saved) {
  const { op, args, expect } = validate(step);
  const resolved = resolve(args, saved);
  let outcome;
  let code;
  let by;
  try {
    outcome = normalise(await HANDLERS[op](kh, tenant, resolved));
  } catch (e) {
    if (e instanceof StepError) throw e;
    if (e instanceof DaemonError) [code, by] = [e.code, 'daemon'];
    else if (e instanceof InvalidInputError || e instanceof IntegrityError) [code, by] = [e.code, 'client'];
    else throw new StepError(`failed without an answer: ${e}`);
  }
  if (Object.hasOwn(expect, 'error')) {
    if (outcome !== undefined) {
      throw new StepError(`expected error ${expect.error}, got ok ${JSON.stringify(outcome).slice(0, 300)}`);
    }
    if (code !== expect.error || (expect.by !== undefined && by !== expect.by)) {
      throw new StepError(`expected error ${expect.error} by ${expect.by ?? 'either'}, got ${code} by ${by}`);
    }
    return;
  }
  if (outcome === undefined) throw new StepError(`expected ok, got error ${code} by ${by}`);
  if (outcome === null || typeof outcome !== 'object') {
    throw new StepError(`a result that is not an object: ${JSON.stringify(outcome)}`);
  }
  for (const [f, want] of Object.entries(expect.ok)) check(outcome, f, want, saved);
  if (step.save !== undefined) saved[step.save] = outcome;
}

async function runScenario(kh, scenario) {
  const tenant = `sc-${crypto.randomBytes(4).toString('hex')}`;
  const saved = { tenant };
  for (const [i, step] of scenario.steps.entries()) {
    try {
      await runStep(kh, tenant, step, saved);
    } catch (e) {
      if (!(e instanceof StepError)) throw e;
      throw new assert.AssertionError({
        message: `scenario ${scenario.name} (tenant ${tenant}), step ${i + 1} (${step.op}): ${e.message}`,
      });
    }
  }
}

let d;
let kh;

before(async () => {
  d = await startDaemon();
  kh = new Client({ socket: d.socket });
});

after(async () => {
  await kh?.close();
  await d?.stop();
});

test('the runner knows every op and check of the file', () => {
  assert.deepEqual(Object.keys(HANDLERS).sort(), Object.keys(S.ops).sort());
  assert.deepEqual(Object.keys(CHECKS).sort(), [...S.checks].sort());
  const names = S.scenarios.map((s) => s.name);
  assert.equal(new Set(names).size, names.length, 'scenario names are unique');
});

test('an unknown op, argument, field or check fails the scenario', async () => {
  for (const step of [
    { op: 'key_frobnicate', key: 'k', expect: { ok: {} } },
    { op: 'key_create', key: 'k', colour: 'red', expect: { ok: {} } },
    { op: 'key_create', key: 'k', expect: { ok: { colour: 'red' } } },
    { op: 'key_create', key: 'k', expect: { ok: { key: { shout: 'K' } } } },
    { op: 'key_create', key: 'k', expect: { ok: { key: 'k' }, error: 'not_found' } },
  ]) {
    await assert.rejects(runScenario(kh, { name: 'probe', steps: [step] }), /scenario probe \(tenant sc-[0-9a-f]+\), step 1/);
  }
});

for (const scenario of S.scenarios) {
  test(`scenario ${scenario.name}`, () => runScenario(kh, scenario));
}
