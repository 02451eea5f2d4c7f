"""Resumable stops: SIGTERM becomes a flag the compiled loop reads, and the exits that say why.

Both exit statuses lie in 128-255, which schedulers such as Kubeflow's TFJob
(restartPolicy: ExitCode) retry; running the same command again resumes.
"""

import contextlib
import os
import signal
import threading

import tensorflow as tf
from absl import logging

PREEMPTED_EXIT_CODE = 143      # SIGTERM: a checkpoint was saved at the step it stopped
WORKER_LOST_EXIT_CODE = 144    # multi-worker: another worker died or stopped answering


class TrainingInterrupted(SystemExit):
    """A resumable stop: ends the process with ``exit_code``, no traceback.

    A ``SystemExit`` so that the binary needs no handler; in-process callers catch it
    like any exception (``pytest.raises(Preempted)``). The message is logged when raised.
    """
    exit_code = 1

    def __init__(self, message: str, step: int):
        super().__init__(self.exit_code)
        self.message, self.step = message, step

    def __str__(self) -> str:
        return self.message


class Preempted(TrainingInterrupted):
    """SIGTERM arrived: every worker saved a checkpoint at the same step boundary."""
    exit_code = PREEMPTED_EXIT_CODE


class WorkerLost(TrainingInterrupted):
    """Multi-worker: a collective failed because another worker died or hung."""
    exit_code = WORKER_LOST_EXIT_CODE


class PreemptionWatcher:
    """Turns SIGTERM (a preemption notice) into a flag the compiled train loop reads every step.

    A Python signal handler runs only when the main thread is back in Python, i.e. after
    the current ``run_steps`` call. So the handler's C half also writes the signal number
    to a wake-up pipe, and a thread reading the pipe sets ``flag`` (a local
    ``tf.Variable``, created outside any strategy scope) while the loop is still running:
    the loop then ends at the next step boundary. Use as a context manager around
    training; on exit the previous handler and wake-up fd are put back. Outside the main
    thread signals cannot be caught: it then only logs a warning.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        if tf.distribute.has_strategy():
            raise RuntimeError("create the PreemptionWatcher outside strategy.scope(): its flag "
                               "must be one local variable per worker, not a mirrored one")
        with tf.device("/cpu:0"):  # read by the host part of the loop, set by a host thread
            self.flag = tf.Variable(0, dtype=tf.int32, trainable=False, name="stop_request")
        self.received = threading.Event()
        self._lock = threading.RLock()  # the handler may interrupt itself in the main thread
        self._previous_handlers, self._previous_wakeup_fd = {}, None
        self._pipe, self._thread = None, None

    def _handle(self, signum, frame):
        del frame
        self._request(signum)

    def _request(self, signum: int):
        with self._lock:
            if self.received.is_set():
                return
            self.flag.assign(1)
            self.received.set()
        logging.warning("received %s: stopping at the next step boundary with a checkpoint",
                        signal.Signals(signum).name)

    def _watch(self, read_fd: int):
        while True:
            data = os.read(read_fd, 1)
            if not data or data[0] == 0:  # closed, or the stop sentinel
                return
            if data[0] in self.signals:
                self._request(data[0])
            if self._previous_wakeup_fd not in (None, -1):  # e.g. an asyncio loop's
                with contextlib.suppress(OSError):
                    os.write(self._previous_wakeup_fd, data)

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            logging.warning("training outside the main thread: %s will not be caught",
                            ", ".join(signal.Signals(s).name for s in self.signals))
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._thread = threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                                        name="PreemptionWatcher")
        self._thread.start()
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._handle)
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc_info):
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        read_fd, write_fd = self._pipe
        os.write(write_fd, b"\0")
        self._thread.join(timeout=5)
        os.close(write_fd)
        os.close(read_fd)
        self._pipe = None


