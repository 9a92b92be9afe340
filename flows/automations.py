"""The project's automations (automations.yaml) applied to a Prefect server: earlier copies removed, then created."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from prefect.events.schemas.automations import AutomationCore
from pydantic import ValidationError

TAG = "mnist-ae"  # marks this project's automations on a server shared with others
FILE = Path(__file__).resolve().parents[1] / "automations.yaml"
NOTIFY = "send-notification"


class AutomationsError(RuntimeError):
    """The automations file or the server it is applied to is not as it must be."""


def read(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """The notification block (`<type slug>/<name>`) and the automations of a file, as written."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise AutomationsError(f"automations file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise AutomationsError(f"automations file {path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("automations"), list):
        raise AutomationsError(f"automations file {path}: expected a mapping with a list under 'automations'")
    notify = document.get("notify")
    if not isinstance(notify, str) or notify.count("/") != 1:
        raise AutomationsError(f"automations file {path}: 'notify' must name a block as <block type slug>/<name>, "
                               f"e.g. custom-webhook/mnist-ae-alerts")
    return notify, document["automations"]


def build(path: Path, entries: list[dict[str, Any]], block_id: UUID) -> list[AutomationCore]:
    """The automations to create: each tagged as this project's, its notifications sent through `block_id`."""
    built = []
    for number, entry in enumerate(entries, start=1):
        name = entry.get("name", f"automation {number}") if isinstance(entry, dict) else f"automation {number}"
        try:
            actions = [{"block_document_id": str(block_id), **a} if isinstance(a, dict) and a.get("type") == NOTIFY
                       else a for a in entry.get("actions") or []]
            automation = AutomationCore.model_validate({**entry, "actions": actions})
        except (ValidationError, AttributeError, TypeError) as exc:
            raise AutomationsError(f"automations file {path}, {name!r}: {_first_error(exc)}") from None
        built.append(automation.model_copy(update={"tags": sorted({*automation.tags, TAG})}))
    return built


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
    return str(exc)


def apply(path: Path = FILE) -> tuple[str, list[tuple[str, UUID]], int]:
    """Replace this project's automations on the server PREFECT_API_URL names with those of `path`.

    Returns the server's URL, the created automations' names and ids, and how many earlier copies were removed.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise AutomationsError("PREFECT_API_URL is not set: automations live on a lasting Prefect server (`prefect "
                               "server start`); point PREFECT_API_URL at it, e.g. http://127.0.0.1:4200/api")
    notify, entries = read(path)
    slug, name = notify.split("/")
    with get_client(sync_client=True) as client:
        if (error := client.api_healthcheck()) is not None:
            raise AutomationsError(f"cannot reach the Prefect server at {url} (PREFECT_API_URL): {error}")
        try:
            block = client.read_block_document_by_name(name, slug)
        except ObjectNotFound:
            raise AutomationsError(f"no {slug} block named {name} on {url} (automations file {path}, 'notify'): "
                                   "create it once, see docs/alerts.md") from None
        automations = build(path, entries, block.id)
        names = {a.name for a in automations}
        earlier = [a for a in client.read_automations() if TAG in a.tags or a.name in names]
        for automation in earlier:
            client.delete_automation(automation.id)
        created = [(a.name, client.create_automation(a)) for a in automations]
    return url, created, len(earlier)
