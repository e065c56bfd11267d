"""jsonedit: strict parsing, Go-identical canonical form, minimal order-keeping edits."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sifoverlay.ocisif import jsonedit, mediatypes
from sifoverlay.sif.load import SifFile

from tests.conftest import conformance_glob, conformance_params, need_vectors, require_tool
from .support import OCI_SIF, parts

GOLDENS = conformance_glob("oci-sif/*/*.golden")


def go_compact_documents() -> list[tuple[str, bytes]]:
    """Every JSON object in the oci-tools goldens that Go wrote compactly (ggcr output)."""
    docs = []
    for path in GOLDENS:
        with SifFile.open(path) as sif:
            for desc in sif.used():
                raw = sif.read(desc)
                # pretty-printed upstream inputs and a PHP-escaped (`\/`) list are not Go output
                if raw.startswith(b"{") and b"\n" not in raw and b"\\/" not in raw:
                    docs.append((f"{path.parent.name}/{path.name}#{desc.id}", raw))
    return docs


DOCS = go_compact_documents()


@pytest.mark.parametrize("raw", [pytest.param(d, id=n) for n, d in DOCS] or conformance_params([]))
def test_canonical_reproduces_go_output(raw: bytes) -> None:
    assert jsonedit.canonical(jsonedit.parse(raw)) == raw


def test_there_are_go_documents_to_compare() -> None:
    need_vectors(OCI_SIF)
    assert len(DOCS) >= 20  # configs, manifests, indexes of 8 goldens


GO_PROGRAM = r"""
package main

import (
	"encoding/json"
	"io"
	"os"
)

func main() {
	in, _ := io.ReadAll(os.Stdin)
	var v []string
	if err := json.Unmarshal(in, &v); err != nil {
		panic(err)
	}
	out, _ := json.Marshal(v)
	os.Stdout.Write(out)
}
"""


def test_string_escaping_matches_go_encoding_json(tmp_path: Path) -> None:
    require_tool("go")
    program = tmp_path / "main.go"
    program.write_text(GO_PROGRAM)
    # \b and \f are left out: Go < 1.22 (Debian's) writes \u0008/\u000c, newer Go and we
    # write \b/\f.
    samples = ["a<b>c&d", "line\nfeed\ttab\rcr", "\x01\x1f\x7f", "caf\u00e9 \u4e2d", "\u2028\u2029", "quote\" back\\slash /", "\ud800 lone"]
    stdin = json.dumps(samples).encode()  # ASCII escapes, incl. the lone surrogate
    env = {"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "PATH": "/usr/bin:/bin", "GO111MODULE": "off"}
    go = shutil.which("go") or "go"
    result = subprocess.run([go, "run", str(program)], input=stdin, capture_output=True, env=env, timeout=300, check=True)
    assert jsonedit.canonical(jsonedit.parse(stdin)) == result.stdout


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b"{not json", "not valid JSON"),
        (b'{"a":1} trailing', "not valid JSON"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b'{"a":NaN}', "invalid JSON number NaN"),
        (b'{"a":"\xff"}', "not UTF-8"),
        ('{"a":1}'.encode("utf-16"), "not UTF-8"),
        (b"[" * 100000, "not valid JSON"),
    ],
)
def test_parse_is_strict(raw: bytes, problem: str) -> None:
    with pytest.raises(jsonedit.JsonError, match=problem):
        jsonedit.parse(raw)


def test_make_descriptor_uses_ggcr_field_order() -> None:
    desc = jsonedit.make_descriptor(
        mediatypes.EXT3_LAYER, 5, "sha256:" + "a" * 64, annotations={"k": "v"}, artifact_type="x/y", platform={"os": "linux"}
    )
    assert jsonedit.canonical(desc) == (
        b'{"mediaType":"application/vnd.sylabs.image.layer.v1.ext3","size":5,"digest":"sha256:' + b"a" * 64
        + b'","annotations":{"k":"v"},"platform":{"os":"linux"},"artifactType":"x/y"}'
    )


MANIFEST = {
    "schemaVersion": 2,
    "mediaType": mediatypes.OCI_MANIFEST,
    "config": {"mediaType": mediatypes.OCI_CONFIG, "size": 10, "digest": "sha256:" + "c" * 64, "x-unknown": True},
    "layers": [
        {"mediaType": mediatypes.SQUASHFS_LAYER, "size": 1, "digest": "sha256:" + "1" * 64},
        {"mediaType": mediatypes.EXT3_LAYER, "size": 2, "digest": "sha256:" + "2" * 64, "annotations": {"a": "b"}, "urls": ["u"]},
    ],
    "annotations": {"org.example": "kept"},
    "zzz": [1, 2],
}


def test_replace_layer_changes_only_the_named_fields() -> None:
    before = copy.deepcopy(MANIFEST)
    out = jsonedit.replace_layer(MANIFEST, -1, {"digest": "sha256:" + "3" * 64, "size": 7})
    assert MANIFEST == before  # input untouched
    assert list(out) == list(MANIFEST)
    assert out["layers"][1] == {"mediaType": mediatypes.EXT3_LAYER, "size": 7, "digest": "sha256:" + "3" * 64, "annotations": {"a": "b"}, "urls": ["u"]}
    assert out["layers"][0] == MANIFEST["layers"][0]
    assert out["zzz"] == [1, 2] and out["annotations"] == {"org.example": "kept"}


def test_replace_layer_none_removes_and_new_keys_follow_ggcr_order() -> None:
    out = jsonedit.replace_layer(MANIFEST, 0, {"annotations": {"n": "1"}})
    assert list(out["layers"][0]) == ["mediaType", "size", "digest", "annotations"]
    out = jsonedit.replace_layer(MANIFEST, 1, {"annotations": None, "platform": {"os": "linux"}})
    assert list(out["layers"][1]) == ["mediaType", "size", "digest", "urls", "platform"]
    out = jsonedit.replace_layer(MANIFEST, 1, {"data": "eA=="})
    assert list(out["layers"][1]) == ["mediaType", "size", "digest", "data", "annotations", "urls"]
    with pytest.raises(jsonedit.JsonError, match="no layer 5"):
        jsonedit.replace_layer(MANIFEST, 5, {"size": 1})


def test_append_layer_and_replace_config() -> None:
    layer = jsonedit.make_descriptor(mediatypes.EXT3_LAYER, 9, "sha256:" + "9" * 64)
    out = jsonedit.append_layer(MANIFEST, layer)
    assert out["layers"][-1] == layer and len(out["layers"]) == 3 and len(MANIFEST["layers"]) == 2
    out = jsonedit.replace_config(MANIFEST, {"size": 11, "digest": "sha256:" + "d" * 64})
    assert out["config"] == {"mediaType": mediatypes.OCI_CONFIG, "size": 11, "digest": "sha256:" + "d" * 64, "x-unknown": True}


def test_config_edits_keep_everything_else() -> None:
    config = {"architecture": "amd64", "config": {"Env": ["A=1"]}, "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}, "history": [{"created_by": "x"}], "container_config": {"k": 1}}
    out = jsonedit.set_diff_id(config, -1, "sha256:" + "2" * 64)
    assert out["rootfs"]["diff_ids"] == ["sha256:" + "2" * 64]
    assert list(out) == list(config) and out["container_config"] == {"k": 1}
    out = jsonedit.append_diff_id(out, "sha256:" + "3" * 64)
    assert out["rootfs"]["diff_ids"] == ["sha256:" + "2" * 64, "sha256:" + "3" * 64]
    out = jsonedit.append_history(out, {"created": "0001-01-01T00:00:00Z"})
    assert out["history"] == [{"created_by": "x"}, {"created": "0001-01-01T00:00:00Z"}]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + "1" * 64] and len(config["history"]) == 1
    fresh = jsonedit.append_history(jsonedit.append_diff_id({"os": "linux"}, "sha256:" + "4" * 64), {"comment": "c"})
    assert fresh == {"os": "linux", "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "4" * 64]}, "history": [{"comment": "c"}]}
    with pytest.raises(jsonedit.JsonError, match="no diff_id 3"):
        jsonedit.set_diff_id(config, 3, "sha256:" + "2" * 64)


def test_replace_manifest_entry_keeps_platform_and_annotations() -> None:
    _, root, _ = parts(OCI_SIF / "TestAppendImage" / "WithReference.golden")
    index = jsonedit.parse(root)
    first, second = index["manifests"]
    new = {"size": 600, "digest": "sha256:" + "e" * 64}
    out = jsonedit.replace_manifest_entry(index, new, old_digest=second["digest"])
    assert out["manifests"][0] == first
    assert out["manifests"][1] == dict(second, size=600, digest="sha256:" + "e" * 64)
    assert list(out["manifests"][1]) == list(second)  # annotations + artifactType keep their place
    out = jsonedit.replace_manifest_entry(index, new, old_digest=first["digest"])
    assert out["manifests"][0]["platform"] == {"architecture": "arm64", "os": "linux", "variant": "v8"}
    with pytest.raises(jsonedit.JsonError, match="2 selectable images"):
        jsonedit.replace_manifest_entry(index, new)
    with pytest.raises(jsonedit.JsonError, match="0 entries with digest"):
        jsonedit.replace_manifest_entry(index, new, old_digest="sha256:" + "0" * 64)


def test_replace_manifest_entry_selects_the_single_image() -> None:
    _, root, _ = parts(OCI_SIF / "TestUpdate" / "AddLayer.golden")
    index = jsonedit.parse(root)
    out = jsonedit.replace_manifest_entry(index, {"size": 1, "digest": "sha256:" + "f" * 64})
    assert jsonedit.canonical(out) == root.replace(b"584", b"1").replace(index["manifests"][0]["digest"].encode(), b"sha256:" + b"f" * 64)


def test_digest_helpers() -> None:
    assert jsonedit.digest_of(b"{}") == "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    assert jsonedit.is_digest("sha256:" + "a" * 64) and not jsonedit.is_digest("sha256:" + "A" * 64)
    assert jsonedit.new_index([]) == {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": []}
