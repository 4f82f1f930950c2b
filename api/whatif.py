"""POST /v1/whatif: `parley whatif` as a job of this API process, with its progress.

The request is checked at once (times, `set` overrides: 422 with the reason); the comparison then
runs as a child process (`parley whatif --json --progress json`), so a long range costs the API's
event loop nothing, and answers 202 with the job's id. GET /v1/whatif/{id} shows the progress
(records read of the range's total) and, once done, the result (the CLI's JSON) or the error.
Jobs live in the API process that started them (behind a load balancer, ask the same one), at
most MAX_RUNNING at a time per process (429 beyond); finished ones are kept for KEEP_FINISHED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field, TypeAdapter

from api.context import CONTEXT, error, validated_body
from domain.policy import parse_duration
from streams.settings import Settings
from streams.whatif import POLICY_SETTINGS, WhatIfError, parse_time, policy_overrides

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

MAX_RUNNING = 2
KEEP_FINISHED = 3600.0  # seconds a finished job stays readable
MAX_KEPT = 50


class WhatIfIn(BaseModel):
    """The body of POST /v1/whatif: the CLI's options."""

    since: str
    until: str | None = None
    channels: list[str] = Field(default_factory=list, max_length=100)
    set: dict[str, str] = Field(default_factory=dict, max_length=len(POLICY_SETTINGS))
    examples: int = Field(0, ge=0, le=100)
    check: bool = True
    reopened_within: str = "PT24H"


WHATIF_IN = TypeAdapter(WhatIfIn)


@dataclass
class Job:
    """One what-if run and what is known about it so far."""

    id: str
    args: list[str]
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    status: str = "running"  # running, done, failed
    done: int = 0
    total: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    finished: float | None = None  # monotonic
    finished_at: datetime | None = None
    task: asyncio.Task[None] | None = None

    def view(self) -> dict[str, Any]:
        """The job as GET shows it."""
        return {
            "id": self.id,
            "status": self.status,
            "progress": {
                "records_read": self.done,
                "records_total": self.total,
                "fraction": round(self.done / self.total, 4) if self.total else (1.0 if self.result else 0.0),
            },
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "result": self.result,
            "error": self.error,
        }


class Jobs:
    """This process's what-if jobs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs: dict[str, Job] = {}

    def running(self) -> int:
        """How many are still running."""
        return sum(1 for j in self.jobs.values() if j.status == "running")

    def start(self, args: list[str]) -> Job:
        """Start a job for these CLI arguments."""
        self._forget_old()
        job = Job(id=str(uuid.uuid4()), args=args)
        self.jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job))
        return job

    def _forget_old(self) -> None:
        now = time.monotonic()
        for job_id, job in list(self.jobs.items()):
            if job.finished is not None and now - job.finished > KEEP_FINISHED:
                del self.jobs[job_id]
        finished = sorted((j.finished, j.id) for j in self.jobs.values() if j.finished is not None)
        for _, job_id in finished[: max(0, len(self.jobs) - MAX_KEPT)]:
            del self.jobs[job_id]

    def _env(self) -> dict[str, str]:
        s = self.settings
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap_servers,
            "DATABASE_URL": s.database_url,
            "PARLEY_TOPIC_PREFIX": s.topic_prefix,
        }
        for name in POLICY_SETTINGS:  # the current policy is this process's, whatever the env says
            env[f"PARLEY_{name.upper()}"] = str(getattr(s, name).total_seconds())
        return env

    async def _run(self, job: Job) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "parley.cli",
            "whatif",
            "--json",
            "--progress",
            "json",
            *job.args,
            env=self._env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        errors: list[str] = []
        try:
            assert proc.stdout is not None and proc.stderr is not None
            out = asyncio.create_task(proc.stdout.read())
            async for line in proc.stderr:
                text = line.decode(errors="replace").strip()
                try:
                    progress = json.loads(text)["progress"]
                    job.done, job.total = int(progress["done"]), int(progress["total"])
                except (ValueError, KeyError, TypeError):
                    if text:
                        errors.append(text)
                        del errors[:-20]
            stdout = await out
            code = await proc.wait()
            if code == 0:
                job.result = json.loads(stdout)
                job.status = "done"
            else:
                job.status = "failed"
                job.error = "\n".join(errors[-5:]) or f"exited with {code}"
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            job.status, job.error = "failed", "cancelled: the API stopped"
            raise
        except Exception as exc:  # any failure is the job's, reported on GET
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("whatif job %s failed", job.id)
        finally:
            job.finished = time.monotonic()
            job.finished_at = datetime.now(UTC)

    async def stop(self) -> None:
        """Cancel the running jobs (their children are killed)."""
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


JOBS: web.AppKey[Jobs] = web.AppKey("parley_whatif_jobs", Jobs)


async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: this process's jobs (after the main resources: it reads the settings)."""
    jobs = Jobs(app[CONTEXT].settings)
    app[JOBS] = jobs
    yield
    await jobs.stop()


def cli_args(body: WhatIfIn, settings: Settings) -> list[str]:
    """The CLI arguments of a request; WhatIfError when a value is refused."""
    now = datetime.now(UTC)
    since = parse_time(body.since, now)
    until = parse_time(body.until, now) if body.until else None
    if until is not None and until <= since:
        raise WhatIfError("until must be after since")
    try:
        parse_duration(body.reopened_within)
    except ValueError as exc:
        raise WhatIfError(f"reopened_within: {exc}") from None
    assignments = [f"{name}={value}" for name, value in body.set.items()]
    policy_overrides(settings, assignments)  # refused here, with the setting's own message
    args = ["--since", since.isoformat(), "--reopened-within", body.reopened_within]
    if until is not None:
        args += ["--until", until.isoformat()]
    for channel in body.channels:
        args += ["--channel", channel]
    for assignment in assignments:
        args += ["--set", assignment]
    if body.examples:
        args += ["--examples", str(body.examples)]
    if not body.check:
        args.append("--no-check")
    return args


@routes.post("/v1/whatif")
async def start_whatif(request: web.Request) -> web.Response:
    """Start a what-if comparison: 202 with the job, 422 for a bad request, 429 when busy."""
    body = await validated_body(request, WHATIF_IN)
    if isinstance(body, web.Response):
        return body
    try:
        args = cli_args(body, request.app[CONTEXT].settings)
    except WhatIfError as exc:
        return error(422, str(exc))
    jobs = request.app[JOBS]
    if jobs.running() >= MAX_RUNNING:
        return error(429, f"{MAX_RUNNING} what-if runs already in progress here; retry when one is done")
    job = jobs.start(args)
    return web.json_response(
        {**job.view(), "url": f"/v1/whatif/{job.id}"},
        status=202,
        headers={"Location": f"/v1/whatif/{job.id}"},
    )


@routes.get("/v1/whatif/{id}")
async def get_whatif(request: web.Request) -> web.Response:
    """A job's progress, and its result once done."""
    job = request.app[JOBS].jobs.get(request.match_info["id"])
    if job is None:
        return error(404, "no such what-if job in this API process (finished ones are kept for an hour)")
    return web.json_response(job.view())
