#!/usr/bin/env python3
"""The settings' documentation, generated from their declarations, between marker lines (everything outside them
stays as written by hand): in .env.example each setting's help above `NAME=default`, grouped as declared; in the
README one table per service, its settings and defaults by group (the meanings stay in .env.example and `--help`).

    python scripts/settings_docs.py --write   # rewrite the generated parts after adding or changing a setting
    python scripts/settings_docs.py --check   # exit 1, with a diff, where a generated part differs

Sources: docker/vllm/serve.py's `ServerSettings` (the server; the names the trainer reads too are documented there
once) and trainer/config.py's `Settings` (the trainer's other settings). A name that docker-compose.yml fixes for
its service is shown commented out in .env.example, since a value there would not reach the container.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "docker/vllm"))  # serve.py, the vLLM image's entrypoint, is no package

import serve  # noqa: E402
from trainer.config import Settings  # noqa: E402

README = REPO / "README.md"
ENV_EXAMPLE = REPO / ".env.example"
COMPOSE_FILE = REPO / "docker-compose.yml"
WIDTH = 118
# Left commented out in .env.example although compose passes it on: changing it cuts the server off the trainer.
KEEP_COMMENTED = {"VLLM_HOST": "the server must listen on all interfaces for the trainer to reach it over the "
                               "compose network"}


@dataclass(frozen=True)
class Entry:
    """One setting as documented: what its declaration says, plus where compose fixes it."""
    name: str
    default: Any
    help: str
    choices: tuple = ()
    fixed_by_compose: str = ""  # the service docker-compose.yml fixes it for
    group: str = ""  # the `# --- group ---` comment above it in the declarations


@dataclass(frozen=True)
class Block:
    """One generated part: its settings and the file that declares them."""
    key: str
    source: str
    entries: tuple[Entry, ...]
    note: str = ""


def groups_of(settings_class: type) -> dict[str, str]:
    """Each setting's group: the `# --- name ---` comment above its declaration."""
    groups, current = {}, ""
    for line in inspect.getsource(settings_class).splitlines():
        if header := re.fullmatch(r"\s*# --- (.+?) ---\s*", line):
            current = header.group(1)
        elif declared := re.search(r"= setting\(\s*\"(\w+)\"", line):
            groups[declared.group(1)] = current
    return groups


def entries_of(settings_class: type, service: str, fixed: dict[str, set[str]], skip: set[str] = frozenset()):
    groups = groups_of(settings_class)
    for f in dataclasses.fields(settings_class):
        name = f.metadata["env"]
        if name in skip:
            continue
        choices = getattr(f.metadata["check"], "choices", ())
        yield Entry(name, f.default, f.metadata["help"], tuple(choices),
                    service if name in fixed.get(service, set()) else "", groups.get(name, ""))


def fixed_by_compose(compose_file: Path = COMPOSE_FILE) -> dict[str, set[str]]:
    """Per service, the names docker-compose.yml gives a value of its own (not one taken from .env)."""
    services = yaml.safe_load(compose_file.read_text())["services"]
    fixed = {}
    for service, spec in services.items():
        environment = spec.get("environment") or {}
        pairs = environment.items() if isinstance(environment, dict) else (
            (item.split("=", 1) + [None])[:2] for item in environment)
        fixed[service] = {name for name, value in pairs if value is not None and "${" not in str(value)}
    return fixed


def declared_blocks() -> list[Block]:
    fixed = fixed_by_compose()
    server_names = {f.metadata["env"] for f in dataclasses.fields(serve.ServerSettings)}
    trainer_names = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    shared = sorted(server_names & trainer_names)
    server = Block("server", "docker/vllm/serve.py", tuple(entries_of(serve.ServerSettings, "vllm", fixed)),
                   note="Read by both services: " + ", ".join(shared) + ".")
    trainer = Block("trainer", "trainer/config.py", tuple(entries_of(Settings, "trainer", fixed, skip=set(shared))),
                    note="The trainer also reads " + ", ".join(shared) + " (above).")
    return [server, trainer]


def shared_default_mismatches() -> list[str]:
    """A name both declare must have one default, or .env.example could show only one of them."""
    server = {f.metadata["env"]: f.default for f in dataclasses.fields(serve.ServerSettings)}
    trainer = {f.metadata["env"]: f.default for f in dataclasses.fields(Settings)}
    return [f"{name}: docker/vllm/serve.py's default {server[name]!r} differs from trainer/config.py's "
            f"{trainer[name]!r}" for name in sorted(server.keys() & trainer.keys()) if server[name] != trainer[name]]


# ---------------------------------------------------------------- rendering
def env_value(value: Any) -> str:
    """A value as it is written in .env (lists comma-separated, booleans as true/false)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(env_value, value))
    return str(value)


def meaning(entry: Entry) -> str:
    text = entry.help
    if entry.choices:
        text += " Allowed: " + ", ".join(env_value(c) or "(empty)" for c in entry.choices) + "."
    if entry.fixed_by_compose:
        text += f" docker-compose.yml sets it for the {entry.fixed_by_compose} service."
    return text


def readme_table(block: Block) -> str:
    """Names and defaults, one row per group; the meanings are in .env.example and `--help`."""
    rows = ["| group | settings and their defaults |", "| --- | --- |"]
    for group, entries in grouped(block.entries):
        cells = [f"`{e.name}` ({f'`{env_value(e.default)}`' if env_value(e.default) else 'empty'}"
                 + ("; set by docker-compose.yml)" if e.fixed_by_compose else ")") for e in entries]
        rows.append(f"| {group or block.key} | {', '.join(cells).replace('|', chr(92) + '|')} |")
    return block.note + "\n\n" + "\n".join(rows)


def grouped(entries: tuple[Entry, ...]) -> list[tuple[str, list[Entry]]]:
    """Consecutive entries of one group together, in declaration order."""
    groups: list[tuple[str, list[Entry]]] = []
    for e in entries:
        if not groups or groups[-1][0] != e.group:
            groups.append((e.group, []))
        groups[-1][1].append(e)
    return groups


def comment(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - 2, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False,
                         break_long_words=False)


def env_lines(block: Block) -> str:
    lines = comment(block.note)
    for group, entries in grouped(block.entries):
        if group:
            lines.append(f"# --- {group} ---")
        for e in entries:
            text, line = meaning(e), f"{e.name}={env_value(e.default)}"
            if e.fixed_by_compose:
                text, line = text + " A value here does not reach it; the line is for runs outside compose.", "# " + line
            elif e.name in KEEP_COMMENTED:
                text, line = text + f" Left commented out: {KEEP_COMMENTED[e.name]}.", "# " + line
            lines += comment(text) + [line]
    return "\n".join(lines)


def markers(path: Path, block: Block) -> tuple[str, str]:
    what = f"settings:{block.key}, generated from {block.source} by scripts/settings_docs.py --write: edit there"
    if path.suffix == ".md":
        return f"<!-- begin {what} -->", f"<!-- end settings:{block.key} -->"
    return f"# >>> begin {what}", f"# <<< end settings:{block.key}"


def render(path: Path, text: str, blocks: list[Block]) -> str:
    """`text` with each block's part between its markers regenerated; raises ValueError naming a missing marker."""
    for block in blocks:
        begin, end = markers(path, block)
        start = text.find(begin)
        stop = text.find(end, start + len(begin)) if start >= 0 else -1
        if start < 0 or stop < 0:
            raise ValueError(f"{path.name}: the marker lines {begin!r} and {end!r} are missing; put them where the "
                             f"{block.key} settings belong")
        body = readme_table(block) if path.suffix == ".md" else env_lines(block)
        text = text[:start + len(begin)] + "\n" + body + "\n" + text[stop:]
    return text


def drift(blocks: list[Block] | None = None, files: tuple[Path, ...] = (README, ENV_EXAMPLE)) -> list[str]:
    """One message per file whose generated parts differ from `blocks` (the declarations by default), with a diff."""
    blocks = declared_blocks() if blocks is None else blocks
    problems = shared_default_mismatches()
    for path in files:
        text = path.read_text()
        try:
            expected = render(path, text, blocks)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if expected != text:
            diff = difflib.unified_diff(text.splitlines(), expected.splitlines(), f"{path.name} (now)",
                                        f"{path.name} (from the declarations)", lineterm="", n=1)
            problems.append(f"{path.name} differs from the settings' declarations; run "
                            f"`python scripts/settings_docs.py --write`:\n" + "\n".join(diff))
    return problems


def main(argv: list[str]) -> int:
    if argv not in (["--write"], ["--check"]):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if argv == ["--check"]:
        problems = drift()
        print("\n\n".join(problems) if problems else "settings docs match their declarations")
        return 1 if problems else 0
    if mismatches := shared_default_mismatches():
        print("\n".join(mismatches), file=sys.stderr)
        return 1
    blocks = declared_blocks()
    for path in (README, ENV_EXAMPLE):
        try:
            new = render(path, path.read_text(), blocks)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if new != path.read_text():
            path.write_text(new)
            print(f"rewrote the settings in {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
