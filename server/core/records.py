"""Proto <-> engine dataclasses, and the google.rpc.Status of every outcome that is not a result.

The protos are both the wire format of gRPC and the record format of the store (a row keeps its request, result
and error as serialized pixart.v1 / google.rpc messages), so every transport and the output side translate here.

The field rules live in engine.request; this module only translates. A value the proto can carry but the
contract cannot (an enum number this server does not know, a custom size with a side left out) is translated
into something GenerationRequest.violations() refuses with the right field name, so every rule is written once.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from engine import vocabulary
from engine.request import Cancelled, GenerationRequest, GenerationResult, InvalidRequest
from protos.pixart.v1 import pixart_pb2 as pb
from server.storage import ResultWriteFailed

from .work import DeadlineExceeded, ShutdownAbort

log = logging.getLogger("pixart.server")


def _proto_table(enum, prefix: str, names, default: str) -> dict[int, str]:
    """proto enum number -> the public API's spelling, derived from the names: "Digital Art" is STYLE_DIGITAL_ART,
    "DPM-SOLVER" is DPM_SOLVER. UNSPECIFIED (0) means the documented default."""
    table = {0: default}
    for name in names:
        table[enum.Value(prefix + re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_"))] = name
    return table


STYLES = _proto_table(pb.Style, "STYLE_", vocabulary.STYLE_NAMES, vocabulary.DEFAULT_STYLE)
IMAGE_SIZES = _proto_table(pb.ImageSizePreset, "", vocabulary.IMAGE_SIZE_PRESETS, vocabulary.DEFAULT_IMAGE_SIZE)
SCHEDULERS = _proto_table(pb.Scheduler, "", vocabulary.SCHEDULERS, vocabulary.DEFAULT_SCHEDULER)
OUTPUT_FORMATS = _proto_table(pb.OutputFormat, "", vocabulary.OUTPUT_FORMATS, vocabulary.DEFAULT_FORMAT)
# UNSPECIFIED is None: the serving engine's default mode (pixart serve --step-cache), not the vocabulary's
STEP_CACHES: dict[int, str | None] = {
    **_proto_table(pb.StepCache, "STEP_CACHE_", vocabulary.STEP_CACHE_MODES, vocabulary.DEFAULT_STEP_CACHE), 0: None}


def _reverse(table: dict[int, str]) -> dict[str, int]:
    # the explicit number, never UNSPECIFIED, so that a round trip names the value
    return {name: number for number, name in table.items() if number != 0}


STYLE_NUMBERS = _reverse(STYLES)
IMAGE_SIZE_NUMBERS = _reverse(IMAGE_SIZES)
SCHEDULER_NUMBERS = _reverse(SCHEDULERS)
OUTPUT_FORMAT_NUMBERS = _reverse(OUTPUT_FORMATS)
STEP_CACHE_NUMBERS = _reverse(STEP_CACHES)


def _enum(table: dict[int, str], number: int) -> str:
    # An unknown number becomes a name no rule accepts, so validation names the field.
    return table.get(number, f"<unknown enum value {number}>")


def request_from_proto(msg: pb.GenerateRequest) -> GenerationRequest:
    """Translate without judging: the result may be invalid; call validate()/engine.check() on it."""
    kw: dict = {}
    for name in ("negative_prompt", "num_inference_steps", "guidance_scale", "seed", "num_images",
                 "enable_safety_checker", "sync_mode", "preview_every"):
        if msg.HasField(name):
            kw[name] = getattr(msg, name)
    which = msg.WhichOneof("image_size")
    if which == "image_size_preset":
        kw["image_size"] = _enum(IMAGE_SIZES, msg.image_size_preset)
    elif which == "image_size_custom":
        c = msg.image_size_custom
        # a side left out is None, which the side rule refuses under image_size.width / image_size.height
        kw["image_size"] = (c.width if c.HasField("width") else None, c.height if c.HasField("height") else None)
    return GenerationRequest(
        prompt=msg.prompt,
        style=_enum(STYLES, msg.style),
        scheduler=_enum(SCHEDULERS, msg.scheduler),
        output_format=_enum(OUTPUT_FORMATS, msg.output_format),
        step_cache=_enum(STEP_CACHES, msg.step_cache),
        **kw,
    )


def request_to_proto(req: GenerationRequest) -> pb.GenerateRequest:
    """The inverse of request_from_proto for a valid request (used by the client and the durable store)."""
    msg = pb.GenerateRequest(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        style=STYLE_NUMBERS[req.style],
        num_inference_steps=req.num_inference_steps,
        scheduler=SCHEDULER_NUMBERS[req.scheduler],
        guidance_scale=float(req.guidance_scale),
        num_images=req.num_images,
        enable_safety_checker=req.enable_safety_checker,
        sync_mode=req.sync_mode,
        output_format=OUTPUT_FORMAT_NUMBERS[req.output_format],
    )
    if req.seed is not None:
        msg.seed = int(req.seed)
    if req.step_cache is not None:
        msg.step_cache = STEP_CACHE_NUMBERS[req.step_cache]
    if req.preview_every:
        msg.preview_every = int(req.preview_every)
    if isinstance(req.image_size, str):
        msg.image_size_preset = IMAGE_SIZE_NUMBERS[req.image_size]
    else:
        msg.image_size_custom.width, msg.image_size_custom.height = (int(s) for s in req.image_size)
    return msg


def bad_request_status(violations: list[tuple[str, str]], message: str | None = None) -> status_pb2.Status:
    """google.rpc.Status with INVALID_ARGUMENT and one BadRequest.FieldViolation per (field, rule)."""
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    text = message or "invalid request: " + "; ".join(f"{f}: {d}" for f, d in violations)
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=text, details=[detail])


def error_status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message)


def status_from_exception(exc: BaseException) -> status_pb2.Status:
    """A refused request names its fields; any other failure is INTERNAL with a stable message and a correlation
    id, never the exception's own text (which may name paths, addresses or internals): that goes to the log, once,
    under the same id."""
    if isinstance(exc, InvalidRequest):
        return bad_request_status(exc.violations)
    return error_status(grpc.StatusCode.INTERNAL, f"internal error; correlation id {correlation_id(exc)} (the "
                                                  "server's log has the details)")


def correlation_id(exc: BaseException) -> str:
    """The id an internal failure is known by, given (and logged with its traceback) the first time it is asked
    for: every answer, stored status and webhook that reports this failure carries the same id."""
    known = getattr(exc, "_pixart_correlation_id", None)
    if known is None:
        known = secrets.token_hex(8)
        try:
            exc._pixart_correlation_id = known  # type: ignore[attr-defined]
        except AttributeError:  # an exception type without a __dict__: logged each time it is reported
            pass
        log.error("internal error", extra={"correlation_id": known}, exc_info=exc)
    return known


def grpc_code(status: status_pb2.Status) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == status.code:
            return code
    return grpc.StatusCode.UNKNOWN


def violations_from_status(status: status_pb2.Status) -> list[tuple[str, str]]:
    """The (field, rule) pairs carried in a google.rpc.Status, for clients and tests."""
    out: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


def result_to_proto(
    result: GenerationResult,
    request_id: str,
    *,
    queue_s: float,
    urls: list[str] | None = None,
    include_data: bool = True,
) -> pb.GenerateResult:
    """`urls`, when given, are set on the images (stored results); `include_data` fills file_data."""
    images = []
    for i, img in enumerate(result.images):
        images.append(
            pb.Image(
                url=urls[i] if urls else "",
                content_type=img.content_type,
                file_name=img.file_name,
                file_size=len(img.data),
                width=img.width,
                height=img.height,
                file_data=img.data if include_data else b"",
            )
        )
    t = result.timings
    timings = pb.Timings(
        queue=queue_s,
        text_encoding=t.get("text_encoding", 0.0),
        denoising=t.get("denoising", 0.0),
        decoding=t.get("decoding", 0.0),
        safety=t.get("safety", 0.0),
        image_encoding=t.get("image_encoding", 0.0),
        total=t.get("total", 0.0) + queue_s,
        steps_computed=result.steps_computed,
        steps_cached=result.steps_cached,
    )
    return pb.GenerateResult(
        images=images,
        seed=int(result.seed),
        prompt=result.prompt,
        has_nsfw_concepts=list(result.has_nsfw_concepts),
        timings=timings,
        request_id=request_id,
    )


def result_to_json(msg: pb.GenerateResult) -> dict:
    """The webhook's JSON shape of a result: fal's field names, image bytes base64-encoded when present."""
    images = []
    for img in msg.images:
        d = {
            "url": img.url or None,
            "content_type": img.content_type,
            "file_name": img.file_name,
            "file_size": img.file_size,
            "width": img.width,
            "height": img.height,
        }
        if img.file_data:
            d["file_data"] = base64.b64encode(img.file_data).decode()
        images.append(d)
    t = msg.timings
    return {
        "images": images,
        "seed": msg.seed,
        "prompt": msg.prompt,
        "has_nsfw_concepts": list(msg.has_nsfw_concepts),
        "timings": {f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields},
    }


def outcome_status(outcome: BaseException) -> status_pb2.Status:
    """How a job that did not complete is reported: the same google.rpc.Status for every way of calling."""
    if isinstance(outcome, DeadlineExceeded):
        return error_status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded; the work was stopped")
    if isinstance(outcome, ShutdownAbort):
        return error_status(grpc.StatusCode.UNAVAILABLE, "the server shut down before the request ended")
    if isinstance(outcome, Cancelled):
        return error_status(grpc.StatusCode.CANCELLED, "cancelled")
    if isinstance(outcome, ResultWriteFailed):  # the storage's fault, not the request's: worth a retry later
        return error_status(grpc.StatusCode.UNAVAILABLE, f"the images were made but could not be stored: {outcome}")
    return status_from_exception(outcome)


def sync_mode(msg: pb.GenerateRequest) -> bool:
    """A request's sync_mode; left unset it is the API's default, true (bytes in the answer, no URLs)."""
    return msg.sync_mode if msg.HasField("sync_mode") else True
