"""The task pipeline: fetch and normalise the photo, run the style on an instance, store the result.

Orchestration only: wire details live in `images`, `comfy`, `storage`. Retriable failures are
retried on another instance with backoff; the caller turns the outcome into events and acks.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import random
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from consumer import tracing
from consumer.bulk import first_set
from consumer.comfy.preemption import Preempted
from consumer.comfy.scheduling import Priority
from consumer.decode_budget import DecodeBudget
from consumer.errors import InstanceStuck, InstanceUnavailable, TaskTimeout, TransientError
from consumer.fetch import ImageFetcher
from consumer.images import NormalisedImage, normalise, probe, release_freed_memory
from consumer.logs import ctx
from consumer.settings import SchedulerPolicy
from consumer.storage import OutputStore, upload_presigned
from consumer.workflows import RenderParams

if TYPE_CHECKING:
    from collections.abc import Iterator

    from opentelemetry.trace import Tracer

    from consumer.comfy import Instance, InstancePool, OutputImage, PromptRun
    from consumer.jobs import Job
    from consumer.metrics import Metrics

log = logging.getLogger(__name__)
UPLOAD_SUBFOLDER = "style-consumer"
REPORTER_STOP_S = 1.0
TIMING_KEYS = frozenset(
    {"queued", "download", "execute", "upload", "total"}
)  # as in contracts' Timings


class Progress(Protocol):
    """What the pipeline tells the outside world while it runs (events, state)."""

    async def started(self, job: Job) -> None: ...
    async def progress(self, job: Job, percent: int) -> None: ...
    async def retrying(self, job: Job, error: TransientError, delay_s: float) -> None: ...


@dataclass(frozen=True)
class PipelineConfig:
    max_side: int = 1024
    max_pixels: int = 50_000_000
    max_pixels_full_decode: int = 30_000_000  # PNG, WebP, HEIC: no reduced-scale decoding
    png_level: int = 0
    max_attempts: int = 3
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 30.0
    task_timeout_s: float = 600.0
    execution_timeout_s: float = 300.0
    upload_timeout_s: float = 60.0


@dataclass(frozen=True)
class Result:
    """A finished task: where its images are."""

    urls: list[str]


class Pipeline:
    """Runs one job from URL to stored result. Stateless between jobs."""

    def __init__(
        self,
        config: PipelineConfig,
        *,
        fetcher: ImageFetcher,
        pool: InstancePool,
        outputs: OutputStore,
        notify: Progress,
        metrics: Metrics,
        decode_budget: DecodeBudget,
        tracer: Tracer = tracing.NO_TRACER,
    ) -> None:
        self._tracer = tracer
        self._cfg = config
        self._fetcher = fetcher
        self._pool = pool
        self._outputs = outputs
        self._notify = notify
        self._metrics = metrics
        self._decode_budget = decode_budget

    async def run(self, job: Job) -> Result:
        """Run the job under its deadline; raises a ConsumerError when it cannot complete."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._cfg.task_timeout_s):
                files = await self._adopt(job)
                if files is None:
                    image = await self._prepare(job)
                    files = await self._execute_with_retries(job, image)
                urls = await self._store(job, files)
        except TimeoutError as exc:
            msg = f"task ran past TASK_TIMEOUT_S={self._cfg.task_timeout_s:g}s; prompt interrupted"
            raise TaskTimeout(msg) from exc
        finally:
            self._record(job, "total", started)
        return Result(urls=urls)

    async def _adopt(self, job: Job) -> list[tuple[OutputImage, bytes]] | None:
        """Take over the prompt an earlier run (a replica that died) left on an instance."""
        if job.previous_prompt is None:
            return None
        name, prompt_id = job.previous_prompt
        instance = self._pool.find(name)
        if instance is None or not instance.healthy:
            return None
        try:
            with self._stage(job, "execute"):
                images = await instance.client.adopt(prompt_id)
                if images is None:
                    return None
                files = [(img, await instance.client.view(img)) for img in images]
        except InstanceUnavailable as exc:
            log.info("could not adopt prompt %s: %s", prompt_id, exc, extra=ctx(**job.log_fields()))
            return None
        job.instance, job.prompt_id = name, prompt_id
        log.info("adopted prompt %s from an earlier run", prompt_id, extra=ctx(**job.log_fields()))
        return files

    async def _prepare(self, job: Job) -> NormalisedImage:
        with self._stage(job, "download"):
            data = await self._fetcher.fetch(job.request.image_url)
        with self._stage(job, "normalise"):
            return await normalise_within(self._decode_budget, data, self._cfg)

    async def _execute_with_retries(
        self, job: Job, image: NormalisedImage
    ) -> list[tuple[OutputImage, bytes]]:
        failed_on: set[str] = set()
        while True:
            try:
                return await self._execute_once(job, image, failed_on)
            except Preempted:  # its place went to interactive work: wait again, same attempt
                self._metrics.preemptions.inc()
                log.info(
                    "staged prompt gave way to interactive work", extra=ctx(**job.log_fields())
                )
            except InstanceUnavailable as exc:  # not BrokerUnavailable: that is no attempt's fault
                if job.attempt >= self._cfg.max_attempts:
                    raise
                if job.instance:
                    failed_on.add(job.instance)
                delay_s = self._backoff_s(job.attempt)
                log.warning(
                    "attempt failed, retrying", extra=ctx(**job.log_fields(), error=str(exc))
                )
                self._metrics.retries.inc()
                job.attempt += 1
                await self._notify.retrying(job, exc, delay_s)
                await asyncio.sleep(delay_s)

    async def _execute_once(
        self, job: Job, image: NormalisedImage, exclude: set[str]
    ) -> list[tuple[OutputImage, bytes]]:
        async with self._pool.slot(job.demand, exclude=exclude) as instance:
            job.instance = instance.name
            self._record_queued(job)
            with self._stage(job, "execute"):
                return await self._run_prompt(job, instance, image)

    async def _run_prompt(
        self, job: Job, instance: Instance, image: NormalisedImage
    ) -> list[tuple[OutputImage, bytes]]:
        client = instance.client
        name = f"{job.task_id}-{job.attempt}-{uuid.uuid4().hex[:8]}.png"
        with tracing.stage_span(self._tracer, "comfyui.upload", job):
            ref = await client.upload_image(image.png, name, UPLOAD_SUBFOLDER)
        fair = self._pool.policy is SchedulerPolicy.FAIR
        front = fair and job.priority is Priority.INTERACTIVE
        run = await client.submit(job.style.render(self._params(job, ref)), front=front)
        job.prompt_id, job.run = run.prompt_id, run  # a shutdown acts on it: Dispatcher.drain
        try:
            if fair and job.priority is Priority.BULK:
                await self._give_way_if_asked(instance, run)
            await self._announce(job, run)
            images = await self._wait_reporting(job, run, instance.name)
        finally:
            job.run = None
            tracing.past_span(self._tracer, "comfyui.queue", job, run.created_ns, run.started_ns)
        self._learn_loads(job, instance, run)
        return [(img, await client.view(img)) for img in images]

    async def _give_way_if_asked(self, instance: Instance, run: PromptRun) -> None:
        """Until the bulk prompt starts, interactive work may ask for its place: then it is
        withdrawn from the instance's queue and `Preempted` raised (the slot is released).
        The wait counts toward the attempt's EXECUTION_TIMEOUT_S only through `wait()`."""
        with self._pool.staged.holding(instance) as asked:
            await first_set([run.begun, asked], timeout_s=self._cfg.execution_timeout_s)
        if asked.is_set() and await run.withdraw():
            raise Preempted(f"prompt {run.prompt_id} withdrawn from {instance.name}")

    def _learn_loads(self, job: Job, instance: Instance, run: PromptRun) -> None:
        """Count the model loads the prompt paid, and teach the pool what they cost."""
        loads = instance.memory.observe(job.style.loaders, run.cached_nodes, run.node_seconds)
        for load in loads:
            self._metrics.model_loads.labels(instance.name).inc()
            self._metrics.model_load_seconds.labels(instance.name).inc(load.seconds)
        self._pool.learn(loads)

    async def _announce(self, job: Job, run: PromptRun) -> None:
        """Record and publish the start; cancelled meanwhile, the prompt is withdrawn."""
        try:
            await self._notify.started(job)
        except asyncio.CancelledError:
            await asyncio.shield(run.cancel())
            raise

    async def _wait_reporting(self, job: Job, run: PromptRun, instance: str) -> list[OutputImage]:
        """The prompt's outputs, its progress reported on the side.

        Progress publishing runs in a task of its own: a slow or blocked broker only delays
        progress events, never the prompt's outcome or its deadline. `run.wait` interrupts
        the prompt on its deadline and on cancellation (unless a shutdown left it for adoption).
        """
        reporter = asyncio.create_task(self._report_progress(job, run))
        try:
            return await run.wait(self._cfg.execution_timeout_s)
        except TaskTimeout as exc:
            msg = (
                f"prompt {run.prompt_id} did not finish on {instance} within "
                f"EXECUTION_TIMEOUT_S={self._cfg.execution_timeout_s:g}s; interrupted"
            )
            raise InstanceStuck(msg) from exc
        finally:
            reporter.cancel()
            await asyncio.wait({reporter}, timeout=REPORTER_STOP_S)

    async def _report_progress(self, job: Job, run: PromptRun) -> None:
        try:
            async for percent in run.progress():
                await self._notify.progress(job, percent)
        except Exception as exc:  # progress is lossy: never let it affect the task
            log.warning("progress reporting stopped: %s", exc, extra=ctx(**job.log_fields()))

    def _params(self, job: Job, image_ref: str) -> RenderParams:
        return RenderParams(
            image=image_ref,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            strength=job.strength,
            seed=job.seed,
            filename_prefix=f"{UPLOAD_SUBFOLDER}/{job.task_id}-{uuid.uuid4().hex[:8]}",
        )

    async def _store(self, job: Job, files: list[tuple[OutputImage, bytes]]) -> list[str]:
        with self._stage(job, "upload"):
            target = job.request.output
            if target is not None:
                image, data = files[0]
                url = await upload_presigned(
                    self._fetcher.client,  # the SSRF guard applies to upload URLs too
                    str(target.upload_url),
                    data,
                    _content_type(image.filename),
                    self._cfg.upload_timeout_s,
                )
                return [url]
            return [
                await self._outputs.save(
                    job.task_id, img.filename, data, _content_type(img.filename)
                )
                for img, data in files
            ]

    def _backoff_s(self, attempt: int) -> float:
        exponential_s: float = self._cfg.retry_backoff_s * 2.0 ** (attempt - 1)
        return min(self._cfg.retry_backoff_max_s, exponential_s) * random.uniform(0.5, 1.0)

    @contextmanager
    def _stage(self, job: Job, stage: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            with tracing.stage_span(self._tracer, stage, job):
                yield
        finally:
            self._record(job, stage, started)

    def _record_queued(self, job: Job) -> None:
        """Accepted to first start on an instance (the contract's `timings_ms.queued`)."""
        if "queued" not in job.timings_ms:
            tracing.past_span(self._tracer, "queued", job, tracing.wall_ns(job.accepted_at), None)
            self._record(job, "queued", job.accepted_at)
            waited_s = time.monotonic() - job.accepted_at
            self._metrics.queue_wait_seconds.labels(job.priority.label).observe(waited_s)

    def _record(self, job: Job, stage: str, started: float) -> None:
        elapsed_s = time.monotonic() - started
        self._metrics.stage_seconds.labels(stage).observe(elapsed_s)
        if stage in TIMING_KEYS:
            job.timings_ms[stage] = job.timings_ms.get(stage, 0) + round(elapsed_s * 1000)


async def normalise_within(
    budget: DecodeBudget, data: bytes, cfg: PipelineConfig
) -> NormalisedImage:
    """Read the header, wait for the decode's estimated memory in `budget`, then decode.

    Both steps run in worker threads: the first call imports the HEIC plugin, and decoding
    takes up to seconds of CPU.
    """
    found = await asyncio.to_thread(
        probe,
        data,
        cfg.max_side,
        cfg.max_pixels,
        max_pixels_full_decode=cfg.max_pixels_full_decode,
    )
    return await budget.run_in_thread(found.estimated_decode_bytes, _normalise_released, data, cfg)


def _normalise_released(data: bytes, cfg: PipelineConfig) -> NormalisedImage:
    """Normalise, then hand the memory the decode freed back to the OS."""
    try:
        return normalise(
            data,
            cfg.max_side,
            cfg.max_pixels,
            cfg.png_level,
            max_pixels_full_decode=cfg.max_pixels_full_decode,
        )
    finally:
        release_freed_memory()


def _content_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"
