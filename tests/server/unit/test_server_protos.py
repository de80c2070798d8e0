"""The pixart.v1 contract: committed stubs match the .proto, and the enums cover the spec's spellings."""

from __future__ import annotations

import pytest

from engine.request import GenerationRequest
from engine.vocabulary import IMAGE_SIZE_PRESETS, OUTPUT_FORMATS, SCHEDULERS, STEP_CACHE_MODES, STYLE_NAMES
from protos import generate
from protos.pixart.v1 import pixart_pb2 as pb
from server.core import records

pytestmark = pytest.mark.timeout(60)


def test_stubs_match_proto() -> None:
    assert generate.drift() == [], "stubs are stale: run `python -m protos.generate` and commit the result"


@pytest.mark.parametrize(
    ("enum", "table", "names"),
    [
        (pb.Style, records.STYLES, STYLE_NAMES),
        (pb.ImageSizePreset, records.IMAGE_SIZES, tuple(IMAGE_SIZE_PRESETS)),
        (pb.Scheduler, records.SCHEDULERS, SCHEDULERS),
        (pb.OutputFormat, records.OUTPUT_FORMATS, OUTPUT_FORMATS),
    ],
)
def test_enums_cover_the_contract(enum, table, names) -> None:
    assert set(table) == set(enum.values()), "every proto enum value is translated"
    assert set(table.values()) == set(names), "every spelling of the spec has an enum value"
    assert enum.Name(0).endswith("_UNSPECIFIED")


def test_step_cache_unspecified_is_the_servers_default() -> None:
    assert set(records.STEP_CACHES) == set(pb.StepCache.values())
    assert records.STEP_CACHES[0] is None, "UNSPECIFIED leaves the mode to the serving engine"
    assert set(records.STEP_CACHE_NUMBERS) == set(STEP_CACHE_MODES)
    assert records.request_from_proto(pb.GenerateRequest(prompt="a", step_cache=99)).violations() == [
        ("step_cache", "must be one of off, balanced, fast")]


def test_unset_fields_take_the_spec_defaults() -> None:
    assert records.request_from_proto(pb.GenerateRequest(prompt="a fox")) == GenerationRequest(prompt="a fox")


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(prompt="a"),
        GenerationRequest(
            prompt="b", negative_prompt="n", style="3D Model", image_size=(640, 480), num_inference_steps=7,
            scheduler="SA-SOLVER", guidance_scale=1.0, seed=2**63 - 1, num_images=8, enable_safety_checker=True,
            sync_mode=False, output_format="webp", step_cache="fast",
        ),
        GenerationRequest(prompt="d", step_cache="off"),
        GenerationRequest(prompt="c", image_size="landscape_16_9", seed=0, guidance_scale=0.0),
    ],
)
def test_request_round_trip(request_: GenerationRequest) -> None:
    msg = records.request_to_proto(request_)
    assert records.request_from_proto(pb.GenerateRequest.FromString(msg.SerializeToString())) == request_


def test_fields_with_defaults_are_optional() -> None:
    # an explicit zero must be distinguishable from "not set" wherever a default applies
    for name in ("negative_prompt", "num_inference_steps", "guidance_scale", "seed", "num_images",
                 "enable_safety_checker", "sync_mode"):
        assert pb.GenerateRequest.DESCRIPTOR.fields_by_name[name].has_presence, name
