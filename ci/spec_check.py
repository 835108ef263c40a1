#!/usr/bin/env python3
"""Checks the committed OpenAPI document (run by ci/client.sh): it is valid OpenAPI 3.0, and every
example it shows is valid against the schema it belongs to.

Usage: spec_check.py SPEC. Needs openapi-spec-validator (which brings openapi-schema-validator).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate


def inline(node: Any, schemas: dict[str, Any]) -> Any:
    """The schema with every local $ref replaced by its target (the document has no cycles)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return inline(schemas[ref.rsplit("/", 1)[1]], schemas)
        # the discriminator only names the oneOf member to try first; oneOf itself decides
        skip = ("example", "discriminator")
        return {key: inline(value, schemas) for key, value in node.items() if key not in skip}
    if isinstance(node, list):
        return [inline(item, schemas) for item in node]
    return node


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    validate(spec)
    print("spec_check: the document is valid OpenAPI", spec["openapi"])
    schemas = spec["components"]["schemas"]
    failures = 0
    checked = 0
    for name, schema in schemas.items():
        if "example" not in schema:
            continue
        checked += 1
        errors = list(OAS30Validator(inline(schema, schemas)).iter_errors(schema["example"]))
        for error in errors:
            failures += 1
            path = "/".join(str(p) for p in error.absolute_path)
            print(f"spec_check: the example of {name} is invalid at /{path}: {error.message}")
    print(f"spec_check: {checked} examples checked, {failures} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
