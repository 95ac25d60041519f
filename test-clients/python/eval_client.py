#!/usr/bin/env python3
"""An evaluation-chatbot client for chat-relay's `/chat` dialect, and a check of its promises.

The evaluation front end sends `{"session_id", "message", "turn_id"}` and reads
`{"type": "delta", "content", "turn_id"}` frames, then `{"type": "done", "turn_id", "message_id",
"usage": {...}, "reason"}` or `{"type": "error", "turn_id", "code", "message"}`; it stops a turn
with `{"type": "cancel", "turn_id"}`.

The script creates a session (`POST /api/sessions`), asks one question and checks that:

  * every delta names the turn and the concatenated deltas equal the reply the relay stored
    (`GET /api/sessions/{id}/messages`), whose id is `done.message_id`; `done.usage` has the three
    token counts;
  * the same request resent on a second connection (same `turn_id`) gets the same reply and the
    same `done` again, and the session holds the question once (no second LLM call);
  * a cancel stops a turn: `done` with `reason: "cancelled"`, and what was streamed is what was
    stored (needs a reply that takes a while: the fake LLM's default does);
  * an unknown session is an `error` with `not_found` and the turn's id.

Exit code 0 when all of that holds; 1 with a `FAIL: ...` line. Every wait has a timeout.

    python eval_client.py --url ws://127.0.0.1:3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import urllib.error
import urllib.request
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException


class Failure(Exception):
    """A check failed; the message says which and why."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """A JSON call: the status and the decoded body (None when empty)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None
    except OSError as err:
        raise Failure(f"cannot reach {url}: {err} (is the relay running?)") from err


class Chat:
    """One evaluation connection."""

    def __init__(self, ws: ClientConnection, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout

    @classmethod
    async def open(cls, base_url: str, timeout: float) -> "Chat":
        url = f"{base_url.rstrip('/')}/chat"
        try:
            ws = await connect(url, open_timeout=timeout, close_timeout=timeout)
        except InvalidStatus as err:
            raise Failure(f"the relay refused {url}: HTTP {err.response.status_code}") from err
        except (OSError, asyncio.TimeoutError, WebSocketException) as err:
            raise Failure(f"cannot connect to {url}: {err!r}") from err
        return cls(ws, timeout)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def frame(self) -> dict[str, Any]:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), self.timeout)
        except asyncio.TimeoutError as err:
            raise Failure(f"no frame from the relay within {self.timeout} s") from err
        frame = json.loads(raw)
        check(isinstance(frame, dict) and "type" in frame, f"not a frame of this dialect: {raw}")
        return frame

    async def reply(self, turn_id: str, stop_after: int | None = None) -> tuple[str, dict[str, Any]]:
        """Reads a turn's deltas up to its done or error; with `stop_after`, cancels it after
        that many deltas."""
        text: list[str] = []
        while True:
            frame = await self.frame()
            check(frame.get("turn_id") == turn_id, f"a frame of another turn: {frame}")
            if frame["type"] == "delta":
                check(set(frame) == {"type", "content", "turn_id"}, f"delta fields: {frame}")
                text.append(frame["content"])
                if stop_after is not None and len(text) == stop_after:
                    await self.send({"type": "cancel", "turn_id": turn_id})
            elif frame["type"] in ("done", "error"):
                return "".join(text), frame
            else:
                raise Failure(f"unexpected frame: {frame}")


def stored_replies(http_base: str, session_id: str) -> list[dict[str, Any]]:
    status, history = http("GET", f"{http_base}/api/sessions/{session_id}/messages?limit=1000")
    check(status == 200, f"messages answered {status}: {history}")
    return history["messages"]


async def run(args: argparse.Namespace) -> None:
    http_base = args.url.replace("ws://", "http://", 1).replace("wss://", "https://", 1).rstrip("/")
    session_id = args.session or f"py-eval-{secrets.token_hex(4)}"
    status, created = http("POST", f"{http_base}/api/sessions", {"session_id": session_id})
    check(status == 201, f"POST /api/sessions answered {status}: {created}")
    print(f"relay {args.url}  session {session_id}")

    turn_id = f"py-{secrets.token_hex(3)}-1"
    request = {"session_id": session_id, "message": args.message, "turn_id": turn_id}
    first = await Chat.open(args.url, args.timeout)
    await first.send(request)
    text, done = await first.reply(turn_id)
    check(done["type"] == "done", f"the turn ended with {done}")
    check(done.get("reason") in ("stop", "length"), f"reason: {done}")
    usage = done.get("usage", {})
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        check(isinstance(usage.get(field), int), f"usage.{field} missing: {done}")
    messages = stored_replies(http_base, session_id)
    replies = [m for m in messages if m["role"] == "assistant"]
    check(len(replies) == 1 and replies[0]["content"] == text,
          f"the deltas do not add up to the stored reply:\n  deltas {text!r}\n  stored {replies}")
    check(replies[0]["message_id"] == done["message_id"], f"done.message_id is not the stored reply's")
    print(f"  {turn_id}: {len(text)} characters, equal to the stored reply {done['message_id']}")

    second = await Chat.open(args.url, args.timeout)
    await second.send(request)
    again, done_again = await second.reply(turn_id)
    check(done_again == done, f"a resend got another end:\n  {done_again}\n  {done}")
    check(again == text, "a resend got another text")
    asked = [m for m in stored_replies(http_base, session_id) if m["role"] == "user"]
    check(len(asked) == 1, f"a resend stored the question again: {asked}")
    print("  the resend got the same reply and done; the question is stored once")
    await second.ws.close()

    cancel_id = f"py-{secrets.token_hex(3)}-2"
    await first.send({"session_id": session_id, "message": "count slowly to fifty", "turn_id": cancel_id})
    streamed, ended = await first.reply(cancel_id, stop_after=2)
    check(ended["type"] == "done" and ended.get("reason") == "cancelled",
          f"a cancelled turn should end with done/cancelled: {ended}")
    stored = [m for m in stored_replies(http_base, session_id) if m["message_id"] == ended["message_id"]]
    check(len(stored) == 1 and stored[0]["content"] == streamed,
          f"the cancelled turn stored other text than streamed: {stored} vs {streamed!r}")
    print(f"  {cancel_id}: cancelled after {len(streamed)} characters, stored as streamed")

    missing = f"py-eval-none-{secrets.token_hex(4)}"
    await first.send({"session_id": missing, "message": "hello?", "turn_id": "x-1"})
    error = await first.frame()
    check(error == {"type": "error", "turn_id": "x-1", "code": "not_found",
                    "message": f"session {missing} does not exist"},
          f"an unknown session: {error}")
    print(f"  unknown session: {error['code']}: {error['message']}")
    await first.ws.close()
    print(f"OK: session {session_id}: deltas equal the stored reply, resend idempotent, cancel stops")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:3000", help="the relay's base URL")
    parser.add_argument("--session", help="session id to create (default: a fresh one)")
    parser.add_argument("--message", default="What is a relay?", help="the question")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds for each wait")
    args = parser.parse_args()
    try:
        asyncio.run(asyncio.wait_for(run(args), args.timeout * 6))
    except Failure as err:
        print(f"FAIL: {err}", file=sys.stderr)
        return 1
    except asyncio.TimeoutError:
        print("FAIL: the whole run timed out", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
