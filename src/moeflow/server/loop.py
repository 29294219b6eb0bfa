"""The engine thread: the one owner of the ``LLM`` (the engine is not thread-safe), fed by a bounded queue of jobs.

HTTP handlers never touch the engine. They ``submit`` a :class:`Job` and await its :class:`Sink`, into which the
engine thread puts, thread-safely, a :class:`~moeflow.sequence.StreamDelta` per step (streaming jobs), then one
:class:`Finished`, or one exception. Everything that reads the tokenizer (chat templates, tokenising) also runs
on this thread.

Batching in this slice is simple: the engine thread takes the oldest waiting job; a non-streaming job runs
together with the other waiting non-streaming jobs whose sampling settings are equal (up to ``max_batch``, one
``LLM.generate`` call); a streaming job runs alone through ``LLM.stream``. **Continuous batching is not in this
slice**: a request that arrives while a batch runs waits for the whole batch to finish; it does not join between
steps. A streaming job whose client went away is ended between two steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from moeflow.errors import RequestError
from moeflow.sampling import SamplingParams


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting jobs: the caller should answer 429."""


class Stopped(Exception):
    """The server is shutting down and admits nothing more."""


@dataclass
class Finished:
    """A job's end: the engine's output and the prompt's length in tokens."""

    output: Any
    prompt_tokens: int


class Sink:
    """A thread -> event loop channel: the engine thread ``put``s, the handler ``await``s ``get``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._queue = loop, asyncio.Queue()

    def put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> Any:
        return await self._queue.get()


@dataclass(eq=False)
class Job:
    """One request: a prompt (text, token ids, or chat messages), its sampling settings, where results go."""

    prompt: str | list[int] | list[dict[str, Any]]
    sampling: dict[str, Any]
    """``SamplingParams`` keywords; ``max_tokens`` None means the rest of the context."""
    sink: Sink
    stream: bool = False
    chat: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ids: list[int] | None = None
    params: SamplingParams | None = None


class EngineLoop:
    """Owns ``llm`` on one thread; ``submit`` queues a job (at most ``max_queue`` wait), ``stop`` ends the thread."""

    def __init__(self, llm: Any, max_queue: int = 64, max_batch: int = 8):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.llm, self.max_queue, self.max_batch = llm, max_queue, max(1, max_batch)
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.running = 0
        """Sequences in the batch now running."""

    # ------------------------------------------------------------------------------- HTTP side
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})"
                )
            self._waiting.append(job)
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="moeflow-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Admit nothing more, refuse what waits, let the running batch finish, and end the thread."""
        with self._cond:
            self._stopping = True
            while self._waiting:
                self._waiting.popleft().sink.put(Stopped("the server shut down before this request ran"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----------------------------------------------------------------------------- engine side
    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
            if job.cancelled.is_set() or not self._prepare(job):
                continue
            try:
                if job.stream:
                    self._run_stream(job)
                else:
                    self._run_batch([job, *self._batch_mates(job)])
            except Exception as err:  # never lose the engine thread: the request gets the error
                job.sink.put(err)
            finally:
                self.running = 0

    def _prepare(self, job: Job) -> bool:
        """Tokenise the prompt and build its sampling parameters (once); a bad request gets its error (False)."""
        if job.params is not None:
            return True
        try:
            tok = self.llm.tokenizer
            if job.chat:
                if tok is None or not getattr(tok, "chat_template", None):
                    raise RequestError("this model has no chat template: use /v1/completions")
                try:
                    text = tok.apply_chat_template(job.prompt, tokenize=False, add_generation_prompt=True)
                except Exception as err:  # the template's own checks (roles must alternate...)
                    raise RequestError(f"the chat template refused these messages: {err}") from None
                job.ids = list(tok(text, add_special_tokens=False)["input_ids"])
            elif isinstance(job.prompt, str):
                if tok is None:
                    raise RequestError("this model has no tokenizer: send the prompt as a list of token ids")
                job.ids = list(tok(job.prompt)["input_ids"])
            else:
                job.ids = list(job.prompt)
            sampling = dict(job.sampling)
            if sampling["max_tokens"] is None:
                context = getattr(self.llm.loaded.config, "max_position_embeddings", None) or 0
                sampling["max_tokens"] = max(1, context - len(job.ids)) if context else 256
            job.params = SamplingParams(**sampling)
            return True
        except Exception as err:
            job.sink.put(err)
            return False

    def _batch_mates(self, first: Job) -> list[Job]:
        """Waiting non-streaming jobs that can run in ``first``'s batch: equal settings, and no seeded sampling
        (a seed's draws are per batch, so a seeded request runs alone to be reproducible)."""
        p = first.params
        if p is None or (p.seed is not None and p.temperature > 0):
            return []
        with self._cond:
            candidates = [j for j in self._waiting if not j.stream and not j.cancelled.is_set()]
        mates: list[Job] = []
        for job in candidates:
            if len(mates) + 1 >= self.max_batch:
                break
            if not self._prepare(job):
                self._take(job)  # its error has been sent
            elif job.params == p:
                mates.append(job)
        return [job for job in mates if self._take(job)]

    def _take(self, job: Job) -> bool:
        """Remove ``job`` from the waiting queue (False: it was no longer there, e.g. refused at shutdown)."""
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return False
            return True

    def _run_batch(self, jobs: list[Job]) -> None:
        self.running = len(jobs)
        try:
            outputs = self.llm.generate([j.ids for j in jobs], jobs[0].params)
        except RequestError as err:
            if len(jobs) == 1:
                jobs[0].sink.put(err)
                return
            for job in jobs:  # one bad prompt must not fail its batch-mates: run each alone
                self._run_batch([job])
            return
        except Exception as err:
            for job in jobs:
                job.sink.put(err)
            return
        for job, out in zip(jobs, outputs):
            job.sink.put(Finished(out, len(job.ids or [])))

    def _run_stream(self, job: Job) -> None:
        self.running = 1
        stream = self.llm.stream(job.ids, job.params)
        try:
            for delta in stream:
                if job.cancelled.is_set():
                    break  # the client went away: end the sequence here
                job.sink.put(delta)
                if delta.finished:
                    job.sink.put(Finished(delta.output, len(job.ids or [])))
        except Exception as err:
            job.sink.put(err)
        finally:
            stream.close()
