#!/usr/bin/env python3
"""A ZeroMQ ROUTER/DEALER exchange shaped like vLLM's data-parallel handshake.

`server` binds a ROUTER on ADDRESS:PORT (--address, default 127.0.0.1);
`client` connects DEALERs (one per data-parallel rank, each with its own
identity) to ADDRESS:PORT. Each round,
every DEALER sends a "ready" message (metadata plus a few KB of payload) and
the ROUTER answers that identity with a "config" message. Both sides check
every field and byte, wait at most --timeout seconds in total, print one
"OK ..." line and exit 0, or print why to stderr and exit 1.

Used by tests/tests/lab_clients.rs, which runs it inside lab hosts.
"""

import argparse
import hashlib
import json
import sys
import time

import zmq

PAYLOAD_SIZE = 4096


def identity(rank):
    return f"dp-rank-{rank}".encode()


def payload(name, round_index):
    seed = hashlib.sha256(name + b":" + str(round_index).encode()).digest()
    return (seed * (PAYLOAD_SIZE // len(seed) + 1))[:PAYLOAD_SIZE]


def fail(side, message):
    print(f"{side} FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def receive(socket, deadline, side):
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not socket.poll(int(remaining * 1000), zmq.POLLIN):
        fail(side, "timed out waiting for a message")
    return socket.recv_multipart()


def server(args):
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.LINGER, 5000)
    router.bind(f"tcp://{args.address}:{args.port}")
    print("server listening", flush=True)
    deadline = time.monotonic() + args.timeout
    next_round = {identity(rank): 0 for rank in range(args.dealers)}
    handled = 0
    while handled < args.dealers * args.rounds:
        frames = receive(router, deadline, "server")
        if len(frames) != 4:
            fail("server", f"expected 4 frames, got {len(frames)}")
        name, kind, meta_raw, blob = frames
        if name not in next_round:
            fail("server", f"unknown identity {name!r}")
        if kind != b"ready":
            fail("server", f"expected 'ready' from {name!r}, got {kind!r}")
        meta = json.loads(meta_raw)
        expected_round = next_round[name]
        if meta.get("identity") != name.decode() or meta.get("round") != expected_round:
            fail("server", f"bad metadata from {name!r}: {meta}")
        if blob != payload(name, expected_round):
            fail("server", f"payload from {name!r} round {expected_round} differs")
        if meta.get("sha256") != hashlib.sha256(blob).hexdigest():
            fail("server", f"payload hash from {name!r} differs")
        rank = int(name.decode().rsplit("-", 1)[1])
        config = {
            "identity": name.decode(),
            "round": expected_round,
            "data_parallel_rank": rank,
            "data_parallel_size": args.dealers,
            "payload_sha256": meta["sha256"],
            "engine_config": {"max_num_seqs": 256, "block_size": 16, "dtype": "bfloat16"},
        }
        router.send_multipart([name, b"config", json.dumps(config).encode()])
        next_round[name] = expected_round + 1
        handled += 1
    print(f"server OK messages={handled}", flush=True)
    router.close(linger=5000)
    context.term()


def client(args):
    context = zmq.Context()
    dealers = []
    for rank in range(args.dealers):
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, identity(rank))
        dealer.setsockopt(zmq.LINGER, 1000)
        dealer.connect(f"tcp://{args.address}:{args.port}")
        dealers.append((identity(rank), dealer))
    deadline = time.monotonic() + args.timeout
    rounds = 0
    for round_index in range(args.rounds):
        for name, dealer in dealers:
            blob = payload(name, round_index)
            meta = {
                "identity": name.decode(),
                "round": round_index,
                "sha256": hashlib.sha256(blob).hexdigest(),
                "local_rank": 0,
            }
            dealer.send_multipart([b"ready", json.dumps(meta).encode(), blob])
        for name, dealer in dealers:
            frames = receive(dealer, deadline, "client")
            if len(frames) != 2 or frames[0] != b"config":
                fail("client", f"{name!r} expected a config message, got {frames!r}")
            config = json.loads(frames[1])
            if config.get("identity") != name.decode() or config.get("round") != round_index:
                fail("client", f"{name!r} got the wrong config: {config}")
            if config.get("payload_sha256") != hashlib.sha256(payload(name, round_index)).hexdigest():
                fail("client", f"{name!r} config echoes the wrong payload hash")
            if config.get("data_parallel_size") != args.dealers:
                fail("client", f"{name!r} config has the wrong size: {config}")
        rounds += 1
    print(f"client OK rounds={rounds} dealers={len(dealers)} messages={rounds * len(dealers)}", flush=True)
    for _, dealer in dealers:
        dealer.close(linger=1000)
    context.term()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["server", "client"])
    parser.add_argument("--address", default="127.0.0.1", help="where the ROUTER binds and the DEALERs connect")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dealers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    if args.mode == "server":
        server(args)
    else:
        client(args)


if __name__ == "__main__":
    main()
