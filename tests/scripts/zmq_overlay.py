#!/usr/bin/env python3
"""A vLLM-shaped ZeroMQ exchange over meshtun's overlay addresses.

`router` binds a ROUTER on tcp://ADDRESS:PORT (the node's overlay address)
and a PULL socket on ADDRESS at a port zmq picks (`bind_to_random_port`).
Each `dealer` (one process per host, rank R) connects a DEALER to
tcp://ADDRESS:PORT and says "hello"; the ROUTER answers with the PULL
endpoint, as vLLM's coordinator announces its ports. The dealer connects a
PUSH socket to that endpoint and sends --messages messages (rank, sequence
number, payload and its SHA-256), then says "done" on the DEALER; the
ROUTER answers "ack" once its PULL has received and checked every message
of that rank. Both sides wait at most --timeout seconds in total, print one
"OK ..." line and exit 0, or print why to stderr and exit 1.

Used by tests/tests/lab_overlay.rs, which runs it inside lab hosts.
"""

import argparse
import hashlib
import json
import sys
import time

import zmq

PAYLOAD_SIZE = 8192


def identity(rank):
    return f"dp-rank-{rank}".encode()


def payload(rank, sequence):
    seed = hashlib.sha256(f"{rank}:{sequence}".encode()).digest()
    return (seed * (PAYLOAD_SIZE // len(seed) + 1))[:PAYLOAD_SIZE]


def fail(side, message):
    print(f"{side} FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def remaining_ms(deadline, side):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        fail(side, "timed out")
    return int(remaining * 1000)


def router(args):
    side = "router"
    context = zmq.Context()
    control = context.socket(zmq.ROUTER)
    control.setsockopt(zmq.ROUTER_MANDATORY, 1)
    control.setsockopt(zmq.LINGER, 5000)
    control.bind(f"tcp://{args.address}:{args.port}")
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull_port = pull.bind_to_random_port(f"tcp://{args.address}")
    pull_endpoint = f"tcp://{args.address}:{pull_port}"
    print(f"router listening control={args.port} pull={pull_port}", flush=True)
    deadline = time.monotonic() + args.timeout
    expected = {identity(rank): rank for rank in range(1, args.dealers + 1)}
    next_sequence = {rank: 0 for rank in expected.values()}
    hello = set()
    done = set()
    acked = set()
    received = 0
    received_bytes = 0
    poller = zmq.Poller()
    poller.register(control, zmq.POLLIN)
    poller.register(pull, zmq.POLLIN)
    while len(acked) < args.dealers:
        events = dict(poller.poll(remaining_ms(deadline, side)))
        if not events:
            fail(side, f"timed out: hello={len(hello)} received={received} done={len(done)}")
        if control in events:
            frames = control.recv_multipart()
            if len(frames) != 2:
                fail(side, f"expected 2 frames on the ROUTER, got {len(frames)}")
            name, kind = frames
            if name not in expected:
                fail(side, f"unknown identity {name!r}")
            if kind == b"hello":
                hello.add(name)
                announce = {"pull": pull_endpoint, "rank": expected[name], "messages": args.messages}
                control.send_multipart([name, b"ports", json.dumps(announce).encode()])
            elif kind == b"done":
                done.add(name)
            else:
                fail(side, f"unexpected {kind!r} from {name!r}")
        if pull in events:
            frames = pull.recv_multipart()
            if len(frames) != 3:
                fail(side, f"expected 3 frames on the PULL, got {len(frames)}")
            meta = json.loads(frames[0])
            blob = frames[2]
            rank, sequence = meta.get("rank"), meta.get("sequence")
            if rank not in next_sequence:
                fail(side, f"message from unknown rank {rank}")
            if sequence != next_sequence[rank]:
                fail(side, f"rank {rank}: expected message {next_sequence[rank]}, got {sequence}")
            if blob != payload(rank, sequence) or frames[1] != hashlib.sha256(blob).hexdigest().encode():
                fail(side, f"rank {rank}: message {sequence} differs")
            next_sequence[rank] = sequence + 1
            received += 1
            received_bytes += len(blob)
        for name in done - acked:
            if next_sequence[expected[name]] == args.messages:
                control.send_multipart([name, b"ack", str(args.messages).encode()])
                acked.add(name)
    print(
        f"router OK dealers={len(acked)} messages={received} bytes={received_bytes} pull_port={pull_port}",
        flush=True,
    )
    control.close(linger=5000)
    pull.close(linger=0)
    context.term()


def dealer(args):
    side = f"dealer-{args.rank}"
    context = zmq.Context()
    control = context.socket(zmq.DEALER)
    control.setsockopt(zmq.IDENTITY, identity(args.rank))
    control.setsockopt(zmq.LINGER, 1000)
    control.connect(f"tcp://{args.address}:{args.port}")
    deadline = time.monotonic() + args.timeout
    control.send_multipart([b"hello"])
    if not control.poll(remaining_ms(deadline, side), zmq.POLLIN):
        fail(side, "no answer to hello")
    frames = control.recv_multipart()
    if len(frames) != 2 or frames[0] != b"ports":
        fail(side, f"expected a ports message, got {frames!r}")
    announce = json.loads(frames[1])
    if announce.get("rank") != args.rank or announce.get("messages") != args.messages:
        fail(side, f"wrong announcement {announce}")
    endpoint = announce["pull"]
    if not endpoint.startswith(f"tcp://{args.address}:"):
        fail(side, f"the PULL endpoint {endpoint} is not on {args.address}")
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, int(args.timeout * 1000))
    push.setsockopt(zmq.SNDTIMEO, remaining_ms(deadline, side))
    push.connect(endpoint)
    for sequence in range(args.messages):
        blob = payload(args.rank, sequence)
        meta = {"rank": args.rank, "sequence": sequence}
        try:
            push.send_multipart([json.dumps(meta).encode(), hashlib.sha256(blob).hexdigest().encode(), blob])
        except zmq.Again:
            fail(side, f"could not send message {sequence} in time")
    control.send_multipart([b"done"])
    if not control.poll(remaining_ms(deadline, side), zmq.POLLIN):
        fail(side, "no ack")
    frames = control.recv_multipart()
    if frames != [b"ack", str(args.messages).encode()]:
        fail(side, f"expected an ack, got {frames!r}")
    print(f"{side} OK messages={args.messages} pull={endpoint}", flush=True)
    push.close(linger=1000)
    control.close(linger=1000)
    context.term()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["router", "dealer"])
    parser.add_argument("--address", required=True, help="the ROUTER node's overlay address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dealers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    if args.mode == "router":
        router(args)
    else:
        dealer(args)


if __name__ == "__main__":
    main()
