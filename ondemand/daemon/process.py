"""One worker process: spawn, pipes, the steps of a stop, exit classification.  No state machine.

`WorkerProcess` is the handle of one spawned worker (`python -m ondemand.worker`).  It owns the
asyncio subprocess, its stdout and stderr reader tasks and the last lines of its stderr.  Every
stdout line is decoded with ondemand/protocol.py and handed to `on_event(proc, event)`; once the
process is reaped, `on_exit(proc, returncode)` is called.  Both callbacks only post a message to
the supervisor's queue: the worker's state lives there, never here.  The supervisor decides *when*
to stop; this module knows *how*: `stop()` asks (the `exit` op, stdin closed, SIGTERM as well when
forced), `kill()` SIGKILLs; the supervisor's stop deadline escalates from one to the other.

Invariants:
- The worker is a fresh interpreter, never a fork: CUDA state must not be inherited.  It gets its
  own session, so a Ctrl-C at the terminal reaches the daemon, not the GPU process.
- A line on stdout that is not the protocol (not JSON, an unknown event, an op, a missing or
  mistyped field, longer than STREAM_LIMIT) is handled in exactly one place, `_read_stdout`: one
  warning naming the pid and what was wrong, then the worker is killed and its exit classified
  `protocol_error`.  Ignoring the line (the behaviour before protocol.py) left a batch waiting
  for an answer that would never come, with no deadline to end the wait; a worker that breaks the
  protocol is a bug or a `worker.command` of another version, and a prompt, named failure beats
  a silent hang.  The batch's jobs are retried alone like after any crash.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable

from ondemand import protocol
from ondemand.config import WorkerConfig
from ondemand.errors import ProtocolError
from ondemand.gpu import GpuProbe, gpu_index

log = logging.getLogger(__name__)

STREAM_LIMIT = 16 * 1024 * 1024  # longest protocol line we accept from the worker
STDERR_TAIL = 20  # stderr lines kept for the crash message

Spawn = Callable[[], Awaitable[asyncio.subprocess.Process]]


def default_command(worker: WorkerConfig) -> list[str]:
    """`worker.command` split shell-style, else a fresh interpreter running ondemand.worker."""
    if worker.command:
        return shlex.split(worker.command)
    return [sys.executable, "-m", "ondemand.worker"]


def make_spawn(command: list[str], env: dict[str, str] | None = None) -> Spawn:
    async def spawn() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=STREAM_LIMIT,
            env=env,
            start_new_session=True,
        )

    return spawn


def worker_env() -> dict[str, str]:
    """The environment for a worker: ours, unbuffered."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class ExitKind(enum.StrEnum):
    """Why a worker process ended (events.WorkerExited.kind)."""

    EXITED = "exited"  # we asked it to, and it did
    LOAD_FAILED = "load_failed"  # stopped after it reported a failed load
    LOAD_TIMEOUT = "load_timeout"  # stopped after worker.load_timeout_s
    CRASHED = "crashed"  # ended on its own
    KILLED = "killed"  # SIGKILL we did not send: possibly the out-of-memory killer
    STOP_ESCALATED = "stop_escalated"  # we SIGKILLed it after worker.stop_timeout_s
    PROTOCOL_ERROR = "protocol_error"  # we SIGKILLed it for a line that is not the protocol
    HUNG = "hung"  # we SIGKILLed it: no heartbeat for worker.heartbeat_timeout_s on a batch
    BATCH_TIMEOUT = "batch_timeout"  # we SIGKILLed it: a batch ran past its deadline


class WorkerProcess:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        on_event: Callable[[WorkerProcess, protocol.Event], None],
        on_exit: Callable[[WorkerProcess, int | None], None],
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self.stop_reason = ""  # why we asked it to stop ("" = we did not)
        self.killed: tuple[ExitKind, str] | None = None  # we sent SIGKILL: why (kind, detail)
        self.protocol_error = ""  # what was wrong with the line it was killed for
        self._tasks = [
            asyncio.create_task(self._read_stdout(on_event, on_exit),
                                name=f"worker-{self.pid}-stdout"),
            asyncio.create_task(self._read_stderr(), name=f"worker-{self.pid}-stderr"),
        ]

    async def send(self, op: protocol.Op) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            return  # it is exiting; on_exit follows
        stdin.write(protocol.encode(op).encode())
        with contextlib.suppress(ConnectionError):
            await stdin.drain()

    async def stop(self, reason: str, *, force: bool) -> bool:
        """Ask it to exit: the `exit` op, then EOF on stdin, SIGTERM as well when `force`.
        False when it was asked already (the first reason stays)."""
        if self.stop_reason:
            return False
        self.stop_reason = reason
        await self.send(protocol.Exit())
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if force and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        return True

    def kill(self, kind: ExitKind = ExitKind.STOP_ESCALATED,
             detail: str = "after worker.stop_timeout_s") -> None:
        """SIGKILL (a stopped process cannot handle SIGTERM); the exit is classified `kind`."""
        if self.killed is None:
            self.killed = (kind, detail)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def close(self) -> None:
        """Stop reading (the process is gone; a grandchild may still hold stderr open)."""
        for task in self._tasks:
            task.cancel()

    def held_gpu_mb(self, probe: GpuProbe | None, device: str) -> float | None:
        """GPU memory the process holds in MiB (0 when none, also once it is gone); None when
        the probe cannot tell."""
        index = gpu_index(device)
        if probe is None or probe.fallback or index is None:
            return None
        held = probe.sample([self.pid], index).pids_gpu_memory_bytes
        return None if held is None else held / 2**20

    def classify(self, rc: int | None) -> tuple[ExitKind, str]:
        """The exit's kind and a one-line detail, from its status and what we did to it."""
        if rc is None:
            return ExitKind.CRASHED, "no exit status"
        what = f"rc={rc}" if rc >= 0 else f"signal {_signame(-rc)}"
        if self.protocol_error:
            return ExitKind.PROTOCOL_ERROR, f"{what}: {self.protocol_error}"
        if self.killed is not None:
            kind, detail = self.killed
            return kind, f"{what} {detail}"
        if self.stop_reason in (ExitKind.LOAD_FAILED, ExitKind.LOAD_TIMEOUT):
            return ExitKind(self.stop_reason), what
        if self.stop_reason and rc in (0, -signal.SIGTERM):
            return ExitKind.EXITED, f"{what} ({self.stop_reason})"
        if rc == -signal.SIGKILL:
            return ExitKind.KILLED, f"{what}: killed from outside, possibly by the OOM killer"
        tail = " | ".join(list(self.stderr_tail)[-3:])
        return ExitKind.CRASHED, f"{what}{': ' + tail if tail else ''}"

    async def _read_stdout(
        self,
        on_event: Callable[[WorkerProcess, protocol.Event], None],
        on_exit: Callable[[WorkerProcess, int | None], None],
    ) -> None:
        stream = self.proc.stdout
        assert stream is not None
        try:
            async for line in stream:
                if not line.strip():
                    continue
                try:
                    event = protocol.decode_event(line)
                except ProtocolError as e:
                    self._broke_protocol(str(e))
                    break
                on_event(self, event)
        except (ValueError, ConnectionError) as e:  # a line over STREAM_LIMIT, a broken pipe
            self._broke_protocol(f"stdout unreadable: {e}")
        on_exit(self, await self.proc.wait())

    def _broke_protocol(self, what: str) -> None:
        log.warning("worker pid=%d broke the protocol, killing it: %s", self.pid, what)
        self.protocol_error = what
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def _read_stderr(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        with contextlib.suppress(ValueError, ConnectionError):
            async for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                self.stderr_tail.append(line)
                log.info("worker[%d] %s", self.pid, line)


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)
