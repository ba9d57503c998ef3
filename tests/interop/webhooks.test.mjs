// Webhooks checked by the official verifiers: every body ringwire delivers must verify with
// `standardwebhooks` (the Standard Webhooks reference library) or with the `pusher` Node
// SDK's webhook validation, exactly as a user's receiver would run them.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import Pusher from 'pusher-js';
import PusherServer from 'pusher';
import { Webhook } from 'standardwebhooks';

import { spawnRingwire, until } from './harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BIN = path.resolve(HERE, '..', '..', process.env.RINGWIRE_BIN || 'target/release/ringwire');
const APP_ID = '1';
const KEY = 'ringwire-demo-key';
const SECRET = 'ringwire-demo-secret';
// Two secrets: the current one and one being rotated out; either must verify alone.
const WHSEC_NEW = 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD';
const WHSEC_OLD = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';

/** A receiver that records raw bodies and headers. */
function startReceiver() {
  const requests = [];
  const server = createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      requests.push({ url: req.url, headers: req.headers, body: Buffer.concat(chunks).toString('utf8') });
      res.writeHead(200, { 'Content-Type': 'text/plain' }).end('ok');
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, requests })));
}

describe('webhooks verified by the official libraries', () => {
  let receiver;
  let ringwire;
  let api;

  before(async () => {
    receiver = await startReceiver();
    const port = receiver.server.address().port;
    const config = `
[server]
bind = "127.0.0.1:0"
shards = 2

[webhooks]
data_dir = "{TMP}/data"
allow_private_targets = true
batch_ms = 50

[[apps]]
id = "${APP_ID}"
key = "${KEY}"
secret = "${SECRET}"

[[apps.webhooks]]
url = "http://127.0.0.1:${port}/standard"
format = "standard"
secret = "${WHSEC_NEW}"
secrets = ["${WHSEC_OLD}"]

[[apps.webhooks]]
url = "http://127.0.0.1:${port}/pusher"
format = "pusher"
`;
    ringwire = await spawnRingwire({ bin: BIN, config, prefix: 'ringwire-webhooks-', onStderr: () => {} });
    api = new PusherServer({ appId: APP_ID, key: KEY, secret: SECRET, host: ringwire.host, port: String(ringwire.port), useTLS: false });
  });

  after(() => {
    ringwire?.server.kill('SIGKILL');
    receiver?.server.close();
  });

  it('signs every event subscription so standardwebhooks verifies it, with either secret', async () => {
    const events = 20;
    for (let i = 0; i < events; i++) {
      const response = await api.trigger(`orders-${i % 3}`, 'order.created', { n: i, note: 'ünïcødé "quoted"' });
      assert.equal(response.status, 200);
    }
    await until('standard deliveries', () => receiver.requests.filter((r) => r.url === '/standard').length >= events);
    const delivered = receiver.requests.filter((r) => r.url === '/standard');
    const seen = new Set();
    for (const request of delivered) {
      for (const secret of [WHSEC_NEW, WHSEC_OLD]) {
        const payload = new Webhook(secret).verify(request.body, request.headers);
        assert.equal(payload.type, 'order.created');
        assert.match(payload.channel, /^orders-\d$/);
        seen.add(payload.data.n);
      }
      assert.equal(request.headers['content-type'], 'application/json');
    }
    assert.equal(seen.size, events);
    // A tampered body must not verify (the check is real).
    const tampered = { ...delivered[0], body: delivered[0].body.replace('order.created', 'order.deleted') };
    assert.throws(() => new Webhook(WHSEC_NEW).verify(tampered.body, tampered.headers));
  });

  it('sends lifecycle webhooks that the pusher SDK validates', async () => {
    const client = new Pusher(KEY, {
      wsHost: ringwire.host, wsPort: ringwire.port, forceTLS: false, enabledTransports: ['ws'], cluster: 'mt1',
    });
    const channel = client.subscribe('lobby');
    await new Promise((resolve) => channel.bind('pusher:subscription_succeeded', resolve));
    client.unsubscribe('lobby');
    await until('occupied and vacated', () => {
      const names = receiver.requests.filter((r) => r.url === '/pusher').flatMap((r) => JSON.parse(r.body).events.map((e) => e.name));
      return names.includes('channel_occupied') && names.includes('channel_vacated');
    });
    client.disconnect();
    for (const request of receiver.requests.filter((r) => r.url === '/pusher')) {
      const webhook = api.webhook({ headers: request.headers, rawBody: request.body });
      assert.ok(webhook.isValid(), `pusher SDK rejects ${request.body}`);
      for (const event of webhook.getEvents()) assert.equal(event.channel, 'lobby');
    }
    const forged = receiver.requests.find((r) => r.url === '/pusher');
    const bad = api.webhook({ headers: { ...forged.headers, 'x-pusher-signature': '0'.repeat(64) }, rawBody: forged.body });
    assert.equal(bad.isValid(), false);
  });
});
