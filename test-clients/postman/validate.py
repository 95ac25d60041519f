#!/usr/bin/env python3
"""Check chat-relay.postman_collection.json against the essentials of Postman Collection v2.1.

    python3 test-clients/postman/validate.py [COLLECTION] [--schema collection.json] [--no-node]

Standard library only. Checks what Postman and newman rely on when importing the file:

  * info.name, info.schema = the v2.1.0 schema URL, a non-empty item list;
  * every folder has a name and an item list; every request item has a name and a request with
    a method and a url object whose raw, protocol, host[], path[] and query[] agree;
  * headers are {key, value[, disabled: bool]}; test scripts are {listen, script: {exec: [..]}};
  * every {{variable}} used in a url or header is declared in the collection's variable list,
    and the variables this project documents (host, sid, after, token) are there with their
    defaults;
  * the JavaScript of every script parses (`node --check`, when node is installed).

With --schema PATH (a copy of the official v2.1.0 JSON schema) it also validates against that
schema with the `jsonschema` package. Exit code 0 when the file passes, 1 with one line per
problem otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_URL = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
METHODS = {"GET", "PUT", "POST", "PATCH", "DELETE", "COPY", "HEAD", "OPTIONS", "LINK", "UNLINK",
           "PURGE", "LOCK", "UNLOCK", "PROPFIND", "VIEW"}
EXPECTED_VARIABLES = {"host": "127.0.0.1:3000", "sid": "room001", "after": "0", "token": ""}
VAR_RE = re.compile(r"\{\{([^{}]+)\}\}")
DEFAULT_FILE = Path(__file__).with_name("chat-relay.postman_collection.json")


class Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.used_vars: set[str] = set()
        self.scripts: list[tuple[str, str]] = []  # (where, source)
        self.requests = 0

    def fail(self, where: str, msg: str) -> None:
        self.problems.append(f"{where}: {msg}")

    def expect_str(self, where: str, value: Any, what: str, nonempty: bool = True) -> bool:
        if not isinstance(value, str) or (nonempty and not value.strip()):
            self.fail(where, f"{what} must be a{' non-empty' if nonempty else ''} string, got {value!r}")
            return False
        return True

    def collect_vars(self, text: str) -> None:
        self.used_vars.update(v.strip() for v in VAR_RE.findall(text))

    def check(self, coll: Any) -> None:
        if not isinstance(coll, dict):
            self.fail("$", "the collection must be a JSON object")
            return
        info = coll.get("info")
        if not isinstance(info, dict):
            self.fail("$.info", "missing or not an object")
        else:
            self.expect_str("$.info.name", info.get("name"), "name")
            if info.get("schema") != SCHEMA_URL:
                self.fail("$.info.schema", f"must be {SCHEMA_URL}, got {info.get('schema')!r}")
            if "description" in info and not isinstance(info["description"], (str, dict)):
                self.fail("$.info.description", "must be a string or a description object")
        items = coll.get("item")
        if not isinstance(items, list) or not items:
            self.fail("$.item", "must be a non-empty list")
        else:
            self.check_items("$.item", items)
        self.check_events("$.event", coll.get("event", []))
        self.check_variables(coll.get("variable"))

    def check_items(self, where: str, items: list[Any]) -> None:
        names: set[str] = set()
        for i, it in enumerate(items):
            here = f"{where}[{i}]"
            if not isinstance(it, dict):
                self.fail(here, "must be an object")
                continue
            if self.expect_str(f"{here}.name", it.get("name"), "name"):
                here = f"{where}[{i}] ({it['name']})"
                if it["name"] in names:
                    self.fail(here, "duplicate name in the same folder")
                names.add(it["name"])
            if "item" in it:  # a folder
                if "request" in it:
                    self.fail(here, "an item is either a folder (item) or a request, not both")
                if not isinstance(it["item"], list):
                    self.fail(f"{here}.item", "must be a list")
                else:
                    self.check_items(f"{here}.item", it["item"])
            elif "request" in it:
                self.check_request(f"{here}.request", it["request"])
                if "response" in it and not isinstance(it["response"], list):
                    self.fail(f"{here}.response", "must be a list")
            else:
                self.fail(here, "has neither request nor item")
            self.check_events(f"{here}.event", it.get("event", []))

    def check_request(self, where: str, req: Any) -> None:
        self.requests += 1
        if not isinstance(req, dict):
            self.fail(where, "must be an object (a bare URL string is not used in this collection)")
            return
        method = req.get("method")
        if method not in METHODS:
            self.fail(f"{where}.method", f"must be an HTTP method such as GET, got {method!r}")
        self.check_url(f"{where}.url", req.get("url"))
        headers = req.get("header", [])
        if not isinstance(headers, list):
            self.fail(f"{where}.header", "must be a list")
            headers = []
        for j, h in enumerate(headers):
            hw = f"{where}.header[{j}]"
            if not isinstance(h, dict):
                self.fail(hw, "must be an object")
                continue
            self.expect_str(f"{hw}.key", h.get("key"), "key")
            if self.expect_str(f"{hw}.value", h.get("value"), "value", nonempty=False):
                self.collect_vars(h["value"])
            if "disabled" in h and not isinstance(h["disabled"], bool):
                self.fail(f"{hw}.disabled", "must be true or false")
        if "description" in req and not isinstance(req["description"], (str, dict)):
            self.fail(f"{where}.description", "must be a string or a description object")

    def check_url(self, where: str, url: Any) -> None:
        if not isinstance(url, dict):
            self.fail(where, "must be an object with raw, host and path")
            return
        raw = url.get("raw")
        if not self.expect_str(f"{where}.raw", raw, "raw"):
            return
        self.collect_vars(raw)
        host, path = url.get("host"), url.get("path")
        if not (isinstance(host, list) and host and all(isinstance(h, str) for h in host)):
            self.fail(f"{where}.host", f"must be a non-empty list of strings, got {host!r}")
            return
        if not (isinstance(path, list) and all(isinstance(p, str) and p for p in path)):
            self.fail(f"{where}.path", f"must be a list of non-empty strings, got {path!r}")
            return
        query = url.get("query", [])
        if not isinstance(query, list) or not all(
            isinstance(q, dict) and isinstance(q.get("key"), str) and isinstance(q.get("value"), (str, type(None)))
            for q in query
        ):
            self.fail(f"{where}.query", f"must be a list of {{key, value}} objects, got {query!r}")
            return
        # raw must say the same as the parsed parts, or Postman and newman disagree on the URL.
        rebuilt = ".".join(host) + ("/" + "/".join(path) if path else "")
        if url.get("protocol"):
            rebuilt = f"{url['protocol']}://{rebuilt}"
        active = [q for q in query if not q.get("disabled")]
        if active:
            rebuilt += "?" + "&".join(f"{q['key']}={q.get('value') or ''}" for q in active)
        if rebuilt != raw:
            self.fail(where, f"raw {raw!r} disagrees with protocol/host/path/query {rebuilt!r}")

    def check_events(self, where: str, events: Any) -> None:
        if not isinstance(events, list):
            self.fail(where, "must be a list")
            return
        for k, ev in enumerate(events):
            ew = f"{where}[{k}]"
            if not isinstance(ev, dict) or ev.get("listen") not in ("test", "prerequest"):
                self.fail(ew, f"must be {{listen: test|prerequest, script}}, got {ev!r}"[:200])
                continue
            script = ev.get("script")
            if not isinstance(script, dict):
                self.fail(f"{ew}.script", "must be an object")
                continue
            exec_ = script.get("exec")
            if isinstance(exec_, str):
                exec_ = exec_.split("\n")
            if not (isinstance(exec_, list) and exec_ and all(isinstance(line, str) for line in exec_)):
                self.fail(f"{ew}.script.exec", "must be a non-empty list of lines")
                continue
            if script.get("type", "text/javascript") != "text/javascript":
                self.fail(f"{ew}.script.type", "must be text/javascript")
            self.scripts.append((ew, "\n".join(exec_)))

    def check_variables(self, variables: Any) -> None:
        if not isinstance(variables, list):
            self.fail("$.variable", "must be a list of {key, value}")
            return
        declared: dict[str, Any] = {}
        for i, v in enumerate(variables):
            if not isinstance(v, dict) or not isinstance(v.get("key"), str) or not v["key"]:
                self.fail(f"$.variable[{i}]", f"must be an object with a key, got {v!r}")
                continue
            if v["key"] in declared:
                self.fail(f"$.variable[{i}]", f"duplicate variable {v['key']!r}")
            declared[v["key"]] = v.get("value")
        for name, default in EXPECTED_VARIABLES.items():
            if name not in declared:
                self.fail("$.variable", f"missing variable {name!r}")
            elif declared[name] != default:
                self.fail("$.variable", f"{name!r} defaults to {declared[name]!r}, expected {default!r}")
        for name in sorted(self.used_vars - declared.keys()):
            self.fail("$.variable", f"{{{{{name}}}}} is used but not declared")

    def check_scripts_parse(self) -> str:
        node = shutil.which("node")
        if node is None:
            return "skipped (node not installed)"
        with tempfile.TemporaryDirectory() as tmp:
            for n, (where, source) in enumerate(self.scripts):
                # Wrapped in a function, as Postman runs them; `pm` is only referenced, not run.
                path = Path(tmp) / f"script{n}.js"
                path.write_text(f"(function (pm) {{\n{source}\n}});\n", encoding="utf-8")
                res = subprocess.run([node, "--check", str(path)], capture_output=True, text=True)
                if res.returncode != 0:
                    lines = res.stderr.strip().splitlines()
                    detail = next((x for x in lines if "Error" in x), "syntax error")
                    self.fail(where, f"JavaScript does not parse: {detail}")
        return f"{len(self.scripts)} scripts parse (node --check)"


def validate_schema(coll: Any, schema_path: Path) -> list[str]:
    try:
        import jsonschema  # type: ignore[import-not-found]
    except ImportError:
        return ["--schema needs the jsonschema package (pip install jsonschema)"]
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    return [
        f"schema: {'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}"
        for e in sorted(cls(schema).iter_errors(coll), key=lambda e: list(map(str, e.absolute_path)))
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Validate a Postman Collection v2.1 file.")
    ap.add_argument("collection", nargs="?", type=Path, default=DEFAULT_FILE)
    ap.add_argument("--schema", type=Path, help="official v2.1.0 JSON schema file to validate against too")
    ap.add_argument("--no-node", action="store_true", help="do not syntax-check the scripts with node")
    args = ap.parse_args(argv)

    try:
        coll = json.loads(args.collection.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        print(f"FAIL {args.collection}: cannot load JSON: {err}", file=sys.stderr)
        return 1
    checker = Checker()
    checker.check(coll)
    scripts = "skipped (--no-node)" if args.no_node else checker.check_scripts_parse()
    problems = list(checker.problems)
    schema_note = "no schema file given (--schema PATH)"
    if args.schema:
        problems += validate_schema(coll, args.schema)
        schema_note = f"valid against {args.schema}"
    if problems:
        print(f"FAIL {args.collection}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(
        f"OK {args.collection.name}: Postman Collection v2.1, {checker.requests} requests, "
        f"variables {', '.join(sorted(checker.used_vars))} declared; {scripts}; {schema_note}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
