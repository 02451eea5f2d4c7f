"""Runs N ``ranet.train`` worker processes on this machine, as one multi-worker cluster.

    python -m launch.local --workers=2 -- --flagfile=flags/ranet_smoke.cfg --model_dir=runs/smoke_2w

Worker i runs ``python -m ranet.train <training flags> --strategy=multi_worker_mirrored``
(the strategy flag is added only when the training flags do not name one) with
``TF_CONFIG={"cluster": {"worker": ["localhost:P0", ...]}, "task": {"type": "worker",
"index": i}}`` on free loopback ports. Every output line of worker i is printed as
``[worker i] <line>``; the launcher's own lines start with ``[launch]`` (on stderr).

Like every launcher here it only sets the environment and runs the binary: the training
flags are passed through untouched, and ``--dry_run`` prints exactly what would run.

Stopping: when a worker exits with a non-zero status the others get SIGTERM, then SIGKILL
after ``--grace_period_seconds``, and the launcher exits with that first worker's status
(128 + N for a worker killed by signal N). Ctrl-C or SIGTERM to the launcher sends SIGTERM to
every worker (ranet.train then saves a checkpoint at the next step boundary and exits with
status 143; the same command resumes); a second Ctrl-C, or the grace period running out,
sends SIGKILL. Workers run in their own process groups, so a terminal's Ctrl-C reaches them
only through the launcher, once; on Linux they also get SIGTERM if the launcher is killed.
"""

import argparse
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

STRATEGY_FLAG = "--strategy=multi_worker_mirrored"
_POLL_SECONDS = 0.1
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def free_ports(count: int) -> List[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now.

    All sockets stay bound until every port is chosen, so the ports differ. Another process
    could still take one before the worker binds it (seconds later); then that worker fails
    to start and the launcher stops the others: run again, or pass --port_base.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(addresses: Sequence[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": list(addresses)},
                       "task": {"type": "worker", "index": index}})


def named_strategy(train_flags: Sequence[str]) -> Optional[str]:
    """The value of the last --strategy among the training flags (absl: one or two dashes)."""
    value = None
    for position, flag in enumerate(train_flags):
        name, equals, text = flag.lstrip("-").partition("=")
        if flag.startswith("-") and name == "strategy":
            value = text if equals else (train_flags[position + 1]
                                         if position + 1 < len(train_flags) else "")
    return value


def worker_command(train_flags: Sequence[str]) -> List[str]:
    """``python -m ranet.train`` with the training flags, plus the strategy if none is named.

    Appended last, so that it also overrides a --strategy inside a --flagfile: N workers
    that are not one multi-worker cluster would each train alone on the same --model_dir.
    """
    extra = [] if named_strategy(train_flags) is not None else [STRATEGY_FLAG]
    return [sys.executable, "-m", "ranet.train", *train_flags, *extra]


def visible_gpus(gpus_per_worker: int, workers: int) -> List[str]:
    """CUDA_VISIBLE_DEVICES of each worker: consecutive slices of what this process sees."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is None:
        available = [str(i) for i in range(gpus_per_worker * workers)]
    else:
        available = [d for d in inherited.split(",") if d.strip()]
    needed = gpus_per_worker * workers
    if len(available) < needed:
        raise ValueError(f"--gpus_per_worker={gpus_per_worker} x --workers={workers} needs "
                         f"{needed} GPUs but CUDA_VISIBLE_DEVICES lists {len(available)}. "
                         f"Received: CUDA_VISIBLE_DEVICES={inherited}")
    return [",".join(available[i * gpus_per_worker:(i + 1) * gpus_per_worker])
            for i in range(workers)]


def worker_environments(workers: int, port_base: int = 0,
                        gpus_per_worker: int = 0) -> List[Dict[str, str]]:
    """The variables the launcher sets for each worker (on top of its own environment)."""
    ports = (free_ports(workers) if port_base == 0
             else [port_base + i for i in range(workers)])
    addresses = [f"localhost:{port}" for port in ports]
    gpus = visible_gpus(gpus_per_worker, workers) if gpus_per_worker else None
    environments = []
    for index in range(workers):
        env = {"TF_CONFIG": tf_config(addresses, index),
               "PYTHONUNBUFFERED": "1"}  # lines reach the launcher as they are written
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index]
        environments.append(env)
    return environments


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell exit status (-N, killed by signal N, is 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _log(message: str) -> None:
    print(f"[launch] {message}", file=sys.stderr, flush=True)


def _stop_with_launcher(launcher_pid: int):
    """preexec_fn (Linux): SIGTERM to the worker when the launcher dies, even by SIGKILL."""
    def preexec():
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


class _Worker:
    def __init__(self, index: int, command: List[str], env: Dict[str, str]):
        self.index = index
        self.process = subprocess.Popen(
            command, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_stop_with_launcher(os.getpid()) if _LIBC is not None else None)
        self.returncode: Optional[int] = None
        self.reader: Optional[threading.Thread] = None

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def signal(self, signum: int) -> None:
        """Signals the worker's whole process group (it leads one: start_new_session)."""
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _pump(stream, prefix: bytes, lock: threading.Lock) -> None:
    """Copies one worker's output to stdout line by line, each line prefixed."""
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        with lock:
            try:
                out.write(prefix + line)
                out.flush()
            except (BrokenPipeError, ValueError):
                pass  # our stdout is gone; keep draining so the worker never blocks on it
    stream.close()


def run_workers(commands: Sequence[List[str]], environments: Sequence[Dict[str, str]],
                grace_period_seconds: float) -> int:
    """Starts the workers, streams their output, and returns the job's exit status."""
    pending_signals: List[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending_signals.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    workers: List[_Worker] = []
    try:
        # Every worker is started before any reader thread, so that no thread is running
        # while preexec_fn runs in a forked child.
        for index, (command, env) in enumerate(zip(commands, environments)):
            workers.append(_Worker(index, command, env))
        lock = threading.Lock()
        for worker in workers:
            worker.reader = threading.Thread(
                target=_pump, args=(worker.process.stdout, f"[worker {worker.index}] ".encode(),
                                    lock), daemon=True)
            worker.reader.start()
        first_failure = _supervise(workers, grace_period_seconds, pending_signals)
    finally:
        for worker in workers:  # only reached with live workers if the launcher itself failed
            if worker.process.poll() is None:
                worker.signal(signal.SIGKILL)
                worker.process.wait()
        for worker in workers:  # the last lines of every worker before our own last line
            if worker.reader is not None:
                worker.reader.join(timeout=5)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if first_failure is None:
        _log(f"all {len(workers)} workers finished")
        return 0
    index, status = first_failure
    _log(f"exiting with worker {index}'s status {status}")
    return status


def _supervise(workers: List[_Worker], grace_period_seconds: float,
               pending_signals: List[int]) -> Optional[Tuple[int, int]]:
    """Waits for every worker; returns (index, exit status) of the first that failed."""
    first_failure: Optional[Tuple[int, int]] = None  # (worker index, exit status)
    kill_at: Optional[float] = None
    signals_received = 0

    def stop_all(reason: str) -> None:
        nonlocal kill_at
        alive = [w for w in workers if w.alive]
        if not alive:
            return
        deadline = time.monotonic() + grace_period_seconds
        kill_at = deadline if kill_at is None else min(kill_at, deadline)
        _log(f"{reason}: sending SIGTERM to worker(s) {', '.join(str(w.index) for w in alive)} "
             f"(SIGKILL after {grace_period_seconds:g} s)")
        for worker in alive:
            worker.signal(signal.SIGTERM)

    while any(worker.alive for worker in workers):
        while pending_signals:
            signum = pending_signals.pop(0)
            signals_received += 1
            name = signal.Signals(signum).name
            if signals_received == 1:
                stop_all(f"received {name}; asking every worker to stop (again to kill)")
            else:
                _log(f"received {name} again: sending SIGKILL")
                kill_at = time.monotonic()
        for worker in workers:
            if worker.alive and worker.process.poll() is not None:
                worker.returncode = worker.process.returncode
                status = exit_status(worker.returncode)
                if status == 0:
                    _log(f"worker {worker.index} finished")
                    continue
                _log(f"worker {worker.index} exited with status {status}")
                if first_failure is None:
                    first_failure = (worker.index, status)
                    if not signals_received:  # else every worker was already asked to stop
                        stop_all(f"worker {worker.index} failed")
        if kill_at is not None and time.monotonic() >= kill_at:
            alive = [w for w in workers if w.alive]
            if alive:
                _log(f"sending SIGKILL to worker(s) {', '.join(str(w.index) for w in alive)}")
            for worker in alive:
                worker.signal(signal.SIGKILL)
            kill_at = None
        time.sleep(_POLL_SECONDS)
    return first_failure


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.local",
        description="Runs N ranet.train workers on this machine as one "
                    "MultiWorkerMirroredStrategy cluster. Training flags go after --.",
        epilog="example: python -m launch.local --workers=2 -- "
               "--flagfile=flags/ranet_smoke.cfg --model_dir=runs/smoke_2w")
    parser.add_argument("--workers", type=int, required=True, help="Worker processes.")
    parser.add_argument("--port_base", type=int, default=0,
                        help="Worker i listens on port_base + i; 0 (default): free ports.")
    parser.add_argument("--gpus_per_worker", type=int, default=0,
                        help="Give each worker its own slice of CUDA_VISIBLE_DEVICES; "
                             "0 (default): leave the variable alone.")
    parser.add_argument("--grace_period_seconds", type=float, default=30.0,
                        help="Time between SIGTERM and SIGKILL when stopping workers; long "
                             "enough for ranet.train to save a checkpoint.")
    parser.add_argument("--dry_run", action="store_true",
                        help="Print each worker's environment and command; start nothing.")
    return parser


def parse(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """(launcher options, training flags): the training flags are everything after ``--``."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = _parser()
    args = parser.parse_args(argv[:split])
    train_flags = argv[split + 1:]
    if args.workers < 1:
        parser.error(f"--workers must be >= 1. Received: --workers={args.workers}")
    if args.port_base and not 1024 <= args.port_base <= 65535 - args.workers + 1:
        parser.error(f"--port_base must be 0 (free ports) or leave room for {args.workers} "
                     f"ports in 1024-65535. Received: --port_base={args.port_base}")
    if args.gpus_per_worker < 0 or args.grace_period_seconds < 0:
        parser.error("--gpus_per_worker and --grace_period_seconds must be >= 0")
    if not train_flags:
        parser.error("no training flags: give them after --, e.g. python -m launch.local "
                     "--workers=2 -- --flagfile=flags/ranet_smoke.cfg --model_dir=runs/smoke_2w")
    return args, train_flags


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, train_flags = parse(sys.argv[1:] if argv is None else argv)
    try:
        environments = worker_environments(args.workers, args.port_base, args.gpus_per_worker)
    except ValueError as error:
        _log(f"error: {error}")
        return 2
    command = worker_command(train_flags)
    if args.dry_run:
        for index, env in enumerate(environments):
            assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            print(f"[worker {index}] {assignments} {shlex.join(command)}", flush=True)
        return 0
    strategy = named_strategy(train_flags)
    if strategy not in (None, "multi_worker_mirrored") and args.workers > 1:
        _log(f"warning: --strategy={strategy}: the workers will not form one cluster, and "
             "each will train alone")
    _log(f"starting {args.workers} worker(s): {shlex.join(command)}")
    return run_workers([command] * args.workers, environments, args.grace_period_seconds)


if __name__ == "__main__":
    sys.exit(main())
