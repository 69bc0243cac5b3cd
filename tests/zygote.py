"""`semhitok` runs for the tests, each in a new process, without each paying the interpreter's start and the ~6 s of
imports (torch, transformers, DeepSpeed, megatron-core): a fork server. This process imports what `semhitok train`
imports, once, and then forks one child per request; the child takes the request's working directory, environment,
stdin (none) and output files, runs `semhitok.cli.main(argv)` as the `semhitok` command does, runs the exit handlers and
exits with its status (an uncaught exception: traceback on stderr, status 1, as Python does).

What a child shares with a fresh `semhitok` process is everything but the imports: the tests start this server with the
environment their runs get (tests/conftest.py run_semhitok), so what a module reads from the environment at import time
is what it would read in a fresh process. Nothing here computes before forking, and the server refuses to start with
a second thread alive (a fork keeps only the forking thread; a lock another held would stay locked in the child).

With nproc > 1 it forks that many ranks with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR; the
request's MASTER_PORT), their outputs side by side in the same files; a failed rank stops the others, as torchrun does.

Protocol, one JSON object per line: in {"argv", "cwd", "env", "stdout", "stderr", "nproc"}; out {"pids"} after the
forks, then {"returncode"} (the first failed rank's, else 0) when every rank has exited."""

import atexit
import functools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import traceback


def torchrun_env(rank: int, nproc: int) -> dict[str, str]:
    """What torchrun sets for one rank of a one-node job of nproc ranks (MASTER_PORT: the caller's)"""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1"}


def fork_ranks(nproc: int, run) -> list[int]:
    """nproc children of this process, rank r running run(r) -> its exit status (an exception: its traceback, 1); a child
    never comes back: it runs the exit handlers (logging.shutdown, ...) as an interpreter does, then ends. -> their pids"""
    pids = []
    for rank in range(nproc):
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run(rank)
            except BaseException:
                traceback.print_exc()
            finally:
                atexit._run_exitfuncs()
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return pids


def wait_ranks(jobs: list[list[int]]) -> list[int]:
    """Every rank of every job (a job: its ranks' pids) waited for; a job's first failed rank stops its others, which
    would wait in a collective forever (as torchrun does) -> each job's status: its first failed rank's, else 0 (the
    ranks stopped after it report the kill)"""
    job_of = {pid: j for j, pids in enumerate(jobs) for pid in pids}
    status = [0] * len(jobs)
    while job_of:
        pid, raw = os.wait()
        j = job_of.pop(pid)
        if os.waitstatus_to_exitcode(raw) != 0 and not status[j]:
            status[j] = os.waitstatus_to_exitcode(raw)
            for other in [p for p, k in job_of.items() if k == j]:
                os.kill(other, signal.SIGKILL)
    return status


def child(request: dict, rank: int) -> int:
    """A forked rank: the request's process state, then the `semhitok` command -> its exit status."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["nproc"] > 1:
        os.environ.update(torchrun_env(rank, request["nproc"]))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):  # ranks append side by side, as under torchrun
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    sys.argv = ["semhitok", *request["argv"]]
    from semhitok.cli import main

    try:
        return main(request["argv"]) or 0
    except SystemExit as done:  # sys.exit's rules: None 0, an int itself, anything else printed and 1
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)
        return 1  # (any other exception: fork_ranks prints it and exits with 1)


def serve() -> None:
    import deepspeed  # noqa: F401  (what `semhitok train` imports, and the Megatron backend)
    import megatron.core.dist_checkpointing  # noqa: F401

    import semhitok.cli  # noqa: F401
    import semhitok.mllm.megatron.train  # noqa: F401
    import semhitok.mllm.train  # noqa: F401

    if threading.active_count() != 1:
        sys.exit(f"zygote: {threading.active_count()} threads after the imports ({threading.enumerate()}): forking is unsafe")
    for line in sys.stdin:
        request = json.loads(line)
        pids = fork_ranks(request["nproc"], functools.partial(child, request))
        print(json.dumps({"pids": pids}), flush=True)
        print(json.dumps({"returncode": wait_ranks([pids])[0]}), flush=True)


class Zygote:
    """The tests' side: a server started with `env` (the environment its runs get) in `cwd`; run() like subprocess.run
    with capture_output and text."""

    def __init__(self, env: dict, cwd: str):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self.buffer = b""

    def _line(self, timeout: float) -> dict:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the zygote exited ({self.proc.wait()}); its stderr is in the test's output")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], env: dict, cwd: str, timeout: float, nproc: int = 1) -> subprocess.CompletedProcess:
        """nproc > 1: that many ranks (torchrun's environment, MASTER_PORT from env), their outputs side by side"""
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": out, "stderr": err, "nproc": nproc}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            pids = self._line(120)["pids"]
            try:
                code = self._line(timeout)["returncode"]
            except TimeoutError:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                self._line(120)
                raise subprocess.TimeoutExpired(["semhitok", *argv], timeout) from None
            with open(out) as o, open(err) as e:
                return subprocess.CompletedProcess(["semhitok", *argv], code, o.read(), e.read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    serve()
