"""The documents against what they describe: the settings' docs (README tables, .env.example) against the
declarations in trainer/config.py and docker/vllm/serve.py."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from conftest import REPO
from scripts import settings_docs
from scripts.settings_docs import serve


def test_settings_docs_match_the_declarations():
    problems = settings_docs.drift()
    assert not problems, "\n\n".join(problems)


def test_a_changed_help_text_is_caught_in_both_files():
    blocks = settings_docs.declared_blocks()
    trainer = blocks[1]
    entries = list(trainer.entries)
    entries[0] = dataclasses.replace(entries[0], help=entries[0].help + " Changed.")
    problems = settings_docs.drift([blocks[0], dataclasses.replace(trainer, entries=tuple(entries))])
    assert [p.split(" ", 1)[0] for p in problems] == ["README.md", ".env.example"]
    assert all(" Changed." in p and "settings_docs.py --write" in p for p in problems)


def test_check_command_exits_0_when_in_step():
    result = subprocess.run([sys.executable, str(REPO / "scripts/settings_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_server_help_lists_every_setting_with_default_and_allowed_values():
    result = subprocess.run([sys.executable, str(REPO / "docker/vllm/serve.py"), "--help"], capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    for f in dataclasses.fields(serve.ServerSettings):
        assert f.metadata["env"] in result.stdout and f.metadata["help"] in result.stdout
    (line,) = [line for line in result.stdout.splitlines() if line.strip().startswith("VLLM_KV_CACHE_DTYPE ")]
    assert line.split()[1:] == ["default:", "auto;", "allowed:", "auto,", "fp8,", "fp8_e4m3,", "fp8_e5m2"]

