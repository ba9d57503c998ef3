// ringwire dashboard: polls /dashboard/api/snapshot once a second and renders it. Rates are
// deltas of the server's counters divided by the time between two snapshots; the sparklines'
// history (the last HISTORY_POINTS snapshots) lives only in this page. All text from the
// server is set with textContent, never parsed as HTML (channel names come from clients).
'use strict';

const POLL_MS = 1000;
const TIMEOUT_MS = 3000;
const HISTORY_POINTS = 180;
const SPARK_SPAN_MIN = 30;

const history = { connections: [], in: [], out: [], published: [], delivered: [], dead: [] };
let previous = null;
let failures = 0;

const $ = (selector, root = document) => root.querySelector(selector);
const number = (n) => (n === null || n === undefined ? '–' : Math.round(n).toLocaleString('en-US'));
const rate = (n) => (n === null ? '–' : n < 10 ? n.toFixed(1) : number(n));

function setStatus(text, kind) {
  const status = $('#status');
  status.textContent = text;
  status.className = `status ${kind}`;
}

async function poll() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const response = await fetch('/dashboard/api/snapshot', { cache: 'no-store', signal: abort.signal });
    if (response.status === 401) {
      // The session ended (a restart changes the cookie's key): back to the login form.
      window.location.assign('/dashboard');
      return;
    }
    if (!response.ok) throw new Error(`snapshot answered ${response.status}`);
    render(await response.json());
    failures = 0;
    setStatus('live', 'live');
  } catch (error) {
    failures += 1;
    setStatus('reconnecting…', 'down');
    $('#updated').textContent = `${failures} failed`;
  } finally {
    clearTimeout(timer);
    setTimeout(poll, POLL_MS);
  }
}

function perSecond(now, before, field, seconds) {
  if (!before || seconds <= 0) return null;
  return Math.max(0, (now.totals[field] - before.totals[field]) / seconds);
}

function render(snapshot) {
  const seconds = previous ? (snapshot.time_ms - previous.time_ms) / 1000 : 0;
  const totals = snapshot.totals;
  const rates = {
    in: perSecond(snapshot, previous, 'messages_in_total', seconds),
    out: perSecond(snapshot, previous, 'messages_out_total', seconds),
    published: perSecond(snapshot, previous, 'published_total', seconds),
    delivered: perSecond(snapshot, previous, 'webhook_delivered_total', seconds),
  };
  $('#total-connections').textContent = number(totals.connections);
  $('#rate-in').textContent = rate(rates.in);
  $('#rate-out').textContent = rate(rates.out);
  $('#rate-published').textContent = rate(rates.published);
  $('#rate-delivered').textContent = rate(rates.delivered);
  $('#total-dead').textContent = number(totals.webhook_dead_letters);
  const points = { connections: totals.connections, dead: totals.webhook_dead_letters, ...rates };
  for (const [name, value] of Object.entries(points)) {
    if (value === null) continue;
    history[name].push(value);
    if (history[name].length > HISTORY_POINTS) history[name].shift();
    drawSparkline($(`canvas[data-spark="${name}"]`), history[name]);
  }
  renderShards(snapshot, seconds);
  renderCluster(snapshot.cluster);
  for (const app of snapshot.apps) renderApp(app, seconds);
  $('#updated').textContent = new Date(snapshot.time_ms).toLocaleTimeString('en-GB');
  previous = snapshot;
}

function drawSparkline(canvas, values) {
  const context = canvas.getContext('2d');
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  if (values.length < 2) return;
  const max = Math.max(1, ...values);
  // The newest value sits at the right edge; a short history is spread over at least
  // SPARK_SPAN_MIN points so it is visible from the first seconds.
  const span = Math.max(values.length, SPARK_SPAN_MIN);
  const offset = span - values.length;
  context.strokeStyle = '#58a6ff';
  context.lineWidth = 1.5;
  context.beginPath();
  values.forEach((value, i) => {
    const x = ((offset + i) / (span - 1)) * width;
    const y = height - 2 - (value / max) * (height - 4);
    if (i === 0) context.moveTo(x, y);
    else context.lineTo(x, y);
  });
  context.stroke();
}

/** Replaces a tbody's rows with `rows` (arrays of cell texts); `empty` when there are none;
 * `decorate(tr, cells, index)` adds to each row. */
function fillRows(tbody, rows, empty, decorate = () => {}) {
  const fragment = document.createDocumentFragment();
  rows.forEach((cells, index) => {
    const tr = document.createElement('tr');
    for (const text of cells) {
      const td = document.createElement('td');
      td.textContent = text;
      td.title = text;
      tr.append(td);
    }
    decorate(tr, cells, index);
    fragment.append(tr);
  });
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    tr.className = 'empty';
    const td = document.createElement('td');
    td.colSpan = tbody.closest('table').tHead.rows[0].cells.length;
    td.textContent = empty;
    tr.append(td);
    fragment.append(tr);
  }
  tbody.replaceChildren(fragment);
}

function renderShards(snapshot, seconds) {
  const before = previous ? previous.shards : [];
  const delta = (shard, field) => {
    const old = before.find((s) => s.shard === shard.shard);
    return old && seconds > 0 ? rate(Math.max(0, (shard[field] - old[field]) / seconds)) : '–';
  };
  const rows = snapshot.shards.map((s) => [
    `${s.shard}${s.down ? ' (down)' : ''}`, number(s.connections), number(s.subscriptions),
    delta(s, 'messages_in_total'), delta(s, 'messages_out_total'), number(s.ring_depth),
    number(s.mesh_outbox_depth), bytes(s.write_queue_bytes),
  ]);
  fillRows($('#shards tbody'), rows, 'no shards');
}

/** Per node: its last share seen and the message rates between its last two shares. Nodes
 * share every `cluster.connections_refresh_ms`, not at this page's polls, so a rate is the
 * delta of its totals over the time between its own shares, kept until the next share. */
const clusterShares = new Map();

function nodeRates(nodes) {
  const live = new Set(nodes.map((n) => n.node));
  for (const name of [...clusterShares.keys()]) if (!live.has(name)) clusterShares.delete(name);
  for (const n of nodes) {
    const known = clusterShares.get(n.node);
    if (!known) {
      clusterShares.set(n.node, { last: n, messages_in_total: null, messages_out_total: null });
    } else if (n.shared_ms > known.last.shared_ms) {
      const seconds = (n.shared_ms - known.last.shared_ms) / 1000;
      for (const field of ['messages_in_total', 'messages_out_total']) {
        known[field] = known.last.shared_ms > 0 ? Math.max(0, (n[field] - known.last[field]) / seconds) : null;
      }
      known.last = n;
    }
  }
  return clusterShares;
}

/** The Cluster panel, only in cluster mode: every live node and the sums, or why the view is
 * unavailable (this node's own numbers above stay). */
function renderCluster(cluster) {
  const panel = $('#cluster');
  panel.hidden = !cluster;
  if (!cluster) return;
  const links = cluster.links.map((l) => {
    const span = document.createElement('span');
    span.className = `link ${l.up ? 'up' : 'down'}`;
    span.textContent = `shard ${l.shard} ${l.up ? 'up' : 'down'}`;
    return span;
  });
  $('#cluster-links').replaceChildren(...links);
  const state = $('#cluster-state');
  state.className = `cluster-state${cluster.available ? '' : ' unavailable'}`;
  state.textContent = cluster.available
    ? `${cluster.sums.nodes} ${cluster.sums.nodes === 1 ? 'node' : 'nodes'}`
    : `view unavailable: ${cluster.reason}`;
  const appIds = cluster.available ? Object.keys(cluster.sums.apps) : [];
  const head = $('#cluster-nodes thead tr');
  const shown = [...head.cells].slice(5).map((th) => th.dataset.app);
  if (cluster.available && shown.join('\n') !== appIds.join('\n')) {
    // One column per app; rebuilt only when the apps change, so numbers never move the layout.
    [...head.cells].slice(5).forEach((th) => th.remove());
    for (const id of appIds) {
      const th = document.createElement('th');
      th.dataset.app = id;
      th.textContent = `App ${id}`;
      head.append(th);
    }
  }
  const nodes = cluster.available ? cluster.nodes : [];
  const rates = nodeRates(nodes);
  const nodeRate = (n, field) => (rates.get(n.node)[field] === null ? '–' : rate(rates.get(n.node)[field]));
  const rows = nodes.map((n) => [
    n.node, `${(n.lease_remaining_ms / 1000).toFixed(1)} s`, number(n.connections),
    nodeRate(n, 'messages_in_total'), nodeRate(n, 'messages_out_total'),
    ...appIds.map((id) => number(n.apps[id])),
  ]);
  const empty = cluster.available ? 'no live nodes' : 'cluster view unavailable while this node cannot reach Redis';
  fillRows($('#cluster-nodes tbody'), rows, empty, (tr, _cells, index) => {
    tr.dataset.node = nodes[index].node;
    tr.classList.toggle('this', nodes[index].this);
  });
  const sums = cluster.available ? cluster.sums : null;
  const foot = $('#cluster-nodes tfoot');
  if (!sums) {
    foot.replaceChildren();
    return;
  }
  // The sums' rates add the nodes' own, so a node that joins or leaves makes no spike.
  const sumRate = (field) => {
    const known = nodes.map((n) => rates.get(n.node)[field]).filter((r) => r !== null);
    return known.length === 0 ? '–' : rate(known.reduce((total, r) => total + r, 0));
  };
  const cells = ['All nodes', '', number(sums.connections), sumRate('messages_in_total'), sumRate('messages_out_total'),
    ...appIds.map((id) => number(sums.apps[id]))];
  const tr = document.createElement('tr');
  tr.className = 'sums';
  for (const text of cells) {
    const td = document.createElement('td');
    td.textContent = text;
    tr.append(td);
  }
  foot.replaceChildren(tr);
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function appSection(id) {
  let section = document.querySelector(`section.app[data-app="${CSS.escape(id)}"]`);
  if (!section) {
    section = $('#app-template').content.firstElementChild.cloneNode(true);
    section.dataset.app = id;
    $('#apps').append(section);
  }
  return section;
}

/** The app's message rate from its counter in this and the previous snapshot. */
function appRate(app, field, seconds) {
  const old = previous && previous.apps.find((a) => a.id === app.id);
  return old && seconds > 0 ? rate(Math.max(0, (app[field] - old[field]) / seconds)) : '–';
}

function renderApp(app, seconds) {
  const section = appSection(app.id);
  for (const field of ['id', 'connections', 'channels', 'subscriptions', 'presence_channels']) {
    $(`[data-field="${field}"]`, section).textContent = field === 'id' ? app.id : number(app[field]);
  }
  $('[data-field="rate-in"]', section).textContent = appRate(app, 'messages_in_total', seconds);
  $('[data-field="rate-out"]', section).textContent = appRate(app, 'messages_out_total', seconds);
  fillRows($('table.hot tbody', section), app.hot_channels.map((c) => [c.name, number(c.subscribers)]),
    'no occupied channels', (tr, cells) => { tr.dataset.channel = cells[0]; });
  fillRows($('table.presence tbody', section), app.presence.map((c) => [c.name, number(c.members)]),
    'no presence channels', (tr, cells) => { tr.dataset.presence = cells[0]; });
  $('.webhooks-block', section).hidden = app.webhooks.length === 0;
  renderEndpoints(section, app);
}

/** One endpoint's cells: id and URL, state, last status, last error, queue, dead, success. */
function endpointCells(e) {
  return [
    `${e.id} ${e.url}`, e.state.replace('_', ' '), e.last_status === null ? '–' : String(e.last_status),
    e.last_error || e.disabled_reason || '', number(e.pending), number(e.dead_letters),
    e.success_rate === null ? '–' : `${(e.success_rate * 100).toFixed(1)}%`,
  ];
}

/** Updates the endpoint rows in place while the endpoints stay the same, so that a button is
 * never replaced under the operator's pointer; rebuilds them when the list changed. */
function renderEndpoints(section, app) {
  const tbody = $('table.webhooks tbody', section);
  const rows = [...tbody.rows];
  const same = rows.length === app.webhooks.length && rows.every((tr, i) => tr.dataset.endpoint === app.webhooks[i].id);
  if (!same) {
    fillRows(tbody, app.webhooks.map((e) => [...endpointCells(e), '']), 'no endpoints', (tr, _cells, index) => {
      const endpoint = app.webhooks[index];
      tr.dataset.endpoint = endpoint.id;
      const path = (action) => `endpoints/${enc(endpoint.id)}/${action}`;
      tr.cells[7].append(
        button('Dead letters', 'dead-letters', () => showDeadLetters(section, app.id, endpoint.id)),
        button('Replay all', 'replay-all', () => act(section, app.id, endpoint.id, path('replay'))),
        button('Enable', 'enable', () => act(section, app.id, endpoint.id, path('enable'))),
      );
    });
  }
  [...tbody.rows].forEach((tr, i) => {
    const endpoint = app.webhooks[i];
    if (!endpoint) return;
    endpointCells(endpoint).forEach((value, j) => {
      if (tr.cells[j].textContent !== value) {
        tr.cells[j].textContent = value;
        tr.cells[j].title = value;
      }
    });
    tr.cells[1].className = `state state-${endpoint.state}`;
    tr.cells[1].dataset.state = endpoint.state;
    // Re-enabling only means something for an endpoint that is not healthy.
    $('button[data-action="enable"]', tr).hidden = endpoint.state === 'healthy';
  });
}

const enc = encodeURIComponent;

function button(label, action, onClick) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = label;
  b.dataset.action = action;
  b.addEventListener('click', onClick);
  return b;
}

function showError(text) {
  const error = $('#error');
  error.textContent = text;
  error.hidden = !text;
}

/** Calls a webhook admin action through the dashboard's server side, then reloads the list. */
async function act(section, appId, endpointId, path) {
  try {
    const response = await fetch(`/dashboard/api/apps/${enc(appId)}/${path}`, { method: 'POST' });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `answered ${response.status}`);
    showError('');
  } catch (error) {
    showError(`Action failed: ${error.message}`);
  }
  await showDeadLetters(section, appId, endpointId);
}

async function showDeadLetters(section, appId, endpointId) {
  const block = $('.letters', section);
  block.hidden = false;
  block.dataset.endpoint = endpointId;
  $('[data-field="letters-endpoint"]', block).textContent = endpointId;
  $('.attempts', block).hidden = true;
  let letters = [];
  try {
    const response = await fetch(`/dashboard/api/apps/${enc(appId)}/endpoints/${enc(endpointId)}/dead_letters`);
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `answered ${response.status}`);
    letters = body.dead_letters;
  } catch (error) {
    showError(`Dead letters: ${error.message}`);
  }
  const rows = letters.map((d) => [d.webhook_id, new Date(d.created_ms).toLocaleString('en-GB'), d.body, '']);
  fillRows($('tbody', block), rows, 'no dead letters', (tr, cells) => {
    const id = cells[0];
    tr.dataset.webhookId = id;
    tr.cells[3].append(
      button('Replay', 'replay', () => act(section, appId, endpointId, `deliveries/${enc(id)}/replay`)),
      button('Attempts', 'attempts', () => showAttempts(block, appId, id)),
    );
  });
}

async function showAttempts(block, appId, webhookId) {
  const pre = $('.attempts', block);
  const response = await fetch(`/dashboard/api/apps/${enc(appId)}/deliveries/${enc(webhookId)}/attempts`);
  const body = await response.json();
  const lines = (body.attempts || []).map((a) =>
    `${new Date(a.at_ms).toISOString()}  ${a.status ?? '---'}  ${a.duration_ms} ms  ${a.error ?? ''}`);
  pre.textContent = `Attempts of ${webhookId}\n${lines.join('\n') || body.error || 'none'}`;
  pre.hidden = false;
}

poll();
