"""The OpenAPI 3.1 document of the admin API, built from the declared routes and their pydantic models."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from gateway.web.api import MAX_PATH_ID, Endpoint
from gateway.web.errors import ErrorBody

REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Download:
    """A route's response that is a file (e.g. CSV or PDF) rather than JSON: ``response=Download(("text/csv",))``."""

    media_types: tuple[str, ...]
#: Every status an operation can answer besides its success, each in the error body of gateway.web.errors.
_ERRORS = {
    "400": "the body is not a JSON object, or nests more than 32 levels deep",
    "401": "no token, or an unknown or revoked one",
    "404": "no such resource, or not visible to the caller",
    "405": "the path does not take this method (the Allow header lists those it takes)",
    "409": "the current state forbids the change",
    "413": "the body is larger than 1 MiB",
    "422": "the input breaks a rule or does not validate, or a required body is missing (the field is named)",
    "503": "the database is unavailable or busy; try again shortly",
}


def build_document(endpoints: Sequence[Endpoint], *, title: str, version: str) -> dict[str, Any]:
    models: list[tuple[Any, JsonSchemaMode]] = [(ErrorBody, "serialization")]
    for e in endpoints:
        if e.body is not None:
            models.append((e.body, "validation"))
        if e.query is not None:
            models.append((e.query, "validation"))
        if _is_model(e.response):
            models.append((e.response, "serialization"))
    refs, top = models_json_schema(list(dict.fromkeys(models)), ref_template=REF)
    schemas: dict[str, Any] = top.get("$defs", {})
    error_ref = refs[(ErrorBody, "serialization")]

    paths: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for e in endpoints:
        operation_id = f"{e.tag}.{e.handler.__name__}"
        if operation_id in seen or e.method.lower() in paths.get(e.path, {}):
            raise ValueError(f"two routes declare {operation_id} or {e.method} {e.path}; each must be unique")
        seen.add(operation_id)
        operation: dict[str, Any] = {
            "operationId": operation_id,
            "summary": e.summary,
            "tags": [e.tag],
            "parameters": _path_parameters(e.path),
            "responses": {},
        }
        if e.query is not None:
            operation["parameters"] += _query_parameters(schemas, refs[(e.query, "validation")])
        if e.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(e.body, "validation")]}},
            }
        if isinstance(e.response, Download):
            operation["responses"][str(e.status)] = {
                "description": e.summary,
                "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in e.response.media_types},
            }
        elif e.status == 204 or e.response is None:
            operation["responses"][str(e.status)] = {"description": "done, no content"}
        else:
            operation["responses"][str(e.status)] = {
                "description": e.summary,
                "content": {"application/json": {"schema": refs[(e.response, "serialization")]}},
            }
        for status, description in _ERRORS.items():
            if e.public and status == "401":
                continue
            operation["responses"][status] = {
                "description": description, "content": {"application/json": {"schema": error_ref}},
            }
        if e.public:
            operation["security"] = []
        paths.setdefault(e.path, {})[e.method.lower()] = operation

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearerAuth": []}],
    }


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


#: A license key as the API prints it: five groups of five symbols of Crockford's base 32 (gateway.core.license_keys).
#: The API also reads other spellings (lower case, no dashes); this is the form to send.
KEY_PATTERN = "^[0-9A-HJKMNP-TV-Z]{5}(-[0-9A-HJKMNP-TV-Z]{5}){4}$"


def _path_parameters(path: str) -> list[dict[str, Any]]:
    """Each path parameter with the values that can name something, so a generated request can reach the handler.

    Without them a client generating requests from this document (a fuzzer, a test generator) sends ids past any
    integer and keys of any text; the only answers that are not a validation error are then the 401s of its own
    requests without a token, which reads as "authentication failed" although the token was accepted.
    """
    parameters = []
    for name in re.findall(r"{(\w+)}", path):
        schema: dict[str, Any]
        if name == "id" or name.endswith("_id"):
            schema = {"type": "integer", "minimum": 1, "maximum": MAX_PATH_ID}
        elif name == "key":
            schema = {"type": "string", "pattern": KEY_PATTERN, "minLength": 29, "maxLength": 29,
                      "examples": ["7K3QD-0M9ZX-4T2WB-8HNCV-RY5FD"]}  # a well-formed key (check symbol right)
        else:
            schema = {"type": "string", "minLength": 1}
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    return parameters


def _query_parameters(schemas: dict[str, Any], ref: dict[str, str]) -> list[dict[str, Any]]:
    schema = schemas[ref["$ref"].rsplit("/", 1)[-1]]
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema.get("properties", {}).items():
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if "description" in prop:
            parameter["description"] = prop["description"]
        parameters.append(parameter)
    return parameters
