// The operator dashboard in a real browser: Debian's chromium, headless, driven by
// puppeteer-core against a ringwire child process with two shards, a webhook endpoint on a
// local receiver whose answers the tests choose, and WebSocket clients in another tab.
// The steps build on each other (log in, watch, break an endpoint, fix it), so they run in
// order on one server. Screenshots of the main views go to SCREENSHOTS (scripts/browser).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, createHmac } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
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
const SCREENSHOTS = path.resolve(ROOT, process.env.SCREENSHOTS || 'target/browser');
const TOKEN = 'browser-test-token-0123456789';
const [APP_ID, KEY, SECRET] = ['1', 'ringwire-demo-key', 'ringwire-demo-secret'];
const WAIT_MS = 10000;

let server; // the ringwire child process
let base; // http://127.0.0.1:port
let browser;
let page; // the dashboard tab
let clients; // a tab holding WebSocket clients
let tmp;
const receiver = { status: 500, requests: [], server: null, url: '' };

/** Starts ringwire on a free port with the dashboard on and one endpoint on the receiver. */
async function startRingwire() {
  tmp = mkdtempSync(path.join(tmpdir(), 'ringwire-browser-'));
  const config = `[server]\nbind = "127.0.0.1:0"\nshards = 2\n\n` +
    `[webhooks]\ndata_dir = "${tmp}/data"\nallow_private_targets = true\nretry_schedule_ms = [0, 100]\n` +
    `retry_jitter_percent = 0\nbatch_ms = 20\n\n` +
    `[dashboard]\nenabled = true\ntoken = "${TOKEN}"\n\n` +
    `[[apps]]\nid = "${APP_ID}"\nkey = "${KEY}"\nsecret = "${SECRET}"\n\n` +
    `[[apps.webhooks]]\nid = "orders"\nformat = "standard"\nurl = "${receiver.url}"\n` +
    `secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"\nchannels = ["orders-*"]\n`;
  writeFileSync(path.join(tmp, 'ringwire.toml'), config);
  server = spawn(BIN, ['--config', path.join(tmp, 'ringwire.toml')], { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = createInterface({ input: server.stdout });
  const first = await withTimeout(new Promise((resolve) => lines.once('line', resolve)), 'ringwire to listen');
  const match = /^ringwire listening on (\S+:\d+) /.exec(first);
  assert.ok(match, `unexpected first line: ${first}`);
  lines.on('line', () => {}); // keep draining stdout
  base = `http://${match[1]}`;
}

function withTimeout(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Publishes an event through the signed HTTP API (Pusher's request signing). */
async function publish(channel, name, data) {
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
  const response = await fetch(`${base}${route}?${params}`, { method: 'POST', body, headers: { 'content-type': 'application/json' } });
  assert.equal(response.status, 200, await response.text());
}

/** The text of `selector` on the dashboard, or null while it is absent. */
const text = (selector) => page.$eval(selector, (e) => e.textContent).catch(() => null);

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

async function screenshot(name) {
  await page.screenshot({ path: path.join(SCREENSHOTS, `${name}.png`), fullPage: true });
}

/** Opens a WebSocket in the clients tab and resolves with its socket_id. */
function openClient(index) {
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

function subscribe(index, data) {
  return clients.evaluate((index, data) => {
    window.sockets[index].send(JSON.stringify({ event: 'pusher:subscribe', data }));
  }, index, data);
}

before(async () => {
  mkdirSync(SCREENSHOTS, { recursive: true });
  receiver.server = createServer((request, response) => {
    let body = '';
    request.on('data', (chunk) => { body += chunk; });
    request.on('end', () => {
      receiver.requests.push({ id: request.headers['webhook-id'], status: receiver.status, body });
      response.statusCode = receiver.status;
      response.end();
    });
  });
  await new Promise((resolve) => receiver.server.listen(0, '127.0.0.1', resolve));
  receiver.url = `http://127.0.0.1:${receiver.server.address().port}/hooks`;
  await startRingwire();
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // The test runs as root in CI containers, where Chromium's sandbox cannot start.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  page = await browser.newPage();
  if (process.env.DEBUG) {
    page.on('response', (r) => console.log('response', r.status(), r.url()));
    page.on('requestfailed', (r) => console.log('failed', r.url(), r.failure()?.errorText));
  }
  await page.setViewport({ width: 1280, height: 900 });
  clients = await browser.newPage();
  // The dashboard's tab stays in front: a background tab gets no typing and throttled timers.
  await page.bringToFront();
});

after(async () => {
  await browser?.close();
  server?.kill('SIGKILL');
  receiver.server?.close();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

test('without a credential only the login form is shown, and the data answers 401', async () => {
  const response = await page.goto(`${base}/dashboard`);
  assert.equal(response.status(), 200);
  assert.ok(await page.$('form[action="/dashboard/login"] input#token'));
  assert.equal(await page.$('#shards'), null, 'no dashboard without a credential');
  const data = await page.evaluate(() => fetch('/dashboard/api/snapshot').then((r) => r.status));
  assert.equal(data, 401);
  await screenshot('dashboard-login');
});

test('a wrong token is refused in the page', async () => {
  await page.type('#token', 'not-the-token');
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  assert.equal(await text('.error'), 'Wrong token.');
  assert.equal(await page.$('#shards'), null);
});

test('with the Bearer token the page loads without logging in', async () => {
  const other = await browser.createBrowserContext();
  const tab = await other.newPage();
  await tab.setExtraHTTPHeaders({ authorization: `Bearer ${TOKEN}` });
  await tab.goto(`${base}/dashboard`);
  await tab.waitForFunction(() => document.querySelector('#status')?.textContent === 'live', { timeout: WAIT_MS });
  await other.close();
});

test('logging in through the form shows the live dashboard', async () => {
  await page.type('#token', TOKEN);
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  await until('the status to say live', async () => (await text('#status')) === 'live');
  const cookies = await page.cookies();
  const session = cookies.find((c) => c.name === 'ringwire_dashboard');
  assert.ok(session.httpOnly && session.sameSite === 'Strict' && session.path === '/dashboard', JSON.stringify(session));
  assert.equal(await page.evaluate(() => document.cookie), '', 'the page cannot read the session cookie');
  await until('two shard rows', async () => (await page.$$('#shards tbody tr')).length === 2);
  assert.ok(await page.$eval('#cluster', (e) => e.hidden), 'no Cluster panel on a single node');
});

test('published events move the counters', async () => {
  // A page of the server's own origin (a JSON answer will do) hosts the clients' sockets.
  await clients.goto(`${base}/health`);
  await openClient(0);
  await openClient(1);
  await subscribe(0, { channel: 'news' });
  await subscribe(1, { channel: 'news' });
  await until('two connections', async () => (await text('#total-connections')) === '2');
  await until('news with two subscribers', async () =>
    (await text('section.app[data-app="1"] table.hot tr[data-channel="news"] td:nth-child(2)')) === '2');
  const publishing = setInterval(() => publish('news', 'tick', '"x"').catch(() => {}), 100);
  try {
    await until('messages out per second above 0', async () => Number((await text('#rate-out')) || 0) > 0);
    await until('publishes per second above 0', async () => Number((await text('#rate-published')) || 0) > 0);
    // A few more updates while events flow, so the screenshot's sparklines have a shape.
    const seen = new Set();
    await until('five more updates', async () => seen.add(await text('#updated')).size > 5);
  } finally {
    clearInterval(publishing);
  }
  await screenshot('dashboard-live');
});

test('a presence channel shows its member count', async () => {
  const sign = (socketId, channel, channelData) =>
    `${KEY}:${createHmac('sha256', SECRET).update(`${socketId}:${channel}:${channelData}`).digest('hex')}`;
  for (const [index, user] of [[2, 'alice'], [3, 'bob']]) {
    const socketId = await openClient(index);
    const channelData = JSON.stringify({ user_id: user });
    await subscribe(index, { channel: 'presence-room', auth: sign(socketId, 'presence-room', channelData), channel_data: channelData });
  }
  await until('presence-room with two members', async () =>
    (await text('tr[data-presence="presence-room"] td:nth-child(2)')) === '2');
  assert.equal(await text('[data-app="1"] [data-field="presence_channels"]'), '1');
});

test('a failing endpoint changes state and its dead letter can be replayed from the page', async () => {
  receiver.status = 500;
  await publish('orders-1', 'order.created', '{"id":1}');
  const row = 'tr[data-endpoint="orders"]';
  await until('the endpoint to leave healthy', async () => {
    const state = await page.$eval(`${row} td[data-state]`, (e) => e.dataset.state).catch(() => null);
    return state && state !== 'healthy';
  });
  await until('one dead letter', async () => (await text(`${row} td:nth-child(6)`)) === '1');
  assert.equal(await text(`${row} td:nth-child(3)`), '500');
  await page.click(`${row} button[data-action="dead-letters"]`);
  const letter = '.letters tbody tr[data-webhook-id]';
  await page.waitForSelector(letter, { timeout: WAIT_MS });
  const webhookId = await page.$eval(letter, (e) => e.dataset.webhookId);
  await page.click(`${letter} button[data-action="attempts"]`);
  await until('the attempts listed', async () => ((await text('.letters pre.attempts')) || '').includes(' 500 '));
  await screenshot('dashboard-webhook-failing');

  receiver.status = 200;
  await page.click(`${letter} button[data-action="replay"]`);
  await until('the replay delivered', async () => receiver.requests.some((r) => r.id === webhookId && r.status === 200));
  await until('the list emptied', async () => (await text('.letters tbody tr.empty td')) === 'no dead letters');
  await until('no dead letter in the table', async () => (await text(`${row} td:nth-child(6)`)) === '0');
});

test('an endpoint disabled by 410 Gone is re-enabled and its dead letters replayed from the page', async () => {
  const row = 'tr[data-endpoint="orders"]';
  const state = () => page.$eval(`${row} td[data-state]`, (e) => e.dataset.state).catch(() => null);
  receiver.status = 410;
  await publish('orders-2', 'order.created', '{"id":2}');
  await until('the endpoint disabled', async () => (await state()) === 'disabled');
  assert.ok(await page.$eval(`${row} button[data-action="enable"]`, (b) => !b.hidden), 'Enable is offered');
  const before = receiver.requests.length;
  receiver.status = 200;
  await page.click(`${row} button[data-action="enable"]`);
  await until('the endpoint enabled', async () => (await state()) === 'healthy');
  await page.click(`${row} button[data-action="replay-all"]`);
  await until('the dead letter delivered', async () =>
    receiver.requests.slice(before).some((r) => r.status === 200 && r.body.includes('"id":2')));
  await until('no dead letter in the table', async () => (await text(`${row} td:nth-child(6)`)) === '0');
});

test('the layout holds at a phone width', async () => {
  await page.setViewport({ width: 390, height: 844, isMobile: true });
  await until('live', async () => (await text('#status')) === 'live');
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page is ${overflow} px wider than the phone (tables scroll inside their boxes)`);
  await screenshot('dashboard-phone');
  await page.setViewport({ width: 1280, height: 900 });
});

test('a lost server shows reconnecting… and the page recovers by itself', async () => {
  server.kill('SIGSTOP');
  try {
    await until('reconnecting', async () => (await text('#status')) === 'reconnecting…');
  } finally {
    server.kill('SIGCONT');
  }
  await until('live again', async () => (await text('#status')) === 'live');
});
