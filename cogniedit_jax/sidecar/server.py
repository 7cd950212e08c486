"""The PyTorch sidecar: an HTTP server for the judge, the decomposer and the condition encoder.

    python -m cogniedit_jax.sidecar [--judge DIR | --rule-judge NAME] [--decomposer DIR] [--encoder DIR]
                                    [--host 127.0.0.1] [--port 8765] [--device auto] ...

Endpoints (JSON; arrays and images as in `protocol.py`):
    GET  /health     roles, backends, device, image backend, limits
    POST /judge      {"items": [{"edited", "source", "instruction"}]}   -> {"results", "invalid", "backend"}
    POST /decompose  {"items": [{"image", "instruction"}]}              -> {"results", "fallbacks"}
    POST /encode     {"items": [{"image", "prompt"}]}                   -> {"embeds", "mask", "positions"}
    POST /chat       {"items": [{"content": [{"text"} | {"image"}], ...}]} -> {"results": [{"text"}]}

Each role has one worker thread that gathers the items of concurrent requests into batches of up to
`--max-batch`; HTTP requests are served on their own threads, so /health answers while a model is busy.
The server listens on loopback only unless `--allow-remote` is given together with a token
(`--token-file` or COGNIEDIT_SIDECAR_TOKEN); with a token every request must send `Authorization: Bearer`.
Requests over `--max-request-mb`, with more than `--max-items` items, or with an image over
`--max-image-pixels` are refused (413) and the server goes on serving.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cogniedit_jax.sidecar.protocol import (
    PROTOCOL_VERSION,
    TOKEN_HEADER,
    ProtocolError,
    decode_image,
    encode_array,
)

log = logging.getLogger("cogniedit_jax.sidecar")
TOKEN_ENV = "COGNIEDIT_SIDECAR_TOKEN"
DEFAULT_PORT = 8765


class Batcher:
    """One worker thread per role: requests queue up, and the worker runs `fn` on the items of every request
    that arrived within `wait_s` of the first, `max_batch` items at a time."""

    def __init__(self, name: str, fn, max_batch: int, wait_s: float):
        self.name, self.fn, self.max_batch, self.wait_s = name, fn, max_batch, wait_s
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True).start()

    def submit(self, items: list) -> list:
        slot = {"items": items, "done": threading.Event()}
        self.queue.put(slot)
        slot["done"].wait()
        if "error" in slot:
            raise slot["error"]
        return slot["results"]

    def _run(self, items: list) -> list:
        out = []
        for start in range(0, len(items), self.max_batch):
            out += self.fn(items[start:start + self.max_batch])
        if len(out) != len(items):
            raise RuntimeError(f"{self.name} returned {len(out)} results for {len(items)} items")
        return out

    def _gather(self) -> list[dict]:
        slots = [self.queue.get()]
        count, deadline = len(slots[0]["items"]), time.monotonic() + self.wait_s
        while count < self.max_batch and (left := deadline - time.monotonic()) > 0:
            try:
                slots.append(self.queue.get(timeout=left))
            except queue.Empty:
                break
            count += len(slots[-1]["items"])
        return slots

    def _loop(self):
        while True:
            slots = self._gather()
            try:
                results = self._run([it for s in slots for it in s["items"]])
                for s in slots:
                    s["results"], results = results[:len(s["items"])], results[len(s["items"]):]
            except Exception:  # noqa: BLE001 (any model failure: retried per request below)
                # Run each request alone so that one bad request fails only itself.
                for s in slots:
                    try:
                        s["results"] = self._run(s["items"])
                    except Exception as e:
                        log.exception("%s failed on a request of %d items", self.name, len(s["items"]))
                        s["error"] = e
            for s in slots:
                s["done"].set()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_bind(host: str, allow_remote: bool, token: str | None):
    """Refuse a non-loopback address unless remote access was asked for explicitly and a token guards it."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise SystemExit(f"refusing to listen on {host!r}: not a loopback address. The sidecar runs models for "
                         f"anyone who can reach it; pass --allow-remote and a token (--token-file or {TOKEN_ENV}) "
                         "to listen on another address")
    if not token:
        raise SystemExit(f"refusing to listen on {host!r} with --allow-remote but no token: set {TOKEN_ENV} or "
                         "pass --token-file")


def _text(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}.{key}: expected a string, found {type(value).__name__}")
    return value


class Sidecar:
    """The roles this process serves, their batchers, and the request limits."""

    def __init__(self, args, judge=None, decomposer=None, encoder=None, info=None, chat=None):
        wait = args.batch_wait_ms / 1000
        self.args, self.info, self.encoder = args, info or {}, encoder
        self.batchers = {}
        if judge is not None:
            self.batchers["judge"] = Batcher("judge", judge.score, args.max_batch, wait)
        if decomposer is not None:
            self.batchers["decompose"] = Batcher("decompose", decomposer.decompose, args.max_batch, wait)
        if encoder is not None:
            self.batchers["encode"] = Batcher("encode", lambda items: encoder.encode(
                [it["image"] for it in items], [it["prompt"] for it in items]), args.max_batch, wait)
        if chat is not None:
            self.batchers["chat"] = Batcher("chat", chat.answer, args.max_batch, wait)

    def health(self) -> dict:
        a = self.args
        return {"status": "ok", "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                "endpoints": sorted(self.batchers), **self.info,
                "limits": {"max_request_bytes": a.max_request_mb * 2**20, "max_image_pixels": a.max_image_pixels,
                           "max_items": a.max_items}}

    def _raw_items(self, body) -> list:
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise ProtocolError("the request needs a non-empty list under 'items'")
        if len(items) > self.args.max_items:
            raise ProtocolError(f"{len(items)} items is over the limit of {self.args.max_items} "
                                "(server option --max-items)", status=413)
        return items

    def _items(self, body: dict, fields: dict) -> list[dict]:
        items = self._raw_items(body)
        out = []
        for i, item in enumerate(items):
            where = f"items[{i}]"
            if not isinstance(item, dict):
                raise ProtocolError(f"{where}: expected an object")
            out.append({k: decode_image(item.get(k), self.args.max_image_pixels, f"{where}.{k}") if kind == "image"
                        else _text(item, k, where) for k, kind in fields.items()})
        return out

    def handle(self, endpoint: str, body) -> dict:
        if endpoint not in self.batchers:
            raise ProtocolError(f"this sidecar does not serve /{endpoint}; it serves {sorted(self.batchers)} "
                                "(start it with --judge/--rule-judge, --decomposer, --encoder or --chat)", status=404)
        if endpoint == "judge":
            results = self.batchers["judge"].submit(
                self._items(body, {"edited": "image", "source": "image", "instruction": "text"}))
            return {"results": results, "invalid": sum(not r["valid"] for r in results),
                    "backend": self.info["roles"]["judge"]}
        if endpoint == "decompose":
            results = self.batchers["decompose"].submit(
                self._items(body, {"image": "image", "instruction": "text"}))
            return {"results": results, "fallbacks": sum(r["fallback"] for r in results)}
        if endpoint == "chat":
            from cogniedit_jax.sidecar.chat import parse_chat_item

            items = [parse_chat_item(it, self.args.max_image_pixels, self.args.chat_max_new_tokens, f"items[{i}]")
                     for i, it in enumerate(self._raw_items(body))]
            return {"results": self.batchers["chat"].submit(items)}
        from cogniedit_jax.sidecar.encoder import pad_embeddings

        embeds, mask = pad_embeddings(self.batchers["encode"].submit(
            self._items(body, {"image": "image", "prompt": "text"})))
        return {"embeds": encode_array(embeds), "mask": encode_array(mask), "positions": self.encoder.positions}


def make_handler(sidecar: Sidecar, token: str | None):
    max_bytes = sidecar.args.max_request_mb * 2**20

    class Handler(BaseHTTPRequestHandler):
        server_version = "cogniedit-sidecar"

        def log_message(self, fmt, *args):
            log.debug("%s " + fmt, self.client_address[0], *args)

        def _reply(self, status: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if token is None:
                return True
            sent = self.headers.get(TOKEN_HEADER, "")
            if hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return True
            self._reply(401, {"error": "missing or wrong token (header 'Authorization: Bearer <token>')"})
            return False

        def _body(self):
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise ProtocolError("the request needs a Content-Length header", status=411)
            length = int(length)
            if length > max_bytes:
                # Read (and drop) a moderately oversized body so the client gets the answer instead of a reset.
                remaining = length if length <= 2 * max_bytes else 0
                while remaining > 0 and (chunk := self.rfile.read(min(remaining, 2**20))):
                    remaining -= len(chunk)
                self.close_connection = True
                raise ProtocolError(f"request of {length} bytes is over the limit of "
                                    f"{max_bytes} (server option --max-request-mb)", status=413)
            try:
                return json.loads(self.rfile.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ProtocolError(f"the request body is not JSON: {e}") from e

        def do_GET(self):
            if not self._authorized():
                return
            if self.path.rstrip("/") != "/health":
                return self._reply(404, {"error": f"unknown path {self.path}; GET /health"})
            self._reply(200, sidecar.health())

        def do_POST(self):
            if not self._authorized():
                return
            start, endpoint = time.monotonic(), self.path.strip("/")
            try:
                out, status = sidecar.handle(endpoint, self._body()), 200
            except ProtocolError as e:
                out, status = {"error": str(e)}, e.status
            except Exception as e:
                log.exception("/%s failed", endpoint)
                out, status = {"error": f"{type(e).__name__}: {e}"}, 500
            log.info("/%s %d in %.0f ms", endpoint, status, 1000 * (time.monotonic() - start))
            self._reply(status, out)

    return Handler


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cogniedit_jax.sidecar", description=__doc__.split("\n\n")[0])
    roles = p.add_argument_group("roles (each optional)")
    judge = roles.add_mutually_exclusive_group()
    judge.add_argument("--judge", metavar="DIR", help="Qwen2.5-VL judge checkpoint folder")
    judge.add_argument("--rule-judge", metavar="NAME", help="a registered rule judge, or module:NAME")
    roles.add_argument("--decomposer", metavar="DIR", help="Qwen2.5-VL-family instruction decomposer folder")
    roles.add_argument("--encoder", metavar="DIR",
                       help="Qwen-Image-Edit pipeline folder (uses text_encoder/, processor/) or a Qwen2.5-VL one")
    roles.add_argument("--chat", metavar="DIR",
                       help="Qwen2.5-VL model for /chat: prompts and images from the caller (benchmark judges)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (see --port-file)")
    net.add_argument("--port-file", help="write {host, port, pid} here as JSON once listening")
    net.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (needs a token)")
    net.add_argument("--token-file", help=f"file holding the shared token (else ${TOKEN_ENV})")
    net.add_argument("--parent-pid", type=int, help="exit when this process (the trainer) is gone")
    lim = p.add_argument_group("limits and batching")
    lim.add_argument("--max-request-mb", type=int, default=512)
    lim.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    lim.add_argument("--max-items", type=int, default=256)
    lim.add_argument("--max-batch", type=int, default=8, help="items per model call")
    lim.add_argument("--batch-wait-ms", type=float, default=20.0)
    m = p.add_argument_group("models")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    m.add_argument("--image-backend", choices=["auto", "pil", "torchvision"], default="auto")
    m.add_argument("--judge-template", help="a judge prompt file (default: the packaged paper prompt)")
    m.add_argument("--judge-retries", type=int, default=2, help="sampled retries of an unreadable answer")
    m.add_argument("--judge-max-new-tokens", type=int, default=512)
    m.add_argument("--decomposer-template", help="a decomposer prompt file (default: the packaged one)")
    m.add_argument("--decomposer-max-new-tokens", type=int, default=1024)
    m.add_argument("--chat-max-new-tokens", type=int, default=2048, help="the most a /chat item may ask for")
    m.add_argument("--encoder-positions", choices=["pipeline", "mrope"], default="pipeline",
                   help="pipeline: exactly diffusers 0.42.1 (1-D positions); mrope: Qwen2.5-VL's 3-D positions")
    p.add_argument("--log-level", default="INFO")
    return p


def _read_token(args) -> str | None:
    if args.token_file:
        return Path(args.token_file).read_text().strip() or None
    return os.environ.get(TOKEN_ENV) or None


def load_roles(args) -> dict:
    """The judge, decomposer and encoder asked for; a folder named by several roles is loaded once."""
    from cogniedit_jax.sidecar.vl import load_vl

    models = {}

    def vl(path):
        key = str(Path(path).resolve())
        if key not in models:
            models[key] = load_vl(path, args.device, args.dtype, args.image_backend)
        return models[key]

    roles, info = {}, {}
    if args.judge:
        from cogniedit_jax.sidecar.judge import VLJudge

        roles["judge"] = VLJudge(vl(args.judge), args.judge_template, args.judge_max_new_tokens, args.judge_retries)
    elif args.rule_judge:
        from cogniedit_jax.sidecar.rules import get_rule_judge

        roles["judge"] = get_rule_judge(args.rule_judge)
    if args.decomposer:
        from cogniedit_jax.sidecar.decomposer import VLDecomposer

        roles["decomposer"] = VLDecomposer(vl(args.decomposer), args.decomposer_template,
                                           args.decomposer_max_new_tokens)
    if args.encoder:
        from cogniedit_jax.sidecar.encoder import ConditionEncoder

        roles["encoder"] = ConditionEncoder(vl(args.encoder), args.encoder_positions)
    if args.chat:
        from cogniedit_jax.sidecar.chat import VLChat

        roles["chat"] = VLChat(vl(args.chat))
    info["roles"] = {"judge": roles["judge"].backend} if "judge" in roles else {}
    info["roles"].update({r: "vl" for r in ("decomposer", "encoder", "chat") if r in roles})
    first = next(iter(models.values()), None)
    info.update(device=first.device if first else "cpu", dtype=first.dtype if first else None,
                image_backend=first.image_backend if first else None)
    return {"info": info, **roles}


def _watch_parent(parent_pid: int, server):
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    log.warning("parent process %d is gone; shutting down", parent_pid)
    server.shutdown()


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s sidecar %(levelname)s %(message)s")
    token = _read_token(args)
    check_bind(args.host, args.allow_remote, token)
    roles = load_roles(args)
    sidecar = Sidecar(args, roles.get("judge"), roles.get("decomposer"), roles.get("encoder"), roles["info"],
                      roles.get("chat"))
    server = ThreadingHTTPServer((args.host, args.port), make_handler(sidecar, token))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    if args.port_file:
        tmp = Path(args.port_file).with_suffix(".tmp")
        tmp.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}))
        os.replace(tmp, args.port_file)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, server), daemon=True).start()
    log.info("listening on http://%s:%d, serving %s", host, port, sidecar.health()["endpoints"])
    try:
        server.serve_forever()
    finally:
        server.server_close()
        log.info("stopped")


if __name__ == "__main__":
    main()
