"""The engine thread: the one owner of the ``LLM`` (the engine is not thread-safe), fed by a bounded queue of jobs.

HTTP handlers never touch the engine. They ``submit`` a :class:`Job` and await its :class:`Sink`, into which the
engine thread puts, thread-safely, a :class:`~moeflow.engine.batch.StepOutput` per token (streaming jobs), then
one :class:`Finished`, or one exception. Everything that reads the tokenizer (chat templates, tokenising) also
runs on this thread.

The thread runs continuous batching (:class:`~moeflow.engine.batch.BatchEngine`): between two steps it adds the
newly submitted jobs, aborts the cancelled ones (a client that went away frees its KV row before the next step)
and runs one step; requests join and leave the running batch at every token boundary. A model whose state the
row KV pool cannot hold is served one request at a time (:class:`~moeflow.engine.serial.SerialEngine`).

The longest sequence served (``max_model_len``: the model's context, or less) is fixed when the loop is built: the
static decode bucket is sized for it at once, so no admitted request makes the engine build a longer bucket (on a GPU
a compile and a graph capture, stalling every stream), and a request needing more positions is refused (400,
``context_length_exceeded``). ``warm_up`` runs one tiny request through the thread before the server takes clients,
so the decode step is compiled and captured then, not on the first client's request.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from moeflow.engine.batch import BatchEngine
from moeflow.engine.serial import SerialEngine
from moeflow.engine.static_rows import StaticRows
from moeflow.errors import MoeflowError, RequestError
from moeflow.sampling import SamplingParams
from moeflow.server.limits import check_length, resolve_max_model_len
from moeflow.validate import context_length

WARMUP_TIMEOUT_S = 900.0
"""How long the warm-up request may take (a first compile and capture of a large model's step can take minutes)."""


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


class WaitSink:
    """A thread -> thread channel (the warm-up's): the engine thread ``put``s, a blocking ``wait`` takes."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def wait(self, timeout: float) -> Any:
        return self._queue.get(timeout=timeout)


@dataclass(eq=False)
class Job:
    """One request: a prompt (text, token ids, or chat messages), its sampling settings, where results go."""

    prompt: str | list[int] | list[dict[str, Any]]
    sampling: dict[str, Any]
    """``SamplingParams`` keywords; ``max_tokens`` None means the rest of the context."""
    sink: Sink | WaitSink
    stream: bool = False
    chat: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ids: list[int] | None = None
    params: SamplingParams | None = None


class EngineLoop:
    """Owns ``llm`` on one thread; ``submit`` queues a job (at most ``max_queue`` wait), ``stop`` ends the thread.
    Sequences of at most ``max_model_len`` positions are served (default: the model's context)."""

    def __init__(self, llm: Any, max_queue: int = 64, max_batch: int = 8, prefill_chunk: int = 256,
                 max_model_len: int | None = None):  # fmt: skip
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.llm, self.max_queue, self.max_batch = llm, max_queue, max(1, max_batch)
        self.context = context_length(llm.loaded.config)
        self.max_model_len = resolve_max_model_len(max_model_len, self.context)
        try:
            self.engine: BatchEngine | SerialEngine = BatchEngine(
                llm, self.max_batch, prefill_chunk, max_len=self.max_model_len or 1
            )
        except RequestError:
            self.engine = SerialEngine(llm)
        self.warmups = 0
        """Warm-up requests run (0 or 1)."""
        self.warmup_s: float | None = None
        self._incoming: deque[Job] = deque()
        self._jobs: dict[int, Job] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------- HTTP side
    @property
    def waiting(self) -> int:
        """Jobs not yet running: submitted, or in the engine's waiting queue."""
        return len(self._incoming) + len(self.engine.waiting)

    @property
    def running(self) -> int:
        """Sequences in the running batch."""
        return len(self.engine.running)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if self.waiting >= self.max_queue:
                raise QueueFull(f"{self.waiting} requests are already waiting (--max-queue {self.max_queue})")
            self._incoming.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away (or the job is done): its sequence ends before the engine's next step."""
        job.cancelled.set()
        with self._cond:
            self._cond.notify()

    @property
    def decode_shape(self) -> str:
        """What the decode step runs, in words (for the startup lines)."""
        kv = self.engine.kv if isinstance(self.engine, BatchEngine) else None
        if isinstance(kv, StaticRows):
            return f"static decode step of {kv.rows} rows x {kv.max_len} positions"
        if kv is not None:
            return f"eager decode of up to {self.max_batch} rows"
        return "one request at a time"

    def start(self) -> None:
        """Start the engine thread (once: a second call does nothing)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._serve, name="moeflow-engine", daemon=True)
        self._thread.start()

    def warm_up(self, timeout: float = WARMUP_TIMEOUT_S) -> float:
        """Run one tiny request (a one-token prompt, two tokens out: a prefill and a decode step) through the
        started thread and wait for it, so the decode step is compiled and captured before any client's request;
        returns its seconds. Once: later calls return the first one's time. Raises what the request raised."""
        if self.warmup_s is not None:
            return self.warmup_s
        tok = self.llm.tokenizer
        first = next((t for t in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None))
                      if isinstance(t, int)), 0)  # fmt: skip
        sink = WaitSink()
        job = Job([first], dict(max_tokens=2, temperature=0.0, ignore_eos=True), sink)
        t0 = time.perf_counter()
        self.submit(job)
        try:
            item = sink.wait(timeout)
        except queue.Empty:
            self.cancel(job)
            raise MoeflowError(f"the warm-up request did not finish in {timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        self.warmups += 1
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s

    def stop(self, timeout: float | None = 30.0) -> None:
        """Admit nothing more, refuse what waits, let the running sequences finish, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----------------------------------------------------------------------------- engine side
    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self.engine.has_work and not self._stopping:
                    self._cond.wait()
                new = list(self._incoming)
                self._incoming.clear()
                stopping = self._stopping
            if stopping:
                self._refuse(new)
                if not self.engine.has_work:
                    return
            for job in new:
                self._add(job)
            for rid, job in list(self._jobs.items()):
                if job.cancelled.is_set():
                    self.engine.abort(rid)
                    del self._jobs[rid]
            try:
                outputs = self.engine.step() if self.engine.has_work else []
            except Exception as err:  # never lose the engine thread: the running requests get the error
                for rid, job in list(self._jobs.items()):
                    self.engine.abort(rid)
                    job.sink.put(err)
                self._jobs.clear()
                continue
            for out in outputs:
                job = self._jobs.get(out.request_id)
                if job is None:
                    continue
                if job.stream:
                    job.sink.put(out)
                if out.finished:
                    job.sink.put(Finished(out.output, len(job.ids or [])))
                    del self._jobs[out.request_id]

    def _refuse(self, new: list[Job]) -> None:
        """Shutting down: the submitted and the engine's waiting requests get ``Stopped``."""
        for job in new:
            job.sink.put(Stopped("the server shut down before this request ran"))
        for rid in list(self.engine.waiting):
            self.engine.abort(rid)
            job = self._jobs.pop(rid, None)
            if job is not None:
                job.sink.put(Stopped("the server shut down before this request ran"))

    def _add(self, job: Job) -> None:
        """Tokenise the prompt, build its sampling parameters and hand it to the engine (a bad request gets its
        error)."""
        if job.cancelled.is_set():
            return
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
            limit = self.max_model_len
            if sampling["max_tokens"] is None:
                sampling["max_tokens"] = max(1, limit - len(job.ids)) if limit else 256
            check_length(len(job.ids), sampling["max_tokens"], limit, self.context)
            job.params = SamplingParams(**sampling)
            rid = self.engine.add(job.ids, job.params, arrival=job.submitted)
        except Exception as err:
            job.sink.put(err)
            return
        self._jobs[rid] = job
