"""Load the JSON Schemas in ``schemas/`` and turn violations into one clear message.

The schemas sit at the top of the repository and inside the installed wheel (``vjobs/schemas``), so both a
source checkout and an installed package find them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

_HERE = Path(__file__).resolve().parent
_PLACES = (_HERE / "schemas", _HERE.parent / "schemas")


def schema_path(name: str) -> Path:
    for folder in _PLACES:
        candidate = folder / f"{name}.schema.json"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"schema {name!r} not found in {', '.join(map(str, _PLACES))}: reinstall vjobs")


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads(schema_path(name).read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def problem(name: str, document: Any) -> str | None:
    """None when ``document`` is valid against schema ``name``, else one line naming the field (as a JSON
    pointer) and saying what was expected."""
    error = best_match(_validator(name).iter_errors(document))
    if error is None:
        return None
    pointer = "/" + "/".join(str(part) for part in error.absolute_path)
    return f"{pointer}: {_explain(error, name)}"


def _explain(error: jsonschema.ValidationError, name: str) -> str:
    if error.validator == "additionalProperties":
        return f"{error.message} (schemas/{name}.schema.json lists the fields allowed)"
    if error.validator == "pattern":
        return f"{error.instance!r} does not match {error.validator_value!r}"
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    return f"{error.message}" + (f" (expected: {description})" if description else "")

