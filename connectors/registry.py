"""Connection kinds: their settings models, their role (CRM or project tool), their class.

Adding a system means adding its module and one entry here; nothing in `sync/` changes.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any, Literal

from pydantic import Field

from connectors.asana import PROJECT_FIELDS as ASANA_PROJECT_FIELDS
from connectors.asana import AsanaSettings
from connectors.base import CRM, ProjectTool
from connectors.clickup import PROJECT_FIELDS as CLICKUP_PROJECT_FIELDS
from connectors.clickup import ClickUpSettings
from connectors.hubspot import HubSpotSettings
from connectors.salesforce import SalesforceSettings
from connectors.shared_budget import SharedBudgets

Role = Literal["crm", "project_tool"]

ConnectionSettings = Annotated[
    HubSpotSettings | SalesforceSettings | AsanaSettings | ClickUpSettings,
    Field(discriminator="kind"),
]

# kind -> (role, settings model, "module:Class" built lazily so vendor SDKs load on use)
CONNECTION_SETTINGS: dict[str, tuple[Role, type, str]] = {
    "hubspot": ("crm", HubSpotSettings, "connectors.hubspot:HubSpotCRM"),
    "salesforce": ("crm", SalesforceSettings, "connectors.salesforce:SalesforceCRM"),
    "asana": ("project_tool", AsanaSettings, "connectors.asana:AsanaProjects"),
    "clickup": ("project_tool", ClickUpSettings, "connectors.clickup:ClickUpProjects"),
}

# Project-level fields a mapping may set (`project.fields.<name>`), per project tool.
PROJECT_FIELDS: dict[str, frozenset[str]] = {
    "asana": ASANA_PROJECT_FIELDS,
    "clickup": CLICKUP_PROJECT_FIELDS,
}


def role_of(kind: str) -> Role:
    return CONNECTION_SETTINGS[kind][0]


def build_connector(
    name: str, settings: Any, budgets: SharedBudgets | None = None
) -> CRM | ProjectTool:
    """Construct the connector for a validated connection (no network call here).

    With `budgets`, the connection's rate budgets are shared with every process that uses the
    same backend and connection name; without, each process paces itself alone.
    """
    _, _, target = CONNECTION_SETTINGS[settings.kind]
    module, _, cls = target.partition(":")
    connector = getattr(importlib.import_module(module), cls)
    if budgets is None:
        return connector(name, settings)
    return connector(name, settings, budgets=budgets.for_connection(settings.kind, name))
