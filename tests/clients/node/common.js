// Shared loop of the Node drivers: for each OP[:ARG] on the command line open a fresh client,
// run the operation, probe the connection with `stats`, and print one JSON line (see
// ../libdrivers.py). A library error is "raised"; a JavaScript TypeError/RangeError/
// ReferenceError/SyntaxError is "crashed".
'use strict';

const LANGUAGE_ERRORS = [TypeError, RangeError, ReferenceError, SyntaxError];

function short(v) {
  let text;
  try {
    text = v === undefined ? 'undefined' : JSON.stringify(v, (k, x) =>
      (x && x.type === 'Buffer' && Array.isArray(x.data)) ? `<${x.data.length} bytes>` : x);
  } catch (e) {
    text = String(v);
  }
  return text.length > 60 ? text.slice(0, 57) + '...' : text;
}

class NotAvailable extends Error {}

function classify(err) {
  if (LANGUAGE_ERRORS.some((cls) => err instanceof cls)) {
    return ['crashed', `${err.constructor.name}: ${String(err.message).slice(0, 50)}`];
  }
  if (err instanceof Error) return ['raised', `${err.constructor.name}: ${String(err.message).slice(0, 50)}`];
  return ['raised', `error ${short(err)}`];
}

function splitOp(token) {
  const i = token.indexOf(':');
  return i < 0 ? [token, null] : [token.slice(0, i), token.slice(i + 1)];
}

// driver: { open(port) -> client, op(client, name, arg) -> Promise, stats(client) -> Promise<{pid, uptime}>, close(client) }
async function main(driver) {
  const port = Number(process.argv[2]);
  for (const token of process.argv.slice(3)) {
    const [name, arg] = splitOp(token);
    const client = await driver.open(port);
    let outcome;
    let detail;
    try {
      const value = await driver.op(client, name, arg);
      outcome = 'returned';
      detail = short(value);
    } catch (err) {
      if (err instanceof NotAvailable) {
        process.stdout.write(JSON.stringify({ op: token, outcome: 'n/a', detail: 'no such call', sync: '' }) + '\n');
        driver.close(client);
        continue;
      }
      [outcome, detail] = classify(err);
    }
    let sync;
    try {
      const s = await driver.stats(client);
      sync = `stats pid=${s.pid} uptime=${s.uptime}`;
    } catch (err) {
      sync = `stats failed: ${classify(err)[1]}`;
    }
    process.stdout.write(JSON.stringify({ op: token, outcome, detail, sync }) + '\n');
    driver.close(client);
  }
}

function jobArgs(arg) {
  return {
    tube: arg || 'jobs',
    id: arg && /^\d+$/.test(arg) ? Number(arg) : 1,
  };
}

const USE_FIRST = ['put', 'kick', 'peek-ready', 'peek-buried', 'peek-delayed'];

module.exports = { main, jobArgs, NotAvailable, USE_FIRST };
