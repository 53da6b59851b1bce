"""The schema: predict.py's literal Inputs agree with the engine's SPEC, and .cog/openapi_schema.json is fresh."""

import json
import subprocess
import sys

import pytest

from flux.request import SPEC
from tests.conftest import ROOT
from tests.helpers.inputs import declared_inputs


def test_committed_openapi_schema_is_fresh():
    result = subprocess.run([sys.executable, "script/schema.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_declared_inputs_are_the_spec():
    assert list(declared_inputs()) == list(SPEC)


@pytest.mark.parametrize("name", list(SPEC))
def test_each_input_matches_the_spec(name):
    field, spec = declared_inputs()[name], SPEC[name]
    default = field.default.get_secret_value() if hasattr(field.default, "get_secret_value") else field.default
    assert default == spec.default
    assert field.ge == spec.ge and field.le == spec.le
    assert (tuple(field.choices) if field.choices else None) == spec.choices


def test_schema_layout():
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    inputs = schema["components"]["schemas"]["Input"]
    assert inputs["required"] == ["prompt"]
    assert inputs["properties"]["seed"] == {
        "description": inputs["properties"]["seed"]["description"], "nullable": True, "title": "Seed",
        "type": "integer", "x-order": list(SPEC).index("seed"),
    }
    assert schema["components"]["schemas"]["Output"] == {
        "title": "Output", "type": "array", "items": {"type": "string", "format": "uri"},
    }
    assert schema["components"]["schemas"]["aspect_ratio"]["enum"] == list(SPEC["aspect_ratio"].choices)


def test_readme_documents_every_input():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in SPEC if f"`{name}`" not in readme]
    assert not missing, f"README.md does not document: {missing}"
