"""`sifoverlay inspect [--json] IMAGE`: the SIF header and objects, and for an OCI-SIF
every image its root index names (manifest, config, layers with their SIF offsets, the
overlay), as far as the file is valid.

A diagnostic verb: whatever the Go `siftool list` can list, inspect shows (exit 0); what
is wrong with the file goes into `warnings` (JSON) / `Warning:` lines (text) and into
the `error` of each invalid image. Only a file that is not a readable SIF at all (bad
magic or version, descriptor table outside the file) is an error (exit 2).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from sifoverlay.cli.output import add_json_flag, print_json, write_text

if TYPE_CHECKING:
    from sifoverlay.ocisif.model import OciSifImage, SurveyedImage
    from sifoverlay.sif.header import Header

HELP = "show the SIF header, objects and OCI image of IMAGE"
TEXT_LIMIT = 200  # characters of a crafted string value shown in the text form


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "inspect",
        help=HELP,
        description=HELP + ". Works on native SIFs too (no OCI part), on OCI-SIFs with several "
        "images and on damaged files (what is wrong is listed as warnings; exit 0). Read-only.",
    )
    parser.add_argument("image", metavar="IMAGE", help="SIF or OCI-SIF file")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = inspect_file(args.image)
    if args.json:
        print_json(report)
    else:
        write_text(render_text(report))
    return 0


# -- building the report --------------------------------------------------------------------
def inspect_file(path: str) -> dict[str, Any]:
    """The whole report as plain data (what --json prints)."""
    from sifoverlay.errors import SifFormatError
    from sifoverlay.ocisif import model
    from sifoverlay.sif.constants import DataType
    from sifoverlay.sif.load import SifFile

    try:
        sif = SifFile.open(path)
    except SifFormatError as exc:
        loose = read_loosely(path)
        if loose is None:
            raise
        header, descriptors, size = loose
        return {
            "path": path,
            "header": header_info(header, size),
            "descriptors": [descriptor_info(d) for d in descriptors],
            "oci": None,
            "images": [],
            "hint": None,
            "warnings": [f"{exc.problem}: the OCI part is not examined"],
        }
    with sif:
        report: dict[str, Any] = {
            "path": sif.path,
            "header": header_info(sif.header, sif.stat.st_size),
            "descriptors": [descriptor_info(d) for d in sif.used()],
            "oci": None,
            "images": [],
            "hint": None,
            "warnings": [],
        }
        if not any(d.datatype == DataType.OCI_ROOT_INDEX for d in sif.used()):
            report["hint"] = "not an OCI-SIF; " + model.NATIVE_HINT.format(path=path)
            return report
        found = model.survey(sif)
        report["warnings"] = list(found.warnings)
        for item in found.images:
            report["images"].append(image_info(item, selected=item is found.selected))
        if found.selected is not None and found.selected.image is not None:
            report["oci"] = oci_info(found.selected.image)
        return report


def read_loosely(path: str) -> tuple[Header, list[Any], int] | None:
    """Header and used descriptors the way Go's loader reads them (magic and version
    checked, the rest trusted), for a file our strict validation refuses; None when not
    even that works."""
    import os

    from sifoverlay.sif.constants import DESCRIPTOR_SIZE, HEADER_SIZE, MAGIC, VERSION
    from sifoverlay.sif.descriptor import DESCRIPTOR_STRUCT, Descriptor
    from sifoverlay.sif.header import Header

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = Header.unpack(handle.read(HEADER_SIZE))
            if header.magic != MAGIC or header.version != VERSION:
                return None
            total, offset = header.descriptors_total, header.descriptors_offset
            if total < 0 or offset < 0 or offset + total * DESCRIPTOR_SIZE > size:
                return None
            handle.seek(offset)
            table = handle.read(total * DESCRIPTOR_SIZE)
    except (OSError, ValueError):
        return None
    if len(table) != total * DESCRIPTOR_SIZE:
        return None
    descriptors = [Descriptor(*fields) for fields in DESCRIPTOR_STRUCT.iter_unpack(table)]
    return header, [d for d in descriptors if d.is_used], size


def header_info(h: Header, file_size: int) -> dict[str, Any]:
    return {
        "launch_script": h.launch_script_str,
        "version": h.version_str,
        "arch": h.arch_name,
        "id": str(h.uuid),
        "created_at": h.created_at,
        "modified_at": h.modified_at,
        "deterministic": h.is_deterministic,
        "descriptors_free": h.descriptors_free,
        "descriptors_total": h.descriptors_total,
        "descriptors_offset": h.descriptors_offset,
        "descriptors_size": h.descriptors_size,
        "data_offset": h.data_offset,
        "data_size": h.data_size,
        "file_size": file_size,
    }


def descriptor_info(desc: Any) -> dict[str, Any]:
    extra = {k: v for k, v in desc.extra_info().items() if k != "digest"}
    return {
        "id": desc.id,
        "datatype": desc.datatype,
        "datatype_name": desc.datatype_label,
        "group": desc.group or None,
        "link": desc.link or None,
        "link_is_group": desc.is_group_link and desc.link != 0,
        "offset": desc.offset,
        "size": desc.size,
        "size_with_padding": desc.size_with_padding,
        "created_at": desc.created_at,
        "modified_at": desc.modified_at,
        "name": desc.name_str,
        "digest": desc.digest,
        "extra": extra or None,
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def platform_text(entry: Any) -> str | None:
    """os/arch[/variant] of an index entry's platform, when it names one."""
    platform = entry.get("platform") if isinstance(entry, dict) else None
    if not isinstance(platform, dict):
        return None
    parts = [_text(platform.get(key)) or "" for key in ("os", "architecture", "variant")]
    return "/".join(p for p in parts if p) or None


def image_info(item: SurveyedImage, *, selected: bool) -> dict[str, Any]:
    """One image of the index: where it is listed, its manifest, and either its
    contents (`oci_info`) or why it is invalid."""
    from sifoverlay.ocisif.model import REF_NAME_ANNOTATION

    entry: dict[str, Any] = item.entry if isinstance(item.entry, dict) else {}
    found = entry.get("annotations")
    annotations: dict[str, Any] = found if isinstance(found, dict) else {}
    info: dict[str, Any] = {
        "position": list(item.position),
        "manifest": _text(entry.get("digest")),
        "manifest_media_type": _text(entry.get("mediaType")),
        "platform": platform_text(entry),
        "ref_name": _text(annotations.get(REF_NAME_ANNOTATION)),
        "selected": selected,
        "error": item.error,
    }
    if item.image is not None:
        info.update(oci_info(item.image))
    return info


def oci_info(image: OciSifImage) -> dict[str, Any]:
    overlay = image.overlay
    return {
        "manifest": image.manifest.digest,
        "manifest_media_type": _text(image.manifest_entry.get("mediaType")),
        "config": image.config.digest,
        "config_media_type": _text(image.manifest.json["config"].get("mediaType")),
        "root_index": image.root_index.digest,
        "layers": [
            {
                "mediaType": layer.media_type,
                "digest": layer.digest,
                "size": layer.size,
                "offset": layer.offset,
                "descriptor": layer.descriptor.id,
            }
            for layer in image.layers
        ],
        "overlay": None
        if overlay is None
        else {
            "offset": overlay.offset,
            "size": overlay.size,
            "digest": overlay.recorded_digest,
            "descriptor": overlay.descriptor.id,
            "fingerprint": overlay.fingerprint,
        },
    }


# -- human form -----------------------------------------------------------------------------------
def go_time(seconds: int) -> str:
    """UTC ISO time; Go's zero time (deterministic images) prints as year 0001."""
    import datetime as dt

    try:
        moment = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=seconds)
    except OverflowError:
        return str(seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ").rjust(20, "0")


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def _none(value: Any) -> str:
    return "-" if value is None else str(value)


def describe_extra(extra: dict[str, Any] | None) -> str:
    """siftool-like summary of type-specific metadata ("Squashfs/*System/amd64")."""
    if not extra:
        return "-"
    if "fs_type_name" in extra:
        return f"{extra['fs_type_name']}/{extra['part_type_name']}/{extra['arch']}"
    if "hash_type_name" in extra:
        return extra["hash_type_name"] + (f" {extra['entity']}" if extra.get("entity") else "")
    return " ".join(str(v) for k, v in extra.items() if k.endswith("_name") or k == "format_name")


def render_text(report: dict[str, Any]) -> str:
    h = report["header"]
    used = h["descriptors_total"] - h["descriptors_free"]
    out = [
        f"Image:        {report['path']}",
        f"SIF version:  {h['version']}   arch: {h['arch']}   id: {h['id']}"
        + ("   (deterministic)" if h["deterministic"] else ""),
        f"Created:      {go_time(h['created_at'])}   modified: {go_time(h['modified_at'])}",
        f"Descriptors:  {used} used, {h['descriptors_free']} free of {h['descriptors_total']}"
        f"   table at {h['descriptors_offset']} ({h['descriptors_size']} bytes)",
        f"Data:         at {h['data_offset']} ({h['data_size']} bytes)   file {h['file_size']} bytes",
        "",
    ]
    rows = []
    for d in report["descriptors"]:
        link = _none(d["link"]) + (" (G)" if d["link_is_group"] else "")
        detail = d["digest"] or describe_extra(d["extra"])
        kind = f"{d['datatype_name']} ({d['datatype']})"
        rows.append([str(d["id"]), kind, _none(d["group"]), link, str(d["offset"]), str(d["size"]), short(d["name"]) or "-", short(detail)])
    text = "\n".join(out) + "\n" + table(["ID", "TYPE", "GROUP", "LINK", "OFFSET", "SIZE", "NAME", "DIGEST / INFO"], rows)
    if report["hint"] is not None:
        text += f"\nOCI:          {report['hint']}\n"
    oci = report["oci"]
    if oci is not None:
        text += "\n" + image_text(oci)
    others = [item for item in report["images"] if not item["selected"]]
    if others:
        text += f"\nImages:       {len(report['images'])} in the OCI index\n"
    for item in others:
        text += "\n" + other_image_text(item)
    for warning in report["warnings"]:
        text += f"\nWarning:      {short(warning, 2 * TEXT_LIMIT)}"
    return text + ("\n" if report["warnings"] else "")


def short(value: Any, limit: int = TEXT_LIMIT) -> str:
    """A value of the file for the text form: one line, at most `limit` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def image_text(oci: dict[str, Any]) -> str:
    text = (
        f"Manifest:     {oci['manifest']}   {short(oci['manifest_media_type'])}\n"
        f"Config:       {oci['config']}   {short(oci['config_media_type'])}\n\n"
    )
    layer_rows = [
        [str(i), short(layer["mediaType"]), str(layer["offset"]), str(layer["size"]), layer["digest"]]
        for i, layer in enumerate(oci["layers"])
    ]
    text += table(["LAYER", "MEDIA TYPE", "OFFSET", "SIZE", "DIGEST"], layer_rows)
    overlay = oci["overlay"]
    if overlay is None:
        return text + "\nOverlay:      none\n"
    state = "fingerprint recorded" if overlay["fingerprint"] is not None else "no fingerprint"
    where = f"ext3 at {overlay['offset']} ({overlay['size']} bytes)"
    return text + f"\nOverlay:      {where}   recorded {overlay['digest']}   {state}\n"


def other_image_text(item: dict[str, Any]) -> str:
    """An image that is not the one the overlay verbs use: where it is listed, then its
    contents or why it is invalid."""
    names = [short(v) for v in (item["platform"], item["ref_name"]) if v]
    head = f"Image {'/'.join(map(str, item['position']))}:".ljust(14) + short(item["manifest"] or "-")
    head += "".join(f"   {n}" for n in names) + "\n"
    if item["error"] is not None:
        return head + f"Invalid:      {short(item['error'], 2 * TEXT_LIMIT)}\n"
    return head + image_text(item)
