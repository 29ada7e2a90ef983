"""Asynchronous settlement jobs (reference §16.4): a facilitator may accept a settle without
finishing it, answering ``202`` (or a body with a job id and no transaction). Such an answer is
**not** a settlement: the job is polled with ``GET {facilitator}/settle/<jobId>`` until it is
``succeeded`` (settled, with its transaction), ``failed`` or ``not_found`` (the debt stays and the
settlement is re-driven later).

``JobAwareFacilitatorClient`` is the SDK's ``HTTPFacilitatorClient`` with two changes: an accepted
job raises ``SettleJobAccepted`` (the SDK client would raise a bare ``ValueError`` on 202, or try
to parse a job body as a final ``SettleResponse``), and ``settle_job_status`` reads a job.
``poll_settle_job`` polls with capped exponential backoff; the caller bounds it (``settle_one``
runs it shielded under the settle deadline and keeps the job id for the next round if it is
still pending).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import trio
from x402.http import HTTPFacilitatorClient
from x402.http.facilitator_client import (
    _attach_extension_responses,
    _parse_facilitator_response,
)
from x402.schemas import SettleResponse

MAX_JOB_ID = 256
_SUCCEEDED = {"succeeded", "success", "settled", "completed", "confirmed", "done"}
_FAILED = {"failed", "failure", "error", "reverted", "cancelled", "canceled", "expired"}
_NOT_FOUND = {"not_found", "notfound", "unknown", "missing"}


class JobState(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    transaction: str | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.state is not JobState.PENDING


class SettleJobAccepted(Exception):
    """The facilitator accepted the settle as an asynchronous job: poll it, do not trust it."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"settle accepted as job {job_id}")
        self.job_id = job_id


class SettleJobClient(Protocol):
    async def settle_job_status(self, job_id: str) -> JobStatus: ...


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _job_id(body: dict[str, Any], response: httpx.Response) -> str | None:
    for key in ("jobId", "job_id", "id"):
        value = body.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    location = response.headers.get("Location", "")
    if "/settle/" in location:
        return location.rsplit("/settle/", 1)[1].split("?", 1)[0] or None
    return None


def accepted_job(response: httpx.Response) -> str | None:
    """The job id when a settle answer is an accepted/pending job, else None (a final answer)."""
    body = _json(response)
    if response.status_code == 202:
        job = _job_id(body, response)
        if job is None:
            raise ValueError("facilitator accepted the settle (202) without a job id")
        return job
    if response.status_code == 200 and not body.get("transaction"):
        job = None
        for key in ("jobId", "job_id"):  # a bare "id" on a 200 is not a job
            if body.get(key):
                job = str(body[key])
        return job
    return None


def parse_job_status(response: httpx.Response) -> JobStatus:
    if response.status_code == 404:
        return JobStatus(JobState.NOT_FOUND)
    if response.status_code not in (200, 202):
        raise ValueError(f"facilitator job status failed ({response.status_code})")
    body = _json(response)
    raw = str(body.get("status") or body.get("state") or "").strip().lower()
    tx = body.get("transaction") or body.get("txHash") or body.get("tx_hash")
    tx = str(tx) if tx else None
    error = body.get("errorReason") or body.get("error_reason") or body.get("error")
    error = str(error)[:200] if error else None
    if raw in _SUCCEEDED or (not raw and body.get("success") is True and tx):
        if not tx:  # a success we cannot show on chain: treat as still pending
            return JobStatus(JobState.PENDING, None, "succeeded_without_transaction")
        return JobStatus(JobState.SUCCEEDED, tx, None)
    if raw in _FAILED or (not raw and body.get("success") is False):
        return JobStatus(JobState.FAILED, tx, error or "settle_job_failed")
    if raw in _NOT_FOUND:
        return JobStatus(JobState.NOT_FOUND, None, error)
    return JobStatus(JobState.PENDING, tx, None)  # pending, queued, submitted, ...


class JobAwareFacilitatorClient(HTTPFacilitatorClient):
    """``HTTPFacilitatorClient`` that recognises asynchronous settle jobs and can poll them."""

    async def _settle_http(
        self,
        version: int,
        payload_dict: dict[str, Any],
        requirements_dict: dict[str, Any],
    ) -> SettleResponse:
        client = self._get_async_client()
        response = await client.post(
            f"{self._url}/settle",
            headers=self._get_settle_headers(),
            json=self._build_request_body(version, payload_dict, requirements_dict),
        )
        job = accepted_job(response)
        if job is not None:
            if len(job) > MAX_JOB_ID:
                raise ValueError("facilitator job id too long")
            raise SettleJobAccepted(job)
        if response.status_code != 200:  # the SDK client's behaviour from here on
            raise ValueError(f"Facilitator settle failed ({response.status_code}): {response.text}")
        result = _parse_facilitator_response(response, SettleResponse, "settle")
        return _attach_extension_responses(result, response)

    async def settle_job_status(self, job_id: str) -> JobStatus:
        client = self._get_async_client()
        response = await client.get(
            f"{self._url}/settle/{quote(job_id, safe='')}",
            headers=self._get_settle_headers(),
        )
        return parse_job_status(response)


async def poll_settle_job(
    client: SettleJobClient,
    job_id: str,
    *,
    first_delay: float = 0.1,
    max_delay: float = 2.0,
    sleep: Callable[[float], Awaitable[Any]] = trio.sleep,
) -> JobStatus:
    """Poll until the job is final (the caller bounds the time). A transport error or an odd
    answer counts as "still pending" and is retried after the next backoff step."""
    delay = first_delay
    while True:
        try:
            status = await client.settle_job_status(job_id)
        except (httpx.HTTPError, ValueError):
            status = JobStatus(JobState.PENDING, None, "poll_error")
        if status.final:
            return status
        await sleep(delay)
        delay = min(delay * 2, max_delay)
