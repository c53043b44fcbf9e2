"""``pied chat``: talk to a running server from the terminal.

Each line typed is sent, with the conversation so far, to ``/v1/chat/completions`` with
``stream: true``; the reply is printed as its server-sent events arrive. Ctrl-C while a reply
streams stops that reply (the connection is closed, so the server aborts the request) and returns
to the prompt; the part already shown stays in the history, since it is what the user saw.
Ctrl-C twice at the prompt, Ctrl-D or ``/exit`` quits.

Only the standard library is used (``http.client``): the client must start fast, and a blocking
read on a socket is what a SIGINT can interrupt cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

READ_TIMEOUT_SECONDS = 600.0  # a reply may wait behind a long queue; Ctrl-C is the way out
HELP = "Commands: /exit (or Ctrl-D) quits, /clear forgets the conversation, /help shows this."


class ChatError(Exception):
    """What went wrong talking to the server, in one line fit to show the user."""


@dataclass
class Server:
    """Where the server is and how to authenticate; one fresh connection per request."""

    url: str
    api_key: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url if "://" in self.url else f"http://{self.url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ChatError(f"--url must look like http://HOST:PORT, got {self.url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        # Accept the OpenAI-style base URL (".../v1") as well as the server's root.
        self.prefix = parts.path.rstrip("/").removesuffix("/v1")

    def connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=READ_TIMEOUT_SECONDS)

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def send(self, connection: http.client.HTTPConnection, method: str, path: str, body: Any = None):
        """The response to one request; raises ChatError for a refused connection or an error status."""
        data = None if body is None else json.dumps(body).encode()
        try:
            connection.request(method, self.prefix + path, body=data, headers=self.headers())
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            raise ChatError(f"cannot reach the server at {self.url}: {error}") from None
        if response.status != 200:
            raise ChatError(f"server error {response.status}: {error_message(response.read())}")
        return response

    def model_names(self) -> list[str]:
        connection = self.connect()
        try:
            listing = json.loads(self.send(connection, "GET", "/v1/models").read())
        finally:
            connection.close()
        return [model["id"] for model in listing.get("data", [])]


def error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body, or the body itself when it is not one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        kind = f"{error['type']}: " if error.get("type") else ""
        return kind + str(error["message"])
    return body.decode(errors="replace").strip() or "(empty response)"


def sse_payloads(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, up to ``data: [DONE]``."""
    while True:
        line = response.readline()
        if not line:
            return  # the server closed the stream early; what arrived is all there is
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments and other fields
        data = line[len(b"data:") :].strip()
        if data == b"[DONE]":
            return
        payload = json.loads(data)
        if "error" in payload:
            raise ChatError(f"server error: {error_message(data)}")
        yield payload


@dataclass
class Reply:
    """What came back for one question, filled in as the stream goes (so an interrupt keeps it)."""

    text: str = ""
    finish_reason: str | None = None


@dataclass
class ChatSession:
    server: Server
    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def request_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": self.messages(), "stream": True}
        if self.model:
            body["model"] = self.model
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def stream_reply(self, reply: Reply, out: TextIO) -> None:
        """Send the conversation and print the reply as it streams. KeyboardInterrupt propagates,
        with ``reply`` holding what was printed; the connection is closed either way, which is what
        tells the server to stop generating."""
        connection = self.server.connect()
        try:
            response = self.server.send(connection, "POST", "/v1/chat/completions", self.request_body())
            for payload in sse_payloads(response):
                for choice in payload.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        reply.text += text
                        out.write(text)
                        out.flush()
                    reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
        except (OSError, http.client.HTTPException, ValueError) as error:  # ValueError: a bad JSON event
            raise ChatError(f"the reply broke off: {error}") from None
        finally:
            connection.close()

    def ask(self, question: str, out: TextIO, err: TextIO) -> None:
        """One exchange: the question joins the history, then the reply (or as much as was shown)."""
        self.history.append({"role": "user", "content": question})
        reply = Reply()
        try:
            self.stream_reply(reply, out)
        except KeyboardInterrupt:
            out.write("\n")
            err.write("[reply stopped]\n")
        except ChatError as error:
            if reply.text:
                out.write("\n")
            err.write(f"pied chat: {error}\n")
            if not reply.text:
                self.history.pop()  # nothing came back: the question can simply be asked again
                return
        else:
            out.write("\n")
            if reply.finish_reason == "length":
                err.write("[reply cut at --max-tokens]\n")
        self.history.append({"role": "assistant", "content": reply.text})


def read_line(prompt: str) -> str | None:
    """A line from the user; None to quit (EOF, or a second Ctrl-C in a row at the prompt)."""
    interrupted = False
    while True:
        try:
            return input(prompt)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print()
            if interrupted:
                return None
            interrupted = True
            print("(Ctrl-C again, Ctrl-D or /exit to quit)", file=sys.stderr)


def run(session: ChatSession, banner: str) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input(), where available)
    print(banner, file=sys.stderr)
    while True:
        line = read_line("> ")
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/clear":
            session.history.clear()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if line in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        session.ask(line, sys.stdout, sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        server = Server(args.url, args.api_key or os.environ.get("PIED_API_KEY") or None)
        # Ask for the model list first: a wrong URL or key shows up now, not after the first question.
        names = server.model_names()
    except ChatError as error:
        print(f"pied chat: {error}", file=sys.stderr)
        return 1
    model = args.model or (names[0] if names else None)
    session = ChatSession(server, args.model, args.system, args.temperature, args.max_tokens)
    banner = f"pied chat with {model or 'the server'} at {server.url}. Ctrl-C stops a reply; {HELP}"
    return run(session, banner)


def add_chat_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a running server from the terminal")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    parser.add_argument("--model", default=None, help="the model name to ask for (default: the server's)")
    parser.add_argument(
        "--api-key", default=None, help="sent as 'Authorization: Bearer KEY'; default: $PIED_API_KEY"
    )
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system message to start with")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    parser.add_argument(
        "--max-tokens", type=int, default=512, help="the longest reply, in tokens (default: 512)"
    )
    parser.set_defaults(handler=cmd_chat)
