"""OpenAI's Files API, for its Batch API: upload a batch's input (purpose batch), read, list and delete
files, and download a batch's output and error files. Errors come in OpenAI's shape (api/errors.py).

An upload (multipart, as the openai client sends it) is read a line at a time from the request, with
the batch limits (GENQUEUE_BATCH_MAX_BYTES, _MAX_LINE_BYTES, _MAX_ITEMS): each line must be a JSON
object; what the lines ask for is checked when a batch is made from the file. Files are visible to
the key that uploaded them alone, and expire after GENQUEUE_BATCH_TTL_S.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO

from flask import Blueprint, Response, current_app, jsonify, request
from marshmallow import Schema, fields

from api.batches import jsonl_lines
from api.errors import ApiError
from api.http import PAGE_PARAMETERS, check_text, list_page, owner, page_limit
from api.openai.batches import output_file
from api.openai.protocol import OPENAI_ERROR
from api.openapi import document
from api.service import file_service
from api.service.batches import MAX_LISTED_ERRORS, too_large
from api.service.files import PURPOSES
from tasks.store.files import FileRecord

bp = Blueprint("openai_files", __name__, url_prefix="/v1/files")

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # the form's boundaries and its purpose field, beside the file
TAGS = ["OpenAI-compatible batches"]


class FileObjectSchema(Schema):
    id = fields.String()
    object = fields.String(metadata={"description": "file"})
    bytes = fields.Integer()
    created_at = fields.Integer(metadata={"description": "Unix seconds"})
    expires_at = fields.Integer(allow_none=True)
    filename = fields.String()
    purpose = fields.String(
        metadata={"description": "batch (uploads), batch_output (a batch's output and error files)"}
    )
    status = fields.String(metadata={"description": "processed"})
    status_details = fields.String(allow_none=True)


class FileListSchema(Schema):
    object = fields.String()
    data = fields.List(fields.Nested(FileObjectSchema))
    first_id = fields.String(allow_none=True)
    last_id = fields.String(allow_none=True)
    has_more = fields.Boolean()


class FileDeletedSchema(Schema):
    id = fields.String()
    object = fields.String()
    deleted = fields.Boolean()


class FileUploadSchema(Schema):
    """The multipart form of an upload."""

    file = fields.Raw(required=True, metadata={"type": "string", "format": "binary", "description": "JSONL"})
    purpose = fields.String(required=True, metadata={"description": "batch"})


def file_object(record: FileRecord) -> dict:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": int(record.created_at),
        "expires_at": int(record.expires_at) if record.expires_at else None,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
    }


def upload_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """Each line of the upload (without its line break); at the end, a 400 naming every line that is
    not a JSON object (the file store then removes what it wrote)."""
    settings = current_app.config
    max_items, errors, count = int(settings["BATCH_MAX_ITEMS"]), {}, 0
    for number, line in jsonl_lines(stream, int(settings["BATCH_MAX_BYTES"]), int(settings["BATCH_MAX_LINE_BYTES"])):
        count += 1
        if count > max_items:
            raise too_large(f"the file has more than {max_items} lines (GENQUEUE_BATCH_MAX_ITEMS)")
        try:
            document = json.loads(line)
            check_text(document)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if len(errors) < MAX_LISTED_ERRORS:
                errors[str(number)] = [f"Not a JSON object: {exc}"]
            continue
        yield line.rstrip(b"\r\n")
    if errors:
        message = f"{len(errors)} lines are not JSON objects (by line: {', '.join(errors)}); nothing was stored"
        raise ApiError(400, "invalid_file", message, {"lines": errors})
    if not count:
        raise ApiError(400, "invalid_file", "the file has no lines", {"file": ["Empty."]})


@bp.post("")
@document(
    "Upload a file (OpenAI-compatible): a batch's input",
    description=(
        'Multipart, as the openai client sends it: file (JSONL, one {"custom_id", "method": "POST", "url", "body"} '
        "a line) and purpose: batch. Each line must be a JSON object; what it asks for is checked when a batch "
        "is made from the file (POST /v1/batches with input_file_id)."
    ),
    tags=TAGS,
    request=FileUploadSchema,
    request_media="multipart/form-data",
    responses={
        200: ("The file", FileObjectSchema),
        400: OPENAI_ERROR,
        413: OPENAI_ERROR,
        415: OPENAI_ERROR,
    },
)
def upload():
    max_bytes = int(current_app.config["BATCH_MAX_BYTES"])
    request.max_content_length = max_bytes + MULTIPART_OVERHEAD_BYTES
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "upload the file as multipart/form-data (file, purpose)")
    purpose, upload_file = request.form.get("purpose"), request.files.get("file")
    if purpose not in PURPOSES:
        message = f"purpose must be one of: {', '.join(PURPOSES)}"
        raise ApiError(400, "invalid_request", message, {"purpose": [message]})
    if upload_file is None:
        raise ApiError(400, "invalid_request", "give the file in the form field 'file'", {"file": ["Missing."]})
    filename = (upload_file.filename or "upload.jsonl")[:256]
    record = file_service().create(owner(), purpose, filename, upload_lines(upload_file.stream))
    return jsonify(file_object(record))


@bp.get("")
@document(
    "List your files, newest first (OpenAI-compatible)",
    tags=TAGS,
    parameters=PAGE_PARAMETERS,
    responses={200: ("A page of files", FileListSchema), 400: OPENAI_ERROR},
)
def list_files():
    records, has_more = file_service().list(owner(), page_limit(), request.args.get("after") or None)
    return list_page([file_object(record) for record in records], has_more)


@bp.get("/<file_id>")
@document(
    "Read a file's details (OpenAI-compatible): an upload, or a batch's output or error file",
    tags=TAGS,
    responses={200: ("The file", FileObjectSchema), 404: OPENAI_ERROR},
)
def get_file(file_id: str):
    output = file_service().output_of(file_id, owner())
    if output is None:
        return jsonify(file_object(file_service().get(file_id, owner())))
    batch, errors = output
    _id, lines = output_file(batch, errors)
    size = sum(len(line.encode()) for line in lines)
    record = FileRecord(file_id, batch.owner, "batch_output", f"{file_id}.jsonl", size, 0, batch.created_at)
    return jsonify({**file_object(record), "expires_at": int(batch.expires_at) if batch.expires_at else None})


@bp.get("/<file_id>/content")
@document(
    "Download a file's content (OpenAI-compatible)",
    description=(
        'An upload as it was sent; a batch\'s output file has one {"id", "custom_id", "response": {"status_code", '
        '"request_id", "body"}, "error": null} line per succeeded request, its error file one {"id", "custom_id", '
        '"response": null, "error": {"code", "message"}} line per failed or cancelled request, in input order.'
    ),
    tags=TAGS,
    responses={200: ("JSONL", None, "application/jsonl"), 404: OPENAI_ERROR},
)
def file_content(file_id: str):
    output = file_service().output_of(file_id, owner())
    if output is not None:
        _id, lines = output_file(*output)
        return Response(lines, mimetype="application/jsonl")
    record = file_service().get(file_id, owner())
    return Response((line + "\n" for line in file_service().lines(record)), mimetype="application/jsonl")


@bp.delete("/<file_id>")
@document(
    "Delete an uploaded file (OpenAI-compatible)",
    description="A batch's output and error files are its results: they expire with the batch (GENQUEUE_BATCH_TTL_S).",
    tags=TAGS,
    responses={200: ("Deleted", FileDeletedSchema), 400: OPENAI_ERROR, 404: OPENAI_ERROR},
)
def delete_file(file_id: str):
    if file_service().output_of(file_id, owner()) is not None:
        message = "a batch's output and error files are its results: they expire with the batch"
        raise ApiError(400, "invalid_request", message, {"file_id": [message]})
    file_service().delete(file_id, owner())
    return jsonify({"id": file_id, "object": "file", "deleted": True})
