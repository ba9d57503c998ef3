// Shared by the interop test files: where the binary and the demo app are, the ringwire
// config they run, starting and stopping ringwire as a child process on a free port, killing
// children when the runner exits, bounded waits, a recording webhook receiver, and the
// pusher-js client helpers (`pusherClients`, one set per test file).
// (Not a test file itself: its name matches none of node --test's patterns.)

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import Pusher from 'pusher-js';
import PusherServer from 'pusher';

/** This folder: the Python helpers live here. */
export const HERE = path.dirname(fileURLToPath(import.meta.url));
/** The server binary: RINGWIRE_BIN (default target/release/ringwire), relative to the repo root. */
export const BIN = path.resolve(HERE, '..', '..', process.env.RINGWIRE_BIN || 'target/release/ringwire');
/** The interpreter with the pinned Python packages (scripts/interop makes a venv). */
export const PYTHON = process.env.RINGWIRE_PYTHON || 'python3';

// The demo app every config holds.
export const APP_ID = '1';
export const KEY = 'ringwire-demo-key';
export const SECRET = 'ringwire-demo-secret';
/** 32 bytes, base64: lets the Node SDK encrypt and hand out per-channel shared secrets. */
export const ENCRYPTION_MASTER_KEY = Buffer.alloc(32, 7).toString('base64');
/** How many shards every test server runs: two, so that every path crosses the mesh. */
export const SHARDS = 2;
/** The bound on every single wait for a client, an event or a condition. */
export const WAIT_MS = 5000;

/**
 * The test CA and the certificate and key it signed for localhost and 127.0.0.1, made by
 * scripts/interop (which also hands the CA to Node through NODE_EXTRA_CA_CERTS). Unset when the
 * tests run without the script.
 */
export const TLS_FILES = {
  ca: process.env.RINGWIRE_TLS_CA,
  cert: process.env.RINGWIRE_TLS_CERT,
  key: process.env.RINGWIRE_TLS_KEY,
};
/** The name the TLS clients connect to: the certificate's DNS name, so that they send it as
 * SNI and verify it as a browser does (an IP address is neither sent as SNI nor, by RFC 6066,
 * allowed as one). The TLS listener binds 127.0.0.1; where localhost also resolves to ::1,
 * Node (autoSelectFamily) and Python (each getaddrinfo address in turn) fall back to it. */
export const TLS_SERVER_NAME = 'localhost';

/** The bound on each test that waits for the server, should one of its waits be missed. */
export const BOUNDED = { timeout: 20000 };

/**
 * A ringwire config: [server] on a free port with SHARDS shards, [webhooks] (a data_dir in the
 * temp folder, private targets allowed) when `webhooks` is given, [tls] on another free port
 * with the certificate of TLS_FILES when `tls` is given, the demo app, and one
 * [[apps.webhooks]] table per entry of `endpoints` (its keys, values written as JSON, which
 * TOML reads alike for strings and arrays of strings). `server`, `webhooks`, `tls` and `app`
 * hold the extra TOML lines of their tables.
 */
export function configToml({ server = '', webhooks, tls, app = '', endpoints = [] } = {}) {
  const webhooksTable =
    webhooks === undefined ? '' : `[webhooks]\ndata_dir = "{TMP}/data"\nallow_private_targets = true\n${webhooks}\n\n`;
  if (tls !== undefined && !(TLS_FILES.cert && TLS_FILES.key)) {
    throw new Error('RINGWIRE_TLS_CERT and RINGWIRE_TLS_KEY are unset: run the TLS tests with scripts/interop');
  }
  const tlsTable =
    tls === undefined
      ? ''
      : `[tls]\nbind = "127.0.0.1:0"\ncert_file = ${JSON.stringify(TLS_FILES.cert)}\n` +
        `key_file = ${JSON.stringify(TLS_FILES.key)}\n${tls}\n\n`;
  const endpointTables = endpoints.map(
    (fields) => `\n[[apps.webhooks]]\n${Object.entries(fields).map(([k, v]) => `${k} = ${JSON.stringify(v)}\n`).join('')}`,
  );
  return `[server]\nbind = "127.0.0.1:0"\nshards = ${SHARDS}\n${server}\n\n${webhooksTable}${tlsTable}` +
    `[[apps]]\nid = "${APP_ID}"\nkey = "${KEY}"\nsecret = "${SECRET}"\n${app}\n${endpointTables.join('')}`;
}

// Children to SIGKILL (and their cleanups to run) when this process exits. One listener for
// all of them, so a file that spawns many children stays under Node's listener limit.
const atExit = new Set();
process.on('exit', () => {
  for (const cleanup of atExit) cleanup();
});
for (const signal of ['SIGINT', 'SIGTERM']) process.once(signal, () => process.exit(1));

/**
 * SIGKILLs `child` (a no-op once it has exited) and runs `cleanup` when this process exits,
 * even when the runner is interrupted or times out.
 */
export function killOnExit(child, cleanup = () => {}) {
  atExit.add(() => {
    child.kill('SIGKILL');
    cleanup();
  });
}

/**
 * Spawns `bin --config <config>` (bin defaults to BIN) and resolves once its first stdout
 * line names the address and, when the config has a [tls] table, once its TLS line names the
 * TLS address too.
 * `onStderr(text)` receives the last 20 000 characters of stderr whenever more arrives.
 * Returns { server, exit, tmpDir, host, port, tlsHost, tlsPort } (the last two only with
 * [tls]); `exit` resolves with { code, signal } or { error }. The server is SIGKILLed and the
 * temp folder removed when this process exits, even when the runner is interrupted or times
 * out.
 */
export async function spawnRingwire({ bin = BIN, config, prefix, onStderr = () => {} }) {
  const tmpDir = mkdtempSync(path.join(tmpdir(), prefix));
  const configPath = path.join(tmpDir, 'ringwire.toml');
  // `{TMP}` in the config names the temp folder (for webhooks.data_dir).
  writeFileSync(configPath, config.replaceAll('{TMP}', tmpDir));
  const server = spawn(bin, ['--config', configPath], { stdio: ['ignore', 'pipe', 'pipe'] });
  killOnExit(server, () => rmSync(tmpDir, { recursive: true, force: true }));
  const exit = new Promise((resolve) => {
    server.on('exit', (code, signal) => resolve({ code, signal }));
    server.on('error', (error) => resolve({ error }));
  });
  let stderr = '';
  server.stderr.setEncoding('utf8');
  server.stderr.on('data', (chunk) => {
    stderr = (stderr + chunk).slice(-20000);
    onStderr(stderr);
  });

  // The first stdout lines, where ringwire prints its addresses: collected from the start rather
  // than awaited one by one, since readline may hand over several lines at once. stdout is
  // drained for the server's lifetime.
  const startup = [];
  let lineArrived = () => {};
  createInterface({ input: server.stdout }).on('line', (line) => {
    if (startup.length < 100) startup.push(line);
    lineArrived();
  });
  /** Resolves with the first startup line that `pattern` matches, as a match. */
  const lineMatching = (pattern) =>
    new Promise((resolve) => {
      lineArrived = () => {
        const match = startup.map((line) => pattern.exec(line)).find(Boolean);
        if (match) resolve(match);
      };
      lineArrived();
    });
  /** Splits `127.0.0.1:43567` (or `[::1]:43567`) at its last colon. */
  const hostPort = (address) => {
    const colon = address.lastIndexOf(':');
    return [address.slice(0, colon), Number(address.slice(colon + 1))];
  };

  const early = exit.then(({ code, signal, error }) => {
    throw error ?? new Error(`ringwire exited before listening (${code ?? signal}):\n${stderr}`);
  });
  early.catch(() => {}); // only the race below reports it
  const wantsTls = /^\[tls\]/m.test(config);
  let timer;
  const timeout = new Promise((_, reject) => {
    const what = wantsTls ? 'the first and the TLS line' : 'the first line';
    timer = setTimeout(() => reject(new Error(`timed out after 10000 ms waiting for ${what} of ${bin}`)), 10000);
  });
  const race = (promise) => Promise.race([promise, early, timeout]);
  try {
    // `ringwire listening on 127.0.0.1:43567 (2 shards: IoUring, IoUring)`
    const [line] = await race(lineMatching(/^.*/));
    const listening = /^ringwire listening on (\S+:\d+) /.exec(line);
    if (!listening) throw new Error(`unexpected first line: ${line}`);
    const [host, port] = hostPort(listening[1]);
    if (!wantsTls) return { server, exit, tmpDir, host, port };
    // `  TLS: wss://127.0.0.1:37761/app/{key}?protocol=7   HTTPS API: https://…`, after the app lines.
    const [, tlsAddress] = await race(lineMatching(/^ {2}TLS: wss:\/\/(\S+:\d+)\/app\//));
    const [tlsHost, tlsPort] = hostPort(tlsAddress);
    return { server, exit, tmpDir, host, port, tlsHost, tlsPort };
  } finally {
    clearTimeout(timer);
    lineArrived = () => {};
  }
}

/** Resolves after `ms`: to pace writes or polls, or to give what must not happen its chance. */
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Races `promise` against `ms`; the error names `what`, and `why()` may add a cause. */
export function withTimeout(promise, ms, what, why = () => '') {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}${why()}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `predicate` every 20 ms until it is truthy and returns its value; throws naming
 * `what` (and `why()`) after `ms`. */
export async function until(what, predicate, ms = 10000, why = () => '') {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}${why()}`);
    await sleep(20);
  }
}

/**
 * One test file's ringwire, started by `start()` (see spawnRingwire) and stopped by `stop()`;
 * after start it carries server, exit, tmpDir, host and port (and tlsHost and tlsPort when the
 * config has [tls]), and `stderr` as it grows.
 */
export function ringwireProcess({ config, prefix }) {
  const ringwire = {
    stderr: '',
    /** Spawns ringwire on a free port. */
    async start() {
      const onStderr = (text) => {
        ringwire.stderr = text;
      };
      Object.assign(ringwire, await spawnRingwire({ config, prefix, onStderr }));
    },
    /** Whether the child has been spawned and has not exited. */
    running() {
      return Boolean(ringwire.server) && ringwire.server.exitCode === null && ringwire.server.signalCode === null;
    },
    /** For a timeout message: a note that the cause is that the server is gone, if it is. */
    gone() {
      if (!ringwire.server || ringwire.running()) return '';
      const status = ringwire.server.exitCode ?? ringwire.server.signalCode;
      return ` (ringwire has exited: ${status}; stderr:\n${ringwire.stderr})`;
    },
    /** Checks that the server (if it ever listened) is still running, SIGTERMs it, checks that
     * it exits 0 within 10 s, and removes the temp folder whatever happened. */
    async stop() {
      try {
        if (!ringwire.port) return; // never listened: spawnRingwire kills it when the runner exits
        const { exitCode, signalCode } = ringwire.server;
        assert.ok(ringwire.running(), `ringwire exited during the tests (${exitCode ?? signalCode}):\n${ringwire.stderr}`);
        ringwire.server.kill('SIGTERM');
        const { code, signal } = await withTimeout(ringwire.exit, 10000, 'ringwire to exit on SIGTERM');
        assert.equal(signal, null, `ringwire died of ${signal}:\n${ringwire.stderr}`);
        assert.equal(code, 0, `ringwire exited with ${code}:\n${ringwire.stderr}`);
      } finally {
        if (ringwire.tmpDir) rmSync(ringwire.tmpDir, { recursive: true, force: true });
      }
    },
  };
  return ringwire;
}

/** The `pusher` Node SDK as the demo app's backend, aimed at `ringwire` (at its TLS listener
 * over https when `tls`); `options` override. */
export function pusherServer(ringwire, options = {}, { tls = false } = {}) {
  const [host, port] = tls ? [TLS_SERVER_NAME, ringwire.tlsPort] : [ringwire.host, ringwire.port];
  return new PusherServer({ appId: APP_ID, key: KEY, secret: SECRET, host, port: String(port), useTLS: tls, ...options });
}

/** The pusher-js options that aim a client at `ringwire` the way a browser app would: at its
 * TLS listener over wss:// when `tls` (as a page served over https must). */
export function clientOptions(ringwire, { tls = false } = {}) {
  if (tls) {
    return {
      cluster: 'mt1',
      wsHost: TLS_SERVER_NAME,
      wssPort: ringwire.tlsPort,
      forceTLS: true, // the transport named 'ws' then opens wss:// to wsHost:wssPort
      enabledTransports: ['ws'],
    };
  }
  return {
    cluster: 'mt1', // required by pusher-js 8; wsHost/wsPort override the host it implies
    wsHost: ringwire.host,
    wsPort: ringwire.port,
    forceTLS: false,
    enabledTransports: ['ws'],
  };
}

/** ringwire_connections per shard, from GET /metrics. */
export async function metricsConnections(ringwire) {
  const res = await fetch(`http://${ringwire.host}:${ringwire.port}/metrics`);
  assert.equal(res.status, 200);
  const text = await res.text();
  const perShard = {};
  for (const m of text.matchAll(/^ringwire_connections\{shard="(\d+)"\} (\d+)$/gm)) {
    perShard[m[1]] = Number(m[2]);
  }
  return perShard;
}

/** The JSON body of a response that must be a 200. */
export async function json(responsePromise) {
  const res = await responsePromise;
  assert.equal(res.status, 200);
  return res.json();
}

/** A `node:http` receiver on a free port that records each request's url, headers and body
 * and then lets `respond(req, res)` answer it; returns { requests, port, close }. */
export function httpReceiver(respond) {
  const requests = [];
  const server = createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      requests.push({ url: req.url, headers: req.headers, body: Buffer.concat(chunks).toString('utf8') });
      respond(req, res);
    });
  });
  return listening(server, requests, () => {
    server.closeAllConnections();
    server.close();
  });
}

/** Resolves with a receiver's { requests, port, close } once `server` listens on a free
 * loopback port. */
export function listening(server, requests, close) {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ requests, port: server.address().port, close })));
}

/**
 * The pusher-js helpers of one test file, aimed at `ringwire` (read when a client is made) with
 * `defaults` added to every client's options. Every wait is bounded by WAIT_MS and says when
 * the cause is that ringwire has exited. `closeAll()` disconnects every client still open.
 * With `tls`, the clients connect over wss:// to the TLS listener.
 */
export function pusherClients(ringwire, defaults = {}, { tls = false } = {}) {
  const clients = new Set(); // every pusher-js instance, so none is left open at the end
  const sockets = new Set(); // every faye-websocket socket pusher-js opened (see releaseCloseTimers)
  const wait = (promise, what) => withTimeout(promise, WAIT_MS, what, ringwire.gone);

  /** A pusher-js client aimed at the test server, configured the way a browser app would be. */
  function newClient(extra = {}) {
    const client = new Pusher(KEY, { ...clientOptions(ringwire, { tls }), ...defaults, ...extra });
    clients.add(client);
    client.connection.bind('connected', () => {
      const socket = client.connection.connection?.transport?.socket;
      if (socket) sockets.add(socket);
    });
    return client;
  }

  /** Resolves with `client` once it is connected; rejects if pusher-js gives up. */
  function connected(client) {
    if (client.connection.state === 'connected') return Promise.resolve(client);
    return wait(
      new Promise((resolve, reject) => {
        client.connection.bind('connected', () => resolve(client));
        client.connection.bind('failed', () => reject(new Error('pusher-js connection failed')));
      }),
      'pusher-js to connect',
    );
  }

  /** A new client, once connected. */
  async function connectedClient(extra) {
    return connected(newClient(extra));
  }

  /** Subscribes `client` to `name`; resolves with the channel on subscription_succeeded. */
  function subscribed(client, name) {
    const channel = client.subscribe(name);
    if (channel.subscribed) return Promise.resolve(channel);
    return wait(
      new Promise((resolve, reject) => {
        channel.bind('pusher:subscription_succeeded', () => resolve(channel));
        channel.bind('pusher:subscription_error', (err) =>
          reject(new Error(`subscription to ${name} failed: ${JSON.stringify(err)}`)),
        );
        channel.bind('pusher:error', (err) =>
          reject(new Error(`server refused subscription to ${name}: ${JSON.stringify(err)}`)),
        );
      }),
      `subscription_succeeded on ${name}`,
    );
  }

  /** Disconnects `client` and forgets it. */
  function disconnect(client) {
    client.disconnect();
    clients.delete(client);
  }

  /** Disconnects every client still open. */
  function closeAll() {
    for (const client of clients) client.disconnect();
    clients.clear();
  }

  /** Library quirk (pusher-js 8.6.0 in Node): when the server closes a connection with a code
   * in 4000-4099, pusher-js "refuses" it by calling disconnect() from inside its own close
   * handler, which calls faye-websocket's close() on the already closed socket; that arms a
   * 30 s close-handshake timer nothing ever clears, keeping this process alive for 30 s after
   * the tests. In a browser the extra close() is a no-op. Since the test cannot defer what
   * pusher-js does itself, it unrefs those dead timers at the end (behaviour is unchanged). */
  function releaseCloseTimers() {
    for (const socket of sockets) {
      if (socket.readyState === 3 /* CLOSED */ && socket._closeTimer) socket._closeTimer.unref();
    }
    sockets.clear();
  }

  /** A list that things are pushed onto; until(n) resolves once it holds n of them. */
  function recorder(what) {
    const got = [];
    const waiters = [];
    return {
      got,
      push(item) {
        got.push(item);
        for (let i = waiters.length - 1; i >= 0; i--) {
          if (got.length >= waiters[i].n) {
            waiters[i].resolve(got);
            waiters.splice(i, 1);
          }
        }
      },
      until(n, label = `${n} × ${what}`) {
        if (got.length >= n) return Promise.resolve(got);
        return wait(new Promise((resolve) => waiters.push({ n, resolve })), label);
      },
    };
  }

  /** Records `event` on any pusher-js emitter (a channel, pusher.user, pusher.user.watchlist,
   * pusher.connection) as { data, metadata }. */
  function record(emitter, event, what = event) {
    const r = recorder(what);
    emitter.bind(event, (data, metadata) => r.push({ data, metadata }));
    return r;
  }

  /** Records the data of every `event` on `channel`. */
  function recordData(channel, event) {
    const r = recorder(`${event} on ${channel.name}`);
    channel.bind(event, (data) => r.push(data));
    return r;
  }

  /** Polls `predicate` until it is truthy; bounded by WAIT_MS. */
  function waitFor(predicate, what) {
    return until(what, predicate, WAIT_MS, ringwire.gone);
  }

  return {
    clients,
    newClient,
    connected,
    connectedClient,
    subscribed,
    disconnect,
    closeAll,
    releaseCloseTimers,
    recorder,
    record,
    recordData,
    waitFor,
  };
}

/**
 * Runs tests/interop/python_sdk.py (the official Python `pusher` SDK) against `host:port`:
 * it triggers `from-python` with `data` on `py-room`, then queries channels with prefix `py-`.
 * `extra` are further arguments (`--ssl`, `--ca-file`). Asserts a zero exit within 15 s and
 * returns what the script printed (its JSON).
 */
export async function runPythonSdk({ host, port, data, extra = [] }) {
  const args = [
    path.join(HERE, 'python_sdk.py'),
    '--host', host,
    '--port', String(port),
    ...extra,
    '--app-id', APP_ID,
    '--key', KEY,
    '--secret', SECRET,
    '--channel', 'py-room',
    '--event', 'from-python',
    '--data', JSON.stringify(data),
    '--prefix', 'py-',
  ];
  const child = spawn(PYTHON, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (c) => (stdout += c));
  child.stderr.setEncoding('utf8').on('data', (c) => (stderr += c));
  const what = `${PYTHON} python_sdk.py ${extra.join(' ')}`.trim();
  const code = await withTimeout(
    new Promise((resolve, reject) => {
      child.on('error', reject);
      child.on('exit', resolve);
    }),
    15000,
    what,
  ).catch((err) => {
    child.kill('SIGKILL');
    throw err;
  });
  assert.equal(code, 0, `${what} failed:\n${stderr}`);
  return JSON.parse(stdout);
}
