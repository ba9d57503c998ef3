// The dashboard's Cluster panel in a real browser: a redis-server of the test's own on a free
// port, two ringwire nodes (two shards each) sharing it, the dashboard of node A in Debian's
// chromium (puppeteer-core) and WebSocket clients on both nodes in another tab. The steps run
// in order: both nodes and the sums shown, then Redis killed and the panel saying the cluster
// view is unavailable while A's own numbers stay. The panel's screenshot goes to SCREENSHOTS.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, createHmac } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import puppeteer from 'puppeteer-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const BIN = path.resolve(ROOT, process.env.RINGWIRE_BIN || 'target/debug/ringwire');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const REDIS = process.env.REDIS_SERVER || 'redis-server';
const SCREENSHOTS = path.resolve(ROOT, process.env.SCREENSHOTS || 'target/browser');
const TOKEN = 'browser-test-token-0123456789';
const [APP_ID, KEY, SECRET] = ['1', 'ringwire-demo-key', 'ringwire-demo-secret'];
const WAIT_MS = 10000;

let redis; // the redis-server child process
let nodes = []; // [{ process, base }] of node-a and node-b
let browser;
let page; // node A's dashboard
let clients; // a tab holding WebSocket clients
let tmp;

function withTimeout(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A port that was free a moment ago (redis-server needs a number, not 0). */
async function freePort() {
  const probe = createServer();
  await new Promise((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const { port } = probe.address();
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

/** Starts redis-server without persistence; resolves with its port once it accepts. */
async function startRedis() {
  const port = await freePort();
  redis = spawn(REDIS, ['--bind', '127.0.0.1', '--port', String(port), '--save', '', '--appendonly', 'no', '--dir', tmp],
    { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = createInterface({ input: redis.stdout });
  await withTimeout(new Promise((resolve) => lines.on('line', (l) => { if (/Ready to accept connections/.test(l)) resolve(); })),
    'redis-server to accept connections');
  return port;
}

/** Starts one node named `nodeId` on a free port with the dashboard on. */
async function startNode(nodeId, redisPort) {
  const config = `[server]\nbind = "127.0.0.1:0"\nshards = 2\n\n` +
    `[webhooks]\ndata_dir = "${tmp}/${nodeId}"\n\n` +
    `[cluster]\nredis_url = "redis://127.0.0.1:${redisPort}"\nnode_id = "${nodeId}"\nprefix = "browser"\n` +
    `connections_refresh_ms = 200\n\n` +
    `[dashboard]\nenabled = true\ntoken = "${TOKEN}"\n\n` +
    `[[apps]]\nid = "${APP_ID}"\nkey = "${KEY}"\nsecret = "${SECRET}"\n`;
  const file = path.join(tmp, `${nodeId}.toml`);
  writeFileSync(file, config);
  // Its log (the link's warnings once Redis is killed) would drown the test's report.
  const child = spawn(BIN, ['--config', file], { stdio: ['ignore', 'pipe', 'ignore'] });
  const lines = createInterface({ input: child.stdout });
  const first = await withTimeout(new Promise((resolve) => lines.once('line', resolve)), `${nodeId} to listen`);
  const match = /^ringwire listening on (\S+:\d+) /.exec(first);
  assert.ok(match, `unexpected first line: ${first}`);
  lines.on('line', () => {}); // keep draining stdout
  const base = `http://${match[1]}`;
  await until(`${nodeId} ready`, async () => (await fetch(`${base}/ready`).catch(() => null))?.status === 200);
  return { process: child, base };
}

/** Polls `check` every 50 ms until it returns something truthy. */
async function until(what, check) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const text = (selector) => page.$eval(selector, (e) => e.textContent).catch(() => null);

/** The Cluster table's body rows as arrays of cell texts. */
const rows = () => page.$$eval('#cluster-nodes tbody tr', (trs) => trs.map((tr) => [...tr.cells].map((td) => td.textContent)));
const sums = () => page.$$eval('#cluster-nodes tfoot td', (tds) => tds.map((td) => td.textContent));

/** Opens a WebSocket to `base` in the clients tab and resolves once it is established. */
function openClient(base, index) {
  const url = `${base.replace('http', 'ws')}/app/${KEY}?protocol=7`;
  return clients.evaluate((url, index) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    (window.sockets ||= [])[index] = ws;
    ws.onmessage = (m) => {
      const message = JSON.parse(m.data);
      if (message.event === 'pusher:connection_established') resolve(JSON.parse(message.data).socket_id);
    };
    ws.onerror = () => reject(new Error('WebSocket failed'));
  }), url, index);
}

function subscribe(index, channel) {
  return clients.evaluate((index, channel) => {
    window.sockets[index].send(JSON.stringify({ event: 'pusher:subscribe', data: { channel } }));
  }, index, channel);
}

/** Publishes an event through node `base`'s signed HTTP API. */
async function publish(base, channel, name, data) {
  const body = JSON.stringify({ name, channel, data });
  const params = new URLSearchParams({
    auth_key: KEY,
    auth_timestamp: String(Math.floor(Date.now() / 1000)),
    auth_version: '1.0',
    body_md5: createHash('md5').update(body).digest('hex'),
  });
  params.sort();
  const route = `/apps/${APP_ID}/events`;
  const query = decodeURIComponent(params.toString());
  params.set('auth_signature', createHmac('sha256', SECRET).update(`POST\n${route}\n${query}`).digest('hex'));
  await fetch(`${base}${route}?${params}`, { method: 'POST', body, headers: { 'content-type': 'application/json' } });
}

before(async () => {
  mkdirSync(SCREENSHOTS, { recursive: true });
  tmp = mkdtempSync(path.join(tmpdir(), 'ringwire-browser-cluster-'));
  const redisPort = await startRedis();
  nodes = [await startNode('node-a', redisPort), await startNode('node-b', redisPort)];
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // The test runs as root in CI containers, where Chromium's sandbox cannot start.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 900 });
  await page.setExtraHTTPHeaders({ authorization: `Bearer ${TOKEN}` });
  clients = await browser.newPage();
  await page.bringToFront();
});

after(async () => {
  await browser?.close();
  for (const node of nodes) node.process.kill('SIGKILL');
  redis?.kill('SIGKILL');
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

test('the Cluster panel lists both nodes with their connections and the sums', async () => {
  const [a, b] = nodes;
  await clients.goto(`${a.base}/health`);
  await openClient(a.base, 0);
  await openClient(b.base, 1);
  await openClient(b.base, 2);
  for (const index of [0, 1, 2]) await subscribe(index, 'news');
  await page.goto(`${a.base}/dashboard`);
  await until('the Cluster panel shown', async () => page.$eval('#cluster', (e) => !e.hidden));
  await until('two nodes', async () => (await text('#cluster-state')) === '2 nodes');
  await until('three connections in the sums', async () => (await sums())[2] === '3');
  const listed = (await rows()).map((cells) => [cells[0].split('/')[0], cells[2], cells[5]]);
  assert.deepEqual(listed, [['node-a', '1', '1'], ['node-b', '2', '2']]);
  assert.equal(await text('#cluster-nodes thead th:nth-child(6)'), `App ${APP_ID}`);
  assert.ok(await page.$eval('#cluster-nodes tr.this', (tr) => tr.cells[0].textContent.startsWith('node-a/')));
  assert.equal(await text('#cluster-links'), 'shard 0 upshard 1 up');
  const publishing = setInterval(() => publish(b.base, 'news', 'tick', '"x"').catch(() => {}), 100);
  try {
    await until('out per second across the cluster above 0', async () => Number((await sums())[4] || 0) > 0);
    // A few more updates while events flow, so the screenshot shows steady rates.
    const seen = new Set();
    await until('five more updates', async () => seen.add(await text('#updated')).size > 5);
  } finally {
    clearInterval(publishing);
  }
  await page.screenshot({ path: path.join(SCREENSHOTS, 'dashboard-cluster.png'), fullPage: true });
});

test('with Redis gone the panel says the cluster view is unavailable and the node its own numbers', async () => {
  redis.kill('SIGKILL');
  await until('the view unavailable', async () => ((await text('#cluster-state')) || '').startsWith('view unavailable'));
  await until('the links down', async () => (await text('#cluster-links')) === 'shard 0 downshard 1 down');
  assert.equal(await text('#cluster-nodes tbody tr.empty td'), 'cluster view unavailable while this node cannot reach Redis');
  assert.equal(await text('#status'), 'live', 'no error page: the snapshot still answers');
  assert.equal(await text('#total-connections'), '1');
});
