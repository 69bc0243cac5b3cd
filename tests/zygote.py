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
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import traceback


def child(request: dict) -> int:
    """The forked child: the request's process state, then the `semhitok` command -> its exit status."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
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
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def serve() -> None:
    import deepspeed  # noqa: F401  (what `semhitok train` imports, and the Megatron backend)
    import megatron.core.dist_checkpointing  # noqa: F401

    import semhitok.cli  # noqa: F401
    import semhitok.mllm.megatron.train  # noqa: F401
    import semhitok.mllm.train  # noqa: F401

    if threading.active_count() != 1:
        sys.exit(f"zygote: {threading.active_count()} threads after the imports ({threading.enumerate()}): forking is unsafe")
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pids = []
        for rank in range(request["nproc"]):
            reply.flush(), sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    if request["nproc"] > 1:  # torchrun's environment for this rank
                        request["env"].update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(request["nproc"]),
                                              LOCAL_WORLD_SIZE=str(request["nproc"]), MASTER_ADDR="127.0.0.1")
                    code = child(request)
                finally:
                    atexit._run_exitfuncs()  # what the interpreter runs at exit (logging.shutdown, ...), then no return
                    sys.stdout.flush(), sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        print(json.dumps({"pids": pids}), file=reply, flush=True)
        codes, failed = {}, 0
        while len(codes) < len(pids):  # a failed rank stops the others, which would wait in a collective (as torchrun)
            pid, status = os.wait()
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0 and not failed:
                failed = codes[pid]  # the first to fail: those stopped after it report the kill
                for other in set(pids) - set(codes):
                    os.kill(other, signal.SIGKILL)
        print(json.dumps({"returncode": failed}), file=reply, flush=True)


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
