"""HTTP client for vLLM's OpenAI-compatible server: health, completions from token IDs, runtime LoRA adapters.

Transient faults (connection refused or broken off mid-answer, timeouts, 500/502/503/504) are retried with capped
exponential backoff; anything else, or a fault that outlasts the retries, raises `ServerError` naming the server URL.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Callable

import backoff
import requests

log = logging.getLogger(__name__)

RETRYABLE_STATUS = (500, 502, 503, 504)
# The backoff's own jitter draws from `random`, which training seeds with SEED: every run, and every client of a
# server, would wait the same sequence and retry in step. The OS's entropy differs per process.
_JITTER = random.SystemRandom()


def full_jitter(wait: float) -> float:
    return _JITTER.uniform(0, wait)


class ServerError(RuntimeError):
    """The vLLM server could not do what was asked; the message says what and where."""


class AdapterNotFound(ServerError):
    """A request named an adapter the server does not have (it restarted, or it was never loaded)."""


class AdapterUnreadable(ServerError):
    """The server cannot find or read the adapter files at the path it was given."""


# A server reads each adapter from the path the trainer wrote it to: the same files, at the same path, on its side.
SHARED_STORAGE_FIX = ("the adapters directory (under RUNS_DIR) must be on storage every server reads at the same "
                      "path: the runs volume mounted into every container on one host, a network filesystem (NFS, "
                      "Lustre, ...) mounted at the same path on every host across hosts (docs/multi-node.md)")


class TransientServerError(ServerError):
    """A fault worth retrying: the server is starting, overloaded or briefly unreachable."""


class ServerUnavailable(ServerError):
    """Transient faults outlasted the retries, or the server stayed unhealthy for the whole wait."""


class StopRequested(Exception):
    """The process was asked to stop while it waited for the server."""


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" or "length" (clipped at max_tokens)


class VLLMServerClient:
    def __init__(self, base_url: str, api_key: str = "", request_timeout: float = 900.0,
                 max_retries: int = 6, retry_max_wait: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.retry_max_wait = retry_max_wait
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def copy(self) -> "VLLMServerClient":
        """A client of the same server with its own `requests.Session`, for another thread: a session's connection
        pool and state are not meant to be shared across threads."""
        return VLLMServerClient(self.base_url, self.api_key, self.request_timeout, self.max_retries,
                                self.retry_max_wait)

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, retry_status: tuple[int, ...] = RETRYABLE_STATUS,
                 **kwargs) -> requests.Response:
        url = f"{self.base_url}{path}"

        def give_up_message(details):
            log.error("vLLM server at %s: giving up on %s %s after %d attempts (%.0f s): %s",
                      self.base_url, method, path, details["tries"], details["elapsed"], details["exception"])

        @backoff.on_exception(backoff.expo, TransientServerError, max_tries=self.max_retries,
                              max_value=self.retry_max_wait, jitter=full_jitter, on_giveup=give_up_message,
                              on_backoff=lambda d: log.warning("vLLM server at %s: %s; retry %d in %.1f s",
                                                               self.base_url, d["exception"], d["tries"], d["wait"]))
        def attempt() -> requests.Response:
            try:
                response = self.session.request(method, url, timeout=self.request_timeout, **kwargs)
            except requests.ConnectionError as exc:
                raise TransientServerError(f"cannot connect to {url} ({type(exc).__name__})") from exc
            except requests.exceptions.ChunkedEncodingError as exc:  # the server died while answering
                raise TransientServerError(f"connection to {url} broke mid-answer") from exc
            except requests.Timeout as exc:
                raise TransientServerError(f"{method} {url} timed out") from exc
            if response.status_code in retry_status:
                raise TransientServerError(f"{method} {url} answered HTTP {response.status_code}")
            return response

        try:
            return attempt()
        except TransientServerError as exc:
            raise ServerUnavailable(f"vLLM server at {self.base_url} is unavailable: {exc}; "
                              f"check that it runs (docker compose logs vllm) and that VLLM_SERVER_HOST/PORT point at it") from exc

    def _json(self, method: str, path: str, **kwargs) -> dict:
        response = self._request(method, path, **kwargs)
        if response.status_code == 401:
            raise ServerError(f"vLLM server at {self.base_url} refused the API key (HTTP 401): "
                              "set the same VLLM_API_KEY for the server and the trainer")
        if response.status_code == 404 and "does not exist" in response.text:
            raise AdapterNotFound(response.text)
        if response.status_code >= 400:
            raise ServerError(f"vLLM server at {self.base_url}: {method} {path} answered HTTP "
                              f"{response.status_code}: {response.text[:500]}")
        return response.json() if response.content else {}

    # ------------------------------------------------------------------ health and discovery
    def wait_until_healthy(self, timeout: float, poll_interval: float = 5.0,
                           stop_requested: Callable[[], bool] = lambda: False) -> float:
        """Block until GET /health answers 200; log progress; raise ServerError after `timeout` seconds,
        StopRequested as soon as `stop_requested()` is true."""
        start = time.monotonic()
        next_report = start
        last_problem = "no answer yet"
        while True:
            try:
                response = self.session.get(f"{self.base_url}/health", timeout=10)
                if response.status_code == 200:
                    waited = time.monotonic() - start
                    log.info("vLLM server at %s is healthy (waited %.0f s)", self.base_url, waited)
                    return waited
                last_problem = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                last_problem = type(exc).__name__
            if stop_requested():
                raise StopRequested(f"stop requested while waiting for the vLLM server at {self.base_url}")
            now = time.monotonic()
            if now - start >= timeout:
                raise ServerUnavailable(f"vLLM server at {self.base_url} not healthy after {timeout:.0f} s "
                                  f"(last: {last_problem}); see `docker compose logs vllm`, or raise VLLM_WAIT_TIMEOUT")
            if now >= next_report:
                log.info("waiting for vLLM server at %s (%s, %.0f s of %.0f s)", self.base_url, last_problem,
                         now - start, timeout)
                next_report = now + 30
            time.sleep(min(poll_interval, max(0.1, timeout - (now - start))))

    def models(self) -> list[dict]:
        return self._json("GET", "/v1/models")["data"]

    def served_model(self) -> dict:
        """The base model entry of /v1/models (the one that is not a LoRA adapter)."""
        entries = [m for m in self.models() if not m.get("parent")]
        if not entries:
            raise ServerError(f"vLLM server at {self.base_url} lists no base model")
        return entries[0]

    def kv_cache_tokens(self) -> int | None:
        """Tokens of KV cache the server allocated (its Prometheus `vllm:cache_config_info`: blocks x block size);
        None if it does not say."""
        try:
            text = self._request("GET", "/metrics").text
        except ServerError:
            return None
        line = next((l for l in text.splitlines() if l.startswith("vllm:cache_config_info{")), "")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        try:
            return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
        except (KeyError, ValueError):
            return None

    # ------------------------------------------------------------------ LoRA adapters
    def load_lora_adapter(self, name: str, path: str) -> None:
        # vLLM answers 500 when the engine rejects an adapter (rank, modules): not a fault to retry.
        def load() -> requests.Response:
            return self._request("POST", "/v1/load_lora_adapter", retry_status=(502, 503, 504),
                                 json={"lora_name": name, "lora_path": path})

        response = load()
        if response.status_code == 400 and "already been loaded" in response.text:
            # A previous trainer process registered this version; its files were rewritten since.
            self.unload_lora_adapter(name)
            response = load()
        if response.status_code == 404 and "no adapter found" in response.text.lower():
            raise AdapterUnreadable(f"vLLM server at {self.base_url} cannot read adapter {name!r} at {path}: "
                                    f"{SHARED_STORAGE_FIX}")
        if response.status_code == 404:
            raise ServerError(f"vLLM server at {self.base_url} has no /v1/load_lora_adapter: start it with "
                              "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
        if response.status_code >= 400:
            raise ServerError(f"vLLM server at {self.base_url} rejected adapter {name!r} from {path} "
                              f"(HTTP {response.status_code}): {response.text[:500]}")

    def unload_lora_adapter(self, name: str) -> None:
        response = self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code >= 400 and response.status_code != 404:
            raise ServerError(f"vLLM server at {self.base_url} could not unload adapter {name!r} "
                              f"(HTTP {response.status_code}): {response.text[:300]}")

    # ------------------------------------------------------------------ generation
    def complete(self, model: str, prompts: list[list[int]], n: int, max_tokens: int, temperature: float,
                 top_p: float, seed: int | None = None, stop_token_ids: list[int] = ()) -> list[Completion]:
        """Sample `n` completions per prompt (prompts as token IDs), in prompt order, with per-token logprobs; with
        a `seed`, the same request samples the same completions whatever else the server is batching. A completion
        ends at any of `stop_token_ids` (kept as its last token) besides the server's own end-of-sequence."""
        body = {"model": model, "prompt": prompts, "n": n, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False}
        if stop_token_ids:
            body["stop_token_ids"] = list(stop_token_ids)
        if seed is not None:
            body["seed"] = seed
        choices = self._json("POST", "/v1/completions", json=body)["choices"]
        choices.sort(key=lambda c: c["index"])
        if len(choices) != len(prompts) * n:
            raise ServerError(f"vLLM server at {self.base_url} returned {len(choices)} completions, "
                              f"expected {len(prompts) * n}")
        return [Completion(prompt_index=i // n, token_ids=c["token_ids"],
                           logprobs=c["logprobs"]["token_logprobs"], finish_reason=c["finish_reason"])
                for i, c in enumerate(choices)]
