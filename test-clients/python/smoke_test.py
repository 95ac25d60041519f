#!/usr/bin/env python3
"""End-to-end smoke test for chat-relay, from the outside: WebSocket in, Redis Stream out.

Two participants, A and B, join one room, exchange five chat messages (A, B, A, B, A) and the
script checks what the relay promises:

  * each sender gets a `chat.ack` (matched by `hd.cid`) carrying the entry's stream id;
  * both sockets receive all five `chat.message` entries, in the same order, with the same
    `hd.id`s as the acks (and every stored entry at most once, in increasing id order);
  * the room's stream (`XRANGE <prefix><sid> - +`, read with redis-py) holds every acked id with
    the fields `participant`, `event` and `body`, the body's `bd.text` is exactly what was sent
    (UTF-8 intact, not escaped), and the chat messages per participant are A: 3, B: 2.

It then prints the room like the prior check script did (id, participant, event, text; then the
messages per participant). Exit code 0 when everything holds, 1 with a message saying what did
not. Every wait has a timeout (--timeout, 10 s by default), so it never hangs.

    python smoke_test.py --url ws://127.0.0.1:3000 --redis redis://127.0.0.1:6379
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections import Counter
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

# The conversation: (role, text). One line mixes Korean, Japanese and emoji to check that
# multi-byte text survives the relay and the stream byte for byte.
SCRIPT: list[tuple[str, str]] = [
    ("A", "hello from A"),
    ("B", "hi A, B here"),
    ("A", "안녕하세요! こんにちは 🎉👋"),
    ("B", "multi-byte text arrived? 한국어 OK ✅"),
    ("A", "bye for now"),
]
EXPECTED_COUNTS = {"A": 3, "B": 2}


class SmokeFailure(Exception):
    """A check failed; the message says which and why."""


class Participant:
    """One WebSocket connection. A reader task keeps every frame, in arrival order."""

    def __init__(self, role: str, ws: ClientConnection, timeout: float) -> None:
        self.role = role
        self.ws = ws
        self.timeout = timeout
        self.frames: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._closed: str | None = None
        self._reader = asyncio.create_task(self._read(), name=f"reader-{role}")

    @classmethod
    async def join(cls, base_url: str, sid: str, role: str, timeout: float) -> "Participant":
        url = f"{base_url.rstrip('/')}/v1/session/chat?sid={sid}&role={role}"
        try:
            ws = await connect(url, open_timeout=timeout, close_timeout=timeout, max_size=2**22)
        except InvalidStatus as err:
            body = err.response.body.decode("utf-8", "replace") if err.response.body else ""
            raise SmokeFailure(
                f"{role}: relay refused the handshake for {url}: "
                f"HTTP {err.response.status_code} {body}"
            ) from err
        except (OSError, asyncio.TimeoutError, WebSocketException) as err:
            raise SmokeFailure(
                f"{role}: cannot connect to {url}: {err!r} (is the relay running?)"
            ) from err
        return cls(role, ws, timeout)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    frame: dict[str, Any] = {"hd": {"event": "<binary>"}, "bd": {}}
                else:
                    try:
                        frame = json.loads(raw)
                    except json.JSONDecodeError:
                        frame = {"hd": {"event": "<not json>"}, "bd": {"raw": raw}}
                self.frames.append(frame)
                self._changed.set()
        except WebSocketException as err:
            self._closed = repr(err)
        finally:
            if self._closed is None:
                code = self.ws.close_code
                reason = self.ws.close_reason
                self._closed = f"closed by the relay (code {code}, reason {reason!r})"
            self._changed.set()

    async def wait_for(
        self, what: str, found: Callable[[list[dict[str, Any]]], Any]
    ) -> Any:
        """Wait until `found(frames)` returns something truthy; fail after the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            result = found(self.frames)
            if result:
                return result
            if self._closed is not None:
                raise SmokeFailure(f"{self.role}: socket {self._closed} while waiting for {what}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise SmokeFailure(
                    f"{self.role}: no {what} within {self.timeout:g} s; "
                    f"last frames: {summarise(self.frames[-5:])}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def send(self, envelope: dict[str, Any]) -> None:
        await asyncio.wait_for(self.ws.send(json.dumps(envelope, ensure_ascii=False)), self.timeout)

    def errors(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if event_of(f) == "error"]

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), self.timeout)
        except (asyncio.TimeoutError, WebSocketException, OSError):
            pass
        self._reader.cancel()
        try:
            await self._reader
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down anyway
            pass


def event_of(frame: dict[str, Any]) -> str:
    hd = frame.get("hd")
    return hd.get("event", "?") if isinstance(hd, dict) else "?"


def summarise(frames: list[dict[str, Any]]) -> str:
    return "; ".join(json.dumps(f, ensure_ascii=False)[:160] for f in frames) or "(none)"


def is_stored(frame: dict[str, Any]) -> bool:
    """A delivered stream entry: it has `hd.id` and is not an ack (acks carry the id too)."""
    hd = frame.get("hd")
    return isinstance(hd, dict) and bool(hd.get("id")) and hd.get("event") not in ("chat.ack", "error")


def id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


async def own_join(p: Participant) -> str:
    """A fresh connection's first stored frame is its own `session.join`."""

    def first_stored(frames: list[dict[str, Any]]) -> dict[str, Any] | None:
        return next((f for f in frames if is_stored(f)), None)

    frame = await p.wait_for("session.join", first_stored)
    hd = frame["hd"]
    if hd.get("event") != "session.join" or hd.get("role") != p.role:
        raise SmokeFailure(
            f"{p.role}: the first stored frame should be its own session.join (role {p.role}), "
            f"got {summarise([frame])}"
        )
    return hd["id"]


def check_delivery(p: Participant, acked: list[tuple[str, str, str]]) -> None:
    """Both sockets: the five messages in ack order, same ids, same text; stored ids rise."""
    stored_ids = [f["hd"]["id"] for f in p.frames if is_stored(f)]
    if len(stored_ids) != len(set(stored_ids)):
        dupes = [i for i, n in Counter(stored_ids).items() if n > 1]
        raise SmokeFailure(f"{p.role}: stored entries delivered more than once: {dupes}")
    if stored_ids != sorted(stored_ids, key=id_key):
        raise SmokeFailure(f"{p.role}: stored entries out of stream order: {stored_ids}")
    got = [f for f in p.frames if event_of(f) == "chat.message"]
    got_ids = [f["hd"].get("id") for f in got]
    want_ids = [stream_id for stream_id, _, _ in acked]
    if got_ids != want_ids:
        raise SmokeFailure(
            f"{p.role}: chat.message ids differ from the acks\n  acks:     {want_ids}\n"
            f"  received: {got_ids}"
        )
    for frame, (stream_id, role, text) in zip(got, acked):
        if frame["hd"].get("role") != role or frame.get("bd", {}).get("text") != text:
            raise SmokeFailure(
                f"{p.role}: entry {stream_id} should be {role}: {text!r}, "
                f"got {summarise([frame])}"
            )


async def converse(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Join A and B, exchange the messages, check delivery. Returns (id, role, text) per ack."""
    people: dict[str, Participant] = {}
    try:
        for role in ("A", "B"):
            people[role] = await Participant.join(args.url, args.sid, role, args.timeout)
            join_id = await own_join(people[role])
            print(f"{role} joined room {args.sid!r} (session.join {join_id})")

        acked: list[tuple[str, str, str]] = []
        for n, (role, text) in enumerate(SCRIPT, start=1):
            cid = f"smoke-{n}"
            sender = people[role]
            await sender.send(
                {"hd": {"event": "chat.message", "role": role, "cid": cid}, "bd": {"text": text}}
            )

            def reply(frames: list[dict[str, Any]], cid: str = cid) -> dict[str, Any] | None:
                return next(
                    (
                        f
                        for f in frames
                        if event_of(f) in ("chat.ack", "error") and f["hd"].get("cid") == cid
                    ),
                    None,
                )

            answer = await sender.wait_for(f"chat.ack for cid {cid}", reply)
            if event_of(answer) == "error":
                raise SmokeFailure(f"{role}: message {cid} refused: {summarise([answer])}")
            stream_id = answer["hd"].get("id")
            if not isinstance(stream_id, str) or "-" not in stream_id:
                raise SmokeFailure(f"{role}: ack for {cid} has no stream id: {summarise([answer])}")
            acked.append((stream_id, role, text))
            print(f"  {role} sent {cid} -> acked {stream_id}")

        if [i for i, _, _ in acked] != sorted((i for i, _, _ in acked), key=id_key):
            raise SmokeFailure(f"acked ids are not increasing: {[i for i, _, _ in acked]}")

        want = {stream_id for stream_id, _, _ in acked}
        for p in people.values():

            def all_arrived(frames: list[dict[str, Any]]) -> bool:
                seen = {f["hd"].get("id") for f in frames if event_of(f) == "chat.message"}
                return want <= seen

            await p.wait_for(f"all {len(acked)} chat.message entries", all_arrived)
            check_delivery(p, acked)
            print(f"{p.role} received all {len(acked)} messages in ack order")

        for p in people.values():
            if p.errors():
                raise SmokeFailure(f"{p.role}: unexpected error frames: {summarise(p.errors())}")
        return acked
    finally:
        await asyncio.gather(*(p.close() for p in people.values()))


def field(fields: dict[bytes, bytes], name: str) -> str | None:
    raw = fields.get(name.encode())
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")  # strict: a mangled byte fails here
    except UnicodeDecodeError as err:
        raise SmokeFailure(f"field {name!r} is not valid UTF-8: {raw!r}") from err


def entry_text(body: str | None) -> str:
    try:
        env = json.loads(body or "")
        bd = env.get("bd", {})
        text = bd.get("text") or bd.get("message") or bd.get("delta") or ""
        return str(text).replace("\n", " ")
    except (ValueError, AttributeError):
        return body or ""


async def check_stream(args: argparse.Namespace, acked: list[tuple[str, str, str]]) -> None:
    key = f"{args.prefix}{args.sid}"
    client = aioredis.from_url(
        args.redis, socket_timeout=args.timeout, socket_connect_timeout=args.timeout
    )
    try:
        entries = await asyncio.wait_for(client.xrange(key, "-", "+"), args.timeout)
    except (RedisError, OSError, asyncio.TimeoutError) as err:
        raise SmokeFailure(
            f"cannot read {key} from {args.redis}: {type(err).__name__}: {err}"
        ) from err
    finally:
        await client.aclose()

    rows: list[tuple[str, str, str, str]] = []  # id, participant, event, text
    by_id: dict[str, tuple[str | None, str | None, str | None]] = {}
    for raw_id, fields in entries:
        stream_id = raw_id.decode()
        participant, event, body = (field(fields, n) for n in ("participant", "event", "body"))
        by_id[stream_id] = (participant, event, body)
        rows.append((stream_id, participant or "?", event or "?", entry_text(body)))

    print(f"\nXRANGE {key} - +   ({len(entries)} entries)")
    width = max((len(r[0]) for r in rows), default=15)
    for stream_id, participant, event, text in rows:
        print(f"  {stream_id:<{width}}  {participant:<4} {event:<13} {text}")

    for stream_id, role, text in acked:
        if stream_id not in by_id:
            raise SmokeFailure(f"acked id {stream_id} ({role}: {text!r}) is not in {key}")
        participant, event, body = by_id[stream_id]
        if participant is None or event is None or body is None:
            raise SmokeFailure(f"entry {stream_id} lacks participant/event/body: {by_id[stream_id]}")
        if participant != role or event != "chat.message":
            raise SmokeFailure(
                f"entry {stream_id}: participant/event are {participant}/{event}, "
                f"expected {role}/chat.message"
            )
        try:
            env = json.loads(body)
        except ValueError as err:
            raise SmokeFailure(f"entry {stream_id}: body is not JSON: {body!r}") from err
        if env.get("bd", {}).get("text") != text:
            raise SmokeFailure(
                f"entry {stream_id}: bd.text is {env.get('bd', {}).get('text')!r}, sent {text!r}"
            )
        if env.get("hd", {}).get("sid") != args.sid or env.get("hd", {}).get("role") != role:
            raise SmokeFailure(f"entry {stream_id}: hd.sid/hd.role do not match: {body}")
        if not text.isascii() and text not in body:
            raise SmokeFailure(
                f"entry {stream_id}: text is not stored as plain UTF-8 (escaped?): {body}"
            )

    counts = Counter(p for _, p, e, _ in rows if e == "chat.message")
    print("\nchat.message entries per participant:")
    for participant in sorted(counts):
        print(f"  {participant}: {counts[participant]}")
    if dict(counts) != EXPECTED_COUNTS:
        raise SmokeFailure(f"per-participant counts are {dict(counts)}, expected {EXPECTED_COUNTS}")


async def main_async(args: argparse.Namespace) -> None:
    print(f"relay {args.url}  redis {args.redis}  room {args.sid}")
    acked = await converse(args)
    await check_stream(args, acked)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="ws://127.0.0.1:3000", help="relay base URL (ws://HOST:PORT)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis URL the relay uses")
    ap.add_argument(
        "--sid",
        default=f"py-smoke-{secrets.token_hex(4)}",
        help="room id (default: a fresh py-smoke-<random> so runs never collide)",
    )
    ap.add_argument("--prefix", default="chat:session:", help="stream key prefix (--key-prefix)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds for every wait")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(asyncio.wait_for(main_async(args), args.timeout * 6))
    except SmokeFailure as err:
        print(f"\nFAIL: {err}", file=sys.stderr)
        return 1
    except asyncio.TimeoutError:
        print(f"\nFAIL: the whole run took longer than {args.timeout * 6:g} s", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"\nOK: room {args.sid}: {len(SCRIPT)} messages acked, delivered to A and B in order, stored intact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
