"""Bad sources: one line on stderr naming the source, exit 2, nothing left at OUT and
no scratch directory left beside it."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sifoverlay.cli import main
from sifoverlay.sif.constants import DataType, FsType, PartType, arch_code
from sifoverlay.sif.create import write_new
from sifoverlay.sif.descriptor import partition_extra
from sifoverlay.sif.writeout import ObjectInput

from tests.conftest import require_tool

from .reftree import entry, make_tar, write_layout


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["import", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_refused(capsys: pytest.CaptureFixture[str], out_dir: Path, source: str, *extra: str,
                    names: str, says: str) -> str:
    out = out_dir / "out.oci.sif"
    code, stdout, stderr = _run_cli(capsys, *extra, source, str(out))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert names in lines[0] and says in lines[0], lines[0]
    assert stdout == ""
    assert sorted(p.name for p in out_dir.iterdir()) == []  # no output, no temp file, no staging dir
    return lines[0]


@pytest.fixture()
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def _copy(layouts: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(layouts / name, tmp_path / name))


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def test_missing_directory(capsys, out_dir: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-layout")
    _assert_refused(capsys, out_dir, missing, names=missing, says="no such OCI layout directory")


def test_directory_without_index(capsys, out_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_refused(capsys, out_dir, str(empty), names=str(empty), says="index.json is missing")


def test_no_such_tag(capsys, out_dir: Path, layouts: Path) -> None:
    source = layouts / "whiteout-opaque"
    _assert_refused(capsys, out_dir, f"{source}:nope", names=str(source), says="no image tagged 'nope'")


def test_no_platform_match(capsys, out_dir: Path, layouts: Path) -> None:
    source = layouts / "hello-world-docker-v2-manifest-list"
    line = _assert_refused(capsys, out_dir, str(source), "--platform", "linux/sparc64", names=str(source),
                           says="no image for platform linux/sparc64")
    assert "linux/amd64" in line and "linux/arm/v7" in line  # says what there is


def test_bad_platform_syntax(capsys, out_dir: Path, layouts: Path) -> None:
    code, _, stderr = _run_cli(capsys, "--platform", "amd64", str(layouts / "whiteout-opaque"), str(out_dir / "o"))
    assert code == 2 and "os/arch" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(out_dir.iterdir()) == []


def test_vector_with_wrong_digests_is_refused(capsys, out_dir: Path, layouts: Path) -> None:
    """aufs-docker-v2-manifest stores its config under a digest its bytes do not have."""
    source = layouts / "aufs-docker-v2-manifest"
    _assert_refused(capsys, out_dir, str(source), names=str(source),
                    says="blob sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a is corrupt")


def test_corrupt_layer_blob(capsys, out_dir: Path, layouts: Path, tmp_path: Path) -> None:
    source = _copy(layouts, "whiteout-explicit-file", tmp_path)
    manifest = json.loads(_blob(source, json.loads((source / "index.json").read_bytes())["manifests"][0]["digest"]).read_bytes())
    layer = _blob(source, manifest["layers"][1]["digest"])
    data = bytearray(layer.read_bytes())
    data[-5] ^= 0xFF  # inside the gzip trailer: still "a gzip file", wrong digest
    layer.write_bytes(bytes(data))
    _assert_refused(capsys, out_dir, str(source), names=str(source),
                    says=f"blob {manifest['layers'][1]['digest']} is corrupt")


def test_missing_blob(capsys, out_dir: Path, layouts: Path, tmp_path: Path) -> None:
    source = _copy(layouts, "hard-link-2", tmp_path)
    manifest = json.loads(_blob(source, json.loads((source / "index.json").read_bytes())["manifests"][0]["digest"]).read_bytes())
    _blob(source, manifest["layers"][0]["digest"]).unlink()
    _assert_refused(capsys, out_dir, str(source), names=str(source), says="is missing")


def test_unsupported_layer_media_type(capsys, out_dir: Path, tmp_path: Path) -> None:
    layer = make_tar([(entry("f"), b"x")])
    source = write_layout(tmp_path / "zstd", [{"layers": [("application/vnd.oci.image.layer.v1.tar+zstd", layer)]}])
    _assert_refused(capsys, out_dir, str(source), names=str(source),
                    says="unsupported media type application/vnd.oci.image.layer.v1.tar+zstd")


def test_diff_id_mismatch(capsys, out_dir: Path, tmp_path: Path) -> None:
    layer = gzip.compress(make_tar([(entry("f"), b"x")]), mtime=0)
    source = write_layout(tmp_path / "l", [{"layers": [("application/vnd.oci.image.layer.v1.tar+gzip", layer)],
                                           "config": {}}])
    # rewrite the config with a wrong diff_id, then re-address config, manifest and index
    index = json.loads((source / "index.json").read_bytes())
    manifest_path = _blob(source, index["manifests"][0]["digest"])
    manifest = json.loads(manifest_path.read_bytes())
    config = json.loads(_blob(source, manifest["config"]["digest"]).read_bytes())
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    import hashlib

    def put(raw: bytes) -> dict:
        digest = hashlib.sha256(raw).hexdigest()
        (source / "blobs" / "sha256" / digest).write_bytes(raw)
        return {"digest": f"sha256:{digest}", "size": len(raw)}

    manifest["config"].update(put(json.dumps(config).encode()))
    index["manifests"][0].update(put(json.dumps(manifest).encode()))
    (source / "index.json").write_text(json.dumps(index))
    _assert_refused(capsys, out_dir, str(source), names=str(source), says="but the config's diff_id is sha256:000")


def test_hard_link_to_nothing(capsys, out_dir: Path, tmp_path: Path) -> None:
    layer = make_tar([(entry("a", "hardlink", link="missing"), None)])
    source = write_layout(tmp_path / "l", [{"layers": [("application/vnd.oci.image.layer.v1.tar", layer)]}])
    _assert_refused(capsys, out_dir, str(source), names=str(source), says="hard link 'a' -> 'missing': no such file")


def test_path_escaping_root(capsys, out_dir: Path, tmp_path: Path) -> None:
    layer = make_tar([(entry("../evil"), b"x")])
    source = write_layout(tmp_path / "l", [{"layers": [("application/vnd.oci.image.layer.v1.tar", layer)]}])
    _assert_refused(capsys, out_dir, str(source), names=str(source), says="escapes the root")


def test_native_sif_with_ext3_primary_partition(capsys, out_dir: Path, tmp_path: Path) -> None:
    sif = tmp_path / "ext3.sif"
    extra = partition_extra(FsType.EXT3, PartType.PRIMSYS, arch_code("amd64"))
    write_new(sif, [ObjectInput(DataType.PARTITION, bytes(8192), extra=extra)])
    _assert_refused(capsys, out_dir, str(sif), names=str(sif), says="primary system partition is not squashfs")


def test_native_sif_without_partition(capsys, out_dir: Path, vectors: Path) -> None:
    source = vectors / "sif" / "one-object-generic-json.sif"
    _assert_refused(capsys, out_dir, str(source), names=str(source), says="has no primary system partition")


def test_oci_sif_is_not_a_native_source(capsys, out_dir: Path, vectors: Path) -> None:
    source = vectors / "sif" / "one-object-oci-root-index.sif"
    _assert_refused(capsys, out_dir, str(source), names=str(source), says="already an OCI-SIF")


def test_not_a_sif_file(capsys, out_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.sif"
    junk.write_bytes(b"definitely not a SIF" * 20)
    _assert_refused(capsys, out_dir, str(junk), names=str(junk), says="bad magic")


def test_output_directory_missing(capsys, tmp_path: Path, layouts: Path) -> None:
    out = tmp_path / "nowhere" / "out.oci.sif"
    code, _, stderr = _run_cli(capsys, str(layouts / "whiteout-opaque"), str(out))
    assert code == 2 and "output directory does not exist" in stderr and str(out) in stderr
    assert not out.parent.exists()


def test_failed_import_keeps_existing_output(capsys, out_dir: Path, tmp_path: Path) -> None:
    out = out_dir / "out.oci.sif"
    out.write_bytes(b"previous image")
    code, _, _ = _run_cli(capsys, str(tmp_path / "missing"), str(out))
    assert code == 2
    assert out.read_bytes() == b"previous image"
    assert [p.name for p in out_dir.iterdir()] == ["out.oci.sif"]


def test_layer_that_is_not_a_tar(capsys, out_dir: Path, tmp_path: Path) -> None:
    garbage = gzip.compress(b"this is no tar archive at all" * 40, mtime=0)
    source = write_layout(tmp_path / "l", [{"layers": [("application/vnd.oci.image.layer.v1.tar+gzip", garbage)]}])
    _assert_refused(capsys, out_dir, str(source), names=str(source), says="is not a valid tar")


def test_layer_that_is_not_gzip(capsys, out_dir: Path, tmp_path: Path) -> None:
    broken = b"\x1f\x8b" + b"\x00" * 64  # gzip magic, then nonsense
    source = write_layout(tmp_path / "l", [{"layers": [("application/vnd.oci.image.layer.v1.tar+gzip", broken)]}])
    _assert_refused(capsys, out_dir, str(source), names=str(source), says="is not valid gzip")


def test_truncated_gzip_layer(capsys, out_dir: Path, tmp_path: Path) -> None:
    whole = gzip.compress(make_tar([(entry("f"), b"x" * 5000)]), mtime=0)
    source = write_layout(tmp_path / "l", [{"layers": [("application/vnd.oci.image.layer.v1.tar+gzip", whole[:60])]}])
    _assert_refused(capsys, out_dir, str(source), names=str(source), says="ends early")


# -- tars that end early, as `umoci insert` writes them ------------------------------------------------
def _unterminated(tar: bytes) -> bytes:
    """`tar` without its zero end-of-archive blocks and without the padding of its last
    member: what `umoci insert` stores (GNU tar and Go's archive/tar read it)."""
    end = len(tar)
    while tar[end - 512:end] == bytes(512):
        end -= 512
    while end > 0 and tar[end - 1] == 0:
        end -= 1
    return tar[:end]


LAST_DATA = b"the last member's data, not a multiple of 512 bytes\n" * 7


def _entries() -> list[tuple[object, bytes | None]]:
    return [(entry("etc", "dir", mode=0o755), None), (entry("etc/a"), b"first\n"), (entry("etc/b"), LAST_DATA)]


def _layer_digest(capsys: pytest.CaptureFixture[str], layout: Path, out: Path) -> str:
    assert main(["import", "--json", str(layout), str(out)]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    return str(report["layers"][0]["digest"])


@pytest.mark.parametrize("gzipped", [False, True])
def test_layer_without_end_blocks_imports_like_a_terminated_one(capsys, tmp_path: Path, gzipped: bool) -> None:
    full = make_tar(_entries())  # type: ignore[arg-type]
    short = _unterminated(full)
    assert len(short) % 512 != 0 and len(short) < len(full) - 1024
    media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzipped else "")
    pack = gzip.compress if gzipped else (lambda b: b)
    digests = []
    for name, tar in (("full", full), ("short", short)):
        layout = write_layout(tmp_path / name, [{"layers": [(media, pack(tar))]}])
        digests.append(_layer_digest(capsys, layout, tmp_path / f"{name}.oci.sif"))
    assert digests[0] == digests[1]  # the same squashfs: nothing was lost or added


def test_layer_cut_inside_member_data_is_refused(capsys, out_dir: Path, tmp_path: Path) -> None:
    short = _unterminated(make_tar(_entries()))  # type: ignore[arg-type]
    layout = write_layout(tmp_path / "cut", [{"layers": [("application/vnd.oci.image.layer.v1.tar", short[:-10])]}])
    line = _assert_refused(capsys, out_dir, str(layout), names=str(layout), says="is not a valid tar")
    assert "truncated in the data of 'etc/b'" in line


def test_layer_written_by_umoci_insert(capsys, out_dir: Path, tmp_path: Path) -> None:
    require_tool("umoci", "unsquashfs")
    layout = tmp_path / "umoci"
    for argv in (["init", "--layout", str(layout)], ["new", "--image", f"{layout}:t"]):
        subprocess.run(["umoci", *argv], check=True, capture_output=True)
    payload = tmp_path / "payload"
    (payload / "bin").mkdir(parents=True)
    (payload / "bin" / "tool").write_bytes(LAST_DATA * 3)
    subprocess.run(["umoci", "insert", "--image", f"{layout}:t", str(payload / "bin"), "/bin"], check=True,
                   capture_output=True)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]).read_bytes())
    tar = gzip.decompress(_blob(layout, manifest["layers"][0]["digest"]).read_bytes())
    assert len(tar) % 512 != 0  # this umoci stores its layers unterminated: the case under test
    out = out_dir / "umoci.oci.sif"
    assert main(["import", f"{layout}:t", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    from sifoverlay.ocisif import open_image

    with open_image(out) as img:
        layer = img.layers[0]
        squashfs = tmp_path / "layer.sqfs"
        squashfs.write_bytes(b"".join(img.sif.iter_chunks(layer.descriptor)))
    listing = subprocess.run(["unsquashfs", "-d", str(tmp_path / "x"), str(squashfs)], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert (tmp_path / "x" / "bin" / "tool").read_bytes() == LAST_DATA * 3
