"""The trainer container's command: check the settings once, then start the trainer as one process, or as
TRAINER_PROCESSES processes per node through `torchrun` (its static rendezvous at MASTER_ADDR:MASTER_PORT, the same
command on every node with its own NODE_RANK).

    python launch.py            # settings from the environment, as train_grpo_vllm.py
    python launch.py --check    # only the checks made before starting: exit 0 (with a summary) or 2
    python launch.py --help

A bad setting exits 2 here, once, before any process or GPU is started, and before the server is waited for.

SIGTERM (`docker compose down`) goes to the trainer processes themselves, not to torchrun: torchrun answers a
signal by stopping its workers within its shutdown timeout and exiting 1 whatever they did, while each rank,
signalled directly, finishes the step with the others, checkpoints and exits 0, and torchrun then exits 0. So
torchrun runs in a session of its own (a terminal's Ctrl-C reaches this process only, which passes it on once),
and is told to stop if this process dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from the trainer directory, as the container does
    # Python puts the script's own folder first on sys.path, where trainer/rewards.py, data.py, model.py would
    # shadow a user's module of the same name (REWARD_FUNCS=rewards.my_fn): the package's folder instead.
    HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(HERE.parent))

from trainer.config import SettingsError  # noqa: E402
from trainer.preflight import checked_settings  # noqa: E402

ENTRY_SCRIPT = Path(__file__).resolve().with_name("train_grpo_vllm.py")


def processes_per_node(requested: int) -> int:
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested and visible and requested > visible:
        raise SettingsError(f"TRAINER_PROCESSES={requested} but {visible} GPUs are visible: one process per GPU, "
                            f"so at most {visible} (0 takes them all)")
    if requested:
        return requested
    return visible or 1  # no GPU: one process on the CPU


def torchrun_command(settings, per_node: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={settings.nnodes}",
            f"--node-rank={settings.node_rank}", f"--nproc-per-node={per_node}",
            f"--master-addr={settings.master_addr}", f"--master-port={settings.master_port}",
            str(ENTRY_SCRIPT)]


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        os.execv(sys.executable, [sys.executable, str(ENTRY_SCRIPT), "--help"])
    try:
        settings = checked_settings(os.environ)
        per_node = processes_per_node(settings.trainer_processes)
        if problem := settings.process_split_problem(per_node):
            raise SettingsError([problem])
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "--check" in argv:
        print(check_summary(settings, per_node))
        return 0
    # the processes skip the checks just made, and take `auto`'s attention as resolved here
    env = dict(os.environ, TRAINER_SETTINGS_CHECKED="1", ATTN_IMPLEMENTATION=settings.attn_implementation)
    if per_node * settings.nnodes == 1:
        os.execve(sys.executable, [sys.executable, str(ENTRY_SCRIPT)], env)
    # torchrun gives each process one CPU thread unless OMP_NUM_THREADS is set; ranks read and dequantize the model
    # on the CPU (model.load_model), which on one thread takes many minutes: give each its share of the CPUs
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // per_node)))
    return run_torchrun(torchrun_command(settings, per_node), env)


def check_summary(settings, per_node: int) -> str:
    """What `--check` found usable, in a few lines; the server is not contacted."""
    processes = per_node * settings.nnodes
    return "\n".join([
        "settings OK (nothing was started; the vLLM server was not contacted):",
        f"  model {settings.model_name}, attention {settings.attn_implementation}, {processes} trainer "
        f"process{'es' if processes > 1 else ''} ({per_node} on this node)",
        f"  data {settings.dataset} (split {settings.dataset_split}), rewards {', '.join(settings.reward_funcs)} "
        "(each called once on the data's first rows)",
        f"  {settings.sequences_per_step} sequences per step, {settings.max_steps} steps, run {settings.run_dir}",
        f"  server{'s' if len(settings.server_urls) > 1 else ''} {', '.join(settings.server_urls)}"])


def stop_when_parent_dies() -> None:
    """In the child before exec: SIGTERM when the launcher dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: Linux, as the container)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def run_torchrun(command: list[str], env: dict) -> int:
    torchrun = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=stop_when_parent_dies)

    def forward_to_ranks(signum, frame):
        # torchrun's direct children are this node's trainer processes
        for worker in children(torchrun.pid):
            try:
                os.kill(worker, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward_to_ranks)
    return torchrun.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
