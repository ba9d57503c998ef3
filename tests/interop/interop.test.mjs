// Interoperability tests: ringwire driven by the real, unmodified official libraries —
// pusher-js (the browser/Node client), `pusher` (the Node server SDK) and, through
// python_sdk.py, the Python server SDK. Run by scripts/interop; needs a release build.
//
//   RINGWIRE_BIN     server binary (default target/release/ringwire, relative to the repo root)
//   RINGWIRE_PYTHON  interpreter with the `pusher` package (default python3)

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import PusherServer from 'pusher';

import {
  APP_ID,
  BOUNDED,
  ENCRYPTION_MASTER_KEY,
  KEY,
  SECRET,
  WAIT_MS,
  configToml,
  json,
  metricsConnections,
  pusherClients,
  pusherServer,
  ringwireProcess,
  runPythonSdk,
  sleep,
  withTimeout,
} from './harness.mjs';

const ringwire = ringwireProcess({
  config: configToml({ app: 'enable_client_events = true' }),
  prefix: 'ringwire-interop-',
});
// disableStats: stats are off by default in pusher-js 8.x; kept for older 7.x-style configs.
const { closeAll, connectedClient, disconnect, recordData, subscribed } = pusherClients(ringwire, { disableStats: true });
let serverSdk;

/** The private-channel authorizer an app's backend would run: the Node SDK signs
 * `socket_id:channel` (and adds the shared secret for private-encrypted channels). */
const authorizeWithSdk = {
  customHandler: (params, callback) => {
    try {
      callback(null, serverSdk.authorizeChannel(params.socketId, params.channelName));
    } catch (err) {
      callback(err, null);
    }
  },
};

/** SIGTERMs the server with one pusher-js client connected: checks the 4200 close it gets and
 * the exit status. */
async function stopServer() {
  closeAll();
  let watcher;
  let closeError;
  try {
    if (ringwire.running()) {
      watcher = await connectedClient();
      closeError = new Promise((resolve) =>
        watcher.connection.bind('error', (err) => {
          // Stop pusher-js from reconnecting, as 4200 asks it to. Not from inside this
          // handler: the socket is already closed here, and closing it again would leave
          // a 30 s close-handshake timer in faye-websocket keeping the process alive.
          setImmediate(() => disconnect(watcher));
          resolve(err);
        }),
      );
    }
  } catch (err) {
    // The temp folder goes when the runner exits.
    if (ringwire.running()) ringwire.server.kill('SIGTERM');
    throw err;
  }
  try {
    await ringwire.stop();
    if (closeError) {
      // pusher-js reports the close code on the connection as a PusherError.
      const err = await withTimeout(closeError, WAIT_MS, 'pusher-js to see the 4200 close');
      assert.equal(err.type, 'PusherError', JSON.stringify(err));
      assert.equal(err.data.code, 4200, JSON.stringify(err));
    }
  } finally {
    if (watcher) disconnect(watcher);
  }
}

describe('ringwire with the official Pusher libraries', () => {
  before(async () => {
    await ringwire.start();
    serverSdk = pusherServer(ringwire, { timeout: WAIT_MS, encryptionMasterKeyBase64: ENCRYPTION_MASTER_KEY });
  }, BOUNDED);

  // Proves graceful shutdown as a client sees it: SIGTERM closes a live pusher-js connection
  // with 4200 (pusher-js's "reconnect" range), and the server exits 0.
  after(stopServer, { timeout: 30000 });

  // ---- tests --------------------------------------------------------------------------------

  // Proves fan-out across both shards: 60 pusher-js clients on one public channel, spread over
  // both shards, each get all 5 SDK-triggered events in order with byte-exact data.
  it('a. 60 pusher-js clients on both shards receive 5 SDK events in order', BOUNDED, async () => {
    const N = 60;
    const channelName = 'fanout';
    const group = await Promise.all(Array.from({ length: N }, () => connectedClient()));
    const recorders = await Promise.all(
      group.map(async (client) => recordData(await subscribed(client, channelName), 'tick')),
    );

    const perShard = await metricsConnections(ringwire);
    assert.deepEqual(Object.keys(perShard).sort(), ['0', '1'], `metrics: ${JSON.stringify(perShard)}`);
    assert.ok(perShard['0'] > 0 && perShard['1'] > 0, `both shards hold connections: ${JSON.stringify(perShard)}`);
    assert.ok(perShard['0'] + perShard['1'] >= N, `>= ${N} connections: ${JSON.stringify(perShard)}`);

    const sent = Array.from({ length: 5 }, (_, i) => ({
      seq: i,
      text: `tick ${i} — ünïcødé ✓ "quoted" \\ back\nslash`,
      nested: { list: [i, i * 2, null, true], empty: {} },
    }));
    for (const data of sent) {
      const res = await serverSdk.trigger(channelName, 'tick', data);
      assert.equal(res.status, 200);
    }
    await Promise.all(recorders.map((r, i) => r.until(5, `5 ticks on client ${i}`)));
    for (const r of recorders) assert.deepEqual(r.got, sent);

    group.forEach(disconnect);
  });

  // Proves socket_id exclusion: the client whose pusher.connection.socket_id is passed to
  // trigger does not get that event, while another subscriber does.
  it('b. trigger with socket_id excludes that connection', BOUNDED, async () => {
    const channelName = 'exclusion';
    const [excluded, other] = await Promise.all([connectedClient(), connectedClient()]);
    const excludedEvents = recordData(await subscribed(excluded, channelName), 'news');
    const otherEvents = recordData(await subscribed(other, channelName), 'news');

    const socketId = excluded.connection.socket_id;
    assert.match(socketId, /^\d+\.\d+$/);
    await serverSdk.trigger(channelName, 'news', { n: 1 }, { socket_id: socketId });
    await otherEvents.until(1);
    // A second, unfiltered event from the same SDK follows the first on every path; once the
    // excluded client has it, the first would have arrived before it had it been sent.
    await serverSdk.trigger(channelName, 'news', { n: 2 });
    await excludedEvents.until(1);
    await otherEvents.until(2);
    assert.deepEqual(excludedEvents.got, [{ n: 2 }]);
    assert.deepEqual(otherEvents.got, [{ n: 1 }, { n: 2 }]);

    disconnect(excluded);
    disconnect(other);
  });

  // Proves private-channel auth: an SDK-signed subscription succeeds; a forged signature gets a
  // pusher:error (surfaced by pusher-js on the connection, the channel and the global emitter)
  // and the connection stays up and usable.
  it('c. private channel: good auth subscribes, bad auth errors without disconnecting', BOUNDED, async () => {
    const channelName = 'private-room';
    const good = await connectedClient({ channelAuthorization: authorizeWithSdk });
    const goodEvents = recordData(await subscribed(good, channelName), 'secret');

    const bad = await connectedClient({
      channelAuthorization: {
        customHandler: (params, callback) => {
          const { auth } = serverSdk.authorizeChannel(params.socketId, params.channelName);
          const [key, signature] = auth.split(':');
          const forged = signature.replace(/^./, (c) => (c === '0' ? '1' : '0'));
          callback(null, { auth: `${key}:${forged}` });
        },
      },
    });
    const states = [];
    bad.connection.bind('state_change', ({ current }) => states.push(current));
    const connectionError = new Promise((resolve) => bad.connection.bind('error', resolve));
    const globalError = new Promise((resolve) => bad.bind('pusher:error', resolve));
    const badChannel = bad.subscribe(channelName);
    const channelError = new Promise((resolve) => badChannel.bind('pusher:error', resolve));
    let succeeded = false;
    badChannel.bind('pusher:subscription_succeeded', () => (succeeded = true));

    const [connErr, globalErr, chanErr] = await withTimeout(
      Promise.all([connectionError, globalError, channelError]),
      WAIT_MS,
      'pusher:error for a forged signature',
    );
    assert.equal(connErr.type, 'PusherError');
    assert.equal(connErr.data.code, null);
    assert.match(connErr.data.message, /^Invalid signature/);
    assert.deepEqual(globalErr, connErr.data);
    assert.deepEqual(chanErr, connErr.data);

    // Still connected, not subscribed, and the same socket still works for public channels.
    const socketId = bad.connection.socket_id;
    const publicEvents = recordData(await subscribed(bad, 'after-bad-auth'), 'ping-ish');
    await serverSdk.trigger('after-bad-auth', 'ping-ish', { ok: true });
    await publicEvents.until(1);
    assert.equal(bad.connection.state, 'connected');
    assert.equal(bad.connection.socket_id, socketId);
    assert.deepEqual(states, [], `connection state changes after the error: ${states}`);
    assert.equal(succeeded, false);
    assert.equal(badChannel.subscribed, false);

    // The well-authorized client does receive events on the private channel.
    await serverSdk.trigger(channelName, 'secret', { for: 'members only' });
    assert.deepEqual(await goodEvents.until(1), [{ for: 'members only' }]);

    disconnect(good);
    disconnect(bad);
  });

  // Proves client events: a client-* event from one authorized pusher-js client reaches the
  // other subscriber with its data intact and is not echoed back to the sender.
  it('d. client events on a private channel reach others, not the sender', BOUNDED, async () => {
    const channelName = 'private-chat';
    const [sender, receiver] = await Promise.all([
      connectedClient({ channelAuthorization: authorizeWithSdk }),
      connectedClient({ channelAuthorization: authorizeWithSdk }),
    ]);
    const senderChannel = await subscribed(sender, channelName);
    const receiverChannel = await subscribed(receiver, channelName);
    const echoed = recordData(senderChannel, 'client-typing');
    const senderSentinel = recordData(senderChannel, 'sentinel');
    const received = recordData(receiverChannel, 'client-typing');

    assert.equal(senderChannel.trigger('client-typing', { x: 1 }), true);
    assert.deepEqual(await received.until(1), [{ x: 1 }]);
    // An echo to the sender would be written before the receiver got the event; a later
    // server event to the sender proves nothing was queued ahead of it.
    await serverSdk.trigger(channelName, 'sentinel', {});
    await senderSentinel.until(1);
    assert.deepEqual(echoed.got, []);

    disconnect(sender);
    disconnect(receiver);
  });

  // Proves the channel queries the SDK makes (GET /channels with filter_by_prefix and
  // info=subscription_count, GET /channels/{name}) count pusher-js subscriptions across shards,
  // and that the SDK reports an over-limit trigger as a RequestError with status 413.
  it('e. SDK channel queries count subscriptions; oversized data is rejected with 413', BOUNDED, async () => {
    const group = await Promise.all([1, 2, 3, 4].map(() => connectedClient()));
    await Promise.all([
      subscribed(group[0], 'room-a'),
      subscribed(group[0], 'room-b'),
      subscribed(group[1], 'room-a'),
      subscribed(group[2], 'room-a'),
      subscribed(group[3], 'lobby'),
    ]);

    const all = await json(
      serverSdk.get({ path: '/channels', params: { filter_by_prefix: 'room-', info: 'subscription_count' } }),
    );
    assert.deepEqual(all, {
      channels: { 'room-a': { subscription_count: 3 }, 'room-b': { subscription_count: 1 } },
    });
    const plain = await json(serverSdk.get({ path: '/channels', params: { filter_by_prefix: 'room-' } }));
    assert.deepEqual(plain, { channels: { 'room-a': {}, 'room-b': {} } });

    const roomA = await json(
      serverSdk.get({ path: '/channels/room-a', params: { info: 'subscription_count' } }),
    );
    assert.deepEqual(roomA, { occupied: true, subscription_count: 3 });
    const empty = await json(
      serverSdk.get({ path: '/channels/room-nobody', params: { info: 'subscription_count' } }),
    );
    assert.deepEqual(empty, { occupied: false, subscription_count: 0 });

    // An unsubscribe has no acknowledgement: poll until the count drops.
    group[2].unsubscribe('room-a');
    let count;
    for (const deadline = Date.now() + WAIT_MS; Date.now() < deadline; await sleep(50)) {
      count = (await json(serverSdk.get({ path: '/channels/room-a', params: { info: 'subscription_count' } })))
        .subscription_count;
      if (count === 2) break;
    }
    assert.equal(count, 2);

    // Data limit: 10240 bytes is delivered, 10241 bytes is a 413 surfaced as a RequestError.
    const bigEvents = recordData(group[3].channel('lobby'), 'big');
    const atLimit = 'x'.repeat(10240);
    const ok = await serverSdk.trigger('lobby', 'big', atLimit);
    assert.equal(ok.status, 200);
    assert.deepEqual(await bigEvents.until(1), [atLimit]);
    await assert.rejects(serverSdk.trigger('lobby', 'big', 'x'.repeat(10241)), (err) => {
      assert.ok(err instanceof PusherServer.RequestError, `not a RequestError: ${err}`);
      assert.equal(err.status, 413);
      assert.equal(err.message, 'Unexpected status code 413');
      assert.match(err.body, /10241/);
      return true;
    });

    group.forEach(disconnect);
  });

  // Proves POST /batch_events via triggerBatch: events on two channels reach one subscriber in
  // the order of the batch, with their data.
  it('f. triggerBatch delivers every event in order', BOUNDED, async () => {
    const client = await connectedClient();
    const [one, two] = await Promise.all([subscribed(client, 'batch-1'), subscribed(client, 'batch-2')]);
    const got = [];
    const done = new Promise((resolve) => {
      const push = (channel) => (data) => {
        got.push({ channel, data });
        if (got.length === 6) resolve();
      };
      one.bind('item', push('batch-1'));
      two.bind('item', push('batch-2'));
    });
    const batch = [0, 1, 2, 3, 4, 5].map((i) => ({
      channel: i % 3 === 1 ? 'batch-2' : 'batch-1',
      name: 'item',
      data: { i },
    }));
    const expected = batch.map(({ channel, data }) => ({ channel, data }));
    const res = await serverSdk.triggerBatch(batch);
    assert.equal(res.status, 200);
    await withTimeout(done, WAIT_MS, '6 batch events');
    assert.deepEqual(got, expected);

    disconnect(client);
  });

  // Proves the Python SDK interoperates: its trigger reaches a pusher-js subscriber, and its
  // channels_info / channel_info (GETs signed with body_md5) return the right counts.
  it('g. the Python SDK triggers and queries', BOUNDED, async () => {
    const [a, b] = await Promise.all([connectedClient(), connectedClient()]);
    const events = recordData(await subscribed(a, 'py-room'), 'from-python');
    await subscribed(b, 'py-room');
    await subscribed(b, 'py-other');

    const data = { lang: 'python', n: 42, text: 'grüße' };
    const printed = await runPythonSdk({ host: ringwire.host, port: ringwire.port, data });

    assert.deepEqual(await events.until(1), [data]);
    assert.deepEqual(printed.trigger, {});
    assert.deepEqual(printed.channels_info, {
      channels: { 'py-other': { subscription_count: 1 }, 'py-room': { subscription_count: 2 } },
    });
    assert.deepEqual(printed.channel_info, { occupied: true, subscription_count: 2 });

    disconnect(a);
    disconnect(b);
  });

  // Proves end-to-end encryption passes through: the Node SDK encrypts for a
  // private-encrypted channel, pusher-js decrypts with the shared secret from the authorizer,
  // and the server relays the ciphertext untouched.
  it('h. private-encrypted channel round-trips through the server', BOUNDED, async () => {
    const channelName = 'private-encrypted-vault';
    const client = await connectedClient({ channelAuthorization: authorizeWithSdk });
    const events = recordData(await subscribed(client, channelName), 'sealed');
    const data = { secret: 'only the client can read this', n: [1, 2, 3] };
    await serverSdk.trigger(channelName, 'sealed', data);
    assert.deepEqual(await events.until(1), [data]);
    disconnect(client);
  });
});
