"""One inference thread fed by a bounded queue, batching what waits.

Requests become :class:`Job` s in a queue of at most ``max_queue`` waiting jobs. The worker
thread takes the oldest job and gathers up to ``max_batch``: all those already waiting (when it
was busy), those that arrive within ``batch_wait`` seconds, and, up to ``arrival_wait`` seconds,
those whose upload the service is still receiving (:meth:`InferenceWorker.arrive`: the clients
just answered send their next request while the worker would otherwise start a half-empty
batch). It answers them with one call of the model's ``analyze`` (the Python API's code path).
A full queue refuses new jobs at once (:class:`QueueFull`, with a retry estimate). Its room is
counted in slots: a request being received holds one (so a full queue refuses the next request
before its body is read), and a queued job holds ``cost`` slots, one per encoder window of
audio (a 15-minute recording is charged as the 30 clips it takes the thread as long as). A job
cancelled while it waits (its client went away or its deadline passed) leaves the queue and
frees its slots; jobs past their deadline when the worker reaches them are not run; and a batch
whose every job was abandoned stops at the next checkpoint of inference
(:mod:`harmonifuse.cancellation`: between blocks, segments and decoding steps).
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from harmonifuse.cancellation import Cancelled, cancel_when

log = logging.getLogger("harmonifuse.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry in {retry_after} s")
        self.retry_after = retry_after


class Closed(Exception):
    """The worker is stopping and takes no new jobs."""


class DeadlineExceeded(Exception):
    pass


@dataclass(eq=False)
class Job:
    audio: Any  # a path or a 16 kHz array, as model.analyze takes it
    name: str
    deadline: float  # time.monotonic() after which the answer is no use
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)
    cost: int = 1  # queue slots held while waiting
    started: float | None = None
    finished: float | None = None
    batch_size: int = 0
    abandoned: bool = False  # nobody waits for the answer any more (client gone or answered 504)

    def unwanted(self, now: float) -> bool:
        return self.abandoned or now > self.deadline


class InferenceWorker:
    def __init__(self, *, max_batch: int = 8, max_queue: int = 64, batch_wait: float = 0.005,
                 arrival_wait: float = 0.05,
                 tasks: Sequence[str] = ("asr", "ser"), analyze_options: dict | None = None,
                 threads: int | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait
        self.arrival_wait = arrival_wait
        self.arriving = 0  # requests being received or decoded, not yet queued (one slot each)
        self.queued_cost = 0  # slots held by the queued jobs
        self.tasks = tuple(tasks)
        self.analyze_options = analyze_options or {}
        self.threads = threads
        self.model = None
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.running = 0  # jobs in the batch being answered
        self.batches = 0
        self.answered = 0
        self.batch_seconds = 1.0  # moving average, for Retry-After estimates

    # -- the service's side ------------------------------------------------------------------------

    def start(self, model) -> None:
        self.model = model
        self._thread = threading.Thread(target=self._loop, name="harmonifuse-inference", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the batches ahead times the mean batch time."""
        ahead = math.ceil((len(self._queue) + self.running) / self.max_batch)
        return max(1, math.ceil(ahead * self.batch_seconds))

    @property
    def load(self) -> int:
        """Queue slots in use: the requests arriving and the queued jobs' costs."""
        return self.arriving + self.queued_cost

    def arrive(self) -> None:
        """A request is on its way (its upload is being received): it takes a queue slot now, so a
        full queue refuses it before its body is read (:class:`QueueFull`); and it is worth waiting
        for, briefly, when the worker gathers a batch."""
        with self._cond:
            if self._closing:
                raise Closed
            if self.load >= self.max_queue:
                raise QueueFull(self.retry_after())
            self.arriving += 1

    def depart(self) -> None:
        """A request that :meth:`arrive` announced will not be queued (it was refused)."""
        with self._cond:
            self.arriving -= 1
            self._cond.notify_all()

    def submit(self, audio, name: str, deadline: float, arrived: bool = False, cost: int = 1) -> Job:
        """Queue a job holding ``cost`` slots (``arrived``: announced by :meth:`arrive`, whose slot
        it takes over; a refused one keeps that slot until the caller's :meth:`depart`). A job
        costlier than the whole queue is charged the whole queue."""
        job = Job(audio, name, deadline, cost=max(1, min(int(cost), self.max_queue)))
        with self._cond:
            if self._closing:
                raise Closed
            if self.load - int(arrived) + job.cost > self.max_queue:
                raise QueueFull(self.retry_after())
            if arrived:
                self.arriving -= 1
            self.queued_cost += job.cost
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Take ``job`` out of the queue (True); a job already running is marked abandoned: its
        batch stops at the next checkpoint once no job in it is wanted (False)."""
        with self._cond:
            job.abandoned = True
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self.queued_cost -= job.cost
            self._cond.notify_all()
        job.future.cancel()
        return True

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, answer those queued, and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------------

    def _take_batch(self) -> list[Job]:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return []
                self._cond.wait()
            batch = [self._pop()]
            began = time.monotonic()
            while len(batch) < self.max_batch:
                if self._queue:
                    batch.append(self._pop())
                    continue
                wait = self.arrival_wait if self.arriving > 0 else self.batch_wait
                left = began + wait - time.monotonic()
                if left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            now = time.monotonic()
            live = []
            for job in batch:
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited
                if now > job.deadline:
                    job.future.set_exception(DeadlineExceeded())
                    continue
                live.append(job)
            self.running = len(live)
            return live

    def _pop(self) -> Job:
        job = self._queue.popleft()
        self.queued_cost -= job.cost
        return job

    def _loop(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        while True:
            batch = self._take_batch()
            if not batch:
                with self._cond:
                    if self._closing and not self._queue:
                        return
                continue
            start = time.monotonic()
            for job in batch:
                job.started, job.batch_size = start, len(batch)
            try:
                with cancel_when(lambda: self._unwanted(batch)):
                    results = self._answer([job.audio for job in batch])
            except Cancelled as stopped:
                log.info("stopped a batch of %d after %.1f s: %s", len(batch), time.monotonic() - start, stopped)
                results = [DeadlineExceeded() if time.monotonic() > job.deadline else stopped for job in batch]
            except BaseException as error:  # noqa: BLE001 - every waiting request gets an answer
                log.exception("inference failed for a batch of %d", len(batch))
                results = [error] * len(batch)
            end = time.monotonic()
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (end - start) if self.batches else end - start
            self.batches += 1
            with self._cond:
                self.running = 0
            for job, result in zip(batch, results):
                job.finished = end
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    self.answered += 1
                    job.future.set_result(result)

    @staticmethod
    def _unwanted(batch: list[Job]) -> str | None:
        """Why the batch may stop (every job in it abandoned or past its deadline), or None."""
        now = time.monotonic()
        if all(job.unwanted(now) for job in batch):
            return "no client waits for its answers (gone, or past the deadline)"
        return None

    def _answer(self, audio: list) -> list:
        """``model.analyze`` on the batch; when one input fails to decode, each one alone, so the
        others are still answered and the failing one gets its own error."""
        from harmonifuse.audio import AudioError
        from harmonifuse.inference.fallback import answer_batch

        return answer_batch(lambda items: self.model.analyze(items, tasks=self.tasks, **self.analyze_options), audio,
                            lambda item, error: error, retry_on=(AudioError,))
