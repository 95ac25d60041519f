#!/usr/bin/env python3
"""A voice-chat client for chat-relay's voice dialect, and a check of what the relay promises it.

The voice front end speaks `{"type", "data"}` frames at `ws://HOST/ws/session/{session_id}`:
it sends `request_ai_response` (a transcribed message, an emotion, a timestamp) and speaks the
reply as it streams: `ai_stream_begin`, `ai_stream_chunk` (`data.chunk`), `ai_stream_complete`,
or `ai_stream_error` (`data.error`, a short sentence).

The script creates a session (`POST /api/sessions`), connects, asks, prints each chunk as it
arrives (what a speech synthesiser would read), and checks that:

  * the reply comes in three stages, every chunk in `data.chunk` (never `data.text`);
  * the chunks add up to the reply the relay stored (`GET /api/sessions/{id}/messages`), whose
    id is the `message_id` of `ai_stream_complete`;
  * the request was stored as the user's message, trimmed;
  * a refused request (too long, an unknown emotion) gets an `ai_stream_error` with the relay's
    code, stores nothing, and leaves the socket open: the next request is answered;
  * a session that does not exist is answered "the session has expired" (`not_found`).

Exit code 0 when all of that holds; 1 with a `FAIL: ...` line saying what did not. Every wait has
a timeout (--timeout, 20 s), so it never hangs.

    python voice_client.py --url ws://127.0.0.1:3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
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


class Voice:
    """One voice connection."""

    def __init__(self, ws: ClientConnection, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout

    @classmethod
    async def open(cls, base_url: str, session_id: str, timeout: float) -> "Voice":
        url = f"{base_url.rstrip('/')}/ws/session/{session_id}?role=user"
        try:
            ws = await connect(url, open_timeout=timeout, close_timeout=timeout)
        except InvalidStatus as err:
            raise Failure(f"the relay refused {url}: HTTP {err.response.status_code}") from err
        except (OSError, asyncio.TimeoutError, WebSocketException) as err:
            raise Failure(f"cannot connect to {url}: {err!r}") from err
        return cls(ws, timeout)

    async def frame(self) -> dict[str, Any]:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), self.timeout)
        except asyncio.TimeoutError as err:
            raise Failure(f"no frame from the relay within {self.timeout} s") from err
        frame = json.loads(raw)
        check(isinstance(frame, dict) and "type" in frame and isinstance(frame.get("data"), dict),
              f"not a voice frame: {raw}")
        return frame

    async def ask(self, message: str, emotion: str | None = None) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """Sends a request; returns the spoken text, the begin frame and the last frame."""
        data: dict[str, Any] = {"message": message, "timestamp": int(time.time() * 1000)}
        if emotion is not None:
            data["emotion"] = emotion
        await self.ws.send(json.dumps({"type": "request_ai_response", "data": data}))
        first = await self.frame()
        if first["type"] == "ai_stream_error":
            return "", first, first
        check(first["type"] == "ai_stream_begin", f"expected ai_stream_begin, got {first}")
        spoken: list[str] = []
        print("    speaks: ", end="")
        while True:
            frame = await self.frame()
            kind, body = frame["type"], frame["data"]
            if kind == "ai_stream_chunk":
                check("chunk" in body and "text" not in body, f"a chunk is data.chunk: {frame}")
                spoken.append(body["chunk"])
                print(body["chunk"], end="", flush=True)
            elif kind in ("ai_stream_complete", "ai_stream_error"):
                if spoken:
                    print()
                return "".join(spoken), first, frame
            else:
                raise Failure(f"unexpected frame in a reply: {frame}")


async def run(args: argparse.Namespace) -> None:
    http_base = args.url.replace("ws://", "http://", 1).replace("wss://", "https://", 1).rstrip("/")
    session_id = args.session or f"py-voice-{secrets.token_hex(4)}"
    status, created = http("POST", f"{http_base}/api/sessions", {"session_id": session_id})
    check(status == 201, f"POST /api/sessions answered {status}: {created}")
    print(f"relay {args.url}  session {session_id}")

    voice = await Voice.open(args.url, session_id, args.timeout)
    print(f"  ask (anxious): {args.message!r}")
    text, begin, end = await voice.ask(f"  {args.message}  ", emotion="anxious")
    check(end["type"] == "ai_stream_complete", f"the reply ended with {end}")
    turn = begin["data"].get("turn_id")
    check(end["data"].get("turn_id") == turn, f"complete names another turn: {end}")
    check(text != "", "the reply was empty")

    status, history = http("GET", f"{http_base}/api/sessions/{session_id}/messages")
    check(status == 200, f"messages answered {status}: {history}")
    messages = history["messages"]
    asked = [m for m in messages if m["role"] == "user"]
    replies = [m for m in messages if m["role"] == "assistant"]
    check(len(asked) == 1 and asked[0]["content"] == args.message,
          f"the request was not stored trimmed: {asked}")
    check(asked[0]["message_id"] == turn, f"the turn id is not the request's id: {turn} vs {asked}")
    check(len(replies) == 1, f"expected one stored reply: {replies}")
    check(replies[0]["content"] == text,
          f"the chunks do not add up to the stored reply:\n  spoken {text!r}\n  stored {replies[0]['content']!r}")
    check(replies[0]["message_id"] == end["data"].get("message_id"),
          f"complete's message_id {end['data'].get('message_id')} is not the stored reply's")
    print(f"  the chunks add up to the stored reply ({len(text)} characters)")

    for message, emotion, code in [("x" * 2001, None, "text_too_long"), ("hi", "bored", "invalid_emotion")]:
        _, _, refused = await voice.ask(message, emotion)
        check(refused["type"] == "ai_stream_error" and refused["data"].get("code") == code,
              f"expected an ai_stream_error {code}, got {refused}")
        check(isinstance(refused["data"].get("error"), str) and refused["data"]["error"],
              f"an error needs a sentence: {refused}")
        print(f"  refused ({code}): {refused['data']['error']!r}")
    status, history = http("GET", f"{http_base}/api/sessions/{session_id}/messages")
    check(len(history["messages"]) == 2, f"a refused request was stored: {history['messages']}")

    _, _, again = await voice.ask("one more thing")
    check(again["type"] == "ai_stream_complete", f"the socket did not stay usable: {again}")
    print("  the socket stayed open after the refusals")
    await voice.ws.close()

    gone = await Voice.open(args.url, f"py-voice-none-{secrets.token_hex(4)}", args.timeout)
    _, _, expired = await gone.ask("hello?")
    check(expired["type"] == "ai_stream_error" and expired["data"].get("code") == "not_found",
          f"an unknown session should have expired: {expired}")
    print(f"  unknown session: {expired['data']['error']!r}")
    await gone.ws.close()
    print(f"OK: session {session_id}: three-stage reply, equal to the stored one; refusals kept the socket")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:3000", help="the relay's base URL")
    parser.add_argument("--session", help="session id to create (default: a fresh one)")
    parser.add_argument("--message", default="I feel a bit nervous about tomorrow",
                        help="what the user says")
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
