"""A test publisher that speaks vLLM's KV-event protocol on real libzmq sockets (pyzmq).

Like vLLM's ZmqEventPublisher: a PUB socket that binds and sends [topic, seq (8 bytes BE),
payload], a ROUTER that binds and answers [b"", start_seq] with every buffered batch of
seq >= start_seq, as [b"", (topic,) seq, payload], then the end marker with seq 0xff*8 and an
empty payload. Unlike vLLM it is driven by the test, one JSON command per stdin line, so it
can skip, repeat and restart sequences and send malformed frames:

  {"op": "send", "seq": S, "payload": HEX}       publish live and buffer
  {"op": "skip", "seq": S, "payload": HEX}       buffer only (a message lost on the wire)
  {"op": "repeat", "seq": S, "n": N, "payload": HEX}  publish N batches S.. of one payload
  {"op": "raw", "frames": [HEX, ...]}            publish arbitrary frames (not buffered)
  {"op": "restart"}                              close, forget the buffer, bind the same ports
  {"op": "stop"} / {"op": "start"}               close the sockets / bind them again
  {"op": "mute_replay", "on": true}              leave replay requests unanswered
  {"op": "quit"}

It prints "ready PUB_PORT REPLAY_PORT" once bound, "ok" after each command, and
"replay FROM" when it answers a replay request.
Arguments: --buffer N (replay buffer, default 10000), --topic T, --replay-topic (send the
topic frame in replies, vLLM >= 0.26), --ports PUB REPLAY (bind these instead of free ones).
"""

import argparse
import collections
import json
import sys
import time

import zmq

END = b"\xff" * 8


def bind_retrying(sock, host, port, attempts):
    for attempt in range(attempts):
        try:
            sock.bind("tcp://%s:%d" % (host, port))
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or attempt == attempts - 1:
                raise
            time.sleep(0.01)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--buffer", type=int, default=10000)
    ap.add_argument("--topic", default="kv-events")
    ap.add_argument("--replay-topic", action="store_true")
    ap.add_argument("--ports", type=int, nargs=2, metavar=("PUB", "REPLAY"),
                    help="bind these ports (default: any free ones)")
    ap.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    args = ap.parse_args()
    topic = args.topic.encode()
    ctx = zmq.Context()
    buf = collections.deque(maxlen=args.buffer)
    ports = {"pub": 0, "replay": 0}
    if args.ports:
        ports["pub"], ports["replay"] = args.ports
    socks = {}
    muted = {"on": False}

    def bind(attempts=1):
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        if ports["pub"]:
            # After a restart in this process, libzmq releases the old listeners
            # asynchronously: the ports may take a moment. At start, a taken port fails fast.
            bind_retrying(pub, args.host, ports["pub"], attempts)
            bind_retrying(router, args.host, ports["replay"], attempts)
        else:
            pub.bind("tcp://%s:*" % args.host)
            router.bind("tcp://%s:*" % args.host)
            ports["pub"] = int(pub.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
            ports["replay"] = int(router.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        socks["pub"], socks["router"] = pub, router

    def close():
        for s in socks.values():
            s.close(0)
        socks.clear()

    bind()
    print("ready %d %d" % (ports["pub"], ports["replay"]), flush=True)
    stdin = sys.stdin.fileno()
    while True:
        poller = zmq.Poller()
        poller.register(stdin, zmq.POLLIN)
        if "router" in socks:
            poller.register(socks["router"], zmq.POLLIN)
        ready = dict(poller.poll())
        if "router" in socks and socks["router"] in ready:
            frames = socks["router"].recv_multipart()
            ident, start = frames[0], int.from_bytes(frames[-1], "big")
            if not muted["on"]:
                head = [ident, b""] + ([topic] if args.replay_topic else [])
                for seq, payload in list(buf):
                    if seq >= start:
                        socks["router"].send_multipart(head + [seq.to_bytes(8, "big"), payload])
                socks["router"].send_multipart(head + [END, b""])
                print("replay %d" % start, flush=True)
        if stdin in ready:
            line = sys.stdin.readline()
            if not line:
                break
            cmd = json.loads(line)
            op = cmd["op"]
            if op in ("send", "skip"):
                seq, payload = cmd["seq"], bytes.fromhex(cmd["payload"])
                buf.append((seq, payload))
                if op == "send":
                    socks["pub"].send_multipart([topic, seq.to_bytes(8, "big"), payload])
            elif op == "repeat":
                # n batches from seq `seq` on, all with the same payload.
                payload = bytes.fromhex(cmd["payload"])
                for seq in range(cmd["seq"], cmd["seq"] + cmd["n"]):
                    buf.append((seq, payload))
                    socks["pub"].send_multipart([topic, seq.to_bytes(8, "big"), payload])
            elif op == "raw":
                socks["pub"].send_multipart([bytes.fromhex(f) for f in cmd["frames"]])
            elif op == "restart":
                close()
                buf.clear()
                bind(attempts=300)
            elif op == "stop":
                close()
            elif op == "start":
                bind(attempts=300)
            elif op == "mute_replay":
                muted["on"] = cmd["on"]
            elif op == "quit":
                break
            print("ok", flush=True)
    close()
    ctx.term()


if __name__ == "__main__":
    main()
