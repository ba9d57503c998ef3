// Interoperability over TLS: ringwire's own wss:// and https:// listener driven by the real,
// unmodified libraries — pusher-js with forceTLS, the `pusher` Node SDK with useTLS, the Python
// `pusher` SDK with ssl=True (through python_sdk.py) and Laravel Echo — trusting a test CA, as
// a browser on an https page and an app's backend would. Run by scripts/interop, which makes
// the CA and the certificate and hands the CA to Node (NODE_EXTRA_CA_CERTS, read only at
// process start) and to Python; needs a release build.
//
//   RINGWIRE_BIN       server binary (default target/release/ringwire, relative to the repo root)
//   RINGWIRE_PYTHON    interpreter with the `pusher` package (default python3)
//   RINGWIRE_TLS_CA, RINGWIRE_TLS_CERT, RINGWIRE_TLS_KEY   the PEM files scripts/interop made

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';

import Pusher from 'pusher-js';
import PusherServer from 'pusher';
import Echo from 'laravel-echo';

import {
  APP_ID,
  BOUNDED,
  KEY,
  SECRET,
  TLS_FILES,
  TLS_SERVER_NAME,
  WAIT_MS,
  clientOptions,
  configToml,
  json,
  pusherClients,
  pusherServer,
  ringwireProcess,
  runPythonSdk,
  withTimeout,
} from './harness.mjs';

/** What the TLS port answers a client that speaks plain HTTP to it. */
const PLAINTEXT_REFUSAL = { error: 'this port speaks TLS: use https:// or wss://', status: 400 };

const ringwire = ringwireProcess({
  config: configToml({ app: 'enable_client_events = true', tls: '' }),
  prefix: 'ringwire-tls-',
});
// Every pusher-js client of this file connects over wss:// unless a test asks otherwise.
const {
  clients,
  closeAll,
  connectedClient,
  disconnect,
  newClient,
  record,
  recordData,
  recorder,
  releaseCloseTimers,
  subscribed,
  waitFor,
} = pusherClients(ringwire, {}, { tls: true });
let httpsSdk; // the app's backend over https://, to the TLS listener
let httpSdk; // the same backend over http://, to the plain listener

/** The channel authorizer an app's backend would run (signed by the Node SDK), with
 * channel_data `user` for presence channels. */
function channelAuth(user) {
  return {
    customHandler: ({ socketId, channelName }, callback) => {
      try {
        const presence = channelName.startsWith('presence-') ? user : undefined;
        callback(null, httpsSdk.authorizeChannel(socketId, channelName, presence));
      } catch (err) {
        callback(err, null);
      }
    },
  };
}

/** The URL pusher-js opened its WebSocket to (faye-websocket's client keeps it). */
function socketUrl(client) {
  return client.connection.connection.transport.socket.url;
}

/** ringwire_<name> summed over the shards, from GET /metrics over https. */
async function metricTotal(name) {
  const res = await fetch(`https://${TLS_SERVER_NAME}:${ringwire.tlsPort}/metrics`);
  assert.equal(res.status, 200);
  const text = await res.text();
  const values = [...text.matchAll(new RegExp(`^ringwire_${name}(?:\\{[^}]*\\})? (\\d+)$`, 'gm'))];
  assert.ok(values.length > 0, `no ringwire_${name} in /metrics:\n${text}`);
  return values.reduce((sum, m) => sum + Number(m[1]), 0);
}

/** Sends `request` over plain TCP to `port` and resolves with everything the server wrote
 * before it closed the connection. */
function rawExchange(port, request) {
  return withTimeout(
    new Promise((resolve, reject) => {
      const socket = connect(port, ringwire.tlsHost, () => socket.write(request));
      const chunks = [];
      socket.on('data', (chunk) => chunks.push(chunk));
      socket.on('error', reject);
      socket.on('close', () => resolve(Buffer.concat(chunks).toString('utf8')));
    }),
    WAIT_MS,
    'the TLS port to answer plaintext and close',
    ringwire.gone,
  );
}

describe('ringwire over wss:// and https:// with the official Pusher libraries', () => {
  before(async () => {
    assert.ok(
      TLS_FILES.ca && process.env.NODE_EXTRA_CA_CERTS,
      'RINGWIRE_TLS_CA and NODE_EXTRA_CA_CERTS are unset: run the TLS tests with scripts/interop',
    );
    await ringwire.start();
    httpsSdk = pusherServer(ringwire, { timeout: WAIT_MS }, { tls: true });
    httpSdk = pusherServer(ringwire, { timeout: WAIT_MS });
  }, BOUNDED);

  // Disconnects every client left, then checks that the server is still up and exits 0 on
  // SIGTERM.
  after(async () => {
    releaseCloseTimers();
    closeAll();
    await ringwire.stop();
  }, { timeout: 30000 });

  // ---- tests --------------------------------------------------------------------------------

  // Proves pusher-js with forceTLS connects over wss:// to the TLS listener and both listeners
  // share one server: a wss:// and a ws:// subscriber of one channel each get, in order, an
  // event published over https:// and one published over http://.
  it('1. pusher-js over wss: a public channel gets events published over https and http', BOUNDED, async () => {
    const secure = await connectedClient();
    const plain = await connectedClient(clientOptions(ringwire));
    assert.match(socketUrl(secure), new RegExp(`^wss://${TLS_SERVER_NAME}:${ringwire.tlsPort}/app/${KEY}\\?`));
    assert.match(socketUrl(plain), new RegExp(`^ws://${ringwire.host}:${ringwire.port}/app/${KEY}\\?`));
    const secureEvents = recordData(await subscribed(secure, 'news'), 'story');
    const plainEvents = recordData(await subscribed(plain, 'news'), 'story');

    const sent = [{ via: 'https', text: 'ünïcødé ✓' }, { via: 'http', n: [1, 2, 3] }];
    assert.equal((await httpsSdk.trigger('news', 'story', sent[0])).status, 200);
    assert.equal((await httpSdk.trigger('news', 'story', sent[1])).status, 200);
    assert.deepEqual(await secureEvents.until(2), sent);
    assert.deepEqual(await plainEvents.until(2), sent);

    disconnect(secure);
    disconnect(plain);
  });

  // Proves private channels and client events over wss://: SDK-signed subscriptions succeed,
  // a client-* event reaches the other subscriber intact and is not echoed to the sender.
  it('2. private channel and client events over wss', BOUNDED, async () => {
    const channelName = 'private-chat';
    const [sender, receiver] = await Promise.all([
      connectedClient({ channelAuthorization: channelAuth() }),
      connectedClient({ channelAuthorization: channelAuth() }),
    ]);
    const senderChannel = await subscribed(sender, channelName);
    const receiverChannel = await subscribed(receiver, channelName);
    const echoed = recordData(senderChannel, 'client-typing');
    const senderSentinel = recordData(senderChannel, 'sentinel');
    const received = recordData(receiverChannel, 'client-typing');
    const fromServer = recordData(receiverChannel, 'secret');

    assert.equal(senderChannel.trigger('client-typing', { typing: true, who: 'grüße' }), true);
    assert.deepEqual(await received.until(1), [{ typing: true, who: 'grüße' }]);
    // An echo to the sender would be written before the receiver got the event; a later
    // server event to the sender proves nothing was queued ahead of it.
    await httpsSdk.trigger(channelName, 'sentinel', {});
    await senderSentinel.until(1);
    assert.deepEqual(echoed.got, []);
    await httpsSdk.trigger(channelName, 'secret', { for: 'members only' });
    assert.deepEqual(await fromServer.until(1), [{ for: 'members only' }]);

    disconnect(sender);
    disconnect(receiver);
  });

  // Proves presence over wss://: members as pusher-js sees them, member_added and
  // member_removed, and the https:// users API and user_count agree.
  it('3. presence channel over wss; users API over https', BOUNDED, async () => {
    const channelName = 'presence-lobby';
    const ada = { user_id: 'ada', user_info: { name: 'Ada' } };
    const bob = { user_id: 'bob', user_info: { name: 'Bob' } };
    const first = await connectedClient({ channelAuthorization: channelAuth(ada) });
    const firstChannel = await subscribed(first, channelName);
    assert.deepEqual(firstChannel.members.me, { id: 'ada', info: { name: 'Ada' } });
    const added = record(firstChannel, 'pusher:member_added');
    const removed = record(firstChannel, 'pusher:member_removed');

    const second = await connectedClient({ channelAuthorization: channelAuth(bob) });
    const secondChannel = await subscribed(second, channelName);
    assert.equal(secondChannel.members.count, 2);
    assert.deepEqual((await added.until(1))[0].data, { id: 'bob', info: { name: 'Bob' } });

    const users = await json(httpsSdk.get({ path: `/channels/${channelName}/users` }));
    assert.deepEqual(users.users.map((u) => u.id).sort(), ['ada', 'bob']);
    const info = await json(httpsSdk.get({ path: `/channels/${channelName}`, params: { info: 'user_count' } }));
    assert.deepEqual(info, { occupied: true, user_count: 2 });

    disconnect(second);
    assert.deepEqual((await removed.until(1))[0].data, { id: 'bob', info: { name: 'Bob' } });
    assert.equal(firstChannel.members.count, 1);
    disconnect(first);
  });

  // Proves the Node SDK over https:// (useTLS): trigger and triggerBatch reach a wss://
  // subscriber in order, the channel queries count subscriptions, and an oversized event is
  // a RequestError with status 413, as over http://.
  it('4. Node SDK over https: trigger, triggerBatch, channel queries, 413', BOUNDED, async () => {
    const [a, b] = await Promise.all([connectedClient(), connectedClient()]);
    const events = recordData(await subscribed(a, 'room-a'), 'item');
    await subscribed(b, 'room-a');
    await subscribed(b, 'room-b');

    assert.equal((await httpsSdk.trigger('room-a', 'item', { i: 0 })).status, 200);
    const batch = [1, 2, 3].map((i) => ({ channel: 'room-a', name: 'item', data: { i } }));
    assert.equal((await httpsSdk.triggerBatch(batch)).status, 200);
    assert.deepEqual(await events.until(4), [{ i: 0 }, { i: 1 }, { i: 2 }, { i: 3 }]);

    const channels = await json(
      httpsSdk.get({ path: '/channels', params: { filter_by_prefix: 'room-', info: 'subscription_count' } }),
    );
    assert.deepEqual(channels, {
      channels: { 'room-a': { subscription_count: 2 }, 'room-b': { subscription_count: 1 } },
    });
    const roomB = await json(httpsSdk.get({ path: '/channels/room-b', params: { info: 'subscription_count' } }));
    assert.deepEqual(roomB, { occupied: true, subscription_count: 1 });

    await assert.rejects(httpsSdk.trigger('room-a', 'item', 'x'.repeat(10241)), (err) => {
      assert.ok(err instanceof PusherServer.RequestError, `not a RequestError: ${err}`);
      assert.equal(err.status, 413);
      return true;
    });

    disconnect(a);
    disconnect(b);
  });

  // Proves the Python SDK over https:// (ssl=True, verifying against the test CA): its trigger
  // reaches a wss:// subscriber, and channels_info / channel_info return the right counts.
  it('5. the Python SDK over https triggers and queries', BOUNDED, async () => {
    const [a, b] = await Promise.all([connectedClient(), connectedClient()]);
    const events = recordData(await subscribed(a, 'py-room'), 'from-python');
    await subscribed(b, 'py-room');
    await subscribed(b, 'py-other');

    const data = { lang: 'python', over: 'https', text: 'grüße' };
    const printed = await runPythonSdk({
      host: TLS_SERVER_NAME,
      port: ringwire.tlsPort,
      data,
      extra: ['--ssl', '--ca-file', TLS_FILES.ca],
    });

    assert.deepEqual(await events.until(1), [data]);
    assert.deepEqual(printed.trigger, {});
    assert.deepEqual(printed.channels_info, {
      channels: { 'py-other': { subscription_count: 1 }, 'py-room': { subscription_count: 2 } },
    });
    assert.deepEqual(printed.channel_info, { occupied: true, subscription_count: 2 });

    disconnect(a);
    disconnect(b);
  });

  // Proves Laravel Echo (broadcaster 'pusher', forceTLS) works unmodified over wss://:
  // join() gives here(), joining(), whispers and leaving(); private() receives an event
  // published over https:// by its '.Name'.
  it('6. Laravel Echo over wss: presence room, whisper, private channel', BOUNDED, async () => {
    const taylor = { id: 1, name: 'Taylor' };
    const abigail = { id: 2, name: 'Abigail' };
    // Echo A builds its own pusher-js from the `Pusher` option with forceTLS; Echo B is given
    // a ready pusher-js client (also over wss://) through the `client` option.
    const echoA = new Echo({
      broadcaster: 'pusher',
      Pusher,
      key: KEY,
      ...clientOptions(ringwire, { tls: true }),
      authorizer: (channel) => ({
        authorize: (socketId, callback) => {
          try {
            const presence = channel.name.startsWith('presence-') ? { user_id: taylor.id, user_info: taylor } : undefined;
            callback(null, httpsSdk.authorizeChannel(socketId, channel.name, presence));
          } catch (err) {
            callback(err, null);
          }
        },
      }),
    });
    clients.add(echoA.connector.pusher);
    const echoB = new Echo({
      broadcaster: 'pusher',
      client: newClient({ channelAuthorization: channelAuth({ user_id: abigail.id, user_info: abigail }) }),
    });

    const hereA = recorder('here() on A');
    const joiningA = recorder('joining() on A');
    const leavingA = recorder('leaving() on A');
    const whispersA = recorder('typing whispers on A');
    echoA
      .join('room')
      .here((members) => hereA.push(members))
      .joining((member) => joiningA.push(member))
      .leaving((member) => leavingA.push(member))
      .listenForWhisper('typing', (data) => whispersA.push(data));
    assert.deepEqual((await hereA.until(1))[0], [taylor]);
    assert.match(socketUrl(echoA.connector.pusher), /^wss:\/\//);

    const hereB = recorder('here() on B');
    const roomB = echoB.join('room').here((members) => hereB.push(members));
    const [membersB] = await hereB.until(1);
    assert.deepEqual([...membersB].sort((x, y) => x.id - y.id), [taylor, abigail]);
    assert.match(socketUrl(echoB.connector.pusher), /^wss:\/\//);
    assert.deepEqual((await joiningA.until(1))[0], abigail);

    roomB.whisper('typing', { name: 'Abigail', typing: true });
    assert.deepEqual(await whispersA.until(1), [{ name: 'Abigail', typing: true }]);
    echoB.leave('room');
    assert.deepEqual((await leavingA.until(1))[0], abigail);

    const subscribedA = recorder('private-orders subscribed');
    const shipped = recorder('.OrderShipped');
    echoA
      .private('orders')
      .subscribed(() => subscribedA.push(true))
      .listen('.OrderShipped', (data) => shipped.push(data));
    await subscribedA.until(1);
    await httpsSdk.trigger('private-orders', 'OrderShipped', { order: { id: 42 } });
    assert.deepEqual(await shipped.until(1), [{ order: { id: 42 } }]);
    assert.equal(echoA.connectionStatus(), 'connected');

    echoA.disconnect();
    echoB.disconnect();
    clients.delete(echoA.connector.pusher);
    clients.delete(echoB.connector.pusher);
  });

  // Proves plain HTTP on the TLS port is refused clearly and harmlessly: fetch, the Node SDK
  // with useTLS false and a ws:// upgrade each get a 400 whose JSON body says the port speaks
  // TLS, each is counted as a failed handshake, and a wss:// subscriber connected before
  // keeps receiving while new https:// requests are served.
  it('7. hostile: plain http:// to the TLS port gets a 400 JSON body; the server keeps serving', BOUNDED, async () => {
    const bystander = await connectedClient();
    const events = recordData(await subscribed(bystander, 'bystanders'), 'still-here');
    const failuresBefore = await metricTotal('tls_handshake_failures_total');

    const res = await fetch(`http://${ringwire.tlsHost}:${ringwire.tlsPort}/health`);
    assert.equal(res.status, 400);
    assert.equal(res.headers.get('content-type'), 'application/json');
    assert.deepEqual(await res.json(), PLAINTEXT_REFUSAL);

    const misconfigured = pusherServer(ringwire, { timeout: WAIT_MS, port: String(ringwire.tlsPort) });
    await assert.rejects(misconfigured.trigger('bystanders', 'still-here', { lost: true }), (err) => {
      assert.ok(err instanceof PusherServer.RequestError, `not a RequestError: ${err}`);
      assert.equal(err.status, 400);
      assert.deepEqual(JSON.parse(err.body), PLAINTEXT_REFUSAL);
      return true;
    });

    const upgrade = await rawExchange(
      ringwire.tlsPort,
      `GET /app/${KEY}?protocol=7 HTTP/1.1\r\nHost: ${ringwire.tlsHost}\r\nUpgrade: websocket\r\n` +
        'Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n',
    );
    assert.match(upgrade, /^HTTP\/1\.1 400 /);
    assert.deepEqual(JSON.parse(upgrade.slice(upgrade.indexOf('\r\n\r\n') + 4)), PLAINTEXT_REFUSAL);

    // The server is still serving both kinds of client on the TLS port.
    await httpsSdk.trigger('bystanders', 'still-here', { n: 1 });
    assert.deepEqual(await events.until(1), [{ n: 1 }]);
    assert.equal(bystander.connection.state, 'connected');
    const late = await connectedClient();
    assert.match(socketUrl(late), /^wss:\/\//);
    await waitFor(
      async () => (await metricTotal('tls_handshake_failures_total')) >= failuresBefore + 3,
      'tls_handshake_failures_total to count the three plaintext requests',
    );

    disconnect(bystander);
    disconnect(late);
  });
});
