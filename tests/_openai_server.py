"""A small OpenAI-compatible HTTP server on 127.0.0.1 for the backend tests and benchmarks.

Examples
--------
>>> server = start_server(model_path)            # the tiny GPT-2 of _tiny.py, real generations
>>> server.base_url                               # 'http://127.0.0.1:40123/v1'
>>> server.inject("429", retry_after=0.2)         # the next request answers 429 with Retry-After
>>> server.requests                               # completion requests answered so far
>>> server.close()

``python tests/_openai_server.py --instant --port 8123`` runs it in the foreground; with
``--instant`` it answers at once with a text derived from the prompt (for the client-overhead
benchmark), otherwise it decodes with the model.

Plain asyncio (stdlib only): HTTP/1.1 with keep-alive, ``Content-Length`` bodies. Endpoints:
``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /stats``.
Faults, applied to the next completion requests in order (each counts as a request):
``"429"`` (with ``Retry-After``), ``"500"``, ``"400"``, ``"401"``, ``"drop"`` (the connection
is closed without an answer), ``"slow"`` (the answer comes after ``delay`` seconds), ``"ok"`` (a normal answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

FINGERPRINT = "fp_tiny_gpt2"


class _Model:
    """The tiny GPT-2 behind the server: greedy, or sampled with a per-request seed."""

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.name = path
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def chat_text(self, messages: list[dict]) -> str:
        return "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant:"

    def complete(self, prompt: str, body: dict, n: int) -> tuple[list[tuple[str, str]], int, int]:
        """``([(text, finish_reason)] * n, prompt_tokens, completion_tokens)``."""
        torch = self.torch
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        top_p = float(body.get("top_p") or 1.0)
        seed = body.get("seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids[:, -200:]
        out, completion_tokens = [], 0
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        for _ in range(n):
            kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": self.tokenizer.pad_token_id}
            if temperature == 0:
                kwargs["do_sample"] = False
            else:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
                if generator is not None:
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            with torch.inference_mode():
                result = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            new = result[0, ids.shape[1]:]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            finish = "length" if len(new) >= max_tokens else "stop"
            for s in stop:
                if s and s in text:
                    text, finish = text[: text.index(s)], "stop"
            completion_tokens += len(new)
            out.append((text, finish))
        return out, int(ids.shape[1]), completion_tokens


class _Instant:
    """Answers at once with a text derived from the prompt (client-overhead benchmarks)."""

    name = "instant"

    def chat_text(self, messages: list[dict]) -> str:
        return messages[-1].get("content") or ""

    def complete(self, prompt: str, body: dict, n: int):
        text = f"echo {len(prompt)}: {prompt[:24]}"
        return [(text, "stop")] * n, len(prompt) // 4, 8 * n


class Server:
    """A running server (see the module docstring)."""

    def __init__(self, model: Any, *, ignore_n: bool = False, served_model: str | None = None) -> None:
        self.model = model
        self.ignore_n = ignore_n
        self.served_model = served_model or "tiny-gpt2"
        self.requests = 0  # completion requests received (faults included)
        self.bodies: list[dict] = []  # the JSON bodies of the completion requests
        self.headers: list[dict] = []
        self._faults: deque = deque()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1)  # one model call at a time
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def inject(self, *faults: str, retry_after: float | str = 1, delay: float = 2.0) -> None:
        """Apply these faults, in order, to the next completion requests."""
        with self._lock:
            for fault in faults:
                self._faults.append((fault, retry_after, delay))

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.bodies.clear()
            self.headers.clear()
            self._faults.clear()

    # -- HTTP ----------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                status, payload, extra = await self._respond(method, path, headers, body)
                if status is None:  # a dropped connection
                    writer.transport.abort()
                    return
                data = json.dumps(payload).encode()
                hdrs = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(data)}\r\n{hdrs}\r\n".encode() + data
                )
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def _respond(self, method: str, path: str, headers: dict, raw: bytes):
        path = path.split("?", 1)[0]
        if method == "GET" and path == "/stats":
            return 200, {"requests": self.requests}, {}
        if method == "GET" and path.endswith("/models"):
            return 200, {"object": "list", "data": [{"id": self.served_model, "object": "model"}]}, {}
        if method != "POST" or not path.endswith(("/chat/completions", "/completions")):
            return 404, {"error": {"message": f"no route {method} {path}"}}, {}
        with self._lock:
            self.requests += 1
            fault = self._faults.popleft() if self._faults else None
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, {"error": {"message": "the body is not JSON"}}, {}
        with self._lock:
            self.bodies.append(body)
            self.headers.append(headers)
        if fault is not None:
            kind, retry_after, delay = fault
            if kind == "429":
                return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {
                    "retry-after": str(retry_after)
                }
            if kind in ("500", "400", "401"):
                message = {"500": "internal error", "400": "max_tokens is too large: 99999999",
                           "401": "invalid api key"}[kind]
                return int(kind), {"error": {"message": message}}, {}
            if kind == "drop":
                return None, None, None
            if kind == "slow":
                await asyncio.sleep(delay)
            # "ok": answered normally (to place a fault after some good answers)
        chat = path.endswith("/chat/completions")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return 400, {"error": {"message": "messages must be a non-empty list"}}, {}
            prompt = self.model.chat_text(messages)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return 400, {"error": {"message": "prompt must be a string"}}, {}
        n = 1 if self.ignore_n else int(body.get("n") or 1)
        if isinstance(self.model, _Instant):
            choices, prompt_tokens, completion_tokens = self.model.complete(prompt, body, n)
        else:
            choices, prompt_tokens, completion_tokens = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.model.complete, prompt, body, n
            )
        out_choices = []
        for i, (text, finish) in enumerate(choices):
            if chat:
                out_choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish})
            else:
                out_choices.append({"index": i, "text": text, "finish_reason": finish})
        return 200, {
            "id": f"cmpl-{self.requests}",
            "object": "chat.completion" if chat else "text_completion",
            "model": self.served_model + "-2024-01-01",
            "system_fingerprint": FINGERPRINT,
            "choices": out_choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, {}

    # -- lifecycle ----------------------------------------------------------------------------------
    async def _serve(self, host: str, port: int, ready: threading.Event | None) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, host, port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        if ready is not None:
            ready.set()
        async with self._server:
            await self._server.serve_forever()

    def close(self) -> None:
        """Stop serving and end the server's thread."""
        if self.loop is not None and self._server is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self._server.close)
        if getattr(self, "_thread", None) is not None:
            self._thread.join(timeout=10)
        self._executor.shutdown(wait=False)


def start_server(model_path: str | None = None, *, instant: bool = False, host: str = "127.0.0.1",
                 port: int = 0, **options: Any) -> Server:
    """Start a server in a background thread; ``instant=True`` needs no model."""
    model = _Instant() if instant else _Model(str(model_path))
    server = Server(model, **options)
    ready = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server._serve(host, port, ready))
        except (asyncio.CancelledError, RuntimeError):
            pass
        finally:
            loop.close()

    server._thread = threading.Thread(target=run, name="openai-test-server", daemon=True)
    server._thread.start()
    if not ready.wait(30):
        raise RuntimeError("the test server did not start")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description="an OpenAI-compatible test server")
    parser.add_argument("--model", help="a local model folder (default: --instant)")
    parser.add_argument("--instant", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    model = _Instant() if options.instant or not options.model else _Model(options.model)
    server = Server(model)

    async def go() -> None:
        ready = threading.Event()
        task = asyncio.create_task(server._serve("127.0.0.1", options.port, ready))
        while not ready.is_set():
            await asyncio.sleep(0.01)
        print(f"listening {server.base_url}", flush=True)
        await task

    asyncio.run(go())


if __name__ == "__main__":
    main()
