// Shared by the interop test files: start ringwire as a child process on a free port, kill
// children when the runner exits, poll for a condition.
// (Not a test file itself: its name matches none of node --test's patterns.)

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';

// Children to SIGKILL (and their cleanups to run) when this process exits. One listener for
// all of them, so a file that spawns many children stays under Node's listener limit.
const atExit = new Set();
process.on('exit', () => {
  for (const cleanup of atExit) cleanup();
});
for (const signal of ['SIGINT', 'SIGTERM']) process.once(signal, () => process.exit(1));

/**
 * SIGKILLs `child` (a no-op once it has exited) and runs `cleanup` when this process exits,
 * even when the runner is interrupted or times out.
 */
export function killOnExit(child, cleanup = () => {}) {
  atExit.add(() => {
    child.kill('SIGKILL');
    cleanup();
  });
}

/**
 * Spawns `bin --config <config>` and resolves once its first stdout line names the address.
 * `onStderr(text)` receives the last 20 000 characters of stderr whenever more arrives.
 * Returns { server, exit, tmpDir, host, port }; `exit` resolves with { code, signal } or
 * { error }. The server is SIGKILLed and the temp folder removed when this process exits,
 * even when the runner is interrupted or times out.
 */
export async function spawnRingwire({ bin, config, prefix, onStderr }) {
  const tmpDir = mkdtempSync(path.join(tmpdir(), prefix));
  const configPath = path.join(tmpDir, 'ringwire.toml');
  // `{TMP}` in the config names the temp folder (for webhooks.data_dir).
  writeFileSync(configPath, config.replaceAll('{TMP}', tmpDir));
  const server = spawn(bin, ['--config', configPath], { stdio: ['ignore', 'pipe', 'pipe'] });
  killOnExit(server, () => rmSync(tmpDir, { recursive: true, force: true }));
  const exit = new Promise((resolve) => {
    server.on('exit', (code, signal) => resolve({ code, signal }));
    server.on('error', (error) => resolve({ error }));
  });
  let stderr = '';
  server.stderr.setEncoding('utf8');
  server.stderr.on('data', (chunk) => {
    stderr = (stderr + chunk).slice(-20000);
    onStderr(stderr);
  });

  const lines = createInterface({ input: server.stdout });
  const firstLine = new Promise((resolve) => lines.once('line', resolve));
  const early = exit.then(({ code, signal, error }) => {
    throw error ?? new Error(`ringwire exited before listening (${code ?? signal}):\n${stderr}`);
  });
  early.catch(() => {}); // only the race below reports it
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after 10000 ms waiting for the first line of ${bin}`)), 10000);
  });
  const line = await Promise.race([firstLine, early, timeout]).finally(() => clearTimeout(timer));
  lines.on('line', () => {}); // keep draining stdout

  // `ringwire listening on 127.0.0.1:43567 (2 shards: IoUring, IoUring)`
  if (!/^ringwire listening on \S+:\d+ /.test(line)) throw new Error(`unexpected first line: ${line}`);
  const address = line.trim().split(/\s+/)[3];
  const colon = address.lastIndexOf(':');
  return { server, exit, tmpDir, host: address.slice(0, colon), port: Number(address.slice(colon + 1)) };
}

/** Polls `predicate` every 20 ms until it holds; throws naming `what` after `ms`. */
export async function until(what, predicate, ms = 10000) {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
