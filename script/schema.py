"""Write .cog/openapi_schema.json from the predictor, laid out as `cog build` writes it.

`cog build` generates this file (and the image label) with its Go generator;
natively nothing does, yet coglet's HTTP server needs it to validate inputs.
This reads the predictor through cog's own inspector (the same metadata the
runtime validates against) and emits the same OpenAPI 3.0.2 document.

  python script/schema.py           write the file
  python script/schema.py --check   exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"
PREDICT_REF = ("predict", "Predictor")


def title_case(name: str) -> str:
    return " ".join(p[:1].upper() + p[1:] for p in name.split("_"))


def _encode_default(field):
    value = field.default
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    return value


def _number(value: float) -> float | int:
    """Go writes a float64 bound of 256 as 256; match it."""
    return int(value) if float(value).is_integer() else value


def predictor_info():
    """The predictor as cog's inspector reads it: its declared inputs (`.inputs`, name -> field) and output."""
    sys.path.insert(0, str(ROOT))
    from cog import _inspector

    with warnings.catch_warnings():  # cog 0.23 nudges towards BaseRunner.run(); Replicate's API is predict()
        warnings.simplefilter("ignore", DeprecationWarning)
        return _inspector.create_predictor(*PREDICT_REF)


def input_defaults() -> dict:
    """The value cog gives each input the caller leaves out (the required prompt has none)."""
    return {name: field.default for name, field in predictor_info().inputs.items() if name != "prompt"}


def build_schema() -> dict:
    import cog
    from cog import _adt as adt

    info = predictor_info()
    properties: dict = {}
    required: list[str] = []
    enums: dict = {}
    for name, field in sorted(info.inputs.items(), key=lambda kv: kv[1].order):
        optional = field.type.repetition in (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)
        prop: dict = {"x-order": field.order}
        if field.choices:
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": list(field.choices),
                "type": field.type.primitive.json_type()["type"],
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = title_case(name)
            prop.update(field.type.json_type())
        if field.default is not None:
            prop["default"] = _encode_default(field)
        elif not optional:
            required.append(name)
        if optional:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _number(field.ge)
        if field.le is not None:
            prop["maximum"] = _number(field.le)
        if field.min_length is not None:
            prop["minLength"] = field.min_length
        if field.max_length is not None:
            prop["maxLength"] = field.max_length
        if field.regex is not None:
            prop["pattern"] = field.regex
        if field.deprecated:
            prop["deprecated"] = True
        properties[name] = dict(sorted(prop.items()))  # Go marshals plain maps with sorted keys

    input_schema: dict = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    output_schema = info.output.json_type()
    ref = "#/components/schemas/"
    components = {
        "Input": input_schema,
        "Output": output_schema,
        **enums,
        "PredictionRequest": {
            "title": "PredictionRequest", "type": "object",
            "properties": {"id": {"title": "Id", "type": "string"}, "input": {"$ref": ref + "Input"}},
        },
        "PredictionResponse": {
            "title": "PredictionResponse", "type": "object",
            "properties": {
                "input": {"$ref": ref + "Input"},
                "output": {"$ref": ref + "Output"},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
                "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status", "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"], "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError", "type": "object",
            "properties": {"detail": {"title": "Detail", "type": "array", "items": {"$ref": ref + "ValidationError"}}},
        },
        "ValidationError": {
            "title": "ValidationError", "required": ["loc", "msg", "type"], "type": "object",
            "properties": {
                "loc": {"title": "Location", "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }
    ok = {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}
    invalid = {"description": "Validation Error",
               "content": {"application/json": {"schema": {"$ref": ref + "HTTPValidationError"}}}}
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": ok}}},
        "/health-check": {"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get",
                                   "responses": {"200": ok}}},
        "/predictions": {"post": {
            "summary": "Predict", "description": "Run a single prediction on the model",
            "operationId": "predict_predictions_post",
            "requestBody": {"content": {"application/json": {"schema": {"$ref": ref + "PredictionRequest"}}}},
            "responses": {
                "200": {"description": "Successful Response",
                        "content": {"application/json": {"schema": {"$ref": ref + "PredictionResponse"}}}},
                "422": invalid,
            },
        }},
        "/predictions/{prediction_id}/cancel": {"post": {
            "summary": "Cancel", "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [{"required": True, "schema": {"title": "Prediction Id", "type": "string"},
                            "name": "prediction_id", "in": "path"}],
            "responses": {"200": ok, "422": invalid},
        }},
    }
    return {"openapi": "3.0.2", "info": {"title": "Cog", "version": cog.__version__},
            "paths": paths, "components": {"schemas": components}}


def render() -> str:
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed schema is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not SCHEMA_PATH.is_file() or SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH.relative_to(ROOT)} is stale: run script/schema and commit it.", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
