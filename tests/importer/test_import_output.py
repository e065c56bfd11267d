"""What import writes: deterministic bytes, the OCI graph, the config rewrite, the JSON
report, the selection of images from layouts (tags, platforms, cosign entries)."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

from sifoverlay.cli import main
from sifoverlay.ocisif import mediatypes as mt
from sifoverlay.ocisif import open_image
from sifoverlay.ocisif.importer import import_image
from sifoverlay.ocisif.layout_dir import OciLayout, Platform
from sifoverlay.sif.constants import DETERMINISTIC_TIME
from tests.conftest import require_tool

from .reftree import entry, make_tar, write_layout


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tool("tar2sqfs", "sqfs2tar")


@pytest.mark.parametrize(("name", "squash"), [
    ("whiteout-opaque", False), ("hard-link-delete-4", False), ("hard-link-delete-xattr", True),
    ("many-layers", True), ("overlayfs-docker-v2-manifest", False),
])
def test_same_source_twice_gives_identical_bytes(name: str, squash: bool, layouts: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.oci.sif", tmp_path / "b.oci.sif"
    import_image(layouts / name, first, squash=squash)
    import_image(layouts / name, second, squash=squash)
    assert first.read_bytes() == second.read_bytes()


def test_native_import_is_deterministic(busybox_sif: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.oci.sif", tmp_path / "b.oci.sif"
    import_image(busybox_sif, first)
    import_image(busybox_sif, second)
    assert first.read_bytes() == second.read_bytes()
    with open_image(first) as image:
        header = image.sif.header
        assert header.is_deterministic and header.created_at == DETERMINISTIC_TIME
        assert header.descriptors_total == 3 + 1 + 8  # layer, config, manifest, root index + 8 spare


def test_layers_config_and_manifest(layouts: Path, tmp_path: Path) -> None:
    source = layouts / "hard-link-delete-4"
    out = tmp_path / "out.oci.sif"
    result = import_image(source, out)
    original = OciLayout(str(source)).select()
    with open_image(out) as image:
        assert image.manifest.json["mediaType"] == mt.OCI_MANIFEST
        assert image.manifest.json["config"]["mediaType"] == mt.OCI_CONFIG
        assert [l.digest for l in image.layers] == [l.digest for l in result.layers]
        config = image.config.json
        assert config["rootfs"] == {"type": "layers", "diff_ids": [l.digest for l in image.layers]}
        assert config["history"] == original.config["history"]  # history kept
        for key in set(original.config) - {"rootfs"}:
            assert config[key] == original.config[key]
        assert len(image.root_index.json["manifests"]) == 1
        assert image.manifest.digest == result.manifest_digest
        # blobs in oci-tools order: layers, config, manifest, then the root index
        order = [d.digest for d in image.sif.used()]
        assert order == [*(l.digest for l in image.layers), image.config.digest, image.manifest.digest,
                         image.root_index.digest]
        assert [r.source_digest for r in result.layers] == [l.digest for l in original.layers]


def test_squash_gives_one_layer_and_one_history_entry(layouts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.oci.sif"
    result = import_image(layouts / "many-layers", out, squash=True)
    with open_image(out) as image:
        assert len(image.layers) == 1 and result.squashed
        history = image.config.json["history"]
        assert len(history) == 1 and history[0]["created_by"] == "sifoverlay import --squash"
        raw = image.sif.read(image.layers[0].descriptor)
    listing = tar_listing(raw, tmp_path)
    assert sorted(listing) == ["", *sorted(str(i) for i in range(50))]
    assert result.layers[0].entries == 51


def tar_listing(squashfs: bytes, tmp_path: Path) -> dict[str, tarfile.TarInfo]:
    path = tmp_path / "layer.sqfs"
    path.write_bytes(squashfs)
    tar = tmp_path / "layer.tar"
    with open(tar, "wb") as handle:
        subprocess.run(["sqfs2tar", "--root-becomes", ".", str(path)], stdout=handle, check=True)
    with tarfile.open(tar) as tf:
        return {m.name.strip("./").rstrip("/") if m.name not in (".", "./") else "": m for m in tf.getmembers()}


def test_whiteouts_become_overlayfs_markers(layouts: Path, tmp_path: Path) -> None:
    """No root needed: read the squashfs layers back as tar."""
    out = tmp_path / "out.oci.sif"
    import_image(layouts / "whiteout-opaque", out)
    with open_image(out) as image:
        top = image.sif.read(image.layers[1].descriptor)
    entries = tar_listing(top, tmp_path)
    assert set(entries) == {"", "a", "a/bar"}  # the .wh..wh..opq entry is gone
    assert entries["a"].pax_headers.get("SCHILY.xattr.trusted.overlay.opaque") == "y"
    import_image(layouts / "whiteout-explicit-dir", out)
    with open_image(out) as image:
        top = image.sif.read(image.layers[1].descriptor)
    entries = tar_listing(top, tmp_path)
    assert entries["a/b"].ischr() and (entries["a/b"].devmajor, entries["a/b"].devminor) == (0, 0)
    assert "a/.wh.b" not in entries


def test_cli_json_report(capsys: pytest.CaptureFixture[str], layouts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.oci.sif"
    code = main(["import", "--json", str(layouts / "whiteout-explicit-file"), str(out)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    with open_image(out) as image:
        assert report["manifest"] == image.manifest.digest and report["config"] == image.config.digest
        assert [(l["digest"], l["size"]) for l in report["layers"]] == [(l.digest, l.size) for l in image.layers]
        assert report["size"] == out.stat().st_size and report["kind"] == "oci-layout"
        assert report["platform"] is None  # this vector's config says os "" and architecture ""
    code = main(["import", "--json", str(layouts / "hello-world-docker-v2-manifest"), str(out)])
    assert code == 0 and json.loads(capsys.readouterr().out)["platform"] == "linux/arm64/v8"


def test_cli_text_report(capsys: pytest.CaptureFixture[str], busybox_sif: Path, tmp_path: Path) -> None:
    out = tmp_path / "bb.oci.sif"
    assert main(["import", str(busybox_sif), str(out)]) == 0
    text = capsys.readouterr().out
    with open_image(out) as image:
        assert f"{out}: 1 squashfs layer(s), {out.stat().st_size} bytes" in text
        assert image.layers[0].digest in text


# -- selection ----------------------------------------------------------------------------------
def _two_images(tmp_path: Path, **extra: dict) -> Path:
    first = make_tar([(entry("first"), b"1")])
    second = make_tar([(entry("second"), b"2")])
    return write_layout(tmp_path / "layout", [
        {"layers": [(mt.OCI_LAYER_TAR, first)], **extra.get("a", {})},
        {"layers": [(mt.OCI_LAYER_TAR, second)], **extra.get("b", {})},
    ])


def test_tag_selects_the_image(tmp_path: Path) -> None:
    source = _two_images(tmp_path, a={"tag": "one"}, b={"tag": "two"})
    out = tmp_path / "out.oci.sif"
    import_image(f"{source}:two", out)
    with open_image(out) as image:
        listing = tar_listing(image.sif.read(image.layers[0].descriptor), tmp_path)
    assert set(listing) == {"", "second"}


def test_platform_selects_among_top_level_entries(tmp_path: Path) -> None:
    source = _two_images(tmp_path, a={"platform": {"os": "linux", "architecture": "arm64"}},
                         b={"platform": {"os": "linux", "architecture": "s390x"}})
    layout = OciLayout(str(source))
    assert layout.select(platform=Platform.parse("linux/s390x")).platform == Platform("linux", "s390x")
    assert layout.select(platform=Platform.parse("linux/arm64/v8")).platform == Platform("linux", "arm64")


def test_host_platform_is_the_default_for_lists(layouts: Path) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the vector list's expected digest is the amd64 entry")
    chosen = OciLayout(str(layouts / "hello-world-docker-v2-manifest-list")).select()
    assert chosen.platform == Platform("linux", "amd64")
    assert chosen.manifest_ref.digest == "sha256:f54a58bc1aac5ea1a25d796ae155dc228b3f0e11d046ae276b39c4bf2f13d8c4"


def test_cosign_entries_are_ignored(layouts: Path) -> None:
    chosen = OciLayout(str(layouts / "hello-world-cosign-manifest")).select()
    assert chosen.manifest_ref.digest == "sha256:432f982638b3aefab73cc58ab28f5c16e96fdb504e8c134fc58dff4bae8bf338"
    listed = OciLayout(str(layouts / "hello-world-cosign-manifest-list")).select(platform=Platform.parse("linux/arm/v7"))
    assert listed.platform == Platform("linux", "arm", "v7")


def test_several_images_without_match_is_refused(tmp_path: Path) -> None:
    source = _two_images(tmp_path, a={"platform": {"os": "linux", "architecture": "arm64"}},
                         b={"platform": {"os": "linux", "architecture": "s390x"}})
    from sifoverlay.errors import UsageError

    with pytest.raises(UsageError, match="no image for platform linux/ppc64le"):
        OciLayout(str(source)).select(platform=Platform.parse("linux/ppc64le"))


@pytest.mark.parametrize(("text", "expected"), [
    ("linux/amd64", Platform("linux", "amd64")), ("linux/arm/v7", Platform("linux", "arm", "v7")),
    ("linux/x86_64", Platform("linux", "amd64")), ("linux/aarch64", Platform("linux", "arm64")),
])
def test_platform_parse(text: str, expected: Platform) -> None:
    assert Platform.parse(text) == expected


def test_interrupted_import_never_leaves_a_partial_output(layouts: Path, tmp_path: Path) -> None:
    """SIGKILL a separate import process at every I/O operation in turn (no `finally:`
    runs): OUT is absent or complete; what is left is only the dead import's scratch
    (its staging dir, the half-written temp SIF), and the next import removes it."""
    from sifoverlay.fsio import CountingIO
    from sifoverlay.ocisif.importer import SCRATCH_PREFIX

    source = layouts / "whiteout-explicit-file"
    reference = tmp_path / "reference.oci.sif"
    counter = CountingIO()
    import_image(source, reference, io=counter)
    total = counter.count
    assert total > 10
    complete = left_scratch = 0
    for crash_at in range(1, total + 1):
        work = tmp_path / f"c{crash_at}"
        work.mkdir()
        out = work / "out.oci.sif"
        pid = os.fork()
        if pid == 0:  # child: killed by its own CountingIO at op `crash_at`
            try:
                import_image(source, out, io=CountingIO(crash_at, mode="kill"))
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (crash_at, status)
        if out.exists():
            assert out.read_bytes() == reference.read_bytes()
            complete += 1
        leftovers = sorted(p.name for p in work.iterdir() if p.name != out.name)
        for name in leftovers:  # only the dead process's own scratch, named by its pid
            assert (name.startswith(SCRATCH_PREFIX) and f"-{pid}-" in name) or name == f".{out.name}.sifnew.{pid}", name
        left_scratch += bool(leftovers)
        import_image(source, out)  # the next import cleans up after the dead one
        assert out.read_bytes() == reference.read_bytes()
        assert sorted(p.name for p in work.iterdir()) == [out.name]
    assert complete <= 1  # only a kill after the final rename (at the directory fsync) leaves OUT
    assert left_scratch >= total - 2  # a real kill leaves scratch behind at (almost) every op


def test_identical_layers_are_stored_once(tmp_path: Path) -> None:
    """Two layers that convert to the same squashfs share one SIF object (lookups are by
    digest: two objects with one digest would make the image unreadable)."""
    same = make_tar([(entry("d", "dir"), None), (entry("d/f"), b"same\n")])
    source = write_layout(tmp_path / "layout", [{"layers": [(mt.OCI_LAYER_TAR, same), (mt.OCI_LAYER_TAR, same)]}])
    out = tmp_path / "out.oci.sif"
    result = import_image(source, out)
    assert result.layers[0].digest == result.layers[1].digest
    with open_image(out) as image:
        assert [l.digest for l in image.layers] == [result.layers[0].digest] * 2
        assert len(image.sif.used()) == 4  # one layer object, config, manifest, root index
        image.verify_layers()
