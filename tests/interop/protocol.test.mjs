// Interoperability tests for the newer Pusher protocol features: presence, cache channels,
// user sign-in, server-to-user events, terminate_connections, watchlists, subscription_count
// and Laravel Echo, each driven by the real, unmodified libraries — pusher-js, the `pusher`
// Node SDK and `laravel-echo` (pinned in package-lock.json). Run by scripts/interop beside
// interop.test.mjs, against its own server; needs a release build.
//
//   RINGWIRE_BIN         server binary (default target/release/ringwire, relative to the repo root)
//   RINGWIRE_SERVER_LOG  if set, print the server's stderr at the end

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';

import Pusher from 'pusher-js';
import Echo from 'laravel-echo';

import {
  BOUNDED,
  ENCRYPTION_MASTER_KEY,
  KEY,
  SHARDS,
  WAIT_MS,
  clientOptions,
  configToml,
  json,
  metricsConnections,
  pusherClients,
  pusherServer,
  ringwireProcess,
  sleep,
} from './harness.mjs';

const SETTLE_MS = 300; // how long "nothing more arrives" is watched for, after a sentinel

// presence_debounce_ms = 0: tests 1 and 9 check member_removed as a user leaves, which the
// default 3 s debounce would delay; webhooks.test.mjs covers the default window with pusher-js.
const ringwire = ringwireProcess({
  config: configToml({
    app: 'enable_client_events = true\nsubscription_count_enabled = true\ncache_ttl_s = 60\npresence_debounce_ms = 0',
  }),
  prefix: 'ringwire-protocol-',
});
const {
  clients,
  closeAll,
  connectedClient,
  disconnect,
  newClient,
  record,
  recorder,
  releaseCloseTimers,
  subscribed,
  waitFor,
} = pusherClients(ringwire);
let serverSdk; // the app's backend: signs with the right secret
let wrongSdk; // same key, wrong secret: signs what the server must refuse

// ---- helpers --------------------------------------------------------------------------------

/** Records every event a channel emits, in order, as { event, data }. */
function recordAll(channel) {
  const r = recorder(`events on ${channel.name}`);
  channel.bind_global((event, data) => r.push({ event, data }));
  return r;
}

/** Records the raw protocol messages named `event` that reach a client (before pusher-js
 * interprets them: pusher-js drops, for instance, a member_removed for an unknown member). */
function recordRaw(client, event, channel) {
  const r = recorder(`raw ${event}`);
  client.connection.bind('message', (message) => {
    if (message.event === event && (channel === undefined || message.channel === channel)) r.push(message);
  });
  return r;
}

/** Records the connection's state changes and errors. */
function watchConnection(client) {
  const states = recorder('state changes');
  const errors = recorder('connection errors');
  client.connection.bind('state_change', ({ current }) => states.push(current));
  client.connection.bind('error', (err) => errors.push(err));
  return { states, errors };
}

/** The shard a connection lives on. ringwire numbers socket ids per shard:
 * sequence = n * shards + shard + 1 (src/shard/mod.rs, Shard::register). */
function shardOf(client) {
  const sequence = BigInt(client.connection.socket_id.split('.')[0]);
  return Number((sequence - 1n) % BigInt(SHARDS));
}

/** A connected client on the given shard: the kernel spreads connections over the shards'
 * SO_REUSEPORT listeners, so this connects until one lands there (and drops the others). */
async function clientOnShard(shard, extra) {
  for (let attempt = 0; attempt < 40; attempt++) {
    const client = await connectedClient(extra);
    if (shardOf(client) === shard) return client;
    disconnect(client);
  }
  throw new Error(`no connection landed on shard ${shard} in 40 attempts`);
}

/** Resolves once the connection is closed — by the server, or by pusher-js itself. */
function closed(client, what) {
  return waitFor(() => client.connection.state === 'disconnected', what);
}

/** What pusher-js reports for a server's pusher:error 4009 followed by close 4009: the
 * pusher:error as a PusherError, the close frame as another, then "refused" (4000-4099) as a
 * WebSocketError wrapping the close, after which it stays disconnected. */
function assertRefused4009(errors) {
  const shown = JSON.stringify(errors);
  assert.deepEqual(errors.map((e) => e.type), ['PusherError', 'PusherError', 'WebSocketError'], shown);
  assert.equal(errors[0].data.code, 4009, shown);
  assert.equal(errors[1].data.code, 4009, shown);
  assert.deepEqual(errors[2].error, errors[1], shown);
}

/** The channel authorizer an app's backend would run: the Node SDK signs `socket_id:channel`,
 * plus channel_data for presence channels (as `user`), plus a shared secret for
 * private-encrypted ones. `sdk` may be one with a wrong secret. */
function channelAuth(user, sdk = () => serverSdk) {
  return {
    customHandler: ({ socketId, channelName }, callback) => {
      try {
        const presence = channelName.startsWith('presence-') ? user : undefined;
        callback(null, sdk().authorizeChannel(socketId, channelName, presence));
      } catch (err) {
        callback(err, null);
      }
    },
  };
}

/** The user authenticator an app's backend would run: the Node SDK signs
 * `socket_id::user::user_data`. */
function userAuth(userData, sdk = () => serverSdk) {
  return {
    customHandler: ({ socketId }, callback) => {
      try {
        callback(null, sdk().authenticateUser(socketId, userData));
      } catch (err) {
        callback(err, null);
      }
    },
  };
}

/** pusher.signin(), resolved once signed in and subscribed to its #server-to-user- channel. */
async function signedIn(client, userId) {
  client.signin();
  await waitFor(
    () => client.user.user_data?.id === userId && client.user.serverToUserChannel?.subscribed,
    `${userId} to sign in and subscribe to #server-to-user-${userId}`,
  );
  return client;
}

/** GET /channels/{name}?info=subscription_count, as the SDK makes it. */
async function subscriptionCount(name) {
  return (await json(serverSdk.get({ path: `/channels/${name}`, params: { info: 'subscription_count' } })))
    .subscription_count;
}

/** Triggers a server event on a client's `channel` and waits for it there: whatever the
 * server sent that client before has arrived by then. Then SETTLE_MS more for anything
 * coming the long way round, through another shard. */
async function sentinel(channel, name) {
  const got = record(channel, name);
  await serverSdk.trigger(channel.name, name, {});
  await got.until(1, `sentinel ${name} on ${channel.name}`);
  await sleep(SETTLE_MS);
}

describe('ringwire protocol features with pusher-js, the Node SDK and Laravel Echo', () => {
  before(async () => {
    await ringwire.start();
    const sdkOptions = { timeout: WAIT_MS, encryptionMasterKeyBase64: ENCRYPTION_MASTER_KEY };
    serverSdk = pusherServer(ringwire, sdkOptions);
    wrongSdk = pusherServer(ringwire, { ...sdkOptions, secret: 'not-the-ringwire-demo-secret' });
  }, BOUNDED);

  // Disconnects every client left, then checks that the server is still up and exits 0 on
  // SIGTERM.
  after(async () => {
    releaseCloseTimers();
    if (process.env.RINGWIRE_SERVER_LOG) console.log(`ringwire stderr:\n${ringwire.stderr}`);
    closeAll();
    await ringwire.stop();
  }, { timeout: 30000 });

  // ---- tests --------------------------------------------------------------------------------

  // Proves presence membership across shards: one user on two connections (one per shard) is
  // one member — one member_added when it first joins, one member_removed only when its last
  // connection leaves — and pusher-js's members, GET /users and info=user_count all agree.
  it('1. presence: members, one add/remove per user across shards, users API', BOUNDED, async () => {
    const name = 'presence-lobby';
    const observerUser = { user_id: 'observer', user_info: { name: 'Olive' } };
    const observer = await clientOnShard(0, { channelAuthorization: channelAuth(observerUser) });
    const observerChannel = await subscribed(observer, name);
    assert.equal(observerChannel.members.count, 1);
    assert.deepEqual(observerChannel.members.me, { id: 'observer', info: { name: 'Olive' } });
    const added = record(observerChannel, 'pusher:member_added');
    const removed = record(observerChannel, 'pusher:member_removed');
    const rawAdded = recordRaw(observer, 'pusher_internal:member_added', name);
    const rawRemoved = recordRaw(observer, 'pusher_internal:member_removed', name);

    // Ada on shard 0, then Ada again on shard 1.
    const adaInfo = { name: 'Ada' };
    const ada1 = await clientOnShard(0, { channelAuthorization: channelAuth({ user_id: 'ada', user_info: adaInfo }) });
    const ada1Channel = await subscribed(ada1, name);
    assert.equal(ada1Channel.members.count, 2);
    const seen = [];
    ada1Channel.members.each((member) => seen.push(member));
    seen.sort((a, b) => a.id.localeCompare(b.id));
    assert.deepEqual(seen, [
      { id: 'ada', info: adaInfo },
      { id: 'observer', info: { name: 'Olive' } },
    ]);
    assert.deepEqual((await added.until(1))[0].data, { id: 'ada', info: adaInfo });
    assert.equal(observerChannel.members.count, 2);

    const ada2 = await clientOnShard(1, { channelAuthorization: channelAuth({ user_id: 'ada', user_info: adaInfo }) });
    assert.notEqual(shardOf(ada1), shardOf(ada2));
    const ada2Channel = await subscribed(ada2, name);
    assert.equal(ada2Channel.members.count, 2);
    assert.equal(ada2Channel.members.me.id, 'ada');
    // The shards as the server counts them agree with shardOf: 2 connections on 0, 1 on 1
    // (once the connections clientOnShard dropped are gone).
    await waitFor(async () => {
      const perShard = await metricsConnections(ringwire);
      return perShard['0'] === 2 && perShard['1'] === 1;
    }, 'ringwire_connections to show observer and ada1 on shard 0, ada2 on shard 1');
    const ids = [];
    ada2Channel.members.each((member) => ids.push(member.id));
    assert.deepEqual(ids.sort(), ['ada', 'observer']);
    await sentinel(observerChannel, 'after-second-ada');
    assert.equal(rawAdded.got.length, 1, `member_added: ${JSON.stringify(rawAdded.got)}`);
    assert.equal(observerChannel.members.count, 2);

    // The SDK's view: two users, however many connections.
    const users = async () => (await json(serverSdk.get({ path: `/channels/${name}/users` }))).users;
    const userCount = async () =>
      (await json(serverSdk.get({ path: `/channels/${name}`, params: { info: 'user_count' } }))).user_count;
    const byId = (a, b) => a.id.localeCompare(b.id);
    assert.deepEqual((await users()).sort(byId), [{ id: 'ada' }, { id: 'observer' }]);
    assert.equal(await userCount(), 2);
    const listed = await json(
      serverSdk.get({ path: '/channels', params: { filter_by_prefix: 'presence-', info: 'user_count' } }),
    );
    assert.deepEqual(listed.channels[name], { user_count: 2 });

    // Ada's first connection leaves: Ada is still there, nobody is told otherwise.
    disconnect(ada1);
    await waitFor(async () => (await subscriptionCount(name)) === 2, 'the server to drop ada1');
    await sentinel(observerChannel, 'after-ada1-left');
    assert.deepEqual(rawRemoved.got, []);
    assert.deepEqual(removed.got, []);
    assert.equal(observerChannel.members.count, 2);
    assert.deepEqual((await users()).sort(byId), [{ id: 'ada' }, { id: 'observer' }]);
    assert.equal(await userCount(), 2);

    // Her last connection leaves: exactly one member_removed.
    disconnect(ada2);
    assert.deepEqual((await removed.until(1))[0].data, { id: 'ada', info: adaInfo });
    await sentinel(observerChannel, 'after-ada2-left');
    assert.equal(rawRemoved.got.length, 1, `member_removed: ${JSON.stringify(rawRemoved.got)}`);
    assert.deepEqual(rawRemoved.got[0].data, { user_id: 'ada' });
    assert.equal(rawAdded.got.length, 1);
    assert.equal(observerChannel.members.count, 1);
    assert.deepEqual(await users(), [{ id: 'observer' }]);
    assert.equal(await userCount(), 1);

    disconnect(observer);
  });

  // Proves presence signatures are checked: channel_data signed with a wrong secret, and an
  // auth response replayed from another socket, each get a pusher:error ("Invalid signature")
  // that pusher-js surfaces; the connection stays connected and no member is announced.
  it('2. presence: wrong-secret and replayed signatures are refused, connection stays up', BOUNDED, async () => {
    const name = 'presence-guarded';
    const observer = await connectedClient({
      channelAuthorization: channelAuth({ user_id: 'guard', user_info: null }),
    });
    const observerChannel = await subscribed(observer, name);
    const rawAdded = recordRaw(observer, 'pusher_internal:member_added', name);

    // The donor subscribes legitimately; its auth response is kept for the replay.
    let donorAuth;
    const donor = await connectedClient({
      channelAuthorization: {
        customHandler: ({ socketId, channelName }, callback) => {
          donorAuth = serverSdk.authorizeChannel(socketId, channelName, { user_id: 'donor', user_info: {} });
          callback(null, donorAuth);
        },
      },
    });
    await subscribed(donor, name);
    assert.ok(donorAuth.channel_data, 'the donor was authorized for a presence channel');
    await rawAdded.until(1, "the donor's member_added");

    const forgers = {
      'wrong secret': channelAuth({ user_id: 'forger', user_info: {} }, () => wrongSdk),
      replayed: { customHandler: (_params, callback) => callback(null, donorAuth) },
    };
    for (const [kind, channelAuthorization] of Object.entries(forgers)) {
      const client = await connectedClient({ channelAuthorization });
      const socketId = client.connection.socket_id;
      const { states, errors } = watchConnection(client);
      const channel = client.subscribe(name);
      const channelErrors = record(channel, 'pusher:error');
      let succeeded = false;
      channel.bind('pusher:subscription_succeeded', () => (succeeded = true));

      const [connErr] = await errors.until(1, `pusher:error for the ${kind} signature`);
      assert.equal(connErr.type, 'PusherError', kind);
      assert.equal(connErr.data.code, null, kind);
      assert.match(connErr.data.message, /^Invalid signature/, kind);
      // The message names what should have been signed: this socket's own id.
      assert.ok(connErr.data.message.includes(`${socketId}:${name}:`), connErr.data.message);
      assert.deepEqual((await channelErrors.until(1))[0].data, connErr.data, kind);

      // Still connected and usable.
      const after = record(await subscribed(client, `after-${name}`), 'ok');
      await serverSdk.trigger(`after-${name}`, 'ok', { kind });
      await after.until(1);
      assert.equal(client.connection.state, 'connected', kind);
      assert.equal(client.connection.socket_id, socketId, kind);
      assert.deepEqual(states.got, [], `${kind}: state changes ${states.got}`);
      assert.equal(succeeded, false, kind);
      assert.equal(channel.subscribed, false, kind);
      disconnect(client);
    }

    await sentinel(observerChannel, 'after-forgers');
    assert.deepEqual(
      rawAdded.got.map((m) => m.data.user_id),
      ['donor'],
      'only the donor was ever announced',
    );
    assert.deepEqual(
      (await json(serverSdk.get({ path: `/channels/${name}/users` }))).users.sort((a, b) => a.id.localeCompare(b.id)),
      [{ id: 'donor' }, { id: 'guard' }],
    );
    disconnect(donor);
    disconnect(observer);
  });

  // Proves the sender's identity on presence client events: the receiver's bind callback gets
  // metadata.user_id of the sender (and none for a server event); the sender gets no echo.
  it('3. presence client events carry metadata.user_id', BOUNDED, async () => {
    const name = 'presence-chat';
    const sender = await connectedClient({
      channelAuthorization: channelAuth({ user_id: 'sender-7', user_info: { name: 'Sam' } }),
    });
    const receiver = await connectedClient({
      channelAuthorization: channelAuth({ user_id: 'receiver-9', user_info: { name: 'Rae' } }),
    });
    const senderChannel = await subscribed(sender, name);
    const receiverChannel = await subscribed(receiver, name);
    const echoed = record(senderChannel, 'client-wave');
    const waves = record(receiverChannel, 'client-wave');
    const notes = record(receiverChannel, 'server-note');

    assert.equal(senderChannel.trigger('client-wave', { hand: 'left', n: 1 }), true);
    const [wave] = await waves.until(1);
    assert.deepEqual(wave.data, { hand: 'left', n: 1 });
    assert.deepEqual(wave.metadata, { user_id: 'sender-7' });

    await serverSdk.trigger(name, 'server-note', { from: 'backend' });
    const [note] = await notes.until(1);
    assert.deepEqual(note.data, { from: 'backend' });
    assert.deepEqual(note.metadata, {}, 'a server event names no user');

    await sentinel(senderChannel, 'after-wave');
    assert.deepEqual(echoed.got, []);
    disconnect(sender);
    disconnect(receiver);
  });

  // Proves cache channels of every kind: a subscriber before any publish gets pusher:cache_miss
  // right after subscription_succeeded; one subscribing after two SDK publishes gets the last
  // one (decrypted, for private-encrypted-cache-) as its first event, and no cache_miss.
  it('4. cache channels: cache_miss first, then the last published event first', BOUNDED, async () => {
    const user = { user_id: 'cache-reader', user_info: null };
    for (const name of ['cache-weather', 'private-cache-ledger', 'private-encrypted-cache-vault', 'presence-cache-board']) {
      const early = await connectedClient({ channelAuthorization: channelAuth(user) });
      const earlyChannel = early.subscribe(name);
      const earlyEvents = recordAll(earlyChannel);
      const misses = record(earlyChannel, 'pusher:cache_miss');
      await misses.until(1, `pusher:cache_miss on ${name}`);
      assert.deepEqual(
        earlyEvents.got.map((e) => e.event).filter((e) => e !== 'pusher:subscription_count'),
        ['pusher:subscription_succeeded', 'pusher:cache_miss'],
        name,
      );

      const first = { n: 1, channel: name };
      const last = { n: 2, channel: name, text: 'ünïcødé ✓' };
      await serverSdk.trigger(name, 'update', first);
      await serverSdk.trigger(name, 'update', last);
      await waitFor(() => earlyEvents.got.filter((e) => e.event === 'update').length === 2, `2 updates on ${name}`);
      assert.deepEqual(
        earlyEvents.got.filter((e) => e.event === 'update').map((e) => e.data),
        [first, last],
        name,
      );

      const late = await connectedClient({ channelAuthorization: channelAuth({ user_id: 'late', user_info: null }) });
      const lateChannel = late.subscribe(name);
      const lateEvents = recordAll(lateChannel);
      await waitFor(() => lateEvents.got.some((e) => e.event === 'update'), `the cached event on ${name}`);
      await sentinel(lateChannel, 'cache-sentinel');
      // pusher:subscription_count (this app has it on) comes on its own once-a-second tick.
      const got = lateEvents.got.filter((e) => e.event !== 'pusher:subscription_count');
      assert.deepEqual(
        got.map((e) => e.event),
        ['pusher:subscription_succeeded', 'update', 'cache-sentinel'],
        `${name}: ${JSON.stringify(lateEvents.got.map((e) => e.event))}`,
      );
      assert.deepEqual(got[1].data, last, name);

      disconnect(early);
      disconnect(late);
    }
  });

  // Proves user sign-in: pusher.signin() through the SDK's authenticateUser succeeds, pusher-js
  // subscribes #server-to-user-alice, and sendToUser reaches pusher.user.bind; a sign-in with a
  // bad signature is refused with 4009, which pusher-js takes as final (no reconnect).
  it('5. sign-in, sendToUser, and a bad sign-in closed with 4009', BOUNDED, async () => {
    const aliceData = { id: 'alice', user_info: { name: 'Alice' } };
    const alice = await connectedClient({ userAuthentication: userAuth(aliceData) });
    const aliceConnection = watchConnection(alice);
    const signinSuccess = recordRaw(alice, 'pusher:signin_success');
    await signedIn(alice, 'alice');
    assert.deepEqual(alice.user.user_data, aliceData);
    // The server echoes user_data exactly as signed (a string inside the data).
    assert.deepEqual(signinSuccess.got[0].data, { user_data: JSON.stringify(aliceData) });
    assert.equal(alice.user.serverToUserChannel.name, '#server-to-user-alice');

    const notes = record(alice.user, 'note');
    const res = await serverSdk.sendToUser('alice', 'note', { text: 'hello Alice', n: [1, 2] });
    assert.equal(res.status, 200);
    assert.deepEqual((await notes.until(1))[0].data, { text: 'hello Alice', n: [1, 2] });

    // Someone else's note does not reach her.
    const bob = await connectedClient({ userAuthentication: userAuth({ id: 'bob-5' }) });
    await signedIn(bob, 'bob-5');
    const bobNotes = record(bob.user, 'note');
    await serverSdk.sendToUser('bob-5', 'note', { text: 'for bob' });
    await bobNotes.until(1);
    await serverSdk.sendToUser('alice', 'note', { text: 'second' });
    await notes.until(2);
    assert.deepEqual(notes.got.map((n) => n.data.text), ['hello Alice', 'second']);
    assert.deepEqual(bobNotes.got.map((n) => n.data.text), ['for bob']);

    // A forged sign-in: pusher:error 4009, then close 4009; pusher-js goes to disconnected
    // ("refused") and stays there.
    const mallory = await connectedClient({
      userAuthentication: userAuth({ id: 'mallory' }, () => wrongSdk),
    });
    const { states, errors } = watchConnection(mallory);
    mallory.signin();
    await closed(mallory, 'mallory to be disconnected');
    assertRefused4009(errors.got);
    assert.match(errors.got[0].data.message, /^Invalid signature: .*::user::\{"id":"mallory"\}/);
    await sleep(1500); // pusher-js retries "backoff" closes after 1 s; a refused one never
    assert.deepEqual(states.got, ['disconnected'], `mallory's states: ${states.got}`);
    assert.equal(mallory.user.user_data, null);

    // Alice was not affected.
    assert.equal(alice.connection.state, 'connected', JSON.stringify(aliceConnection.errors.got));
    assert.deepEqual(aliceConnection.states.got, [], JSON.stringify(aliceConnection.errors.got));
    disconnect(mallory);
    disconnect(alice);
    disconnect(bob);
  });

  // Proves POST /users/{id}/terminate_connections (SDK terminateUserConnections): both of
  // carol's connections, on different shards, are closed with 4009 and pusher-js does not
  // reconnect them; another signed-in user stays connected and reachable.
  it('6. terminateUserConnections closes every connection of that user with 4009', BOUNDED, async () => {
    const carol1 = await clientOnShard(0, { userAuthentication: userAuth({ id: 'carol' }) });
    const carol2 = await clientOnShard(1, { userAuthentication: userAuth({ id: 'carol' }) });
    const dave = await connectedClient({ userAuthentication: userAuth({ id: 'dave' }) });
    await Promise.all([signedIn(carol1, 'carol'), signedIn(carol2, 'carol'), signedIn(dave, 'dave')]);
    const watched = [carol1, carol2].map(watchConnection);

    const res = await serverSdk.terminateUserConnections('carol');
    assert.equal(res.status, 200);
    await Promise.all([closed(carol1, 'carol1 to be closed'), closed(carol2, 'carol2 to be closed')]);
    for (const { states, errors } of watched) {
      assertRefused4009(errors.got);
      assert.equal(errors.got[0].data.message, 'Connection terminated by the server');
      assert.deepEqual(states.got, ['disconnected']);
    }

    const daveNotes = record(dave.user, 'still-here');
    await serverSdk.sendToUser('dave', 'still-here', { ok: true });
    assert.deepEqual((await daveNotes.until(1))[0].data, { ok: true });
    await sleep(SETTLE_MS);
    assert.equal(dave.connection.state, 'connected');
    for (const { states } of watched) assert.deepEqual(states.got, ['disconnected'], 'no reconnect');

    disconnect(carol1);
    disconnect(carol2);
    disconnect(dave);
  });

  // Proves watchlists: bob signs in watching wl-alice; pusher.user.watchlist emits `online`
  // when she signs in (on another connection) and `offline` when her connection goes; a
  // watcher who signs in while she is online is told `online` at once.
  it('7. watchlist: online when the watched user signs in, offline when she leaves', BOUNDED, async () => {
    const bob = await connectedClient({
      userAuthentication: userAuth({ id: 'wl-bob', watchlist: ['wl-alice', 'wl-nobody'] }),
    });
    const online = record(bob.user.watchlist, 'online');
    const offline = record(bob.user.watchlist, 'offline');
    await signedIn(bob, 'wl-bob');

    const alice = await connectedClient({ userAuthentication: userAuth({ id: 'wl-alice' }) });
    await signedIn(alice, 'wl-alice');
    const [on] = await online.until(1, "bob's watchlist online event");
    assert.deepEqual(on.data, { name: 'online', user_ids: ['wl-alice'] });

    // A late watcher hears at once that wl-alice is online.
    const carl = await connectedClient({ userAuthentication: userAuth({ id: 'wl-carl', watchlist: ['wl-alice'] }) });
    const carlOnline = record(carl.user.watchlist, 'online');
    await signedIn(carl, 'wl-carl');
    assert.deepEqual((await carlOnline.until(1))[0].data, { name: 'online', user_ids: ['wl-alice'] });

    disconnect(alice);
    const [off] = await offline.until(1, "bob's watchlist offline event");
    assert.deepEqual(off.data, { name: 'offline', user_ids: ['wl-alice'] });
    await sleep(SETTLE_MS);
    assert.equal(online.got.length, 1, JSON.stringify(online.got));
    assert.equal(offline.got.length, 1, JSON.stringify(offline.got));

    disconnect(bob);
    disconnect(carl);
  });

  // Proves subscription_count: with two clients on counted-room, pusher-js emits
  // pusher:subscription_count with 2 and sets channel.subscriptionCount; when one leaves the
  // other is told 1.
  it('8. subscription_count reaches pusher-js', BOUNDED, async () => {
    const name = 'counted-room';
    const [a, b] = await Promise.all([connectedClient(), connectedClient()]);
    const channelA = a.subscribe(name);
    const countsA = record(channelA, 'pusher:subscription_count');
    await subscribed(a, name);
    const channelB = b.subscribe(name);
    const countsB = record(channelB, 'pusher:subscription_count');
    await subscribed(b, name);

    const latest = (r) => r.got.at(-1)?.data.subscription_count;
    await waitFor(() => latest(countsA) === 2 && latest(countsB) === 2, 'subscription_count 2 on both');
    assert.equal(channelA.subscriptionCount, 2);
    assert.equal(channelB.subscriptionCount, 2);
    assert.equal(await subscriptionCount(name), 2);

    b.unsubscribe(name);
    await waitFor(() => latest(countsA) === 1, 'subscription_count 1 after one left');
    assert.equal(channelA.subscriptionCount, 1);
    disconnect(a);
    disconnect(b);
  });

  // Proves Laravel Echo (broadcaster 'pusher') works unmodified: join('room') gives here(),
  // joining(), whisper()/listenForWhisper() and leaving(); private('orders') receives an
  // SDK-triggered event by '.OrderShipped' and, with Echo's App.Events namespace, by
  // 'OrderShipped' for the event Laravel names App\Events\OrderShipped.
  it('9. Laravel Echo: presence room and a private channel', BOUNDED, async () => {
    const taylor = { id: 1, name: 'Taylor' };
    const abigail = { id: 2, name: 'Abigail' };
    // Echo A: Echo builds its own pusher-js from the `Pusher` option (Node has no
    // window.Pusher), authorizing with Echo's documented `authorizer` option. Laravel's user
    // ids are numbers.
    const echoA = new Echo({
      broadcaster: 'pusher',
      Pusher,
      key: KEY,
      ...clientOptions(ringwire),
      authorizer: (channel) => ({
        authorize: (socketId, callback) => {
          try {
            const presence = channel.name.startsWith('presence-') ? { user_id: taylor.id, user_info: taylor } : undefined;
            callback(null, serverSdk.authorizeChannel(socketId, channel.name, presence));
          } catch (err) {
            callback(err, null);
          }
        },
      }),
    });
    clients.add(echoA.connector.pusher);
    // Echo B: Echo given a ready pusher-js instance through the `client` option.
    const echoB = new Echo({
      broadcaster: 'pusher',
      client: newClient({ channelAuthorization: channelAuth({ user_id: abigail.id, user_info: abigail }) }),
    });

    const hereA = recorder('here() on A');
    const joiningA = recorder('joining() on A');
    const leavingA = recorder('leaving() on A');
    const whispersA = recorder('typing whispers on A');
    const roomA = echoA
      .join('room')
      .here((members) => hereA.push(members))
      .joining((member) => joiningA.push(member))
      .leaving((member) => leavingA.push(member))
      .listenForWhisper('typing', (data, metadata) => whispersA.push({ data, metadata }));
    assert.equal(roomA.name, 'presence-room');
    assert.deepEqual((await hereA.until(1))[0], [taylor]);

    const hereB = recorder('here() on B');
    const roomB = echoB.join('room').here((members) => hereB.push(members));
    const [membersB] = await hereB.until(1);
    assert.deepEqual([...membersB].sort((x, y) => x.id - y.id), [taylor, abigail]);
    assert.deepEqual((await joiningA.until(1))[0], abigail);

    roomB.whisper('typing', { name: 'Abigail', typing: true });
    const [whisper] = await whispersA.until(1);
    assert.deepEqual(whisper.data, { name: 'Abigail', typing: true });
    assert.deepEqual(whisper.metadata, { user_id: '2' }, 'the whisper names its sender');

    echoB.leave('room');
    assert.deepEqual((await leavingA.until(1))[0], abigail);
    assert.equal(echoA.connector.pusher.channel('presence-room').members.count, 1);

    // Private channel and Echo's event-name conventions.
    const subscribedA = recorder('private-orders subscribed');
    const shipped = recorder('.OrderShipped');
    const namespaced = recorder('OrderShipped in App.Events');
    const orders = echoA
      .private('orders')
      .subscribed(() => subscribedA.push(true))
      .listen('.OrderShipped', (data) => shipped.push(data))
      .listen('OrderShipped', (data) => namespaced.push(data));
    assert.equal(orders.name, 'private-orders');
    await subscribedA.until(1);
    await serverSdk.trigger('private-orders', 'OrderShipped', { order: { id: 42 } });
    assert.deepEqual(await shipped.until(1), [{ order: { id: 42 } }]);
    await serverSdk.trigger('private-orders', 'App\\Events\\OrderShipped', { order: { id: 43 } });
    assert.deepEqual(await namespaced.until(1), [{ order: { id: 43 } }]);
    assert.equal(shipped.got.length, 1);
    assert.equal(echoA.socketId(), echoA.connector.pusher.connection.socket_id);
    assert.equal(echoA.connectionStatus(), 'connected');

    echoA.disconnect();
    echoB.disconnect();
    clients.delete(echoA.connector.pusher);
    clients.delete(echoB.connector.pusher);
  });
});
