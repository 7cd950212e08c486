"""The JAX side's client for the sidecar (stdlib + numpy; no torch).

    client = SidecarClient({"spawn": True, "judge": "/ckpt/Qwen2.5-VL-7B-Instruct", "encoder": "/ckpt/qie"})
    with client:
        results = client.judge(edited, sources, instructions)     # images uint8 [H, W, 3]
        rewards, valid = judge_rewards(results, "sum")
        embeds, mask = client.encode(sources, instructions)

With `spawn` the client starts the sidecar as a subprocess (free port, its log in `log_file`), notices when it
has died and starts it again (at most `max_restarts` times), and stops it on `close()`, at interpreter exit,
and (through `--parent-pid`) when this process dies. Otherwise it talks to the sidecar at `url`. Every request
has a timeout and is retried with exponential backoff when the connection fails or times out; a request the
server refuses (4xx) or fails on (500) raises `SidecarRequestError` with the server's message at once.
"""

from __future__ import annotations

import atexit
import dataclasses
import http.client
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from cogniedit_jax.sidecar.encoder import pad_embeddings
from cogniedit_jax.sidecar.parsing import reward_from_scores
from cogniedit_jax.sidecar.protocol import TOKEN_HEADER, decode_array, encode_image

log = logging.getLogger("cogniedit_jax.sidecar.client")
TOKEN_ENV = "COGNIEDIT_SIDECAR_TOKEN"  # the server reads the same variable


class SidecarError(RuntimeError):
    pass


class SidecarTimeout(SidecarError):
    pass


class SidecarRequestError(SidecarError):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class SidecarConfig:
    url: str = "http://127.0.0.1:8765"  # used when spawn is False
    spawn: bool = False
    # What a spawned sidecar serves (server flags of the same names).
    judge: str | None = None
    rule_judge: str | None = None
    decomposer: str | None = None
    encoder: str | None = None
    chat: str | None = None
    device: str = "auto"
    extra_args: tuple = ()  # more server flags, e.g. ("--max-batch", "16")
    token: str | None = None  # else $COGNIEDIT_SIDECAR_TOKEN
    timeout_s: float = 600.0  # per request
    retries: int = 3
    backoff_s: float = 1.0
    startup_timeout_s: float = 900.0
    max_restarts: int = 3
    log_file: str | None = None  # a spawned sidecar's stdout/stderr; default: a temporary file
    image_format: str = "raw"  # or "png"

    @classmethod
    def from_dict(cls, d) -> SidecarConfig:
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown sidecar config key(s) {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}")
        if "extra_args" in d:
            d["extra_args"] = tuple(d["extra_args"])
        return cls(**d)


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)


class SidecarClient:
    def __init__(self, config: SidecarConfig | dict):
        self.config = config if isinstance(config, SidecarConfig) else SidecarConfig.from_dict(config)
        self.token = self.config.token or os.environ.get(TOKEN_ENV) or None
        self.url = self.config.url.rstrip("/")
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.limits: dict = {}
        self._tmp = None
        self._log_path: Path | None = None

    # lifecycle

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self) -> dict:
        """Spawn the sidecar (when configured to) and wait until it answers; returns its /health."""
        if self.config.spawn and self.process is None:
            return self._spawn()
        return self.health()

    def _server_args(self) -> list[str]:
        c = self.config
        args = ["--device", c.device]
        for flag in ("judge", "rule_judge", "decomposer", "encoder", "chat"):
            if getattr(c, flag):
                args += [f"--{flag.replace('_', '-')}", str(getattr(c, flag))]
        return args + [str(a) for a in c.extra_args]

    def _spawn(self) -> dict:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="cogniedit-sidecar-")
            self._log_path = Path(self.config.log_file or Path(self._tmp.name) / "sidecar.log")
            atexit.register(self.close)
        port_file = Path(self._tmp.name) / "port.json"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "cogniedit_jax.sidecar", "--port", "0", "--port-file", str(port_file),
               "--parent-pid", str(os.getpid()), *self._server_args()]
        env = dict(os.environ, **({TOKEN_ENV: self.token} if self.token else {}))
        with open(self._log_path, "ab") as logf:
            self.process = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        log.info("started sidecar pid %d (log %s): %s", self.process.pid, self._log_path, " ".join(cmd[3:]))
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SidecarError(f"the sidecar exited with code {self.process.returncode} while starting; "
                                   f"its log ({self._log_path}) ends with:\n{self.log_tail()}")
            if port_file.exists():
                self.url = "http://{host}:{port}".format(**json.loads(port_file.read_text()))
                health = self.health()
                log.info("sidecar ready at %s: %s", self.url, health.get("roles"))
                return health
            time.sleep(0.1)
        self._stop()
        raise SidecarTimeout(f"the sidecar did not start within {self.config.startup_timeout_s} s; log:\n"
                             f"{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])

    def _stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("sidecar pid %d did not stop on SIGTERM; killing it", self.process.pid)
                self.process.kill()
                self.process.wait()

    def close(self):
        """Stop a spawned sidecar (a no-op for one this client did not start)."""
        if self.process is not None:
            self._stop()
            log.info("sidecar pid %d stopped (exit code %s)", self.process.pid, self.process.returncode)
            self.process = None
        if self._tmp is not None and self.config.log_file is None:
            self._tmp.cleanup()
            self._tmp = None

    def _ensure_alive(self):
        if self.process is None or self.process.poll() is None:
            return
        code = self.process.returncode
        if self.restarts >= self.config.max_restarts:
            raise SidecarError(f"the sidecar died (exit code {code}) and was restarted {self.restarts} times "
                               f"already; log:\n{self.log_tail()}")
        self.restarts += 1
        log.warning("the sidecar (pid %d) died with exit code %s; restarting it (%d of %d). Log tail:\n%s",
                    self.process.pid, code, self.restarts, self.config.max_restarts, self.log_tail(5))
        self.process = None
        self._spawn()

    # requests

    def _send(self, endpoint: str, data: bytes | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers[TOKEN_HEADER] = f"Bearer {self.token}"
        req = urllib.request.Request(f"{self.url}/{endpoint}", data=data, headers=headers,
                                     method="POST" if data is not None else "GET")
        with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
            return json.loads(resp.read())

    def _request(self, endpoint: str, data: bytes | None = None) -> dict:
        limit = self.limits.get("max_request_bytes")
        if data is not None and limit and len(data) > limit:
            raise SidecarRequestError(f"/{endpoint}: request of {len(data)} bytes is over the sidecar's limit of "
                                      f"{limit} (--max-request-mb); send smaller images", 413)
        last: BaseException | None = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                delay = self.config.backoff_s * 2 ** (attempt - 1)
                log.warning("/%s attempt %d failed (%s); retrying in %.1f s", endpoint, attempt, last, delay)
                time.sleep(delay)
            self._ensure_alive()
            try:
                return self._send(endpoint, data)
            except urllib.error.HTTPError as e:
                try:
                    message = json.loads(e.read()).get("error", "")
                except (ValueError, OSError):
                    message = e.reason
                raise SidecarRequestError(f"/{endpoint} answered {e.code}: {message}", e.code) from None
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError) as e:
                last = e
        if _is_timeout(last):
            raise SidecarTimeout(f"/{endpoint} timed out after {self.config.timeout_s} s, "
                                 f"{self.config.retries + 1} attempts") from last
        raise SidecarError(f"/{endpoint} failed after {self.config.retries + 1} attempts: {last}") from last

    def _post_items(self, endpoint: str, items: list[dict]) -> list[dict]:
        """POST the items in as few requests as the sidecar's item and size limits allow; one answer each."""
        if not self.limits:
            self.health()
        parts = [json.dumps(it) for it in items]
        max_items, max_bytes = self.limits.get("max_items", len(parts)), self.limits.get("max_request_bytes")
        chunks, size = [[]], 0
        for part in parts:
            if chunks[-1] and (len(chunks[-1]) == max_items or (max_bytes and size + len(part) + 16 > max_bytes)):
                chunks.append([])
                size = 0
            chunks[-1].append(part)
            size += len(part) + 1
        return [self._request(endpoint, ('{"items": [' + ",".join(c) + "]}").encode()) for c in chunks]

    def health(self) -> dict:
        health = self._request("health")
        self.limits = health.get("limits", {})
        return health

    def _images(self, images) -> list[dict]:
        return [encode_image(im, self.config.image_format) for im in images]

    def judge(self, edited, sources, instructions: list[str]) -> list[dict]:
        """One result per edit: {"valid", "scores", "attempts", "text", "error"}; `judge_rewards` turns
        them into rewards. Invalid results carry no scores."""
        items = [{"edited": e, "source": s, "instruction": t}
                 for e, s, t in zip(self._images(edited), self._images(sources), instructions, strict=True)]
        results = [r for out in self._post_items("judge", items) for r in out["results"]]
        invalid = sum(not r["valid"] for r in results)
        if invalid:
            log.warning("judge: %d of %d answers unreadable after retries; those samples are invalid",
                        invalid, len(items))
        return results

    def decompose(self, images, instructions: list[str]) -> list[dict]:
        """One result per item: {"info", "think", "answer", "object", "instruction", "fallback", "missing",
        "text"}; "instruction" is the enriched instruction, or the original one when `fallback`."""
        items = [{"image": im, "instruction": t} for im, t in zip(self._images(images), instructions, strict=True)]
        results = [r for out in self._post_items("decompose", items) for r in out["results"]]
        fallbacks = sum(r["fallback"] for r in results)
        if fallbacks:
            log.warning("decompose: %d of %d answers had no <answer>; kept the original instruction",
                        fallbacks, len(items))
        return results

    def encode(self, images, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Qwen-Image-Edit's (prompt_embeds [B, L, D], prompt_embeds_mask [B, L] int64) for source images and
        instructions, as the diffusers pipeline's encode_prompt builds them (mask always present)."""
        items = [{"image": im, "prompt": p} for im, p in zip(self._images(images), prompts, strict=True)]
        rows = []
        for out in self._post_items("encode", items):
            embeds, mask = decode_array(out["embeds"], "embeds"), decode_array(out["mask"], "mask")
            rows += [e[:n] for e, n in zip(embeds, mask.sum(1))]
        return pad_embeddings(rows)


    def chat(self, turns: list[list[dict]], max_new_tokens: int = 512, temperature: float | None = None,
             top_p: float | None = None, seed: int | None = None) -> list[str]:
        """One answer per turn; a turn is a list of parts `{"text": str}` or `{"image": uint8 [H, W, 3]}` in the
        order the model sees them. Greedy without a temperature."""
        items = [{"content": [{"image": encode_image(p["image"], self.config.image_format)} if "image" in p
                              else {"text": p["text"]} for p in turn],
                  "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
                 for turn in turns]
        return [r["text"] for out in self._post_items("chat", items) for r in out["results"]]


def judge_rewards(results: list[dict], normalization: str = "sum") -> tuple[np.ndarray, np.ndarray]:
    """(rewards float32 [N], valid bool [N]) from judge results; invalid samples get NaN, so that a caller
    who forgets the mask sees it, and must be left out of advantages and loss."""
    valid = np.array([r["valid"] for r in results], dtype=bool)
    rewards = np.array([reward_from_scores(r["scores"], normalization) if r["valid"] else np.nan
                        for r in results], dtype=np.float32)
    return rewards, valid
