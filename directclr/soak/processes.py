"""One launch of a run: started with a token in its environment (how every process of it is
found and killed), watched for the moment of its fault, the fault delivered, nothing left."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .plan import EARLY_MOMENTS, SIGNALS, WRITE_MOMENTS, Fault

LAUNCH_VAR = "DIRECTCLR_SOAK_LAUNCH"  # in every process of a launch: how its leftovers are found
POLL_S = 0.02
WRITE_POLL_S = 0.001  # a tiny checkpoint's temporary file lives 5-10 ms here
LEFTOVER_GRACE_S = 30.0  # torchrun's own shutdown of its ranks, after its first process ends
SCHEDULER_REAP_S = 1.0  # kill -9 of torchrun: its ranks are killed within this, as a job's are


def processes_of(token: str) -> list[int]:
    """Live processes started under `token` (LAUNCH_VAR) or a token below it ("token/...")."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        for item in environ.split(b"\0"):
            if item.startswith(f"{LAUNCH_VAR}=".encode()):
                value = item.split(b"=", 1)[1].decode(errors="replace")
                if value == token or value.startswith(token + "/"):
                    found.append(int(entry.name))
                break
    return found


def kill_all(token: str, group: int | None = None) -> list[int]:
    """kill -9 to the process group `group` and every process of `token`: torchrun starts each
    rank in a session of its own, out of the launcher's group. Returns the pids signalled."""
    if group is not None:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    pids = processes_of(token)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def rank_pid(parent: int, rank: int) -> int | None:
    """The child of torchrun `parent` whose environment says RANK=`rank`."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:  # the command name in parentheses may hold spaces; state and ppid follow it
            ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in Path(
                    entry.path, "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


def run_environment(code: Path) -> dict[str, str]:
    """The runs' environment: plain, whatever launched the soak (no rank or SLURM variables),
    one compute thread per process, the package imported from the snapshot `code`."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT")
    env = {key: value for key, value in os.environ.items()
           if key not in launcher and not key.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    return env


class RunFolder:
    """What the current launch has written into a run's --out: metrics rows, checkpoints and the
    temporary files of writes in progress."""

    def __init__(self, out: Path):
        self.out = out
        # A relaunch cuts metrics.jsonl back to its checkpoint by writing a new file: rows count
        # once the file is not the one the previous launch left.
        self.stale = self._inode()
        # A kill -9 mid-write leaves its temporary file until the relaunch sweeps it, some way
        # into its start-up: not a write of this launch.
        self.left_over = set(self._temporaries())

    def _inode(self) -> int | None:
        try:
            return (self.out / "metrics.jsonl").stat().st_ino
        except FileNotFoundError:
            return None

    def newest_row(self) -> int:
        """The step of this launch's newest metrics row; 0 before it has written any."""
        if self._inode() in (None, self.stale):
            return 0
        newest = 0
        for line in (self.out / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a row being written
                continue
            if "loss" in row:
                newest = max(newest, row["step"])
        return newest

    def checkpoint_step(self) -> int:
        """The newest checkpoint's step: where a relaunch resumes (0: from the start)."""
        steps = [int(p.name[5:14]) for p in self.out.glob("ckpt_*.pt")]
        return max(steps, default=0)

    def _temporaries(self) -> list[str]:
        """The temporary files in --out (directclr.files.atomic_write's .<target>.<hex>.tmp)."""
        try:
            return [entry.name for entry in os.scandir(self.out) if entry.name.endswith(".tmp")]
        except FileNotFoundError:
            return []

    def temporary(self, prefix: str, from_step: int) -> str | None:
        """A temporary file of a write in progress in this launch: of a checkpoint of step >=
        from_step, or of backbone.pt."""
        for name in self._temporaries():
            if name.startswith(prefix) and name not in self.left_over:
                if prefix == ".backbone.pt." or int(name[6:15]) >= from_step:
                    return name
        return None


class Trigger:
    """When a fault is due in one launch. Its window: start-up and resume, position x the time
    the reference run took to its first step; mid-step and checkpoint-write, a step row among
    the next steps, leaving room for the faults after it."""

    def __init__(self, fault: Fault, timing: dict, resumed: int, last_step: int,
                 faults_left: int):
        self.fault, self.timing = fault, timing
        window = max(1, (last_step - resumed - 1) // faults_left)
        self.row = min(last_step, resumed + 1 + int(fault.position * window))
        self.fire_at: float | None = None  # mid-step: seconds after the launch, once known
        self.interval = WRITE_POLL_S if fault.moment in WRITE_MOMENTS else POLL_S

    def due(self, elapsed: float, folder: RunFolder) -> tuple[bool, str | None]:
        """(due now, the temporary file it lands on)."""
        moment = self.fault.moment
        if moment in EARLY_MOMENTS:
            return elapsed >= self.fault.position * self.timing["startup_s"], None
        if moment == "mid-step":
            if self.fire_at is None and folder.newest_row() >= self.row:
                self.fire_at = elapsed + self.fault.jitter * self.timing["step_s"]
            return self.fire_at is not None and elapsed >= self.fire_at, None
        prefix = ".ckpt_" if moment == "checkpoint-write" else ".backbone.pt."
        temporary = folder.temporary(prefix, self.row)
        return temporary is not None, temporary


@dataclass
class Launch:
    """One start of the run's command and how it ended."""
    number: int
    log: str
    fault: dict | None = None  # the Fault, and where it landed once delivered
    exit_code: int | None = None
    seconds: float = 0.0
    hung: bool = False
    leftovers: list[int] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    rank_exits: list[int] = field(default_factory=list)
    verdict: str = ""  # ok, known (KNOWN_DEVIATION) or failure
    reason: str = ""


def launch(command: list[str], env: dict, cwd: Path, out: Path, log: Path, token: str,
           number: int, timeout_s: float, fault: Fault | None = None,
           trigger: Trigger | None = None, rows: list[tuple[float, int]] | None = None
           ) -> Launch:
    """Runs `command` once, delivering `fault` when `trigger` says so; `rows` (if given) gets
    (seconds after launch, step) of each new metrics row, for the reference's timing. Whatever
    happens, nothing of the launch is left running."""
    folder = RunFolder(out)
    record = Launch(number, str(log), asdict(fault) if fault else None)
    start = time.monotonic()
    pid_of_target: int | None = None
    next_lookup = 0.0  # a rank's pid is looked up in /proc at most every POLL_S
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**env, LAUNCH_VAR: token}, start_new_session=True)
    try:
        delivered = False
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if elapsed > timeout_s:
                record.hung = True
                break
            if rows is not None:
                step = folder.newest_row()
                if step > (rows[-1][1] if rows else 0):
                    rows.append((elapsed, step))
            if fault is not None and not delivered:
                if not fault.target.startswith("rank"):
                    pid_of_target = proc.pid
                elif pid_of_target is None and elapsed >= next_lookup:
                    pid_of_target = rank_pid(proc.pid, int(fault.target[-1]))
                    next_lookup = elapsed + POLL_S
                is_due, temporary = trigger.due(elapsed, folder)
                if is_due and pid_of_target is not None:
                    delivered = deliver(fault, pid_of_target, token, proc, folder, temporary,
                                        elapsed, record)
            time.sleep(trigger.interval if trigger and not delivered else POLL_S)
        if record.hung:
            dump_stacks(token, log)
            kill_all(token, proc.pid)
        record.exit_code = proc.wait()
        record.seconds = time.monotonic() - start
        if fault is not None and record.fault.get("temporary"):
            record.fault["temporary_left"] = (out / record.fault["temporary"]).exists()
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while processes_of(token) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        record.leftovers = kill_all(token)
    finally:
        if proc.poll() is None or processes_of(token):
            kill_all(token, proc.pid)
            proc.wait()
    text = log.read_text(errors="replace")
    record.exceptions = raised(text)
    record.rank_exits = [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", text)]
    return record


def dump_stacks(token: str, log: Path) -> None:
    """Appends the Python and native stacks of a hung launch's processes to its log (with
    py-spy, where installed beside this Python or on PATH): where each rank waits."""
    beside_python = Path(sys.executable).parent / "py-spy"
    spy = str(beside_python) if beside_python.exists() else shutil.which("py-spy")
    if spy is None:
        return
    with open(log, "a") as sink:
        for pid in processes_of(token):
            sink.write(f"\n--- soak: stacks of pid {pid} (py-spy dump --native)\n")
            sink.flush()
            try:
                subprocess.run([spy, "dump", "--native", "--pid", str(pid)], stdout=sink,
                               stderr=subprocess.STDOUT, timeout=60)
            except subprocess.TimeoutExpired:
                sink.write("--- soak: py-spy gave no dump within 60 s\n")


def deliver(fault: Fault, pid: int, token: str, proc: subprocess.Popen, folder: RunFolder,
            temporary: str | None, elapsed: float, record: Launch) -> bool:
    """Sends the fault's signal to `pid`; False if it had already ended. kill -9 to torchrun is
    followed by kill -9 to its ranks, as a scheduler reaps a job whose launcher died."""
    try:
        os.kill(pid, SIGNALS[fault.kind])
    except ProcessLookupError:
        return False
    record.fault.update(delivered=True, at_s=round(elapsed, 3), after_row=folder.newest_row(),
                        temporary=temporary)
    if fault.kind == "kill-9" and fault.target == "torchrun":
        time.sleep(fault.jitter * SCHEDULER_REAP_S)
        kill_all(token, proc.pid)
    return True


def raised(text: str) -> list[str]:
    """The exception line ending each traceback in a launch's output (torchrun's ranks prefix
    their lines with [rankN]:; a progress bar may share a line with the traceback's start)."""
    lines = [re.sub(r"^\[rank\d+\]: ?", "", line) for line in re.split(r"[\r\n]+", text)]
    found, inside = [], False
    for line in lines:
        if "Traceback (most recent call last)" in line:
            inside = True
        elif inside and line.strip() and not line[:1].isspace():
            found.append(line.strip()[:300])
            inside = False
    return found
