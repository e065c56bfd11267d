"""`sifoverlay inspect [--json] IMAGE`: the SIF header and objects, and for an OCI-SIF
the selected image (manifest, config, layers with their SIF offsets, the overlay)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from sifoverlay.cli.output import add_json_flag, print_json

if TYPE_CHECKING:
    from sifoverlay.ocisif.model import OciSifImage
    from sifoverlay.sif.load import SifFile

HELP = "show the SIF header, objects and OCI image of IMAGE"


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "inspect",
        help=HELP,
        description=HELP + ". Works on native SIFs too (no OCI part). Read-only.",
    )
    parser.add_argument("image", metavar="IMAGE", help="SIF or OCI-SIF file")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = inspect_file(args.image)
    if args.json:
        print_json(report)
    else:
        sys.stdout.write(render_text(report))
    return 0


# -- building the report --------------------------------------------------------------------
def inspect_file(path: str) -> dict[str, Any]:
    """The whole report as plain data (what --json prints)."""
    from sifoverlay.ocisif import model
    from sifoverlay.sif.constants import DataType
    from sifoverlay.sif.load import SifFile

    with SifFile.open(path) as sif:
        report: dict[str, Any] = {
            "path": sif.path,
            "header": header_info(sif),
            "descriptors": [descriptor_info(d) for d in sif.used()],
            "oci": None,
            "oci_note": None,
        }
        if any(d.datatype == DataType.OCI_ROOT_INDEX for d in sif.used()):
            root = model.read_root_index(sif)
            for _ in model.iter_refs(sif):  # validates the whole graph even without an image
                pass
            if not model.select_image_entries(root.json):
                report["oci_note"] = "the root index lists no image"
            else:
                with model.open_image(sif) as image:
                    report["oci"] = oci_info(image)
        return report


def header_info(sif: SifFile) -> dict[str, Any]:
    h = sif.header
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
        "file_size": sif.stat.st_size,
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


def oci_info(image: OciSifImage) -> dict[str, Any]:
    overlay = image.overlay
    return {
        "manifest": image.manifest.digest,
        "manifest_media_type": image.manifest_entry.get("mediaType"),
        "config": image.config.digest,
        "config_media_type": image.manifest.json["config"].get("mediaType"),
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
        rows.append([str(d["id"]), kind, _none(d["group"]), link, str(d["offset"]), str(d["size"]), d["name"] or "-", detail])
    text = "\n".join(out) + "\n" + table(["ID", "TYPE", "GROUP", "LINK", "OFFSET", "SIZE", "NAME", "DIGEST / INFO"], rows)
    oci = report["oci"]
    if oci is None:
        text += "\n" + ("OCI:          " + report["oci_note"] + "\n" if report["oci_note"] else "OCI:          not an OCI-SIF\n")
        return text
    text += (
        f"\nManifest:     {oci['manifest']}   {oci['manifest_media_type']}\n"
        f"Config:       {oci['config']}   {oci['config_media_type']}\n\n"
    )
    layer_rows = [
        [str(i), layer["mediaType"], str(layer["offset"]), str(layer["size"]), layer["digest"]]
        for i, layer in enumerate(oci["layers"])
    ]
    text += table(["LAYER", "MEDIA TYPE", "OFFSET", "SIZE", "DIGEST"], layer_rows)
    overlay = oci["overlay"]
    if overlay is None:
        text += "\nOverlay:      none\n"
    else:
        state = "fingerprint recorded" if overlay["fingerprint"] is not None else "no fingerprint"
        where = f"ext3 at {overlay['offset']} ({overlay['size']} bytes)"
        text += f"\nOverlay:      {where}   recorded {overlay['digest']}   {state}\n"
    return text
