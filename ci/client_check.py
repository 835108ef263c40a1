#!/usr/bin/env python3
"""End-to-end check of the Python client generated from openapi/openapi.json (run by ci/client.sh).

Environment: ARNELA_BASE_URL (e.g. http://127.0.0.1:8080), ARNELA_TOKEN (an admin bearer token),
and the generated package `arnela_client` on PYTHONPATH. Exits 1 when a check fails.

Each task type is built with its own generated request model (SendEmailTask, SendSmsTask,
SendWhatsappTask, SyncCalendarTask) and typed payload models; responses are read as the
generated TaskView, TaskPage, event models and ErrorBody.
"""

from __future__ import annotations

import itertools
import os
import pkgutil
import sys
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, TypeVar

import arnela_client.models
import httpx
from arnela_client import AuthenticatedClient
from arnela_client.api.tasks import enqueue_task, get_task, get_task_events, list_tasks
from arnela_client.models import ErrorBody, TaskPage, TaskView
from arnela_client.types import Unset

# --- request models: one per task type, with typed payloads -------------------------------------
# isort: split
from arnela_client.models import (
    AppointmentData,
    CalendarChange,
    ChangeAction,
    EmailMessage,
    Locale,
    SendEmailTask,
    SendEmailType,
    SendSmsTask,
    SendSmsType,
    SendWhatsappTask,
    SendWhatsappType,
    SyncCalendarTask,
    SyncCalendarType,
    TemplateMessage,
    TemplateMessageData,
    TemplateName,
    TextMessage,
)

TaskRequest = SendEmailTask | SendSmsTask | SendWhatsappTask | SyncCalendarTask

# The module names under models/ of the four task types' request models.
TASK_MODELS = {
    "send_email": "send_email_task",
    "send_sms": "send_sms_task",
    "send_whatsapp": "send_whatsapp_task",
    "sync_calendar": "sync_calendar_task",
}

RUN = uuid.uuid4().hex[:12]
# Not E.164 (no country code): the server refuses it with 422 naming payload.phone.
BAD_PHONE = "612345678"


def build_send_email() -> TaskRequest:
    return SendEmailTask(
        type_=SendEmailType.SEND_EMAIL,
        payload=EmailMessage(
            to="ana.garcia@example.com",
            subject="Confirmación de su cita",
            body="Hola Ana, su cita es el martes a las 10:00.",
        ),
        idempotency_key=f"client-check-{RUN}-email",
    )


def build_send_sms(phone: str = "+34600111222") -> TaskRequest:
    return SendSmsTask(
        type_=SendSmsType.SEND_SMS,
        payload=TextMessage(phone=phone, message="Recordatorio: su cita es mañana a las 10:00."),
        max_attempts=5,
    )


def build_send_whatsapp() -> TaskRequest:
    run_at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    data = TemplateMessageData.from_dict({"patient_name": "Ana", "starts_at": "2030-02-01T10:00:00+01:00"})
    return SendWhatsappTask(
        type_=SendWhatsappType.SEND_WHATSAPP,
        payload=TemplateMessage(
            phone="+34600111333", template=TemplateName.REMINDER, data=data, locale=Locale.ES
        ),
        run_at=run_at,
    )


def build_sync_calendar() -> TaskRequest:
    return SyncCalendarTask(
        type_=SyncCalendarType.SYNC_CALENDAR,
        payload=CalendarChange(
            event_id=f"client-check-{RUN}",
            action=ChangeAction.CREATE,
            appointment_data=AppointmentData(
                starts_at="2030-02-01T10:00:00+01:00", duration_minutes=30, summary="Revisión"
            ),
        ),
    )


BUILDERS: dict[str, Callable[[], TaskRequest]] = {
    "send_email": build_send_email,
    "send_sms": build_send_sms,
    "send_whatsapp": build_send_whatsapp,
    "sync_calendar": build_sync_calendar,
}

# --- nothing below should need changing with the schema -------------------------------------

TASK_STATUSES = {"queued", "running", "retrying", "succeeded", "dead", "cancelled"}
T = TypeVar("T")


class CheckFailed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def plain(value: Any) -> Any:
    """A generated model, enum or Unset as plain JSON-like data, to compare either schema."""
    if isinstance(value, Unset):
        return None
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "to_dict"):
        return plain(value.to_dict())
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def parsed_as(response: Any, status: int, model: type[T]) -> T:
    expect(
        response.status_code == status,
        f"expected HTTP {status}, got {int(response.status_code)}: {response.content[:300]!r}",
    )
    expect(
        isinstance(response.parsed, model),
        f"expected a {model.__name__}, got {type(response.parsed).__name__}",
    )
    return response.parsed


def request_parts(body: TaskRequest) -> tuple[str, dict[str, Any]]:
    """The type and payload a request sends, as JSON data."""
    sent = plain(body.to_dict())
    return sent["type"], sent["payload"]


def check_task_view(view: TaskView, body: TaskRequest) -> None:
    task_type, payload = request_parts(body)
    expect(isinstance(view.id, uuid.UUID), f"id is {view.id!r}, not a UUID")
    expect(plain(view.type_) == task_type, f"type is {plain(view.type_)!r}, not {task_type!r}")
    stored = plain(view.payload)
    expect(isinstance(stored, dict), f"payload is {stored!r}, not an object")
    differing = {key: stored.get(key) for key, value in payload.items() if stored.get(key) != value}
    expect(not differing, f"payload differs from the request at {differing} (sent {payload})")
    expect(plain(view.status) in TASK_STATUSES, f"unknown status {plain(view.status)!r}")
    expect(view.version >= 1, f"version {view.version} < 1")
    expect(isinstance(view.created_at, datetime), "created_at is not a datetime")


def enqueue(client: AuthenticatedClient, body: TaskRequest) -> TaskView:
    response = enqueue_task.sync_detailed(client=client, body=body)
    view = parsed_as(response, 201, TaskView)
    check_task_view(view, body)
    return view


def read_back(client: AuthenticatedClient, task_id: uuid.UUID, body: TaskRequest) -> TaskView:
    view = parsed_as(get_task.sync_detailed(task_id, client=client), 200, TaskView)
    expect(view.id == task_id, f"asked for {task_id}, got {view.id}")
    check_task_view(view, body)
    return view


def is_model(value: Any) -> bool:
    """An instance of a class of the generated models/ (EventView today, one per event type later)."""
    return type(value).__module__.startswith(f"{arnela_client.models.__name__}.")


def read_history(client: AuthenticatedClient, task_id: uuid.UUID) -> list[Any]:
    response = get_task_events.sync_detailed(task_id, client=client)
    events = parsed_as(response, 200, list)
    expect(len(events) >= 1, "the history is empty")
    untyped = [type(event).__name__ for event in events if not is_model(event)]
    expect(not untyped, f"events not parsed into generated models: {untyped}")
    expect(plain(events[0].type_) == "enqueued", f"first event is {plain(events[0].type_)!r}")
    expect(
        [event.sequence for event in events] == list(range(1, len(events) + 1)),
        f"sequences {[event.sequence for event in events]} are not 1..{len(events)}",
    )
    expect(all(event.task_id == task_id for event in events), "an event of another task")
    expect(plain(events[0].prev_hash) is None, "the first event has a prev_hash")
    for before, event in itertools.pairwise(events):
        expect(
            event.prev_hash == before.hash_, f"event {event.sequence}: prev_hash breaks the chain"
        )
    return events


def read_page(client: AuthenticatedClient, task_ids: list[uuid.UUID]) -> TaskPage:
    page = parsed_as(list_tasks.sync_detailed(client=client, limit=50), 200, TaskPage)
    expect(all(isinstance(item, TaskView) for item in page.items), "an item is not a TaskView")
    listed = {item.id for item in page.items}
    missing = [str(task_id) for task_id in task_ids if task_id not in listed]
    expect(not missing, f"tasks missing from the first page: {missing}")
    return page


def refuse_bad_phone(client: AuthenticatedClient) -> ErrorBody:
    response = enqueue_task.sync_detailed(client=client, body=build_send_sms(phone=BAD_PHONE))
    error = parsed_as(response, 422, ErrorBody)
    expect(plain(error.code) == "validation_failed", f"code is {plain(error.code)!r}")
    expect(plain(error.field) == "payload.phone", f"field is {plain(error.field)!r}")
    return error


class Run:
    def __init__(self) -> None:
        self.passed = self.failed = self.skipped = 0

    def check(self, name: str, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            result = fn(*args)
        except CheckFailed as exc:
            print(f"FAIL {name}: {exc}", flush=True)
        except Exception:  # noqa: BLE001 -- the generated code or the transport broke: show where
            print(f"FAIL {name}: unexpected exception", flush=True)
            traceback.print_exc(file=sys.stdout)
        else:
            self.passed += 1
            print(f"ok   {name}", flush=True)
            return result
        self.failed += 1
        return None

    def skip(self, name: str, why: str) -> None:
        self.skipped += 1
        print(f"skip {name}: {why}", flush=True)


def print_models() -> None:
    names = sorted(module.name for module in pkgutil.iter_modules(arnela_client.models.__path__))
    print(f"generated models ({len(names)}): {', '.join(names)}")
    for task_type, body in ((t, build()) for t, build in BUILDERS.items()):
        module = TASK_MODELS[task_type]
        state = "generated" if module in names else "not generated yet"
        payload = getattr(body, "payload", None)
        print(
            f"  {task_type}: request {type(body).__name__}, payload {type(payload).__name__}"
            f" (models/{module}.py: {state})"
        )


def main() -> int:
    base_url = os.environ["ARNELA_BASE_URL"]
    token = os.environ["ARNELA_TOKEN"]
    print_models()
    client = AuthenticatedClient(
        base_url=base_url,
        token=token,
        timeout=httpx.Timeout(10.0),
        raise_on_unexpected_status=True,  # an undocumented status code is a failure
    )
    run = Run()
    with client:
        created: dict[str, tuple[TaskRequest, TaskView]] = {}
        for task_type, build in BUILDERS.items():
            body = build()
            view = run.check(f"POST /tasks {task_type} -> 201 TaskView", enqueue, client, body)
            if view is not None:
                created[task_type] = (body, view)
                print(f"     id {view.id}, status {plain(view.status)}")
        for task_type in BUILDERS:
            if task_type not in created:
                run.skip(f"GET /tasks/{{id}} {task_type}", "not enqueued")
                run.skip(f"GET /tasks/{{id}}/events {task_type}", "not enqueued")
                continue
            body, view = created[task_type]
            run.check(
                f"GET /tasks/{{id}} {task_type} -> TaskView", read_back, client, view.id, body
            )
            events = run.check(
                f"GET /tasks/{{id}}/events {task_type} -> list of event models",
                read_history,
                client,
                view.id,
            )
            if events is not None:
                names = (f"{plain(event.type_)} ({type(event).__name__})" for event in events)
                print(f"     events: {', '.join(names)}")
        ids = [view.id for _, view in created.values()]
        page = run.check("GET /tasks -> TaskPage", read_page, client, ids)
        if page is not None:
            print(f"     {len(page.items)} tasks, next_after {plain(page.next_after)}")
        error = run.check(
            f"POST /tasks send_sms phone {BAD_PHONE!r} -> 422 ErrorBody", refuse_bad_phone, client
        )
        if error is not None:
            print(
                f"     {plain(error.code)} {plain(error.field)} {plain(error.reason)}: {error.message}"
            )
    summary = f"client_check: {run.passed} passed, {run.failed} failed"
    print(summary + (f", {run.skipped} skipped" if run.skipped else ""))
    return 1 if run.failed or run.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
