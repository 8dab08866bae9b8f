"""Config validation: every problem at once, FILE:LINE, the fix, no secret values."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mappings.problems import ProblemsFound
from sync.config import load_config

GOOD = """\
version: 1
state:
  url: sqlite:///state.db
connections:
  hs:
    kind: hubspot
    auth:
      token: ${HS_TOKEN}
  as:
    kind: asana
    auth:
      token: ${AS_TOKEN}
    workspace: Acme
    team: Delivery
pipelines:
  - name: main
    source: hs
    target: as
    mapping: map.yaml
"""

MAP = """\
version: 1
project:
  name: "{{ deal.dealname }}"
"""


def write(tmp_path: Path, config: str, mapping: str = MAP) -> Path:
    (tmp_path / "map.yaml").write_text(textwrap.dedent(mapping))
    path = tmp_path / "handoff.yaml"
    path.write_text(textwrap.dedent(config))
    return path


@pytest.fixture(autouse=True)
def tokens(monkeypatch):
    monkeypatch.setenv("HS_TOKEN", "pat-na1-0000-super-secret")
    monkeypatch.setenv("AS_TOKEN", "2/asana-super-secret")


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ProblemsFound) as exc:
        load_config(path)
    return [str(p) for p in exc.value.problems]


def test_a_good_config_loads_with_its_mapping(tmp_path):
    loaded = load_config(write(tmp_path, GOOD))
    assert loaded.config.pipelines[0].name == "main"
    assert loaded.mappings["main"].deal_fields == ["dealname"]
    assert loaded.state_url == f"sqlite:///{tmp_path / 'state.db'}"


def test_three_mistakes_are_all_reported_with_file_line_and_fix(tmp_path):
    config = GOOD.replace("version: 1\nstate:", "version: 1\nsatte: {}\nstate:").replace(
        "    team: Delivery\n", "    team: Delivery\n    requests_per_minute: lots\n"
    )
    mapping = MAP.replace('"{{ deal.dealname }}"', '"{{ deal.dealname }"')
    path = write(tmp_path, config, mapping)
    found = problems_of(path)
    assert len(found) == 3, found
    unknown, wrong_type, syntax = sorted(found, key=lambda s: ("satte" not in s, "lots" not in s))
    assert unknown.startswith(f"{path}:2: satte: unknown key 'satte'")
    assert "did you mean 'state'" in unknown
    assert f"{path}:16: connections.as.requests_per_minute:" in wrong_type
    assert "whole number" in wrong_type
    assert syntax.startswith(f"{tmp_path / 'map.yaml'}:3: project.name: template syntax error")
    assert " — " in syntax


def test_missing_environment_variable_is_named_and_no_value_printed(tmp_path, monkeypatch):
    monkeypatch.delenv("AS_TOKEN")
    found = problems_of(write(tmp_path, GOOD))
    assert len(found) == 1
    assert ":12: connections.as.auth.token: environment variable AS_TOKEN is not set" in found[0]
    assert "pat-na1" not in found[0]


def test_a_literal_token_in_the_file_is_refused_without_echoing_it(tmp_path):
    found = problems_of(write(tmp_path, GOOD.replace("${HS_TOKEN}", "pat-literal-123")))
    assert "credentials must not be written in the file" in found[0]
    assert "pat-literal-123" not in " ".join(found)


def test_pipeline_pointing_at_the_wrong_kind_of_connection(tmp_path):
    found = problems_of(write(tmp_path, GOOD.replace("source: hs", "source: as")))
    assert any("'as' is a asana connection, not a CRM" in f for f in found)


def test_unknown_template_name_and_unknown_project_field_caught_at_load(tmp_path):
    mapping = """\
    version: 1
    project:
      name: "{{ dael.dealname }}"
      fields:
        colour: red
    """
    found = problems_of(write(tmp_path, GOOD, mapping))
    assert any(":3: project.name: template uses unknown name(s): dael" in f for f in found)
    assert any("asana projects have no field 'colour'" in f for f in found)


def test_yaml_syntax_error_has_a_line(tmp_path):
    found = problems_of(write(tmp_path, GOOD + "  - : [\n"))
    assert "YAML syntax error" in found[0] and ":2" in found[0].split(" ")[0]
