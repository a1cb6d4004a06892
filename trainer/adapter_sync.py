"""Weight sync by LoRA adapter: save the trainer's adapter to the shared volume and register it with vLLM.

Each optimizer step publishes a new version under a new name (`policy-v<step>`), so a request can never mix two
versions, and vLLM's prefix cache (keyed by adapter) never serves KV computed with stale weights. Older versions
are unloaded once nothing can use them, and their files deleted one publish later. At the end of a run the final
adapter stays registered under the run's name.

NCCL weight broadcast (TRL's server mode) is not an option here: the trainer shares its GPUs with the TP=2 server
and NCCL cannot put two ranks on one GPU.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .files import fsync_tree, write_directory_atomically
from .vllm_client import ServerError, VLLMServerClient

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "policy-v"


class AdapterPublisher:
    def __init__(self, model, client: VLLMServerClient, adapters_dir: Path):
        self.model = model
        self.client = client
        self.adapters_dir = adapters_dir.resolve()
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.current: str | None = None
        self._previous: str | None = None

    def path_of(self, name: str) -> Path:
        path = (self.adapters_dir / name).resolve()
        # The server reads whatever path it is told; only paths of this run's adapter dir are ever sent.
        if path.parent != self.adapters_dir or not name.startswith(ADAPTER_PREFIX):
            raise ValueError(f"refusing to register adapter path outside {self.adapters_dir}: {path}")
        return path

    def publish(self, step: int) -> str:
        """Save the adapter as version `step`, register it, retire the older versions; return its name."""
        name = f"{ADAPTER_PREFIX}{step}"
        path = self.path_of(name)
        write_directory_atomically(path, self.model.save_pretrained)  # a leftover of a killed run is rewritten whole
        self.client.load_lora_adapter(name, str(path))
        if name == self.current:  # the same version written again: nothing older to retire
            return name
        # Generation is synchronous, so once the new version is registered no request can use the old one:
        # unload it now (frees a --max-loras slot), delete its files a publish later (a reader may still be on them).
        if self._previous:
            shutil.rmtree(self.path_of(self._previous), ignore_errors=True)
        if self.current:
            self._unload(self.current)
        self._previous, self.current = self.current, name
        return name

    def check_server_accepts(self) -> None:
        """Register and unload a probe copy of the adapter: a server that rejects it fails here, at start."""
        name = f"{ADAPTER_PREFIX}probe"
        path = self.path_of(name)
        shutil.rmtree(path, ignore_errors=True)
        self.model.save_pretrained(path)
        fsync_tree(path)
        try:
            self.client.load_lora_adapter(name, str(path))
            self._unload(name)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish_final(self, name: str, path: Path) -> None:
        """Register the finished run's adapter at `path` (inside the run's directory) under `name`, where it stays for
        users to query through the server's OpenAI API."""
        path = path.resolve()
        if path.parent != self.adapters_dir.parent:
            raise ValueError(f"refusing to register adapter path outside {self.adapters_dir.parent}: {path}")
        fsync_tree(path)
        self.client.load_lora_adapter(name, str(path))

    def _unload(self, name: str) -> None:
        try:
            self.client.unload_lora_adapter(name)
        except ServerError as exc:  # a leftover slot costs memory, not correctness
            log.warning("could not unload adapter %s: %s", name, exc)

    def remove_leftovers(self) -> None:
        """Delete adapter versions a previous process of this run left behind: the server holds the weights of any
        it still lists in memory, and checkpoints keep their own copy."""
        for path in self.adapters_dir.glob(f"{ADAPTER_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
