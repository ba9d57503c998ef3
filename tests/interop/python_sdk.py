#!/usr/bin/env python3
"""Drives ringwire's HTTP API with the official Python server SDK (PyPI `pusher`).

Spawned by interop.test.mjs (over http://) and tls.test.mjs (over https://, `--ssl`), which
check what a subscribed pusher-js client receives and what this script prints. Steps, in order:
  1. trigger EVENT on CHANNEL with DATA (a JSON object),
  2. channels_info(prefix_filter=PREFIX, attributes=['subscription_count']),
  3. channel_info(CHANNEL, attributes=['subscription_count']),
then one JSON object on stdout: {"trigger": ..., "channels_info": ..., "channel_info": ...}.
Any SDK error propagates, so the exit status is non-zero and the traceback is on stderr.
"""

import argparse
import json
import sys

import pusher
from pusher.requests import RequestsBackend


def trusting(ca_file):
    """The SDK's own requests adapter, verifying certificates against `ca_file`.

    With ssl=True, RequestsBackend passes verify=<the cacert.pem bundled in the SDK> to every
    request (overwriting a `verify` given in backend_options), so requests never consults
    REQUESTS_CA_BUNDLE; the test CA is trusted through the SDK's documented `backend`
    parameter (an HTTP adapter class) instead, leaving the SDK itself unmodified.
    """

    class TrustingBackend(RequestsBackend):
        def __init__(self, client, **options):
            super().__init__(client, **options)
            self.options["verify"] = ca_file

    return TrustingBackend


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--app-id", default="1")
    parser.add_argument("--key", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--event", required=True)
    parser.add_argument("--data", required=True, help="JSON object sent as the event data")
    parser.add_argument("--prefix", required=True, help="filter_by_prefix for channels_info")
    parser.add_argument("--ssl", action="store_true", help="https:// instead of http://")
    parser.add_argument("--ca-file", help="with --ssl: trust this CA (PEM) instead of the SDK's bundle")
    args = parser.parse_args()

    client = pusher.Pusher(
        app_id=u"%s" % args.app_id,
        key=args.key,
        secret=args.secret,
        host=args.host,
        port=args.port,
        ssl=args.ssl,
        timeout=5,
        backend=trusting(args.ca_file) if args.ca_file else None,
    )

    result = {
        "trigger": client.trigger(args.channel, args.event, json.loads(args.data)),
        "channels_info": client.channels_info(
            prefix_filter=args.prefix, attributes=["subscription_count"]
        ),
        "channel_info": client.channel_info(args.channel, attributes=["subscription_count"]),
    }
    json.dump(result, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
