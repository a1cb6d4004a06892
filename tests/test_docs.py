"""The documents against what they describe: the settings' docs (README tables, .env.example) against the
declarations in trainer/config.py and docker/vllm/serve.py."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO
from scripts import settings_docs
from scripts.settings_docs import serve


def test_settings_docs_match_the_declarations():
    problems = settings_docs.drift()
    assert not problems, "\n\n".join(problems)


def changed_first_trainer_setting(**change) -> list:
    server, trainer = settings_docs.declared_blocks()
    entries = list(trainer.entries)
    entries[0] = dataclasses.replace(entries[0], **change)
    return [server, dataclasses.replace(trainer, entries=tuple(entries))]


def test_a_changed_help_text_is_caught_in_env_example():
    first = settings_docs.declared_blocks()[1].entries[0]
    problems = settings_docs.drift(changed_first_trainer_setting(help=first.help + " Changed."))
    assert [p.split(" ", 1)[0] for p in problems] == [".env.example"]  # the README's tables hold no meanings
    assert " Changed." in problems[0] and "settings_docs.py --write" in problems[0]


def test_a_changed_default_is_caught_in_both_files():
    problems = settings_docs.drift(changed_first_trainer_setting(default="elsewhere"))
    assert [p.split(" ", 1)[0] for p in problems] == ["README.md", ".env.example"]
    assert all("elsewhere" in p for p in problems)


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


# ------------------------------------------------------------------ links and names in the documents
DOCUMENTS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
TOP_LEVEL = ("docker/", "trainer/", "tests/", "scripts/", "benchmarks/", "examples/", "docs/", ".ci/")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def test_relative_links_lead_to_files_and_headings_that_exist():
    broken = []
    for doc in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, fragment = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def named_paths(text: str) -> set[str]:
    """Repository paths a document names in backticks or in its layout block (placeholders and globs left out)."""
    names = set(re.findall(r"`([^`\s]+)`", text))
    layout = text.split("## Layout", 1)[1].split("```")[1] if "## Layout" in text else ""
    names |= {line.split()[0] for line in layout.splitlines() if line.strip()}
    return {n.rstrip("/") for n in names if (n.startswith(TOP_LEVEL) or re.fullmatch(r"[\w.-]+\.(md|yml|example)", n))
            and not re.search(r"[<>*]|\.\.\.", n)}


def test_files_the_documents_name_exist():
    missing = [f"{doc.name}: {name}" for doc in DOCUMENTS for name in sorted(named_paths(doc.read_text()))
               if not (REPO / name).exists()]
    assert not missing, "\n".join(missing)


def test_readme_layout_names_files_that_exist_including_globs():
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    entries = [line.split()[0] for line in layout.splitlines() if line.strip()]
    assert len(entries) > 20
    missing = [e for e in entries if not list(REPO.glob(e.rstrip("/")))]
    assert not missing, missing


def test_readme_keeps_the_test_command_that_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/test.sh" in (REPO / ".ci/run").read_text()
    tests_section = readme.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    assert "\n    bash scripts/test.sh\n" in tests_section


def test_compose_services_the_readme_runs_exist():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"docker compose (?:--profile \w+ )?(?:run --rm (?:--no-deps )?|up -d |logs -f |stop |start )([a-z][\w-]+)", readme))
    assert {"fetch-weights", "trainer", "tensorboard"} <= named
    assert named <= services.keys(), named - services.keys()


def test_readme_stays_an_operators_guide():
    """The operator's path in the README, the evidence in docs/ and BENCHMARKS.md: at most 2,500 words."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.split()) <= 2500, len(readme.split())
    order = [readme.index(f"\n## {name}") for name in ("Prerequisites", "Two commands", "Watching a run",
                                                         "Your own data and rewards", "Stop, resume, restart",
                                                         "Troubleshooting")]
    assert order == sorted(order)


def test_readme_step_line_is_the_run_logger_s_current_format():
    """The example a user compares `docker compose logs trainer` with has the fields, in the order, that the trainer
    writes today (numbers aside)."""
    from types import SimpleNamespace

    from trainer.run_log import RunLogger

    (example,) = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("step ")]
    logger = RunLogger.__new__(RunLogger)
    logger.first_step, logger.run_started = 0, 0.0
    record = {"step": 20, "max_steps": 20, "reward": 1.0, "reward_std": 0.0, "completions/clipped_ratio": 0.0,
              "completions/mean_length": 10, "time/generation_s": 3.6, "rollouts/sampled_ahead": 0,
              "time/rollout_wait_s": 3.6, "time/sync_s": 0.14, "time/train_s": 4.6, "tokens/generation_per_s": 43,
              "tokens/train_per_s": 166, "sampling/sampling_logp_difference/mean": 2e-6,
              "sampling/importance_sampling_ratio/mean": 1.0, "memory/peak_gib/cpu": 2.3, "adapter": "policy-v19",
              "rollouts/staleness": 0}
    written = logger.format_line(record, SimpleNamespace(global_step=20, max_steps=20))

    def shape(line: str) -> str:
        return re.sub(r"\d+(\.\d+)?(e[+-]\d+)?", "#", line)

    assert shape(example) == shape(written), f"README.md shows\n{example}\nthe trainer writes\n{written}"
