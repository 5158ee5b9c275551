"""A fork server for the SIGKILL tests (tests/test_crash.py, tests/test_s3.py): one process
imports a child module (torch, zckpt, s3fs: about 2 s) once, then forks a fresh child per trial
that runs the module's ``main()`` with the trial's argv, so a trial costs a fork, not an
interpreter start. The children are real processes killed with a real SIGKILL, as before.

The server imports and forks, nothing else: no thread, thread pool or event loop exists in it to
be copied into a child half-made. Protocol (lines on its stdin and stdout): ``run ARGV-JSON`` is
answered ``pid N``; the child's own output follows (its ``ready`` line); when the child ends (it
is killed) the server answers ``exit N STATUS`` (``os.waitpid``'s status) and reads the next
command.

    python tests/fork_server.py MODULE   # serve; MODULE beside this file, e.g. crash_child
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path


class ForkServer:
    """The tests' end: start children of ``module``, kill them, reap them."""

    def __init__(self, module: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self.readline(120) == "serving", "the fork server did not start"
        self.pid: int | None = None

    def readline(self, timeout: float = 120) -> str:
        """The next line of the server's (or its child's) output, stripped."""
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise AssertionError(f"the fork server said nothing for {timeout} s")
        line = self.proc.stdout.readline()
        assert line, f"the fork server died (exit {self.proc.poll()})"
        return line.strip()

    def start(self, argv: list[str]) -> int:
        """Fork a child running ``module.main()`` with ``sys.argv[1:] == argv``; its pid."""
        assert self.pid is None, "one child at a time"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {json.dumps(argv)}\n")
        self.proc.stdin.flush()
        word, pid = self.readline().split()
        assert word == "pid", word
        self.pid = int(pid)
        return self.pid

    def kill(self) -> int:
        """SIGKILL the child (it is not reaped yet, so its pid is still its own); the status
        ``os.waitpid`` gave the server."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        line = self.readline()
        word, pid, status = line.split()
        assert (word, int(pid)) == ("exit", self.pid), line
        self.pid = None
        return int(status)

    def close(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@contextlib.contextmanager
def fork_server(module: str) -> Iterator[ForkServer]:
    """A :class:`ForkServer` of ``module`` (a file beside this one) for the ``with`` block."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = ForkServer(module, env)
    try:
        yield server
    finally:
        server.close()


def serve(module: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    mod = importlib.import_module(module)
    print("serving", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.partition(" ")
        assert cmd == "run", line
        argv = json.loads(arg)
        go_r, go_w = os.pipe()  # the child starts once its pid line is out: that line comes first
        pid = os.fork()
        if pid == 0:  # the child: run the module, never return into the server's loop
            code = 1
            try:
                os.close(go_w)
                os.read(go_r, 1)
                os.close(go_r)
                sys.argv = [str(mod.__file__), *argv]
                mod.main()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        os.close(go_r)
        print(f"pid {pid}", flush=True)
        os.write(go_w, b"g")
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {status}", flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
