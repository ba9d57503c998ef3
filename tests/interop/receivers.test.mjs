// Webhook receivers written the ways users write them: each one answers in its own shape
// (head and body in separate writes, chunked, 20 KB, 100 Continue first, Python servers), and
// every delivery must verify with `standardwebhooks` and be acknowledged on its first attempt.
// Run by scripts/interop; needs a release build, and for the Python receivers
//   RINGWIRE_PYTHON       interpreter with standardwebhooks, waitress and uvicorn (default python3)
//   RINGWIRE_TEST_DRIVER  ringwire's `server.io_driver` (default auto; `epoll` tests the fallback)

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer as createTcpServer } from 'node:net';
import path from 'node:path';
import { createInterface } from 'node:readline';

import { Webhook } from 'standardwebhooks';

import {
  HERE,
  PYTHON,
  configToml,
  httpReceiver,
  killOnExit,
  listening,
  pusherServer,
  sleep,
  spawnRingwire,
  until,
} from './harness.mjs';

const DRIVER = process.env.RINGWIRE_TEST_DRIVER || 'auto';
const WHSEC = 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD';
const EVENTS = 20;
const ENDPOINT = 'receiver';

/** The JSON a receiver answers with: it names the webhook id, as receivers commonly do. */
const answerFor = (headers) => JSON.stringify({ received: headers['webhook-id'] ?? null });

/**
 * A raw `node:net` receiver for shapes `node:http` cannot make: it reads each keep-alive
 * request (Content-Length bodies, which is what ringwire sends) and answers it with
 * `steps(headers)`, a list of byte strings to write and pauses (ms) between the writes.
 */
function rawReceiver(steps) {
  const requests = [];
  const sockets = new Set();
  const server = createTcpServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    let buffered = Buffer.alloc(0);
    let answering = Promise.resolve();
    socket.on('data', (data) => {
      buffered = Buffer.concat([buffered, data]);
      for (;;) {
        const headEnd = buffered.indexOf('\r\n\r\n');
        if (headEnd < 0) return;
        const lines = buffered.subarray(0, headEnd).toString('latin1').split('\r\n').slice(1);
        const headers = {};
        for (const line of lines) {
          const colon = line.indexOf(':');
          headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
        }
        assert.equal(headers['transfer-encoding'], undefined, 'this receiver reads Content-Length bodies only');
        const length = Number(headers['content-length'] ?? 0);
        if (buffered.length < headEnd + 4 + length) return;
        const body = buffered.subarray(headEnd + 4, headEnd + 4 + length).toString('utf8');
        buffered = buffered.subarray(headEnd + 4 + length);
        requests.push({ headers, body });
        // Answers go out in request order, each write after the previous step.
        answering = answering.then(async () => {
          for (const step of steps(headers)) {
            if (typeof step === 'number') await sleep(step);
            else if (!socket.destroyed) socket.write(step);
          }
        });
      }
    });
  });
  return listening(server, requests, () => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
}

/** The head of a 200 JSON answer with a Content-Length. */
const head200 = (body) =>
  `HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n`;

/**
 * A receiver from python_receivers.py (`http-server`, `wsgi` or `asgi`). It verifies with the
 * PyPI `standardwebhooks` itself and reports each request on stdout as a JSON line.
 */
async function pythonReceiver(kind) {
  const child = spawn(PYTHON, [path.join(HERE, 'python_receivers.py'), kind, '--secret', WHSEC], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  killOnExit(child);
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => { stderr = (stderr + chunk).slice(-20000); });
  const exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => resolve(`exited (${code ?? signal})`));
    child.on('error', (error) => resolve(`failed to start: ${error.message}`));
  });
  const requests = [];
  const lines = createInterface({ input: child.stdout });
  const first = await Promise.race([
    new Promise((resolve) => lines.once('line', resolve)),
    exited.then((why) => { throw new Error(`${PYTHON} python_receivers.py ${kind} ${why}:\n${stderr}`); }),
  ]);
  assert.match(first, /^listening \d+$/);
  lines.on('line', (line) => requests.push(JSON.parse(line)));
  return { requests, port: Number(first.split(' ')[1]), close: () => child.kill('SIGKILL'), stderr: () => stderr };
}

const SHAPES = [
  {
    name: 'Node http: res.writeHead + res.end(JSON body)',
    start: () => httpReceiver((req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end(answerFor(req.headers));
    }),
  },
  {
    name: 'Node http: chunked JSON body written in three pieces',
    start: () => httpReceiver(async (req, res) => {
      // No Content-Length: Node sends `Transfer-Encoding: chunked`, one chunk per write.
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.write('{"received":');
      await sleep(5);
      res.write(JSON.stringify(req.headers['webhook-id']));
      await sleep(5);
      res.end(',"status":"ok"}');
    }),
  },
  {
    name: 'Node http: 20 KB JSON body',
    start: () => httpReceiver((req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify({ received: req.headers['webhook-id'], padding: 'x'.repeat(20 * 1024) }));
    }),
  },
  {
    name: 'raw TCP: head, then the body 50 ms later',
    start: () => rawReceiver((headers) => {
      const body = answerFor(headers);
      return [head200(body), 50, body];
    }),
  },
  {
    name: 'raw TCP: 100 Continue, then the final response',
    start: () => rawReceiver((headers) => {
      const body = answerFor(headers);
      return ['HTTP/1.1 100 Continue\r\n\r\n', 20, head200(body) + body];
    }),
  },
  {
    name: 'raw TCP: 100 Continue, head and body each in its own write',
    start: () => rawReceiver((headers) => {
      const body = answerFor(headers);
      return ['HTTP/1.1 100 Continue\r\n\r\n', 20, head200(body), 20, body];
    }),
  },
  { name: 'Python http.server (HTTP/1.1 keep-alive)', python: true, start: () => pythonReceiver('http-server') },
  { name: 'Python WSGI app under waitress', python: true, start: () => pythonReceiver('wsgi') },
  { name: 'Python ASGI app under uvicorn', python: true, start: () => pythonReceiver('asgi') },
];

/** ringwire with one Standard Webhooks endpoint, `ENDPOINT`, that posts to `port`. */
function configFor(port) {
  return configToml({
    server: `io_driver = "${DRIVER}"`,
    // A short request timeout turns a response ringwire never finishes reading into a failed
    // attempt within the test's wait.
    webhooks: 'request_timeout_ms = 3000',
    endpoints: [{ id: ENDPOINT, url: `http://127.0.0.1:${port}/webhooks`, format: 'standard', secret: WHSEC }],
  });
}

/** The endpoint's health from the admin API, signed by the `pusher` SDK. */
async function endpointHealth(api) {
  const response = await api.get({ path: '/webhooks' });
  const { endpoints } = await response.json();
  const endpoint = endpoints.find((e) => e.id === ENDPOINT);
  assert.ok(endpoint, `no endpoint ${ENDPOINT} in ${JSON.stringify(endpoints)}`);
  return endpoint;
}

/** The distinct errors in the admin API's attempt logs of the deliveries `requests` got. */
async function attemptErrors(api, requests) {
  const errors = new Set();
  for (const id of new Set(requests.map((r) => r.headers['webhook-id']))) {
    // 404: no attempt of this delivery has finished yet.
    const response = await api
      .get({ path: `/webhooks/deliveries/${id}/attempts` })
      .catch((e) => (e.status === 404 ? null : Promise.reject(e)));
    const attempts = response ? (await response.json()).attempts : [];
    for (const attempt of attempts) if (attempt.error) errors.add(attempt.error);
  }
  return [...errors].join(' | ') || 'none logged';
}

describe('webhook receivers as users write them', () => {
  for (const shape of SHAPES) {
    it(`${shape.name}: every delivery verifies and is acknowledged once`, async () => {
      const receiver = await shape.start();
      let ringwire;
      try {
        const config = configFor(receiver.port);
        ringwire = await spawnRingwire({ config, prefix: 'ringwire-receivers-' });
        const api = pusherServer(ringwire);
        for (let n = 0; n < EVENTS; n++) {
          const response = await api.trigger(`receivers-${n % 3}`, 'order.created', { n, shape: shape.name });
          assert.equal(response.status, 200);
        }

        // Done when every delivery is settled, or as soon as one attempt has failed.
        let health;
        await until(`${EVENTS} deliveries settled`, async () => {
          health = await endpointHealth(api);
          if (health.failed_attempts > 0) return true;
          const settled = health.pending === 0 && health.delivered + health.dead_letters >= EVENTS;
          return settled && receiver.requests.length >= EVENTS;
        }, 15000);
        const summary = JSON.stringify(health);
        if (health.failed_attempts > 0) {
          assert.fail(`attempts failed: ${await attemptErrors(api, receiver.requests)}; ${summary}`);
        }
        assert.equal(health.dead_letters, 0, `dead letters: ${summary}`);
        assert.equal(health.delivered, EVENTS, summary);
        const deadLetters = await (await api.get({ path: `/webhooks/${ENDPOINT}/dead_letters` })).json();
        assert.deepEqual(deadLetters, { dead_letters: [] });

        const ids = new Map();
        const numbers = new Set();
        for (const request of receiver.requests) {
          if (shape.python) assert.equal(request.verified, true, `PyPI standardwebhooks: ${request.error}`);
          const payload = new Webhook(WHSEC).verify(request.body, request.headers);
          assert.equal(payload.type, 'order.created');
          assert.equal(payload.data.shape, shape.name);
          numbers.add(payload.data.n);
          const id = request.headers['webhook-id'];
          ids.set(id, (ids.get(id) ?? 0) + 1);
        }
        const repeated = [...ids].filter(([, count]) => count > 1);
        assert.deepEqual(repeated, [], 'a webhook id was received more than once');
        assert.equal(ids.size, EVENTS);
        assert.equal(numbers.size, EVENTS);
      } finally {
        ringwire?.server.kill('SIGKILL');
        receiver.close();
      }
    });
  }
});
