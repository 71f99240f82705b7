"""The one schema (maskforge.schema): numbers whatever their JSON spelling, nothing else coerced, unknown
fields refused, messages that name the field, defaults for fields an older record lacks, and the JSON
Schema that docs/FORMAT.md points to."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from maskforge.errors import MaskforgeError
from maskforge.schema import ArtifactDocument, InputSpec, SearchConfig, json_schema, parse

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize(
    "values,field,expected",
    [
        ({"epochs": 3}, "epochs", 3),
        ({"epochs": 3.0}, "epochs", 3),
        ({"k": 1}, "k", 1.0),
        ({"k": 1.0}, "k", 1.0),
        ({"seed": 2**63 - 1}, "seed", 2**63 - 1),
        ({"seed": 4096.0}, "seed", 4096),
        ({"lr": 1}, "lr", 1.0),
    ],
)
def test_numbers_are_numbers_whatever_their_spelling(values, field, expected):
    value = getattr(SearchConfig.from_dict(values), field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"epochs": "3"}, "search config: epochs must be an integer, got '3'"),
        ({"epochs": True}, "search config: epochs must be an integer, got True"),
        ({"epochs": 2.5}, "search config: epochs must be an integer, got 2.5"),
        ({"seed": float(2**53 + 2)}, "search config: seed must be an integer, got 9007199254740994.0"),
        ({"k": "0.5"}, "search config: k must be a number, got '0.5'"),
        ({"k": None}, "search config: k must be a number, got None"),
        ({"scale_fan": 1}, "search config: scale_fan must be true or false, got 1"),
        ({"arch": 7}, "search config: arch must be a string, got 7"),
        ({"speed": "fast"}, "search config: unknown field speed"),
        ([1, 2], "search config: must be an object"),
    ],
)
def test_nothing_else_is_coerced_and_messages_name_the_field(values, message):
    with pytest.raises(MaskforgeError) as caught:
        SearchConfig.from_dict(values)
    assert str(caught.value) == message


def test_nested_messages_name_the_path():
    spec = {"channels": 2, "height": 4, "width": 4, "mean": [0.5, 0.5], "std": [0.2, -1], "class_names": ["a"]}
    with pytest.raises(MaskforgeError) as caught:
        parse(InputSpec, spec, "artifact x")
    assert str(caught.value) == "artifact x: std[1] must be > 0, got -1"
    with pytest.raises(MaskforgeError) as caught:
        InputSpec(1, 4, 4, (0.5,), (0.2,), ("a",), "extra")
    assert str(caught.value) == "input spec: takes at most 6 values, got 7"


def test_an_older_record_takes_the_defaults_of_newer_fields():
    config = SearchConfig.from_dict({"arch": "fc", "k": 0.3})
    assert (config.arch, config.k) == ("fc", 0.3)
    assert (config.width, config.topk, config.precision, config.masker, config.deterministic) == (
        None,
        "layer",
        None,
        None,
        False,
    )
    assert SearchConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()  # config.json round trip


def test_config_is_immutable_and_replace_validates():
    config = SearchConfig(arch="fc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.k = 0.7  # type: ignore[misc]
    assert config.replace(k=0.7).k == 0.7
    with pytest.raises(MaskforgeError, match="^search config: k must be <= 1, got 2.0$"):
        config.replace(k=2.0)


def test_the_published_json_schema_is_the_schema():
    """docs/artifact.schema.json is generated from ArtifactDocument (regenerate it when the schema changes:
    python -c 'import json, maskforge.schema as s; print(json.dumps(s.json_schema(s.ArtifactDocument),
    indent=1, sort_keys=True))' > docs/artifact.schema.json)."""
    published = json.loads((DOCS / "artifact.schema.json").read_text())
    assert published == json_schema(ArtifactDocument)
    assert published["additionalProperties"] is False
    assert set(published["required"]) == {
        "format",
        "format_version",
        "arch",
        "input",
        "seed",
        "init",
        "k",
        "generator",
        "layers",
        "bn",
        "provenance",
        "digests",
    }
