"""Connection kinds: their settings models, their role (CRM or project tool), their class.

Adding a system means adding its module and one entry here; nothing in `sync/` changes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from connectors.asana import PROJECT_FIELDS as ASANA_PROJECT_FIELDS
from connectors.asana import AsanaSettings
from connectors.base import CRM, ProjectTool
from connectors.hubspot import HubSpotSettings

Role = Literal["crm", "project_tool"]

ConnectionSettings = Annotated[
    HubSpotSettings | AsanaSettings,
    Field(discriminator="kind"),
]

CONNECTION_SETTINGS: dict[str, tuple[Role, type]] = {
    "hubspot": ("crm", HubSpotSettings),
    "asana": ("project_tool", AsanaSettings),
}

# Project-level fields a mapping may set (`project.fields.<name>`), per project tool.
PROJECT_FIELDS: dict[str, frozenset[str]] = {
    "asana": ASANA_PROJECT_FIELDS,
}


def role_of(kind: str) -> Role:
    return CONNECTION_SETTINGS[kind][0]


def build_connector(name: str, settings: Any) -> CRM | ProjectTool:
    """Construct the connector for a validated connection (no network call here)."""
    if settings.kind == "hubspot":
        from connectors.hubspot import HubSpotCRM

        return HubSpotCRM(name, settings)
    if settings.kind == "asana":
        from connectors.asana import AsanaProjects

        return AsanaProjects(name, settings)
    raise ValueError(f"unknown connection kind {settings.kind!r}")
