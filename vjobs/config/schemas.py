"""Load the JSON Schemas in ``schemas/`` and turn violations into one clear message.

The schemas sit at the top of the repository and inside the installed wheel (``vjobs/schemas``), so both a
source checkout and an installed package find them.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jsonschema

_HERE = Path(__file__).resolve().parent
_PLACES = (_HERE.parent / "schemas", _HERE.parent.parent / "schemas")  # the wheel, a checkout


def schema_path(name: str) -> Path:
    for folder in _PLACES:
        candidate = folder / f"{name}.schema.json"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"schema {name!r} not found in {', '.join(map(str, _PLACES))}: reinstall vjobs")


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    import jsonschema  # on first use, not at import: some 40 ms that commands which validate nothing save

    schema = json.loads(schema_path(name).read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def problem(name: str, document: Any) -> str | None:
    """None when ``document`` is valid against schema ``name``, else one line naming the field (as a JSON
    pointer) and saying what was expected."""
    not_finite = _first_non_finite(document)
    if not_finite is not None:
        return f"{not_finite}: not a finite number (NaN and infinities are not numbers a limit can use)"
    from jsonschema.exceptions import best_match  # on first use, as in _validator

    error = best_match(_validator(name).iter_errors(document))
    if error is None:
        return None
    pointer = "/" + "/".join(str(part) for part in error.absolute_path)
    return f"{pointer}: {_explain(error, name)}"


def _first_non_finite(document: Any) -> str | None:
    """JSON Schema's bounds let NaN through (every comparison with it is false); Python's json and TOML
    both read NaN and infinities, so they are refused here, by pointer. A loop, not recursion: any depth."""
    pending = [("", document)]
    while pending:
        pointer, value = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return pointer or "/"
        if isinstance(value, dict):
            pending += [(f"{pointer}/{key}", child) for key, child in value.items()]
        elif isinstance(value, list):
            pending += [(f"{pointer}/{index}", child) for index, child in enumerate(value)]
    return None


def _explain(error: jsonschema.ValidationError, name: str) -> str:
    if error.validator == "additionalProperties":
        return f"{error.message} (schemas/{name}.schema.json lists the fields allowed)"
    if error.validator == "pattern":
        return f"{error.instance!r} does not match {error.validator_value!r}"
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator == "not":  # jsonschema's own words quote the schema back at the user
        return f"{error.instance!r} is not allowed here" + (f" (expected: {description})" if description else "")
    return f"{error.message}" + (f" (expected: {description})" if description else "")

