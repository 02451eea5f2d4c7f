"""Early exit meets batching: the images of requests that arrive together run a stage as one
batch, an image that exits is answered at once, and the survivors of several batches are
regrouped for the next stage instead of straggling through it one by one.

    queue[0] (new images) --stage 1--> exits answered; survivors --> queue[1] --stage 2--> ...

A ``Scheduler`` holds one queue per stage and a few worker threads, each with interpreters
of its own (LiteRT interpreters are not thread-safe; ``Interpreter.invoke`` releases the
GIL, so threads overlap). A free worker takes the stage whose oldest image arrived first (an
early request's survivors before a new request's first stage, so a request is not starved
by newer ones), up to ``max_batch_size`` of its images, and runs them as one batch. A stage
short of a full batch waits up to ``batch_timeout_micros`` (TF Serving's name) for more: new
images at the first stage, the survivors of later batches at the others, which is how the
survivors of several batches regroup. At 0 (TF Serving's advice for CPUs) a stage runs what
it holds: the survivors of batches that ran at the same time (several workers) regroup, a
lone batch's survivors go on at once.

Stage files have a static batch of 1; ``BatchedStages`` resizes each to every allowed batch
size (powers of two up to the largest, as TF Serving's ``allowed_batch_sizes``) and pads a
batch up to the next size. With ``max_batch_size=1`` a worker runs each image through every
stage it needs at once with ``LiteRTPredictor`` (``ImageRunner``): nothing is queued between
stages and no feature is copied out of the interpreters.
"""

import collections
import dataclasses
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging
from ai_edge_litert.interpreter import Interpreter

from ranet.errors import UsageError
from ranet.inference.serving import litert_runtime

# One image's answer: (class, exit 1-based, softmax of that exit).
Answer = Tuple[int, int, np.ndarray]


class Overloaded(Exception):
    """The first stage's queue is full, or the scheduler is closing: refuse at once."""


class DeadlineExceeded(Exception):
    """A request's deadline passed before its images ran."""


def allowed_batch_sizes(max_batch_size: int) -> List[int]:
    """1, 2, 4, ... below ``max_batch_size``, and it."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


class BatchedStages:
    """The stage files of one precision of an export, each resized to every batch size.

    Args:
        export_dir: a LiteRT export (``litert``).
        precision: one of its precisions.
        batch_sizes: the static batch sizes to hold an interpreter for, per stage.
        num_threads: XNNPACK threads per interpreter.
    """

    def __init__(self, export_dir: str, precision: str, batch_sizes: Sequence[int],
                 num_threads: int = 1):
        manifest = litert_runtime.read_manifest(export_dir)
        if precision not in manifest["precisions"]:
            raise UsageError(f"precision must be one of {', '.join(manifest['precisions'])} "
                             f"(what {export_dir} holds). Received: precision={precision!r}")
        self.batch_sizes = sorted(set(batch_sizes))
        self.num_stages = len(manifest["stages"])
        self.stage_inputs = [list(stage["inputs"]) for stage in manifest["stages"]]
        files = [os.path.join(export_dir, path)
                 for path in manifest["precisions"][precision]["files"]]
        # self._tensors[batch][k] = ({input: accessor}, {output: accessor}).
        self._interpreters, self._tensors = {}, {}
        for batch in self.batch_sizes:
            self._interpreters[batch], self._tensors[batch] = [], []
            for path in files:
                interpreter = Interpreter(model_path=path, num_threads=num_threads)
                runner = interpreter.get_signature_runner(litert_runtime.SIGNATURE)
                inputs, outputs = runner.get_input_details(), runner.get_output_details()
                del runner  # it holds the interpreter; resize, allocate and invoke without it
                for details in inputs.values():
                    interpreter.resize_tensor_input(details["index"],
                                                    [batch, *details["shape"][1:]])
                interpreter.allocate_tensors()
                self._interpreters[batch].append(interpreter)
                self._tensors[batch].append((
                    {name: interpreter.tensor(d["index"]) for name, d in inputs.items()},
                    {name: interpreter.tensor(d["index"]) for name, d in outputs.items()}))
        self._check_features(export_dir)

    def _check_features(self, export_dir: str) -> None:
        """Features pass between stages as they are (int8 stays int8): each reader's buffer
        must have its maker's dtype."""
        made: Dict[str, np.dtype] = {}
        for k, (inputs, outputs) in enumerate(self._tensors[self.batch_sizes[0]]):
            for name, tensor in inputs.items():
                if name in made and tensor().dtype != made[name]:
                    raise UsageError(f"stage {k + 1} reads {name!r} as {tensor().dtype}, made "
                                     f"as {made[name]}: {export_dir} is damaged; export it "
                                     "again.")
            made.update({name: tensor().dtype for name, tensor in outputs.items()})

    def run(self, k: int, count: int,
            fill: Callable[[str, np.ndarray], None]) -> Dict[str, np.ndarray]:
        """Runs stage k (0-based) on ``count`` images at the smallest batch size that holds
        them; ``fill(name, rows)`` writes input ``name``'s ``count`` rows. Returns each
        output's ``count`` rows: views of the interpreter's buffers, valid until the next
        call at this batch size."""
        batch = next(size for size in self.batch_sizes if size >= count)
        inputs, outputs = self._tensors[batch][k]
        for name, tensor in inputs.items():
            # Rows past count keep an earlier batch's values: no op mixes images.
            fill(name, tensor()[:count])
        self._interpreters[batch][k].invoke()
        return {name: tensor()[:count] for name, tensor in outputs.items()}


class Job:
    """One request: its images, when it came and by when it must run (on the scheduler's
    clock), and the answers as they come. ``on_done`` gets the answers {"classes",
    "exits", "probabilities"} or an exception, once, from a worker thread."""

    def __init__(self, images: np.ndarray, submitted: float, deadline: float,
                 on_done: Callable[[object], None], num_classes: int):
        self.images = images
        self.submitted, self.deadline = submitted, deadline
        self.on_done = on_done
        count = len(images)
        self.remaining = count
        self.finished = False
        self.answers = {"classes": np.zeros(count, np.int32),
                        "exits": np.zeros(count, np.int32),
                        "probabilities": np.zeros((count, num_classes), np.float32)}


class Item:
    """One image of a job on its way through the stages, with the features later stages
    read: name -> (a batch's output array, this image's row in it)."""
    __slots__ = ("job", "row", "arrival", "queued_at", "features")

    def __init__(self, job: Job, row: int, arrival: int, queued_at: float):
        self.job, self.row, self.arrival = job, row, arrival
        self.queued_at = queued_at  # when it entered the queue it is in
        self.features: Dict[str, Tuple[np.ndarray, int]] = {}


class ImageRunner:
    """Batch size 1: each image through the stages it needs in one go, by the runtime's own
    ``LiteRTPredictor``."""
    num_queues = 1

    def __init__(self, predictor: litert_runtime.LiteRTPredictor):
        self.predictor = predictor

    def run(self, queue: int, items: List[Item]) -> List[Optional[Answer]]:
        return [self.predictor.predict(item.job.images[item.row]) for item in items]


class StageRunner:
    """Batches of one stage at a time: returns the answers of the images that exit, and
    keeps the features the later stages read in the survivors."""

    def __init__(self, stages: BatchedStages, thresholds: Sequence[float],
                 confidence_kind: str):
        self.stages = stages
        self.num_queues = stages.num_stages
        self.thresholds = list(thresholds)
        self.confidence_kind = confidence_kind
        # The features some stage after k reads, kept in a survivor of stage k.
        self._read_after = [set().union(*map(set, stages.stage_inputs[k + 1:]))
                            for k in range(stages.num_stages)]

    def run(self, queue: int, items: List[Item]) -> List[Optional[Answer]]:
        k = queue

        def fill(name: str, rows: np.ndarray) -> None:
            if name == litert_runtime.IMAGES:
                for i, item in enumerate(items):
                    rows[i] = item.job.images[item.row]
            else:
                _gather([item.features[name] for item in items], rows)

        outputs = self.stages.run(k, len(items), fill)
        last = k == self.num_queues - 1
        answers: List[Optional[Answer]] = []
        for i, item in enumerate(items):
            # Row by row, as LiteRTPredictor does, so that both decide on the same floats.
            probabilities = litert_runtime.softmax(outputs[litert_runtime.LOGITS][i])
            if last or litert_runtime.confidence(probabilities, self.confidence_kind) >= \
                    self.thresholds[k]:
                answers.append((int(np.argmax(probabilities)), k + 1, probabilities))
                item.features.clear()
            else:
                answers.append(None)
        survivors = [i for i, answer in enumerate(answers) if answer is None]
        if not survivors:
            return answers
        kept = self._read_after[k]
        # Only the survivors' rows leave the interpreter: the next batch overwrites them.
        features = {name: rows[survivors] for name, rows in outputs.items() if name in kept}
        for position, i in enumerate(survivors):
            item = items[i]
            item.features = {name: ref for name, ref in item.features.items() if name in kept}
            item.features.update({name: (array, position) for name, array in features.items()})
        return answers


def _gather(references: List[Tuple[np.ndarray, int]], rows: np.ndarray) -> None:
    first = references[0][0]
    if all(array is first for array, _ in references):
        np.take(first, [row for _, row in references], axis=0, out=rows)
        return
    for i, (array, row) in enumerate(references):
        rows[i] = array[row]


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """TF Serving's names: at most ``max_batch_size`` images per stage call; a stage waits up
    to ``batch_timeout_micros`` for a fuller batch; ``max_queue`` images may wait for their
    first stage before a new request is refused."""
    max_batch_size: int = 1
    batch_timeout_micros: int = 0
    max_queue: int = 64


class Scheduler:
    """The stage queues of one model and the worker threads that empty them.

    Args:
        runners: one per worker thread (``ImageRunner`` or ``StageRunner``), each with its
            own interpreters.
        options: the batch size, how long a stage waits for a fuller batch, the queue bound.
        clock: seconds, the clock the jobs' deadlines are on.
        on_batch: called with (stage 0-based, images) for every batch run, for metrics.
    """

    def __init__(self, runners: Sequence, options: BatchingOptions,
                 clock: Callable[[], float] = time.monotonic,
                 on_batch: Optional[Callable[[int, int], None]] = None):
        self.options = options
        self._clock = clock
        self._on_batch = on_batch
        self._queues = [collections.deque() for _ in range(runners[0].num_queues)]
        self._condition = threading.Condition()
        self._arrivals = 0
        self._busy = 0
        self._draining = False
        self._closing = False
        self._threads = [threading.Thread(target=self._work, args=(runner,), daemon=True,
                                          name=f"ranet-serve-worker-{i}")
                         for i, runner in enumerate(runners)]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        """Images waiting for their first stage."""
        return len(self._queues[0])

    @property
    def in_flight(self) -> int:
        """Images accepted and not yet answered: queued at any stage, or running."""
        with self._condition:
            return sum(map(len, self._queues)) + self._busy

    def submit(self, job: Job) -> None:
        """Queues ``job``'s images; raises ``Overloaded`` (nothing queued) when the first
        stage already holds ``max_queue`` images or the scheduler is closing."""
        with self._condition:
            if self._closing:
                raise Overloaded("the server is shutting down")
            if len(self._queues[0]) >= self.options.max_queue:
                raise Overloaded(f"the queue is full ({self.options.max_queue} images wait); "
                                 "retry later")
            now = self._clock()
            for row in range(len(job.images)):
                self._queues[0].append(Item(job, row, self._arrivals, now))
                self._arrivals += 1
            self._condition.notify()

    def cancel(self, job: Job) -> bool:
        """Gives up on ``job`` (its deadline passed): its images still queued are dropped and
        those running are not answered. False if it was answered already."""
        with self._condition:
            if job.finished:
                return False
            job.finished = True
            return True

    def drain(self) -> None:
        """Stops waiting for fuller batches: what is queued runs now (new jobs still come
        in: requests accepted before a shutdown may still be reading their bodies)."""
        with self._condition:
            self._draining = True
            self._condition.notify_all()

    def close(self, timeout: Optional[float] = None) -> None:
        """Refuses new jobs, answers every job accepted, then ends the workers."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _ready_queue(self) -> Tuple[Optional[int], Optional[float]]:
        """(the queue to run next, or None; how long until a waiting queue is due)."""
        best, wait = None, None
        now = self._clock()
        for q, queue in enumerate(self._queues):
            if not queue:
                continue
            if (not (self._draining or self._closing)
                    and len(queue) < self.options.max_batch_size):
                # A stage waits a while for a fuller batch: new images, or the survivors of
                # later batches of the stage before.
                remaining = (queue[0].queued_at + self.options.batch_timeout_micros / 1e6
                             - now)
                if remaining > 0:
                    wait = remaining if wait is None else min(wait, remaining)
                    continue
            if best is None or queue[0].arrival < self._queues[best][0].arrival:
                best = q
        return best, wait

    def _take(self) -> Optional[Tuple[int, List[Item], List[Job]]]:
        """Under the lock: (queue, its next batch, jobs expired on the way), or None when
        closing and nothing is left."""
        while True:
            q, wait = self._ready_queue()
            if q is None:
                if self._closing and self._busy == 0 and not any(self._queues):
                    return None
                self._condition.wait(wait)
                continue
            queue, items, expired = self._queues[q], [], []
            now = self._clock()
            while queue and len(items) < self.options.max_batch_size:
                item = queue.popleft()
                if item.job.finished:
                    continue
                if now > item.job.deadline:
                    item.job.finished = True
                    expired.append(item.job)
                    continue
                items.append(item)
            if items or expired:
                self._busy += 1
                return q, items, expired

    def _work(self, runner) -> None:
        while True:
            with self._condition:
                taken = self._take()
            if taken is None:
                with self._condition:
                    self._condition.notify_all()  # the other workers may end too
                return
            q, items, expired = taken
            for job in expired:
                job.on_done(DeadlineExceeded("the request's deadline passed before it ran"))
            answers, error = [], None
            if items:
                if self._on_batch:
                    self._on_batch(q, len(items))
                try:
                    answers = runner.run(q, items)
                except Exception as exception:  # a bug, not a request: fail its jobs, go on
                    logging.exception("stage %d failed on %d images", q + 1, len(items))
                    error = exception
            self._finish(q, items, answers, error)

    def _finish(self, q: int, items: List[Item], answers: List[Optional[Answer]],
                error: Optional[Exception]) -> None:
        done: List[Tuple[Job, object]] = []
        now = self._clock()
        with self._condition:
            self._busy -= 1
            for i, item in enumerate(items):
                job = item.job
                if job.finished:
                    continue
                if error is not None:
                    job.finished = True
                    done.append((job, error))
                    continue
                if answers[i] is None:
                    item.queued_at = now
                    self._queues[q + 1].append(item)
                    continue
                klass, exit_, probabilities = answers[i]
                job.answers["classes"][item.row] = klass
                job.answers["exits"][item.row] = exit_
                job.answers["probabilities"][item.row] = probabilities
                job.remaining -= 1
                if job.remaining == 0:
                    job.finished = True
                    done.append((job, job.answers))
            self._condition.notify_all()
        for job, result in done:
            job.on_done(result)
