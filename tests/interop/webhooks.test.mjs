// Webhooks checked by the official verifiers: every body ringwire delivers must verify with
// `standardwebhooks` (the Standard Webhooks reference library) or with the `pusher` Node
// SDK's webhook validation, exactly as a user's receiver would run them.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import Pusher from 'pusher-js';
import { Webhook } from 'standardwebhooks';

import { KEY, clientOptions, configToml, httpReceiver, pusherServer, sleep, spawnRingwire, until } from './harness.mjs';

// Two secrets: the current one and one being rotated out; either must verify alone.
const WHSEC_NEW = 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD';
const WHSEC_OLD = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw';

/** A receiver that records raw bodies and headers and answers 200 `ok`. */
function startReceiver() {
  return httpReceiver((req, res) => res.writeHead(200, { 'Content-Type': 'text/plain' }).end('ok'));
}

describe('webhooks verified by the official libraries', () => {
  let receiver;
  let ringwire;
  let api;

  before(async () => {
    receiver = await startReceiver();
    const { port } = receiver;
    const config = configToml({
      webhooks: 'batch_ms = 50',
      endpoints: [
        { url: `http://127.0.0.1:${port}/standard`, format: 'standard', secret: WHSEC_NEW, secrets: [WHSEC_OLD] },
        { url: `http://127.0.0.1:${port}/pusher`, format: 'pusher' },
      ],
    });
    ringwire = await spawnRingwire({ config, prefix: 'ringwire-webhooks-' });
    api = pusherServer(ringwire);
  });

  after(() => {
    ringwire?.server.kill('SIGKILL');
    receiver?.close();
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
    const client = new Pusher(KEY, clientOptions(ringwire));
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

  // Proves Pusher's presence debounce at its default window (3 s, this server's config sets
  // none): a pusher-js user who disconnects and reconnects within it is no member_removed or
  // member_added at another client, and no member webhook; staying away is one of each.
  it('a reconnect within the presence debounce makes no member events or webhooks', async () => {
    const name = 'presence-debounce';
    const connect = (user) => {
      const client = new Pusher(KEY, {
        ...clientOptions(ringwire),
        channelAuthorization: {
          customHandler: ({ socketId, channelName }, callback) =>
            callback(null, api.authorizeChannel(socketId, channelName, user)),
        },
      });
      const channel = client.subscribe(name);
      const joined = new Promise((resolve) => channel.bind('pusher:subscription_succeeded', resolve));
      return { client, channel, joined };
    };
    const memberEvents = () =>
      receiver.requests
        .filter((r) => r.url === '/pusher')
        .flatMap((r) => JSON.parse(r.body).events)
        .filter((e) => e.channel === name && e.name.startsWith('member_'))
        .map((e) => `${e.name} ${e.user_id}`);
    const observer = connect({ user_id: 'watcher' });
    await observer.joined;
    const seen = [];
    observer.channel.bind('pusher:member_added', (m) => seen.push(`added ${m.id}`));
    observer.channel.bind('pusher:member_removed', (m) => seen.push(`removed ${m.id}`));
    const first = connect({ user_id: 'ada', user_info: { name: 'Ada' } });
    await first.joined;
    await until('ada added', () => seen.includes('added ada'));
    await until('member webhooks', () => memberEvents().length === 2);
    first.client.disconnect();
    await sleep(100); // the server has seen the close before she comes back
    const second = connect({ user_id: 'ada', user_info: { name: 'Ada' } });
    const members = await second.joined;
    assert.deepEqual(Object.keys(members.members).sort(), ['ada', 'watcher']);
    // Past the window: nothing may have been announced (only waiting shows an absence).
    await sleep(3500);
    assert.deepEqual(seen, ['added ada']);
    assert.deepEqual(memberEvents().sort(), ['member_added ada', 'member_added watcher']);
    second.client.disconnect();
    await until('ada removed', () => seen.includes('removed ada'), 10000);
    await until('member_removed webhook', () => memberEvents().includes('member_removed ada'));
    observer.client.disconnect();
    assert.deepEqual(seen, ['added ada', 'removed ada']);
    assert.deepEqual(memberEvents().filter((e) => e.startsWith('member_removed')), ['member_removed ada']);
  });
});
