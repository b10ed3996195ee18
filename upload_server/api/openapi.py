"""GET /openapi.json: an OpenAPI 3.1 description of the HTTP API, built from the settings in force.

It is tested against the real server by schemathesis (tests/test_openapi.py), so it cannot drift
from what the server does.
"""

from __future__ import annotations

from typing import Any

import falcon

from ..config import Config
from ..protocol import tus
from . import refusals

JSON = "application/json"


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _errors(*codes: int, protocol: str = refusals.SEED) -> dict[str, Any]:
    """Error responses by status; each names the refusal codes `api/refusals` answers with it."""
    text = {
        400: "Malformed request",
        401: "No valid credential",
        403: "Forbidden",
        404: "No such upload (or it belongs to another credential)",
        405: "Method not allowed",
        409: "Conflict with the upload's state",
        410: "Terminated or expired",
        412: "Unsupported Tus-Resumable",
        413: "Too large",
        415: "Unsupported Content-Type",
        416: "Range not satisfiable",
        422: "Refused by the pre-create hook",
        423: "Paused or locked",
        429: "Too many unfinished uploads",
        431: "Headers too large",
        460: "Checksum mismatch",
        503: "Writer, hook or identity provider (JWKS) unavailable; retry",
        507: "Disk full",
    }
    return {str(code): _error(_with_codes(text[code], code, protocol)) for code in codes}


def _with_codes(description: str, status: int, protocol: str) -> str:
    codes = refusals.codes_with(status, protocol)
    return f"{description} (error codes include: {', '.join(codes)})" if codes else description


BINARY = {"type": "string", "format": "binary"}


def _session_id() -> dict[str, Any]:
    return {
        "name": "sessionID",
        "in": "query",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    }


def _status_response(description: str, *errors: int) -> dict[str, Any]:
    return {
        "200": {
            "description": description,
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/Status"}}},
        },
        **_errors(400, 401, 404, *errors, 503),
    }


def _tus_header(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": required, "schema": schema}


TUS_RESUMABLE = _tus_header("Tus-Resumable", {"type": "string", "enum": [tus.VERSION]}, True)
UPLOAD_ID = {
    "name": "upload_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,64}$"},
}
INTEGER = {"type": "integer", "minimum": 0}


def document(config: Config) -> dict[str, Any]:
    files = config.tus_path
    upload = files + "{upload_id}"
    status_schema = {
        "type": "object",
        "required": [
            "sessionID",
            "uploadedChunks",
            "totalChunks",
            "paused",
            "completed",
            "terminated",
            "bytesWritten",
            "totalBytes",
            "filename",
            "state",
            "error",
        ],
        "properties": {
            "sessionID": {"type": "string"},
            "uploadedChunks": INTEGER,
            "totalChunks": INTEGER,
            "paused": {"type": "boolean"},
            "completed": {"type": "boolean"},
            "terminated": {"type": "boolean"},
            "bytesWritten": INTEGER,
            "totalBytes": {"type": ["integer", "null"]},
            "chunkSize": INTEGER,
            "filename": {"type": "string"},
            "storedAs": {"type": ["string", "null"]},
            "state": {
                "enum": [
                    "queued",
                    "writing",
                    "waiting",
                    "paused",
                    "completed",
                    "failed",
                    "terminated",
                    "expired",
                ]
            },
            "error": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/ErrorDetail"}]},
            "protocol": {"enum": ["seed", "tus", "ietf"]},
            "sha256": {"type": ["string", "null"]},
            "createdAt": {"type": ["string", "null"]},
            "updatedAt": {"type": ["string", "null"]},
            "expiresAt": {"type": ["string", "null"]},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "upload_server",
            "version": "1.0.0",
            "description": "Resumable uploads: the seed API and tus 1.0.0. Every error is "
            '{"error": {"code", "message"}}.',
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "ErrorDetail": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "offset": INTEGER,
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}},
                },
                "Status": status_schema,
                "Batch": {
                    "type": "object",
                    "required": ["sessions", "notFound"],
                    "properties": {
                        "sessions": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Status"},
                        },
                        "notFound": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
        "security": [{"bearer": []}, {}] if config.auth else [],
        "paths": {
            "/upload": {
                "post": {
                    "summary": "Upload one or more files (multipart field `file`)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["file"],
                                    "properties": {
                                        "file": {
                                            "description": "one or more files: one session each",
                                            "oneOf": [
                                                BINARY,
                                                {"type": "array", "items": BINARY, "minItems": 1},
                                            ],
                                        },
                                        "sha256": {
                                            "type": "string",
                                            "pattern": "^[0-9a-fA-F]{64}$",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": {
                            "description": "Sessions created",
                            "content": {
                                JSON: {
                                    "schema": {
                                        "type": "object",
                                        "required": ["sessionID", "sessionIDs", "files"],
                                        "properties": {
                                            "sessionID": {"type": "string"},
                                            "sessionIDs": {
                                                "type": "array",
                                                "items": {"type": "string"},
                                            },
                                            "files": {"type": "array", "items": {"type": "object"}},
                                        },
                                    }
                                }
                            },
                        },
                        **_errors(400, 401, 403, 413, 415, 422, 429, 503, 507),
                    },
                },
                "delete": {
                    "summary": "Terminate an upload (as POST /upload/terminate)",
                    "parameters": [_session_id()],
                    "responses": _status_response("Terminated", 409),
                },
            },
            "/upload/status": {
                "get": {
                    "summary": "Progress and state of a session; of several with more than one "
                    "`sessionID`, or with `sessionIDs=a,b` (then a Batch)",
                    "parameters": [
                        {
                            "name": "sessionID",
                            "in": "query",
                            "schema": {"type": "array", "items": {"type": "string"}},
                            "style": "form",
                            "explode": True,
                        },
                        {"name": "sessionIDs", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "The session's status, or a batch of them",
                            "content": {
                                JSON: {
                                    "schema": {
                                        "oneOf": [
                                            {"$ref": "#/components/schemas/Status"},
                                            {"$ref": "#/components/schemas/Batch"},
                                        ]
                                    }
                                }
                            },
                        },
                        **_errors(400, 401, 404, 503),
                    },
                }
            },
            "/upload/pause": {
                method: {
                    "summary": "Pause: the writer stops at its next chunk boundary",
                    "parameters": [_session_id()],
                    "responses": _status_response("Paused", 409),
                }
                for method in ("get", "post")
            },
            "/upload/resume": {
                "post": {
                    "summary": "Resume, from the spool or from the same file sent again",
                    "parameters": [_session_id()],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"file": {"type": "string", "format": "binary"}},
                                }
                            }
                        },
                    },
                    "responses": _status_response("Resumed", 409, 413, 415, 507),
                }
            },
            "/upload/terminate": {
                "post": {
                    "summary": "Stop the writer and remove partial data and spool",
                    "parameters": [_session_id()],
                    "responses": _status_response("Terminated", 409),
                }
            },
            files: {
                "options": {
                    "summary": "tus capabilities",
                    "security": [],
                    "responses": {
                        "204": {
                            "description": "Tus-Version, Tus-Extension, "
                            "Tus-Max-Size, Tus-Checksum-Algorithm"
                        }
                    },
                },
                "post": {
                    "summary": "tus creation (and creation-with-upload, concatenation)",
                    "parameters": [
                        TUS_RESUMABLE,
                        _tus_header(
                            "Upload-Length", {**INTEGER, "maximum": config.max_upload_size}
                        ),
                        _tus_header("Upload-Defer-Length", {"type": "string", "enum": ["1"]}),
                        _tus_header("Upload-Metadata", {"type": "string"}),
                        _tus_header("Upload-Concat", {"type": "string"}),
                    ],
                    "responses": {
                        "201": {"description": "Created; Location is the upload URL"},
                        **_errors(
                            400, 401, 403, 412, 413, 415, 422, 429, 503, 507, protocol=refusals.TUS
                        ),
                    },
                },
            },
            upload: {
                "parameters": [UPLOAD_ID],
                "options": {
                    "summary": "tus capabilities",
                    "security": [],
                    "responses": {"204": {"description": "As OPTIONS on the tus endpoint"}},
                },
                "head": {
                    "summary": "Offset, length and metadata of an upload",
                    "parameters": [TUS_RESUMABLE],
                    "responses": {
                        "200": {"description": "Upload-Offset, Upload-Length, Upload-Metadata"},
                        "401": {"description": "No valid credential"},
                        "404": {"description": "No such upload"},
                        "410": {"description": "Terminated or expired"},
                        "412": {"description": "Unsupported Tus-Resumable"},
                    },
                },
                "patch": {
                    "summary": "Append bytes at Upload-Offset",
                    "parameters": [
                        TUS_RESUMABLE,
                        _tus_header("Upload-Offset", INTEGER, True),
                        _tus_header("Upload-Checksum", {"type": "string"}),
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            tus.OFFSET_OCTET_STREAM: {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    "responses": {
                        "204": {"description": "Stored; Upload-Offset is the new offset"},
                        **_errors(
                            400,
                            401,
                            403,
                            404,
                            409,
                            410,
                            412,
                            413,
                            415,
                            423,
                            460,
                            503,
                            507,
                            protocol=refusals.TUS,
                        ),
                    },
                },
                "delete": {
                    "summary": "tus termination",
                    "parameters": [TUS_RESUMABLE],
                    "responses": {
                        "204": {"description": "Terminated"},
                        **_errors(401, 404, 410, 412, 423, 503, protocol=refusals.TUS),
                    },
                },
                "get": {
                    "summary": "Download a completed upload (Range supported)",
                    "responses": {
                        "200": {
                            "description": "The file",
                            "content": {"application/octet-stream": {}, "*/*": {}},
                        },
                        "206": {"description": "Part of the file"},
                        **_errors(401, 404, 409, 410, 416, protocol=refusals.TUS),
                    },
                },
            },
            "/healthz": {
                "get": {
                    "summary": "Alive",
                    "security": [],
                    "responses": {"200": {"description": "Serving"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Writers up, Manager reachable, disk has room",
                    "security": [],
                    "responses": {
                        "200": {"description": "Ready"},
                        "503": {"description": "Not ready"},
                    },
                }
            },
            **_metrics_path(config),
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
        },
    }


def _metrics_path(config: Config) -> dict[str, Any]:
    """`/metrics` as this app serves it: not at all with `--metrics-listen` (another listener
    does), behind an API key with `--metrics-auth`."""
    if config.metrics_listen is not None:
        return {}
    responses: dict[str, Any] = {
        "200": {"description": "Text format", "content": {"text/plain": {}}}
    }
    if config.metrics_auth:
        responses["401"] = _error("No valid API key")
        responses["403"] = _error("An upload token: this takes an API key (api_key_required)")
    return {
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of every process",
                "security": [{"bearer": []}] if config.metrics_auth else [],
                "responses": responses,
            }
        }
    }


class OpenApiResource:
    def __init__(self, config: Config) -> None:
        self.document = document(config)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.document
