"""Helpers shared by the sif tests: vector lists, byte patching, siftool output parsing."""

from __future__ import annotations

import datetime
import hashlib
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sifoverlay.sif import SifFile
from tests.conftest import SIF_IMAGES, VECTORS, conformance_glob, conformance_params, sif_reference_images

# Offsets of the int64 header fields (spec §1.1) and of descriptor fields (§1.2).
H_FREE, H_TOTAL, H_DOFF, H_DSIZE, H_DATAOFF, H_DATASIZE = 80, 88, 96, 104, 112, 120
D_TYPE, D_USED, D_ID, D_GROUP, D_LINK, D_OFFSET, D_SIZE, D_SWP = 0, 4, 5, 9, 13, 17, 25, 33


def sif_vectors() -> list[Path]:
    """Every SIF among the test data: the sylabs/sif reference images (Debian's, plus the
    newer ones of the conformance set), and the conformance set's singularity/*.sif and
    oci-sif/**/*.golden when it is present."""
    found = sif_reference_images() + conformance_glob("singularity/*.sif")
    found += conformance_glob("oci-sif/**/*.golden")
    return found


def sif_vector_params() -> list[object]:
    """sif_vectors() for parametrize, plus one skipped "conformance-set" parameter (with
    the reason) when the conformance set is absent."""
    return sif_vectors() + conformance_params([])


def vector_id(path: Path) -> str:
    """"sif/NAME.sif" for a reference image (wherever it was found), else the path in the set."""
    if path.parent in (SIF_IMAGES, VECTORS / "sif"):
        return f"sif/{path.name}"
    return str(path.relative_to(VECTORS))


def sha256_file(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def put_i64(data: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<q", data, offset, value)


def put_u32(data: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<I", data, offset, value)


def desc_base(data: bytes | bytearray, slot: int) -> int:
    """File offset of descriptor `slot` (reads the table offset from the header)."""
    (table,) = struct.unpack_from("<q", data, H_DOFF)
    return int(table) + slot * 585


@dataclass(frozen=True)
class ListRow:
    id: int
    group: int  # 0 = NONE
    link: int  # 0 = NONE
    link_is_group: bool
    start: int
    end: int
    type: str


_ROW = re.compile(r"^(\d+)\s*\|(\S+)\s*\|(NONE|\d+)\s*(\(G\))?\s*\|(\d+)-(\d+)\s*\|(.*)$")


def parse_siftool_list(text: str) -> list[ListRow]:
    """Rows of `siftool list` output (header and ruler lines skipped)."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if not m:
            continue
        ident, group, link, gflag, start, end, kind = m.groups()
        rows.append(
            ListRow(
                int(ident),
                0 if group == "NONE" else int(group),
                0 if link == "NONE" else int(link),
                gflag is not None,
                int(start),
                int(end),
                kind.strip(),
            )
        )
    return rows


def rows_from_sif(path: Path | str) -> list[ListRow]:
    """What siftool list should print for `path`, from our reader (type column aside)."""
    with SifFile.open(path) as sif:
        return [
            ListRow(d.id, d.group, d.link, d.is_group_link and d.link != 0, d.offset, d.end, "")
            for d in sif.used()
        ]


def siftool_rows(siftool: str, path: Path | str) -> list[ListRow]:
    out = subprocess.run([siftool, "list", str(path)], capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    return parse_siftool_list(out.stdout)


def strip_type(rows: list[ListRow]) -> list[ListRow]:
    return [ListRow(r.id, r.group, r.link, r.link_is_group, r.start, r.end, "") for r in rows]


def parse_key_values(text: str) -> dict[str, str]:
    """`Key:   value` lines of siftool header/info output."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


HEADER_GOLDENS = {
    "Empty": "empty.sif",
    "EmptyID": "empty-id.sif",
    "EmptyLaunchScript": "empty-launch-script.sif",
    "OneGroup": "one-group.sif",
    "OneGroupSigned": "one-group-signed.sif",  # Debian 12's sylabs/sif 2.8 (PGP)
    "OneGroupSignedLegacy": "one-group-signed-legacy.sif",
    "OneGroupSignedLegacyAll": "one-group-signed-legacy-all.sif",
    "OneGroupSignedLegacyGroup": "one-group-signed-legacy-group.sif",
    "OneGroupSignedPGP": "one-group-signed-pgp.sif",
    "OneObjectCryptMessage": "one-object-crypt-message.sif",
    "OneObjectGenericJSON": "one-object-generic-json.sif",
    "OneObjectOCIBlob": "one-object-oci-blob.sif",
    "OneObjectOCIRootIndex": "one-object-oci-root-index.sif",
    "OneObjectSBOM": "one-object-sbom.sif",
    "OneObjectTime": "one-object-time.sif",
    "TwoGroups": "two-groups.sif",
    "TwoGroupsSigned": "two-groups-signed.sif",  # Debian 12's sylabs/sif 2.8 (PGP)
    "TwoGroupsSignedLegacy": "two-groups-signed-legacy.sif",
    "TwoGroupsSignedLegacyAll": "two-groups-signed-legacy-all.sif",
    "TwoGroupsSignedLegacyGroup": "two-groups-signed-legacy-group.sif",
    "TwoGroupsSignedPGP": "two-groups-signed-pgp.sif",
}


def go_time(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def mask_times(raw: bytes) -> bytes:
    """Blank header ModifiedAt and every descriptor's CreatedAt/ModifiedAt."""
    data = bytearray(raw)
    data[72:80] = bytes(8)
    total, table = struct.unpack_from("<qq", data, 88)
    for slot in range(total):
        base = table + slot * 585
        data[base + 41 : base + 57] = bytes(16)
    return bytes(data)


# Cases run by test_fuzz.py; printed by the terminal summary hook in conftest.py.
FUZZ_COUNTS: dict[str, int] = {"sif": 0, "sif_accepted": 0, "ocisif": 0, "ocisif_accepted": 0}
