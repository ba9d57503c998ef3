// Bun as a benchmark peer for scripts/bench: the smallest pub/sub server on Bun's built-in
// WebSocket server, whose topic fan-out (`server.publish`) is uWebSockets' pub/sub
// (https://bun.sh/docs/api/websockets#pub-sub). It speaks the same URLs as the nginx + Nchan
// peer, so the load generator drives it with `--nchan` unchanged:
//
//   GET  /sub/{channel}  WebSocket upgrade; the socket is subscribed to topic {channel}
//   POST /pub/{channel}  the request body is published to every subscriber as one text frame
//
// Usage: bun benches/bun-pubsub.js [port]   (port 0 or none: any free port)
// Prints one line, `listening 127.0.0.1:PORT`, once it accepts connections.

const port = Number(process.argv[2] ?? 0);
const CHANNEL = /^\/(sub|pub)\/([\w-]+)$/;

const server = Bun.serve({
  hostname: "127.0.0.1",
  port,
  async fetch(request, server) {
    const match = CHANNEL.exec(new URL(request.url).pathname);
    if (!match) {
      return new Response("not found\n", { status: 404 });
    }
    const [, kind, channel] = match;
    if (kind === "sub") {
      if (server.upgrade(request, { data: { channel } })) {
        return undefined;
      }
      return new Response("WebSocket upgrade expected\n", { status: 400 });
    }
    if (request.method !== "POST") {
      return new Response("POST expected\n", { status: 405 });
    }
    server.publish(channel, await request.text());
    return new Response("ok\n");
  },
  websocket: {
    open(ws) {
      ws.subscribe(ws.data.channel);
    },
    message() {},
    // Every peer queues for a slow subscriber rather than dropping: uWebSockets skips a
    // socket whose send buffer is past this limit (default 16 MiB), which the bench would
    // count as lost messages instead of as latency. The other servers buffer too.
    backpressureLimit: 1024 * 1024 * 1024,
    closeOnBackpressureLimit: false,
    // No idle timeout or server pings: an idle-connection hold may outlast the default 120 s,
    // and pings would add traffic the other peers do not send during a run.
    idleTimeout: 0,
    sendPings: false,
  },
});

console.log(`listening ${server.hostname}:${server.port}`);
