// Cluster mode with the real libraries: three ringwire nodes (two shards each) on one
// redis-server that this file starts, pusher-js and Laravel Echo clients spread over the nodes,
// the Node and Python server SDKs talking to whichever node (docs/cluster.md). What is wired
// today is proven here: fan-out from any node's API to every node, order, socket_id exclusion,
// client events relayed across nodes, Echo's private channels and whispers across nodes,
// presence members and Echo's presence rooms across nodes, cache channels across nodes, the
// channel queries of the Node SDK on any node, sign-in with server-to-user events and
// watchlists across nodes, the app limits (max_connections, backend_events_per_second_max)
// counted over every node, and the 503 of an outage.
//
// Needs redis-server on PATH (scripts/test installs it with scripts/redis install).

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { Socket, createServer } from 'node:net';

import Pusher from 'pusher-js';
import Echo from 'laravel-echo';

import {
  BOUNDED,
  clientOptions,
  configToml,
  killOnExit,
  pusherClients,
  pusherServer,
  ringwireProcess,
  runPythonSdk,
  sleep,
  until,
  withTimeout,
} from './harness.mjs';

const NODES = 3;
// A second app whose limits are counted over every node (test 10).
const LIMITED = { appId: '2', key: 'limited-key', secret: 'limited-secret' };
const LIMITED_APP =
  `\n[[apps]]\nid = "${LIMITED.appId}"\nkey = "${LIMITED.key}"\nsecret = "${LIMITED.secret}"\n` +
  'max_connections = 2\nbackend_events_per_second_max = 3\n';
const SETTLE_MS = 300; // how long "nothing more arrives" is watched for, after a sentinel

/** A free 127.0.0.1 port (released just before redis-server takes it). */
async function freePort() {
  const server = createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** redis-server on a free port, no persistence; killed when this process exits. */
async function startRedis() {
  const port = await freePort();
  const redis = spawn('redis-server', ['--bind', '127.0.0.1', '--port', String(port), '--save', '', '--appendonly', 'no'], {
    stdio: 'ignore',
  });
  killOnExit(redis);
  const exited = new Promise((resolve) => redis.on('exit', resolve));
  await until(
    'redis-server to listen',
    async () => {
      const code = await Promise.race([exited, sleep(0)]);
      if (code !== undefined) throw new Error(`redis-server exited (${code}); is it installed? (scripts/redis install)`);
      return new Promise((resolve) => {
        const socket = new Socket();
        socket.once('error', () => resolve(false));
        socket.connect(port, '127.0.0.1', () => {
          socket.destroy();
          resolve(true);
        });
      });
    },
    10000,
  );
  return { redis, port };
}

let redis;
const nodes = [];
const clientSets = [];
let sdks = [];

/** GET /ready on `node` until 200 (its links to Redis are up and subscribed). */
async function ready(node) {
  await until(`node ${node.port} to be ready`, async () => {
    const res = await fetch(`http://${node.host}:${node.port}/ready`).catch(() => null);
    return res?.status === 200;
  });
}

/** The channel authorizer an app's backend runs, with the Node SDK (`user` signs the
 * channel_data of presence channels). */
function channelAuth(sdk, user) {
  return {
    customHandler: ({ socketId, channelName }, callback) => {
      try {
        const presence = channelName.startsWith('presence-') ? user : undefined;
        callback(null, sdk.authorizeChannel(socketId, channelName, presence));
      } catch (err) {
        callback(err, null);
      }
    },
  };
}

/** Laravel Echo on node `index`, authorizing with that node's Node SDK (`user` signs the
 * channel_data of presence channels); its pusher-js is closed with the node's other clients. */
function echoOn(index, user) {
  const instance = new Echo({
    broadcaster: 'pusher',
    Pusher,
    key: 'ringwire-demo-key',
    ...clientOptions(nodes[index]),
    authorizer: (channel) => ({
      authorize: (socketId, callback) => {
        try {
          const presence = user && channel.name.startsWith('presence-') ? { user_id: user.id, user_info: user } : undefined;
          callback(null, sdks[index].authorizeChannel(socketId, channel.name, presence));
        } catch (err) {
          callback(err, null);
        }
      },
    }),
  });
  clientSets[index].clients.add(instance.connector.pusher);
  return instance;
}

describe('cluster: three nodes on one Redis, with pusher-js, Laravel Echo and the server SDKs', () => {
  before(async () => {
    redis = await startRedis();
    const cluster = `\n[cluster]\nredis_url = "redis://127.0.0.1:${redis.port}"\nprefix = "interop"\n`;
    for (let i = 0; i < NODES; i++) {
      const node = ringwireProcess({ config: configToml({ app: `enable_client_events = true\ncache_ttl_s = 60\n${LIMITED_APP}` }) + cluster, prefix: `ringwire-cluster-${i}-` });
      await node.start();
      await ready(node);
      nodes.push(node);
      clientSets.push(pusherClients(node));
    }
    sdks = nodes.map((node) => pusherServer(node));
  });

  after(async () => {
    for (const set of clientSets) {
      set.closeAll();
      set.releaseCloseTimers();
    }
    for (const node of nodes) await node.stop();
    redis?.redis.kill('SIGKILL');
  });

  /** One pusher-js client per node, subscribed to `name`. */
  async function subscribersOnEveryNode(name, options = {}) {
    const all = [];
    for (const set of clientSets) {
      const client = await set.connectedClient(options);
      const channel = await set.subscribed(client, name);
      all.push({ set, client, channel });
    }
    return all;
  }

  // Proves fan-out from any node's API: an event the Node SDK triggers through node A and one
  // the Python SDK triggers through node C each reach a pusher-js client on every node, once.
  it('1. an event triggered on any node reaches subscribers on every node, once', BOUNDED, async () => {
    const subscribers = await subscribersOnEveryNode('py-room');
    const greetings = subscribers.map(({ set, channel }) => set.recordData(channel, 'greeting'));
    const fromPython = subscribers.map(({ set, channel }) => set.recordData(channel, 'from-python'));
    await sdks[0].trigger('py-room', 'greeting', { hello: 'from node A' });
    for (const r of greetings) assert.deepEqual(await r.until(1), [{ hello: 'from node A' }]);

    const data = { hello: 'from python on node C' };
    const printed = await runPythonSdk({ host: nodes[2].host, port: nodes[2].port, data });
    assert.deepEqual(printed.trigger, {});
    // Node C's answer is the cluster's: the channel is occupied (its subscribers are on A, B
    // and C). Subscription counts reach Redis once a second, so they are not compared here.
    assert.equal(printed.channel_info.occupied, true);
    assert.ok('py-room' in printed.channels_info.channels, JSON.stringify(printed.channels_info));
    for (const r of fromPython) assert.deepEqual(await r.until(1), [data]);
    await sleep(SETTLE_MS);
    for (const r of [...greetings, ...fromPython]) assert.equal(r.got.length, 1, 'delivered once');
    for (const { set, client } of subscribers) set.disconnect(client);
  });

  // Proves order across nodes: 60 events from one publisher, each triggered after the previous
  // answer and spread over the three nodes' APIs, arrive in that order on every node.
  it('2. one publisher’s events arrive in order on every node', BOUNDED, async () => {
    const subscribers = await subscribersOnEveryNode('cluster-order');
    const received = subscribers.map(({ set, channel }) => set.recordData(channel, 'tick'));
    for (let n = 0; n < 60; n++) await sdks[n % NODES].trigger('cluster-order', 'tick', { n });
    const expected = Array.from({ length: 60 }, (_, n) => ({ n }));
    for (const r of received) assert.deepEqual(await r.until(60), expected);
    for (const { set, client } of subscribers) set.disconnect(client);
  });

  // Proves socket_id exclusion across nodes: the Node SDK triggers through node A excluding the
  // client on node B; the clients on A and C get the event, B's gets only the next one.
  it('3. socket_id exclusion works across nodes', BOUNDED, async () => {
    const subscribers = await subscribersOnEveryNode('cluster-exclude');
    const received = subscribers.map(({ set, channel }) => set.recordData(channel, 'news'));
    const excluded = subscribers[1].client.connection.socket_id;
    await sdks[0].trigger('cluster-exclude', 'news', { n: 1 }, { socket_id: excluded });
    await sdks[2].trigger('cluster-exclude', 'news', { n: 2 });
    assert.deepEqual(await received[0].until(2), [{ n: 1 }, { n: 2 }]);
    assert.deepEqual(await received[2].until(2), [{ n: 1 }, { n: 2 }]);
    assert.deepEqual(await received[1].until(1), [{ n: 2 }]);
    await sleep(SETTLE_MS);
    assert.deepEqual(received[1].got, [{ n: 2 }]);
    for (const { set, client } of subscribers) set.disconnect(client);
  });

  // Proves client events across nodes: a client on node A triggers client-typing on a private
  // channel; the clients on B and C get it, A does not get its own event back.
  it('4. client events are relayed to the other nodes, not back to the sender', BOUNDED, async () => {
    const subscribers = [];
    for (const [index, set] of clientSets.entries()) {
      const client = await set.connectedClient({ channelAuthorization: channelAuth(sdks[index]) });
      subscribers.push({ set, client, channel: await set.subscribed(client, 'private-cluster-chat') });
    }
    const received = subscribers.map(({ set, channel }) => set.recordData(channel, 'client-typing'));
    assert.ok(subscribers[0].channel.trigger('client-typing', { who: 'a' }));
    assert.deepEqual(await received[1].until(1), [{ who: 'a' }]);
    assert.deepEqual(await received[2].until(1), [{ who: 'a' }]);
    // A sentinel on A's channel: whatever A was sent before it has arrived by then.
    const sentinel = subscribers[0].set.recordData(subscribers[0].channel, 'sentinel');
    await sdks[2].trigger('private-cluster-chat', 'sentinel', {});
    await sentinel.until(1);
    await sleep(SETTLE_MS);
    assert.deepEqual(received[0].got, [], 'the sender does not get its own client event');
    for (const { set, client } of subscribers) set.disconnect(client);
  });

  // Proves Laravel Echo across nodes: Echo on node B listens on private('orders') for
  // '.OrderShipped' triggered by the Node SDK through node A, and gets a whisper sent by an
  // Echo client on node C.
  it('5. Laravel Echo: a private channel and whispers across nodes', BOUNDED, async () => {
    const echoB = echoOn(1);
    const echoC = echoOn(2);
    const shipped = [];
    const whispers = [];
    echoB
      .private('orders')
      .listen('.OrderShipped', (data) => shipped.push(data))
      .listenForWhisper('typing', (data) => whispers.push(data));
    const ordersC = echoC.private('orders');
    await until('both Echo clients to subscribe', () =>
      [echoB, echoC].every((e) => e.connector.pusher.channel('private-orders')?.subscribed),
    );
    await sdks[0].trigger('private-orders', 'OrderShipped', { id: 7 });
    await until('OrderShipped to reach Echo on node B', () => shipped.length === 1);
    assert.deepEqual(shipped, [{ id: 7 }]);
    ordersC.whisper('typing', { name: 'Ada' });
    await until('the whisper from node C to reach node B', () => whispers.length === 1);
    assert.deepEqual(whispers, [{ name: 'Ada' }]);
    echoB.disconnect();
    echoC.disconnect();
  });

  // Proves presence across nodes: Ada on node A and Bob on node B see each other in
  // subscription_succeeded and member_added; Ada's second connection, on node C, adds no
  // member; member_removed comes once, when her last connection leaves; GET /users and
  // info=user_count agree on every node.
  it('6. presence: one member list and one add/remove per user across nodes', BOUNDED, async () => {
    const name = 'presence-cluster-lobby';
    const ada = { user_id: 'ada', user_info: { name: 'Ada' } };
    const bob = { user_id: 'bob', user_info: { name: 'Bob' } };
    const join = async (index, user) => {
      const client = await clientSets[index].connectedClient({ channelAuthorization: channelAuth(sdks[index], user) });
      return { client, channel: await clientSets[index].subscribed(client, name) };
    };
    const ada1 = await join(0, ada);
    assert.equal(ada1.channel.members.count, 1);
    const added = clientSets[0].record(ada1.channel, 'pusher:member_added');
    const removed = clientSets[0].record(ada1.channel, 'pusher:member_removed');
    const bob1 = await join(1, bob);
    const ids = [];
    bob1.channel.members.each((member) => ids.push(member.id));
    assert.deepEqual(ids.sort(), ['ada', 'bob']);
    assert.deepEqual((await added.until(1))[0].data, { id: 'bob', info: { name: 'Bob' } });

    const ada2 = await join(2, ada);
    assert.equal(ada2.channel.members.count, 2);
    const bobAdded = clientSets[1].record(bob1.channel, 'pusher:member_added');
    const bobRemoved = clientSets[1].record(bob1.channel, 'pusher:member_removed');
    for (const sdk of sdks) {
      const { users } = await (await sdk.get({ path: `/channels/${name}/users` })).json();
      assert.deepEqual(users.map((u) => u.id).sort(), ['ada', 'bob']);
      const info = await (await sdk.get({ path: `/channels/${name}`, params: { info: 'user_count' } })).json();
      assert.equal(info.user_count, 2);
    }
    clientSets[0].disconnect(ada1.client);
    await sleep(SETTLE_MS);
    assert.deepEqual(bobRemoved.got, [], 'Ada is still there on node C');
    assert.equal(bob1.channel.members.count, 2);
    clientSets[2].disconnect(ada2.client);
    assert.deepEqual((await bobRemoved.until(1))[0].data, { id: 'ada', info: { name: 'Ada' } });
    await sleep(SETTLE_MS);
    assert.equal(bobAdded.got.length, 0, 'no member_added for a second connection of a member');
    assert.equal(bobRemoved.got.length, 1);
    assert.equal(removed.got.length, 0);
    clientSets[1].disconnect(bob1.client);
  });

  // Proves cache channels across nodes: an event triggered through node A is the first thing a
  // client subscribing on node C gets, and a cache channel with nothing cached answers
  // pusher:cache_miss on any node.
  it('7. cache channels: the last event reaches a new subscriber on another node', BOUNDED, async () => {
    const missed = [];
    const empty = await clientSets[1].connectedClient();
    empty.bind('pusher:cache_miss', (data) => missed.push(data));
    const emptyChannel = empty.subscribe('cache-cluster-nothing');
    emptyChannel.bind('pusher:cache_miss', () => missed.push('channel'));
    await until('cache_miss on node B', () => missed.length > 0);

    await sdks[0].trigger('cache-cluster-prices', 'price', { usd: 42 });
    const late = await clientSets[2].connectedClient();
    const lateChannel = late.subscribe('cache-cluster-prices');
    const prices = clientSets[2].recordData(lateChannel, 'price');
    assert.deepEqual(await prices.until(1), [{ usd: 42 }]);
    clientSets[1].disconnect(empty);
    clientSets[2].disconnect(late);
  });

  // Proves Laravel Echo's presence API across nodes: join('room') on node A and node B gives
  // here() with both users and joining() on the first.
  it('8. Laravel Echo: a presence room across nodes', BOUNDED, async () => {
    const taylor = { id: 1, name: 'Taylor' };
    const abigail = { id: 2, name: 'Abigail' };
    const echoA = echoOn(0, taylor);
    const echoB = echoOn(1, abigail);
    const hereA = [];
    const joiningA = [];
    echoA.join('cluster-room').here((members) => hereA.push(members)).joining((member) => joiningA.push(member));
    await until('here() on node A', () => hereA.length === 1);
    assert.deepEqual(hereA[0], [taylor]);
    const hereB = [];
    echoB.join('cluster-room').here((members) => hereB.push(members));
    await until('here() on node B', () => hereB.length === 1);
    assert.deepEqual([...hereB[0]].sort((x, y) => x.id - y.id), [taylor, abigail]);
    await until('joining() on node A', () => joiningA.length === 1);
    assert.deepEqual(joiningA[0], abigail);
    echoA.disconnect();
    echoB.disconnect();
  });

  /** The user authenticator an app's backend runs, with the Node SDK of node `index`. */
  function userAuth(index, userData) {
    return {
      customHandler: ({ socketId }, callback) => {
        try {
          callback(null, sdks[index].authenticateUser(socketId, userData));
        } catch (err) {
          callback(err, null);
        }
      },
    };
  }

  /** A pusher-js client on node `index`, signed in as `userData` (and subscribed to its
   * #server-to-user- channel, as pusher-js does), with its watchlist events recorded. */
  async function signedIn(index, userData) {
    const set = clientSets[index];
    const client = await set.connectedClient({ userAuthentication: userAuth(index, userData) });
    const online = set.record(client.user.watchlist, 'online');
    const offline = set.record(client.user.watchlist, 'offline');
    client.signin();
    await set.waitFor(
      () => client.user.user_data?.id === userData.id && client.user.serverToUserChannel?.subscribed,
      `${userData.id} to sign in on node ${index}`,
    );
    return { set, client, online, offline };
  }

  // Proves sign-in and watchlists across nodes: bob on node B watches cl-alice; she signs in
  // on node A and bob's pusher.user.watchlist emits online once; carl, signing in on node C
  // while she is online, hears online at once; an event the SDK sends to her through node C
  // reaches her on A; when her connection goes, bob and carl hear offline once.
  it('9. sign-in and watchlists across nodes', BOUNDED, async () => {
    const bob = await signedIn(1, { id: 'cl-bob', watchlist: ['cl-alice'] });
    const alice = await signedIn(0, { id: 'cl-alice' });
    assert.deepEqual((await bob.online.until(1))[0].data, { name: 'online', user_ids: ['cl-alice'] });
    const carl = await signedIn(2, { id: 'cl-carl', watchlist: ['cl-alice'] });
    assert.deepEqual((await carl.online.until(1))[0].data, { name: 'online', user_ids: ['cl-alice'] });

    const notes = alice.set.record(alice.client.user, 'note');
    await sdks[2].sendToUser('cl-alice', 'note', { from: 'node C' });
    assert.deepEqual((await notes.until(1))[0].data, { from: 'node C' });

    alice.set.disconnect(alice.client);
    for (const watcher of [bob, carl]) {
      assert.deepEqual((await watcher.offline.until(1))[0].data, { name: 'offline', user_ids: ['cl-alice'] });
    }
    await sleep(SETTLE_MS);
    for (const watcher of [bob, carl]) {
      assert.equal(watcher.online.got.length, 1, JSON.stringify(watcher.online.got));
      assert.equal(watcher.offline.got.length, 1, JSON.stringify(watcher.offline.got));
    }
    bob.set.disconnect(bob.client);
    carl.set.disconnect(carl.client);
  });

  /** A pusher-js client of the limited app on node `index`: resolves 'connected', or the
   * code of the pusher:error it was refused with. */
  function limitedClient(index) {
    const client = new Pusher(LIMITED.key, clientOptions(nodes[index]));
    clientSets[index].clients.add(client);
    const outcome = new Promise((resolve) => {
      client.connection.bind('connected', () => resolve('connected'));
      // pusher-js 8 wraps the server's pusher:error in a WebSocketError.
      client.connection.bind('error', (err) => resolve(err?.error?.data?.code ?? JSON.stringify(err)));
    });
    return { client, outcome: withTimeout(outcome, 5000, 'the limited client to connect or be refused') };
  }

  // Proves the cluster-wide limits as the libraries see them: with max_connections 2, one
  // pusher-js client on A and one on B, a client on C is refused with 4004 once C has read the
  // others' counts (refreshed every second); with backend_events_per_second_max 3, a batch of
  // 3 through node A and one more event through node B in the same second: the SDK gets 429.
  it('10. app limits are counted over every node', BOUNDED, async () => {
    const held = [limitedClient(0), limitedClient(1)];
    for (const { outcome } of held) assert.equal(await outcome, 'connected');
    let refused;
    await until('a third connection, on node C, to be refused', async () => {
      const third = limitedClient(2);
      refused = await third.outcome;
      third.client.disconnect();
      return refused !== 'connected';
    });
    assert.equal(refused, 4004);
    for (const { client } of held) client.disconnect();

    const limitedSdk = (index) => pusherServer(nodes[index], LIMITED);
    for (let attempt = 0; ; attempt++) {
      // Early in a second, so both requests likely share it (else try again).
      while (Date.now() % 1000 > 100) await sleep(5);
      const second = Math.floor(Date.now() / 1000);
      const batch = [0, 1, 2].map((n) => ({ channel: 'limited-room', name: 'e', data: { n } }));
      await limitedSdk(0).triggerBatch(batch);
      const over = await limitedSdk(1).trigger('limited-room', 'e', { n: 3 }).then(
        (res) => res.status,
        (err) => err.status,
      );
      if (Math.floor(Date.now() / 1000) !== second && attempt < 4) continue;
      assert.equal(over, 429);
      break;
    }
  });

  // Proves the outage contract as the Node SDK sees it: with Redis gone, a trigger through any
  // node is refused with 503 (the SDK raises, so the app retries), and /ready answers 503.
  it('11. while Redis is down, triggers are refused with 503 and /ready is 503', BOUNDED, async () => {
    redis.redis.kill('SIGSTOP');
    try {
      await until('node A to notice', async () => {
        const res = await fetch(`http://${nodes[0].host}:${nodes[0].port}/ready`);
        return res.status === 503;
      });
      await assert.rejects(
        withTimeout(sdks[0].trigger('cluster-room', 'lost', {}), 5000, 'the SDK to get an answer'),
        (err) => err.status === 503,
      );
    } finally {
      redis.redis.kill('SIGCONT');
    }
    for (const node of nodes) await ready(node);
    await sdks[0].trigger('cluster-room', 'back', {});
  });
});
