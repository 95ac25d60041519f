#!/usr/bin/env python3
"""Redis CPU per entry of `append.lua`, or of two versions of it side by side.

    scripts/append-cost.py [A.lua [B.lua]]      (default: src/store/append.lua)

Starts its own redis-server on a free port (stopped by PID at the end), loads each script and
calls it with batches shaped like the relay's (9 keys, 10 head arguments, a body and a cid field
per entry, one kind) over 50 rooms, 4 calls in flight. Redis's own accounting (`INFO
commandstats`, usec per EVALSHA) divided by the batch size gives the cost per entry, without the
client's or the network's share. With two scripts the rounds alternate (A B, B A, ...), so a
noisy machine moves both alike: compare the pairs, not absolute values across runs.

Environment: BATCH (entries per call, 35 as under S1), CALLS (per round, 300), ROUNDS (8),
NOCID=1 (entries without cids: no dedup), HELD=0 (no subscriber, so the script publishes the
bodies; by default one connection follows every room, as a lone relay node does). With HELD=0
nobody receives the publish, so Redis's cost of writing the bodies to subscribers is not in the
figure. The first round also pays for creating the rooms' keys.

Built to find where the script's cost goes: an empty script against it is the price of receiving
the arguments, a script that only XADDs each entry is the floor of any Lua append.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = int(os.environ.get("BATCH", 35))
CALLS = int(os.environ.get("CALLS", 300))
ROUNDS = int(os.environ.get("ROUNDS", 8))
NOCID = os.environ.get("NOCID") == "1"
HELD = os.environ.get("HELD", "1") == "1"
ROOMS = [f"cost{r}" for r in range(50)]


def enc(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def read(self):
        line = self.buf.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind in (b"+", b":"):
            return rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.buf.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")

    def cmd(self, *args):
        self.send(enc(*args))
        return self.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch(room, seq):
    tag = "{" + room + "}"
    keys = [f"chat:session:{tag}"] + [
        f"chat:{k}:{tag}" for k in ("stats", "meta", "awake", "turn", "att", "act", "c0", "c1")
    ]
    args = [100000, "llm", 600, 0, 0, 600000, "any", "", "tok" if HELD else "", bytes([1] * BATCH)]
    pad = "x" * 200
    for _ in range(BATCH):
        seq += 1
        cid = f"p{os.getpid()}.{seq % 200}.{seq}"
        body = (
            '{"hd":{"event":"chat.message","role":"A","cid":"%s"},'
            '"bd":{"text":"%s","seq":%d,"sender":1,"t":%d}}' % (cid, pad, seq, time.time_ns())
        )
        args += [body, "" if NOCID else f"1:A:{cid}"]
    return keys, args + ["A", "chat.message"], seq


def evalsha_usec(conn):
    for line in conn.cmd("INFO", "commandstats").decode().split("\r\n"):
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            return int(fields["calls"]), int(fields["usec"])
    return 0, 0


def main():
    files = sys.argv[1:3] or [os.path.join(ROOT, "src/store/append.lua")]
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="append-cost.")
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                conn = Conn(port)
                break
            except OSError:
                time.sleep(0.05)
        else:
            sys.exit("redis-server did not start")
        shas = [conn.cmd("SCRIPT", "LOAD", open(f).read()).decode() for f in files]
        # A subscriber that drains in the background: the held path's `-i` messages need one.
        if HELD:
            sub = Conn(port)
            for r in ROOMS:
                sub.send(enc("SSUBSCRIBE", f"chat:session:{{{r}}}"))
            for _ in ROOMS:
                sub.read()
            drain = subprocess.Popen(
                ["sh", "-c", "cat >/dev/null"], stdin=sub.sock.fileno()
            )
        results = {i: [] for i in range(len(files))}
        seq = 0
        for r in range(ROUNDS):
            order = list(range(len(files)))
            if r % 2:
                order.reverse()
            for which in order:
                conn.cmd("CONFIG", "RESETSTAT")
                pending = 0
                replies = []
                for k in range(CALLS):
                    keys, args, seq = batch(ROOMS[k % len(ROOMS)], seq)
                    conn.send(enc("EVALSHA", shas[which], len(keys), *keys, *args))
                    pending += 1
                    if pending >= 4:
                        replies.append(conn.read())
                        pending -= 1
                while pending:
                    replies.append(conn.read())
                    pending -= 1
                # append.lua answers {woke, held, ...}: make sure the path asked for is the one
                # measured (a script under test may answer anything else).
                if os.path.basename(files[which]) == "append.lua":
                    held = {r[1] for r in replies}
                    if held != {b"1" if HELD else b"0"}:
                        sys.exit(f"{files[which]}: held flags {held}, expected HELD={int(HELD)}")
                calls, usec = evalsha_usec(conn)
                results[which].append(usec / calls / BATCH)
        for i, f in enumerate(files):
            v = sorted(results[i])
            print(
                f"{os.path.relpath(f)}: median {v[len(v) // 2]:.2f} µs/entry (min {v[0]:.2f});"
                f" rounds {' '.join(f'{x:.2f}' for x in results[i])}"
            )
        if len(files) == 2:
            pairs = [b / a for a, b in zip(results[0], results[1])]
            pairs.sort()
            print(f"B ÷ A per round: median {pairs[len(pairs) // 2]:.2f} (range {pairs[0]:.2f}-{pairs[-1]:.2f})")
        if HELD:
            drain.kill()
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
