"""`sifoverlay inspect`: the real CLI in a subprocess, exact JSON values, golden text."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sifoverlay.ocisif import OVERLAY_FINGERPRINT_ANNOTATION, jsonedit, mediatypes

from tests.conftest import need_vectors

from .support import BROKEN, EXT3_IMAGE, OCI_SIF, VECTORS, build_image, sha256_file

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / ".venv" / "bin" / "sifoverlay"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("SIFOVERLAY_UPDATE_GOLDEN") == "1"
GO_ZERO_TIME = -62135596800


def inspect(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    need_vectors(*args, cwd)
    return subprocess.run([str(CLI), "inspect", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def inspect_json(path: Path | str, cwd: Path | None = None) -> dict[str, Any]:
    result = inspect("--json", str(path), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def region_digest(path: Path, offset: int, size: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return "sha256:" + hashlib.sha256(handle.read(size)).hexdigest()


def test_json_of_add_layer_golden() -> None:
    path = OCI_SIF / "TestUpdate" / "AddLayer.golden"
    report = inspect_json(path)
    assert report["path"] == str(path)
    assert report["header"] == {
        "launch_script": "",
        "version": "01",
        "arch": "unknown",
        "id": "00000000-0000-0000-0000-000000000000",
        "created_at": GO_ZERO_TIME,
        "modified_at": GO_ZERO_TIME,
        "deterministic": True,
        "descriptors_free": 7,
        "descriptors_total": 12,
        "descriptors_offset": 4096,
        "descriptors_size": 12 * 585,
        "data_offset": 4096 + 12 * 585,
        "data_size": 16342 - (4096 + 12 * 585),
        "file_size": 16342,
    }
    rows = report["descriptors"]
    assert [(d["id"], d["datatype"], d["datatype_name"], d["group"], d["link"], d["offset"], d["size"], d["name"]) for d in rows] == [
        (1, 16395, "OCI.Blob", 1, None, 11116, 3208, ""),
        (2, 16395, "OCI.Blob", 1, None, 14324, 223, ""),
        (3, 16395, "OCI.Blob", 1, None, 14547, 897, ""),
        (4, 16395, "OCI.Blob", 1, None, 15444, 584, ""),
        (5, 16394, "OCI.RootIndex", 1, None, 16028, 314, ""),
    ]
    for d in rows:  # the digest column is what the bytes hash to
        assert d["digest"] == region_digest(path, d["offset"], d["size"])
    with open(path, "rb") as handle:
        handle.seek(16028)
        root = json.loads(handle.read(314))
        handle.seek(15444)
        manifest = json.loads(handle.read(584))
    oci = report["oci"]
    assert oci["manifest"] == root["manifests"][0]["digest"] == rows[3]["digest"]
    assert oci["config"] == manifest["config"]["digest"] == rows[2]["digest"]
    assert oci["root_index"] == rows[4]["digest"]
    assert oci["layers"] == [
        {"mediaType": l["mediaType"], "digest": l["digest"], "size": l["size"], "offset": off, "descriptor": i + 1}
        for i, (l, off) in enumerate(zip(manifest["layers"], [11116, 14324]))
    ]
    assert oci["overlay"] is None and report["warnings"] == [] and report["hint"] is None
    assert report["images"] == [{"position": [0], "manifest_media_type": root["manifests"][0]["mediaType"], "platform": None,
                                 "ref_name": None, "selected": True, "error": None, **oci}]


def overlay_image(directory: Path) -> Path:
    out = directory / "overlay.oci.sif"
    build_image(
        out,
        [(mediatypes.SQUASHFS_LAYER, b"squashfs-bytes" * 3), (mediatypes.EXT3_LAYER, EXT3_IMAGE)],
        layer_annotations=[None, {OVERLAY_FINGERPRINT_ANNOTATION: '{"mnt_count":2}'}],
    )
    return out


def test_json_overlay_values(tmp_path: Path) -> None:
    path = overlay_image(tmp_path)
    report = inspect_json(path)
    data_offset = 4096 + (5 + 8) * 585  # 2 layers + config + manifest + index, 8 spare
    overlay = report["oci"]["overlay"]
    assert overlay == {
        "offset": data_offset + 42,
        "size": EXT3_IMAGE.stat().st_size,
        "digest": "sha256:" + sha256_file(EXT3_IMAGE),
        "descriptor": 2,
        "fingerprint": {"mnt_count": 2},
    }
    assert region_digest(path, overlay["offset"], overlay["size"]) == overlay["digest"]
    assert report["oci"]["layers"][-1]["mediaType"] == mediatypes.EXT3_LAYER
    assert report["header"]["descriptors_free"] == 8


def test_empty_oci_sif_prints_the_sif_part(vectors: Path) -> None:
    report = inspect_json(vectors / "singularity" / "empty.oci.sif")
    assert report["oci"] is None and report["images"] == [] and report["warnings"] == ["the root index lists no image"]
    assert [(d["id"], d["datatype"], d["offset"], d["size"]) for d in report["descriptors"]] == [(1, 16394, 32176, 3)]
    assert report["descriptors"][0]["digest"] == region_digest(vectors / "singularity" / "empty.oci.sif", 32176, 3)


def test_native_sif_has_no_oci_part(vectors: Path) -> None:
    path = vectors / "singularity" / "busybox_amd64.sif"
    report = inspect_json(path)
    assert report["oci"] is None and report["images"] == [] and report["warnings"] == []
    assert report["hint"] == f"not an OCI-SIF; a native SIF: convert it with `sifoverlay import {path} OUT.oci.sif`"
    assert report["header"]["arch"] == "amd64" and not report["header"]["deterministic"]
    partition = next(d for d in report["descriptors"] if d["datatype"] == 16388)
    assert partition["extra"] == {"fs_type": 1, "fs_type_name": "Squashfs", "part_type": 2, "part_type_name": "*System", "arch": "amd64"}
    assert all(d["digest"] is None for d in report["descriptors"])
    signature = next(d for d in report["descriptors"] if d["datatype"] == 16389)
    assert (signature["group"], signature["link"], signature["link_is_group"]) == (None, 1, True)


def check_golden(name: str, text: str) -> None:
    golden = GOLDEN_DIR / name
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize(
    "relative, golden",
    [
        ("oci-sif/TestUpdate/AddLayer.golden", "inspect-add-layer.txt"),
        ("singularity/empty.oci.sif", "inspect-empty-oci.txt"),
        ("singularity/busybox_amd64.sif", "inspect-native.txt"),
    ],
)
def test_human_output_golden(relative: str, golden: str) -> None:
    result = inspect(relative, cwd=VECTORS)
    assert result.returncode == 0 and result.stderr == ""
    check_golden(golden, result.stdout)


def test_human_output_golden_with_overlay(tmp_path: Path) -> None:
    overlay_image(tmp_path)
    result = inspect("overlay.oci.sif", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    check_golden("inspect-overlay.txt", result.stdout)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_oci_part_is_shown_with_the_reason_exit_0(case: str, tmp_path: Path) -> None:
    """inspect is a diagnostic: the Go siftool lists these files, so inspect shows them,
    the reason in `warnings` or in the error of the image concerned; exit 0, file untouched."""
    builder, _, pattern = BROKEN[case]
    path = builder(tmp_path)
    before = sha256_file(path)
    result = inspect("--json", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    report = json.loads(result.stdout)
    reasons = report["warnings"] + [image["error"] for image in report["images"] if image["error"]]
    assert [r for r in reasons if re.search(pattern, r)], reasons
    assert report["oci"] is None and report["descriptors"]
    text = inspect(str(path))
    assert (text.returncode, text.stderr) == (0, "")
    assert [line for line in text.stdout.splitlines() if line.startswith(("Warning:", "Invalid:")) and re.search(pattern, line)]
    assert sha256_file(path) == before


@pytest.mark.parametrize("case", ["digest-mismatch", "two-images"])
def test_overlay_verbs_refuse_them_with_the_error_class(case: str, tmp_path: Path) -> None:
    builder, error_name, pattern = BROKEN[case]
    path = builder(tmp_path)
    for json_flag in (["--json"], []):
        result = subprocess.run([str(CLI), "overlay", "status", *json_flag, str(path)], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "SIFOVERLAY_JOURNAL_DIR": str(tmp_path / "j"),
                                                 "SIFOVERLAY_STATE_DIR": str(tmp_path / "state")})
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert result.stderr.count("\n") == 1
        if json_flag:
            error = json.loads(result.stderr)
            assert error["error"] == error_name and error["path"] == str(path) and re.search(pattern, error["message"])
        else:
            assert result.stderr.startswith(f"sifoverlay: {path}: ") and re.search(pattern, result.stderr)


def test_not_a_sif_and_missing_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a SIF file at all" * 10)
    for target, needle in [(text, "bad magic"), (tmp_path / "absent.sif", "No such file or directory")]:
        result = inspect(str(target))
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and needle in result.stderr and str(target) in result.stderr


def test_help() -> None:
    result = inspect("--help")
    assert result.returncode == 0 and "--json" in result.stdout and "IMAGE" in result.stdout


def siftool_list(siftool: str, path: Path) -> list[tuple[int, int | None, int | None, bool, int, int]]:
    """(id, group, link, link is a group, start, end) rows of the Go `siftool list`."""
    out = subprocess.run([siftool, "list", str(path)], capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL, timeout=60)
    rows = []
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) != 5 or not cells[0].isdigit():
            continue
        link = cells[2].replace("(G)", "").strip()
        start, end = cells[3].split("-")
        rows.append((int(cells[0]), None if cells[1] == "NONE" else int(cells[1]), None if link == "NONE" else int(link), "(G)" in cells[2], int(start), int(end)))
    return rows


def test_go_siftool_lists_what_inspect_reports(siftool: str, vectors: Path, tmp_path: Path) -> None:
    files = sorted((vectors / "oci-sif").glob("*/*.golden")) + [vectors / "singularity" / "empty.oci.sif", vectors / "singularity" / "busybox_amd64.sif", overlay_image(tmp_path)]
    for path in files:
        rows = inspect_json(path)["descriptors"]
        ours = [(d["id"], d["group"], d["link"], d["link_is_group"], d["offset"], d["offset"] + d["size"]) for d in rows]
        assert ours == siftool_list(siftool, path), path


# -- every SIF the Go siftool lists, inspect shows ------------------------------------------------
def _is_sif(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(41)
    return head[32:41] == b"SIF_MAGIC"


def upstream_sifs() -> list[Path]:
    """The sylabs/sif reference images and goldens Debian ships (every file with SIF
    magic under its source tree) plus the conformance set's SIF and OCI-SIF files."""
    from tests.conftest import SIF_SOURCE, conformance_glob, sif_reference_images

    found = {str(p): p for p in sif_reference_images()}
    for pattern in ("**/*.sif", "**/*.golden"):
        for p in sorted(SIF_SOURCE.glob(pattern)):
            if p.is_file() and p.stat().st_size >= 128 and _is_sif(p):
                found.setdefault(str(p), p)
    for pattern in ("oci-sif/*/*.golden", "singularity/*.sif", "sif/siftool-golden/*/*.sif"):
        for p in conformance_glob(pattern):
            found.setdefault(str(p), p)
    return [found[k] for k in sorted(found)]


UPSTREAM_SIFS = upstream_sifs()


def _vector_id(path: Path) -> str:
    return "/".join(path.parts[-3:])


@pytest.mark.parametrize("path", UPSTREAM_SIFS, ids=_vector_id)
def test_inspect_accepts_every_sif_the_go_siftool_lists(path: Path, siftool: str) -> None:
    listed = subprocess.run([siftool, "list", str(path)], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    result = inspect("--json", str(path))
    if listed.returncode != 0:
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        return
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    report = json.loads(result.stdout)
    assert [(d["id"], d["group"], d["link"], d["link_is_group"], d["offset"], d["offset"] + d["size"])
            for d in report["descriptors"]] == siftool_list(siftool, path)
    text = inspect(str(path))
    assert (text.returncode, text.stderr) == (0, "") and text.stdout.startswith(f"Image:        {path}\n")


def test_upstream_set_is_complete() -> None:
    """Guards the glob above: Debian's reference images and goldens, and with the
    conformance set its 31 SIF / OCI-SIF vectors (multi-image, broken index...)."""
    from tests.conftest import HAVE_VECTORS, VECTORS

    names = {_vector_id(p) for p in UPSTREAM_SIFS}
    assert "images/one-group.sif" in {"/".join(p.parts[-2:]) for p in UPSTREAM_SIFS}
    assert len([n for n in names if "testdata" in n]) >= 40
    if HAVE_VECTORS:
        assert {"TestAppendImage/Default.golden", "TestRemoveBlob/Valid.golden", "TestWrite/DockerManifestList.golden"} <= {
            "/".join(p.parts[-2:]) for p in UPSTREAM_SIFS}
        assert VECTORS / "sif" / "one-object-oci-root-index.sif" in UPSTREAM_SIFS


@pytest.mark.parametrize(
    "relative, images, valid, selected, warning",
    [
        ("oci-sif/TestAppendImage/Default.golden", 2, 2, False, r"2 images in the root index; SingularityCE needs exactly one"),
        ("oci-sif/TestAppendImage/WithReference.golden", 2, 2, False, r"2 images in the root index"),
        ("oci-sif/TestWrite/DockerManifestList.golden", 9, 9, False, r"9 images in the root index"),
        ("oci-sif/TestRemoveBlob/Valid.golden", 1, 0, False, r"the only image is invalid"),
        ("sif/one-object-oci-root-index.sif", 2, 0, False, r"2 images in the root index"),
        ("oci-sif/TestWrite/DockerManifest.golden", 1, 1, True, None),
    ],
)
def test_every_image_of_the_index_with_its_reason(relative: str, images: int, valid: int, selected: bool,
                                                  warning: str | None, vectors: Any) -> None:
    report = inspect_json(vectors / relative)
    assert len(report["images"]) == images
    assert len([i for i in report["images"] if i["error"] is None and i["layers"]]) == valid
    assert (report["oci"] is not None) == selected == any(i["selected"] for i in report["images"])
    if warning is None:
        assert report["warnings"] == []
    else:
        assert [w for w in report["warnings"] if re.search(warning, w)], report["warnings"]


def test_multi_image_details(vectors: Any) -> None:
    report = inspect_json(vectors / "oci-sif" / "TestAppendImage" / "WithReference.golden")
    first, second = report["images"]
    assert (first["position"], first["platform"], first["ref_name"]) == ([0], "linux/arm64/v8", None)
    assert (second["position"], second["platform"], second["ref_name"]) == ([1], None, "myimage:v1")
    assert [l["descriptor"] for l in first["layers"]] == [1] and [l["descriptor"] for l in second["layers"]] == [4]
    assert first["config"] == "sha256:46331d942d6350436f64e614d75725f6de3bb5c63e266e236e04389820a234c4"
    removed = inspect_json(vectors / "oci-sif" / "TestRemoveBlob" / "Valid.golden")["images"]
    assert removed[0]["error"] == ("layer sha256:7050e35b49f5e348c4809f5eff915842962cb813f32062d3bbdd35c750dd7d01 "
                                   "is referenced but not stored in the SIF")
    assert "layers" not in removed[0] and removed[0]["manifest"] == (
        "sha256:432f982638b3aefab73cc58ab28f5c16e96fdb504e8c134fc58dff4bae8bf338")


def test_human_output_golden_multi_image() -> None:
    result = inspect("oci-sif/TestAppendImage/WithReference.golden", cwd=VECTORS)
    assert result.returncode == 0 and result.stderr == ""
    check_golden("inspect-multi-image.txt", result.stdout)
    broken = inspect("sif/one-object-oci-root-index.sif", cwd=VECTORS)
    assert broken.returncode == 0 and broken.stderr == ""
    check_golden("inspect-invalid-index.txt", broken.stdout)


def test_nested_index_images_and_missing_blobs(tmp_path: Path) -> None:
    """Images below a nested index are listed with their position; a nested index or an
    artifact that is not stored is a warning; the top-level image stays the selected one."""
    from sifoverlay.sif.add import add_object
    from sifoverlay.sif.constants import DataType
    from sifoverlay.sif.writeout import ObjectInput

    from .support import hello_parts, hello_with_spare, replace_root

    hello = hello_parts()
    path = hello_with_spare(tmp_path)
    manifest_entry = json.loads(hello["root"])["manifests"][0]
    missing = "sha256:" + "ab" * 32
    nested = jsonedit.canonical(jsonedit.new_index([manifest_entry, {**manifest_entry, "digest": missing},
                                                    {**manifest_entry, "digest": "sha256:short"}]))
    add_object(path, ObjectInput(DataType.OCI_BLOB, nested))
    entries = [
        manifest_entry,
        jsonedit.descriptor_of(nested, mediatypes.OCI_INDEX),
        {"mediaType": "application/vnd.example.signature", "size": 5, "digest": "sha256:" + "cd" * 32},
        {"mediaType": mediatypes.OCI_INDEX, "size": 7, "digest": "sha256:" + "ef" * 32},
    ]
    replace_root(path, jsonedit.canonical(jsonedit.new_index(entries)))
    report = inspect_json(path)
    assert [(i["position"], i["selected"], i["error"]) for i in report["images"]] == [
        ([0], True, None), ([1, 0], False, None),
        ([1, 1], False, f"manifest {missing} is referenced but not stored in the SIF"),
        ([1, 2], False, f"index {jsonedit.digest_of(nested)} entry 2 has no valid sha256 digest ('sha256:short')")]
    assert report["oci"]["manifest"] == manifest_entry["digest"]
    assert report["warnings"] == [
        f"root index entry 2: blob sha256:{'cd' * 32} is referenced but not stored in the SIF",
        f"root index entry 3: index sha256:{'ef' * 32} is referenced but not stored in the SIF",
    ]
