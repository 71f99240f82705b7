"""Artifacts written by an earlier maskforge keep loading, verifying and re-saving byte for byte.

The files in tests/data were written by `maskforge search` at commit e63ec35 (before the schema and
module redesign), and are never regenerated:

* v1-fc-main-e63ec35.safetensors: `--arch fc --k 0.3 --epochs 1 --max-steps 3 --batch-size 128 --seed 11`
  on the built-in demo set (signed constant weights);
* v1-conv2-kaiming-main-e63ec35.safetensors: `--arch conv2 --k 0.4 --epochs 2 --batch-size 8 --seed 5
  --init kaiming_normal --scale-fan` on an 8x8 RGB image folder (tests/helpers.write_image_folder(12, 4));
* v1-config-main-e63ec35.json: the config.json of the fc run.

The oracles are the files themselves (their bytes and the SHA-256 recorded below when they were written).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from maskforge.artifact import artifact_bytes, build_artifact, load_artifact
from maskforge.materialization import materialize
from maskforge.verify import verify_artifact

DATA = Path(__file__).parent / "data"
FILES = {
    "v1-fc-main-e63ec35.safetensors": "72c94a67f81e5d869f68a14f0eb4be175de674411840bc21aaa6332f09eae69b",
    "v1-conv2-kaiming-main-e63ec35.safetensors": "d82e30040bb61837ce6588c961c28bbb3c9bacf3b989e1065774f32f5e46c464",
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_legacy_artifact_loads_verifies_and_resaves_byte_identically(name):
    path = DATA / name
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == FILES[name]  # the fixture itself is intact
    report = verify_artifact(path)
    assert report.ok, report.to_dict()
    artifact = load_artifact(path)
    assert artifact_bytes(artifact) == data
    materialize(artifact)  # regenerates and checks every weight digest


@pytest.mark.parametrize("name", sorted(FILES))
def test_the_writer_still_writes_the_legacy_bytes(name):
    """Rebuilding the artifact from its own network and metadata gives the file main wrote, byte for byte."""
    artifact = load_artifact(DATA / name)
    model = artifact.create_model()
    document = artifact.document
    rebuilt = build_artifact(
        model,
        arch=artifact.arch,
        arch_args=dict(artifact.arch_args),
        spec=artifact.spec,
        seed=artifact.seed,
        init=artifact.init,
        scale_fan=artifact.scale_fan,
        k=artifact.k,
        provenance=dict(document["provenance"]),
    )
    assert artifact_bytes(rebuilt) == (DATA / name).read_bytes()


def test_legacy_run_config_is_still_a_valid_search_config(tmp_path):
    from maskforge.searches import read_run_config

    recorded = json.loads((DATA / "v1-config-main-e63ec35.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    config = read_run_config(tmp_path)
    for key, value in recorded.items():
        assert getattr(config, key) == value, key
