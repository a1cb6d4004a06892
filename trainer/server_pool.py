"""Several vLLM servers behind the interface of one `VLLMServerClient` (VLLM_SERVER_URLS).

The generation backend and the adapter publisher call the pool exactly as they call one client; the pool
- spreads each `complete` call over the servers that are up, one GRPO group (a prompt and its n= completions) per
  unit, each group to the server with the fewest sequences the pool has in flight there (least outstanding
  requests, as verl's AsyncLLMServerManager balances its vLLM replicas), and returns the completions in prompt order;
- registers every adapter version on every server before any request can name it, and gives a server that comes
  back (restarted: it answers, without the adapters) every adapter still registered before it takes requests again;
- moves the share of a server that fails (unavailable after the client's retries, or a restart that lost the
  adapter) to the others within the same call, so that each prompt's group is sampled exactly once; the failed
  server is probed again (GET /health) at most every REJOIN_PROBE_SECONDS and rejoins once it answers and holds the
  adapters. Only when no server is left does the call raise `ServerUnavailable`, for `ServerRecovery` to wait out.

In-flight counts, not vLLM's /metrics gauges: the trainer is the servers' one heavy client, its own count is exact
at the moment of the choice while a scrape lags the scheduler and its metric names change between vLLM versions.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

import requests

from .vllm_client import AdapterNotFound, Completion, ServerError, ServerUnavailable, StopRequested, VLLMServerClient

log = logging.getLogger(__name__)
T = TypeVar("T")

REJOIN_PROBE_SECONDS = 10.0  # between health probes of a server that is down


@dataclass(eq=False)  # one object per server, a dictionary key
class Member:
    client: VLLMServerClient
    up: bool = True
    in_flight: int = 0  # sequences (prompts x n) this pool has asked of it and not yet got back
    next_probe: float = 0.0

    @property
    def url(self) -> str:
        return self.client.base_url


class ServerPool:
    def __init__(self, clients: list[VLLMServerClient]):
        if not clients:
            raise ValueError("a server pool needs at least one server")
        self.members = [Member(c) for c in clients]
        self.base_url = ", ".join(m.url for m in self.members)  # for messages that name "the server"
        self.registered: dict[str, str] = {}  # adapter name -> path, as every server must hold them
        self._lock = threading.Lock()
        self._waited_for_every_server = False

    def copy(self) -> "ServerPool":
        """The same servers through clients of their own (a `requests.Session` each), for another thread (rounds
        sampled ahead); the adapters every server must hold are shared, so either pool re-registers them on a server
        that rejoins."""
        twin = ServerPool([m.client.copy() for m in self.members])
        twin.registered = self.registered
        twin._waited_for_every_server = self._waited_for_every_server
        return twin

    # ------------------------------------------------------------------ health
    def wait_until_healthy(self, timeout: float, poll_interval: float = 5.0,
                           stop_requested: Callable[[], bool] = lambda: False) -> float:
        """The first wait (the start) is for every server, each within `timeout`: each must pass the start-up
        checks. Later waits (recovery, when none was left) end as soon as any server is back with the adapters."""
        start = time.monotonic()
        if not self._waited_for_every_server:
            for member in self.members:
                member.client.wait_until_healthy(max(1.0, timeout - (time.monotonic() - start)), poll_interval,
                                                 stop_requested)
                member.up = True
            self._waited_for_every_server = True
            return time.monotonic() - start
        while True:
            for member in self.members:
                member.next_probe = 0.0
            self._rejoin_recovered()
            if self._up_members():
                return time.monotonic() - start
            if stop_requested():
                raise StopRequested(f"stop requested while waiting for the vLLM servers at {self.base_url}")
            if time.monotonic() - start >= timeout:
                raise ServerUnavailable(f"no vLLM server of {self.base_url} healthy after {timeout:.0f} s; see "
                                        "their logs, or raise VLLM_WAIT_TIMEOUT")
            time.sleep(min(poll_interval, max(0.1, timeout - (time.monotonic() - start))))

    def models(self) -> list[dict]:
        """The entries of /v1/models that every server that is up lists (an adapter counts once all have it)."""
        listings = self._on_every_up_member("listing models", lambda m: m.client.models())
        ids = set.intersection(*({e["id"] for e in entries} for entries in listings.values()))
        return [e for e in next(iter(listings.values())) if e["id"] in ids]

    def served_model(self) -> dict:
        """The base model every server serves, with the smallest --max-model-len among them."""
        served = self._on_every_up_member("start-up probe (served model)", lambda m: m.client.served_model())
        names = {entry["id"] for entry in served.values()}
        if len(names) > 1:
            listing = "; ".join(f"{m.url} serves {e['id']!r}" for m, e in served.items())
            raise ServerError(f"the vLLM servers serve different models ({listing}): start every server with the "
                              "same MODEL_NAME")
        lengths = {m.url: e.get("max_model_len") for m, e in served.items()}
        if len(set(lengths.values())) > 1:
            log.warning("the vLLM servers differ in --max-model-len (%s): the smallest bounds every request", lengths)
        return min(served.values(), key=lambda e: e.get("max_model_len") or float("inf"))

    # ------------------------------------------------------------------ LoRA adapters
    def kv_cache_tokens(self) -> int | None:
        """Tokens of KV cache over the servers that are up (a round is spread over them); None if one does not say."""
        tokens = [m.client.kv_cache_tokens() for m in self._up_members()]
        return None if not tokens or None in tokens else sum(tokens)

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Register on every server that is up; one that is down gets it when it rejoins."""
        self.registered[name] = path
        self._rejoin_recovered()
        self._on_every_up_member(f"registering adapter {name}", lambda m: m.client.load_lora_adapter(name, path))

    def unload_lora_adapter(self, name: str) -> None:
        self.registered.pop(name, None)
        # A server that is down now lost it with its restart, or keeps a slot it frees at the next restart.
        self._on_every_up_member(f"unloading adapter {name}", lambda m: m.client.unload_lora_adapter(name),
                                 tolerate_down=True)

    # ------------------------------------------------------------------ generation
    def complete(self, model: str, prompts: list[list[int]], n: int, max_tokens: int, temperature: float,
                 top_p: float, seed: int | None = None, stop_token_ids: list[int] = ()) -> list[Completion]:
        """`VLLMServerClient.complete` over the pool: `n` completions per prompt, in prompt order, each prompt's
        group from one server, every group exactly once."""
        groups: list[list[Completion] | None] = [None] * len(prompts)
        pending = list(range(len(prompts)))
        while pending:
            self._rejoin_recovered()
            shares = self._assign(pending, n)
            with ThreadPoolExecutor(max_workers=len(shares)) as executor:
                futures = {executor.submit(self._complete_on, member, model, [prompts[i] for i in indices], n,
                                           max_tokens, temperature, top_p, seed, stop_token_ids): (member, indices)
                           for member, indices in shares.items()}
            failed, errors = [], []
            for future, (member, indices) in futures.items():
                try:
                    completions = future.result()
                except (ServerUnavailable, AdapterNotFound) as exc:
                    self._mark_down(member, exc)
                    failed += indices
                    continue
                except ServerError as exc:
                    errors.append(exc)
                    continue
                for index in indices:
                    groups[index] = []
                for c in completions:
                    index = indices[c.prompt_index]
                    groups[index].append(Completion(index, c.token_ids, c.logprobs, c.finish_reason))
            if errors:
                raise errors[0]
            if failed:
                log.warning("%d of %d prompts go to the other vLLM servers", len(failed), len(prompts))
            pending = sorted(failed)
        return [c for group in groups for c in group]

    def _assign(self, pending: list[int], n: int) -> dict[Member, list[int]]:
        """Each group to the up server with the fewest sequences in flight, counting those given in this call."""
        up = self._up_members()
        if not up:
            raise ServerUnavailable(f"every vLLM server is unavailable ({self.base_url})")
        with self._lock:
            load = {m: m.in_flight for m in up}
            shares: dict[Member, list[int]] = {}
            for index in pending:
                member = min(up, key=lambda m: load[m])  # ties go to the first listed: a stable spread
                load[member] += n
                shares.setdefault(member, []).append(index)
        return shares

    def _complete_on(self, member: Member, model: str, prompts: list[list[int]], n: int, max_tokens: int,
                     temperature: float, top_p: float, seed: int | None,
                     stop_token_ids: list[int]) -> list[Completion]:
        sequences = len(prompts) * n
        with self._lock:
            member.in_flight += sequences
        try:
            return member.client.complete(model, prompts, n=n, max_tokens=max_tokens, temperature=temperature,
                                          top_p=top_p, seed=seed, stop_token_ids=stop_token_ids)
        finally:
            with self._lock:
                member.in_flight -= sequences

    # ------------------------------------------------------------------ membership
    def _up_members(self) -> list[Member]:
        return [m for m in self.members if m.up]

    def _mark_down(self, member: Member, exc: Exception) -> None:
        if isinstance(exc, AdapterNotFound):
            reason = "it answered without the adapter (it restarted)"
            member.next_probe = 0.0  # it is up: give it the adapters at the next round
        else:
            reason = f"unavailable ({str(exc)[:200]})"
            member.next_probe = time.monotonic()
        member.up = False
        log.warning("vLLM server at %s left the pool: %s; its requests go to the others until it is back",
                    member.url, reason)

    def _rejoin_recovered(self) -> None:
        """Probe the servers that are down (each at most every REJOIN_PROBE_SECONDS); one that answers gets every
        registered adapter it lacks, then takes requests again."""
        for member in self.members:
            if member.up or time.monotonic() < member.next_probe:
                continue
            member.next_probe = time.monotonic() + REJOIN_PROBE_SECONDS
            try:
                if member.client.session.get(f"{member.url}/health", timeout=5).status_code != 200:
                    continue
                held = {entry["id"] for entry in member.client.models()}
                for name, path in list(self.registered.items()):
                    if name not in held:
                        log.warning("vLLM server at %s came back without adapter %s (it restarted); registering "
                                    "it again", member.url, name)
                        member.client.load_lora_adapter(name, path)
            except (requests.RequestException, ServerUnavailable, AdapterNotFound) as exc:
                log.info("vLLM server at %s is still down (%s)", member.url, type(exc).__name__)
                continue
            member.up = True
            log.info("vLLM server at %s rejoined the pool with adapters %s", member.url,
                     ", ".join(self.registered) or "(none)")

    def _on_every_up_member(self, what: str, call: Callable[[Member], T],
                            tolerate_down: bool = False) -> dict[Member, T]:
        """`call` on every server that is up, in parallel; a server that turns out unavailable leaves the pool. With
        none left, ServerUnavailable (unless `tolerate_down`); any other error is raised."""
        up = self._up_members()
        if not up and not tolerate_down:
            raise ServerUnavailable(f"{what}: every vLLM server is unavailable ({self.base_url})")
        with ThreadPoolExecutor(max_workers=max(1, len(up))) as executor:
            futures = {m: executor.submit(call, m) for m in up}
        results, errors = {}, []
        for member, future in futures.items():
            try:
                results[member] = future.result()
            except ServerUnavailable as exc:
                self._mark_down(member, exc)
            except ServerError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        if not results and not tolerate_down:
            raise ServerUnavailable(f"{what}: every vLLM server is unavailable ({self.base_url})")
        return results


def server_client(settings, base_url: str) -> VLLMServerClient:
    return VLLMServerClient(base_url, settings.vllm_api_key, settings.vllm_request_timeout,
                            settings.vllm_max_retries, settings.vllm_retry_max_wait)


def server_backend(settings) -> VLLMServerClient | ServerPool:
    """One client for one server (VLLM_SERVER_HOST/PORT), a pool for VLLM_SERVER_URLS."""
    urls = settings.server_urls
    if len(urls) == 1:
        return server_client(settings, urls[0])
    return ServerPool([server_client(settings, url) for url in urls])
