#!/usr/bin/env python3
"""Webhook receivers written the ways Python users write them, for receivers.test.mjs.

KIND picks the server: `http-server` (the standard library's http.server with HTTP/1.1
keep-alive), `wsgi` (a WSGI app under waitress) or `asgi` (an ASGI callable under uvicorn).
Each one verifies the Standard Webhooks signature with the PyPI `standardwebhooks` package,
answers with a JSON body (200, or 400 when the signature does not verify), and reports what
it received to the Node side as one JSON line on stdout per request ({"headers", "body",
"verified", "error"}), flushed before it answers, so the test sees every attempt a sender
made. The first line is `listening <port>`.
The process serves until it is killed.
"""

import argparse
import json
import socket
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def record(webhook, headers, body):
    """Verifies one request, reports it on stdout and returns the status and JSON answer."""
    verified, error = False, None
    try:
        webhook.verify(body, headers)
        verified = True
    except (WebhookVerificationError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    line = {"headers": headers, "body": body.decode("utf-8", "replace"), "verified": verified, "error": error}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    # A receiver refuses what does not verify, as the Standard Webhooks spec asks.
    status = 200 if verified else 400
    return status, json.dumps({"received": headers.get("webhook-id"), "verified": verified}).encode()


def serve_http_server(sock, webhook):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        # Keep-alive, as a user sets it for a receiver that gets many deliveries.
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, answer = record(webhook, headers, body)
            # send_response and end_headers flush the head; the body is a second write.
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format, *args):
            pass

    server = ThreadingHTTPServer(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.serve_forever()


def serve_wsgi(sock, webhook):
    import waitress

    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = {
            key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")
        }
        headers["content-type"] = environ.get("CONTENT_TYPE", "")
        status, answer = record(webhook, headers, body)
        reason = "200 OK" if status == 200 else "400 Bad Request"
        start_response(reason, [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
        return [answer]

    waitress.serve(app, sockets=[sock], threads=4, _quiet=True)


def serve_asgi(sock, webhook):
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status, answer = record(webhook, headers, body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    config = uvicorn.Config(app, http="h11", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["http-server", "wsgi", "asgi"])
    parser.add_argument("--secret", required=True, help="the endpoint's whsec_ secret")
    args = parser.parse_args()

    webhook = Webhook(args.secret)
    # Bound here on port 0 and handed to the server, so the port is known before it serves.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sys.stdout.write(f"listening {sock.getsockname()[1]}\n")
    sys.stdout.flush()
    {"http-server": serve_http_server, "wsgi": serve_wsgi, "asgi": serve_asgi}[args.kind](sock, webhook)
    return 0


if __name__ == "__main__":
    sys.exit(main())
