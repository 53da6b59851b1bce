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


def lora_text_lacks(description: str) -> list[str]:
    """What a LoRA input's description leaves out of the registries: the family of each layout read
    (flux/lora/layouts.py, after "Formats: ", nothing else there) and the form of each host (flux/lora/hosts.py)."""
    from flux.lora.hosts import HOSTS
    from flux.lora.layouts import LAYOUTS

    before, _, formats = description.partition("Formats: ")
    families = {kind.family for kind in LAYOUTS if kind.family}
    missing = sorted(f for f in families if f not in formats)
    rest = formats.removesuffix(".")
    for family in sorted(families, key=len, reverse=True):
        rest = rest.replace(family, "")
    if rest.replace(",", "").strip():
        missing.append(f"(named but not read: {rest!r})")
    forms = [host.accepted.split(" (")[0].removeprefix("a ").removeprefix("an ") for host in HOSTS]
    return missing + [form for form in forms if form.lower() not in before.lower()]


def test_the_lora_input_names_every_layout_and_host():
    """predict.py's text is a literal (cog reads the file without running it), so it cannot be built from the
    registries: it is checked against them, and a layout or host added without its words there fails here."""
    description = declared_inputs()["replicate_weights"].description
    assert lora_text_lacks(description) == []
    assert lora_text_lacks(description.replace("XLabs, ", "").replace("a CivitAI URL", "a URL")) == [
        "XLabs", "CivitAI URL"]  # the check itself
