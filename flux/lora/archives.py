"""A LoRA download unpacked to its one .safetensors file: itself, or the one in its .tar (any compression) or .zip.

An archive is read as a stream, one member at a time, and refused while it is read: more than MAX_MEMBERS members, more
than `max_bytes` of content (counted as it really unpacks, not as the archive announces it), a path out of the
folder, a link or special file, no .safetensors or several. A zip of a pickle (torch.save) is refused as a pickle; a
file that is not a safetensors file is named for what it is (a web page, a zip, a pickle).

What the parsers hold in memory before any content is bounded too (LoraSettings.max_header_bytes): a tar's long-name
and PAX headers are counted from their own headers before tarfile reads them (GNU sparse files, whose maps tarfile
reads without a bound, are refused), a zip's central directory is sized and its entries counted from its end record
before zipfile parses it, and a safetensors header is sized from its first 8 bytes before it is parsed; its tensors
are counted (LoraSettings.max_tensors) before any layout conversion reads them.
"""

from __future__ import annotations

import logging
import lzma
import math
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .. import download as dl
from ..errors import UserError
from ..progress import human_bytes
from ..settings import LoraSettings
from ..tarstream import member_problem
from . import PICKLE_SUFFIXES, SAFETENSORS, LoraError, listing, pickle_message, short

log = logging.getLogger(__name__)

# An archive of a LoRA holds the LoRA and a few files beside it (a trainer's config, sample images): more members
# than this is refused while reading, before the time it would take to go through them.
MAX_MEMBERS = 1000


def as_safetensors(raw: Path, folder: Path, shown: str, settings: LoraSettings) -> Path:
    """The one .safetensors file a download holds (itself, or the one in its .tar or .zip, unpacking to at most
    settings.max_bytes), checked to be one within the header and tensor limits."""
    path = raw
    if _is_tar(raw, shown, settings.max_header_bytes):
        path = _from_tar(raw, folder / "lora.safetensors", shown, settings)
    elif zipfile.is_zipfile(raw):
        path = _from_zip(raw, folder / "lora.safetensors", shown, settings)
    if path != raw:
        raw.unlink()
    _check_safetensors(path, shown, settings)
    return path


def _counted_headers(shown: str, limit: int) -> type[tarfile.TarInfo]:
    """A TarInfo class for one archive that counts its long-name and PAX headers before tarfile reads them whole,
    refusing them past `limit` bytes together, and refuses GNU sparse members (tarfile reads their maps unbounded)."""
    held = 0

    class Counted(tarfile.TarInfo):
        # _proc_member is where tarfile reads what follows a header; it has no public hook (tarfile takes a TarInfo
        # class, `tarinfo=`, for exactly this kind of extension).
        def _proc_member(self, tar):
            nonlocal held
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise LoraError(f"{shown}: the archive holds a sparse file ({short(self.name)!r}); refusing to read "
                                "it.")
            if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                             tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
                held += self.size
                if held > limit:
                    raise LoraError(f"{shown}: the .tar archive's long-name and PAX headers come to more than "
                                    f"{human_bytes(limit)}, the limit on a LoRA file's headers "
                                    "(FLUX_LORA_MAX_HEADER_BYTES). Send the .safetensors file itself.")
            return super()._proc_member(tar)

    return Counted


def _is_tar(path: Path, shown: str, header_limit: int) -> bool:
    """Whether path is a tar of any compression tarfile reads, its first header read within the header limit."""
    try:
        with tarfile.open(path, mode="r|*", tarinfo=_counted_headers(shown, header_limit)):
            return True
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError):  # not a tar, or a compressed non-tar
        return False


def _from_tar(raw: Path, dest: Path, shown: str, settings: LoraSettings) -> Path:
    """The archive read as a stream, one member at a time: at most MAX_MEMBERS members, settings.max_bytes of content
    (counted from each member's header before its content is read) and settings.max_header_bytes of long-name and
    PAX headers; the one .safetensors written to dest."""
    names, found, total, max_bytes = [], [], 0, settings.max_bytes
    try:
        with tarfile.open(raw, mode="r|*", tarinfo=_counted_headers(shown, settings.max_header_bytes)) as tar:
            for member in tar:
                if len(names) == MAX_MEMBERS:
                    raise LoraError(_too_many(shown, "tar"))
                problem = member_problem(member.name, member.isfile() or member.isdir(), short)
                if problem:
                    raise LoraError(f"{shown}: the archive {problem}; refusing to read it.")
                total += member.size
                if total > max_bytes:
                    raise LoraError(_too_big(shown, max_bytes))
                names.append(member.name)
                if member.isfile() and member.name.endswith(SAFETENSORS):
                    found.append(member.name)
                    if len(found) == 1:
                        _copy(tar.extractfile(member), dest, shown, max_bytes)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        log.info("lora: %s: reading the tar archive failed (%s)", shown, type(exc).__name__)
        raise LoraError(f"{shown}: the .tar archive is damaged or truncated: check the file.") from None
    except OSError as exc:
        if exc.errno is not None:  # the disk, not the archive
            raise
        raise LoraError(f"{shown}: the .tar archive is damaged or truncated: check the file.") from None
    return _the_one(shown, names, found, dest)


def _from_zip(raw: Path, dest: Path, shown: str, settings: LoraSettings) -> Path:
    """A zip read like a tar: at most MAX_MEMBERS members and a central directory of at most
    settings.max_header_bytes (both read from its end record before the directory is parsed), settings.max_bytes of
    content (counted as it is unpacked, not as the zip announces it); the one .safetensors written to dest. A zip of
    a pickle (torch.save) is refused as one."""
    _check_zip_directory(raw, shown, settings.max_header_bytes)
    max_bytes = settings.max_bytes
    try:
        with zipfile.ZipFile(raw) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise LoraError(_too_many(shown, "zip"))
            for member in members:
                problem = member_problem(member.filename, (member.external_attr >> 28) != 0o12, short)  # not a symlink
                if problem:
                    raise LoraError(f"{shown}: the zip archive {problem}; refusing to read it.")
            names = [m.filename for m in members]
            found = [m for m in members if not m.is_dir() and m.filename.endswith(SAFETENSORS)]
            if not found and any(PurePosixPath(n).name == "data.pkl" for n in names):
                raise LoraError(pickle_message(shown))
            if len(found) == 1:
                with archive.open(found[0]) as source:
                    _copy(source, dest, shown, max_bytes)
    except UserError:
        raise
    except zipfile.BadZipFile:
        raise LoraError(f"{shown}: the .zip archive is damaged or truncated: check the file.") from None
    except (zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        log.info("lora: %s: reading the zip archive failed (%s)", shown, type(exc).__name__)
        raise LoraError(f"{shown}: the .zip archive is damaged, encrypted or compressed in a way this loader does "
                        "not read: use a .safetensors file or a plain .zip.") from None
    return _the_one(shown, names, [m.filename for m in found], dest)


def _check_zip_directory(raw: Path, shown: str, limit: int) -> None:
    """The entry count and directory size a zip's end record (zip64's too) declares, checked before zipfile reads
    and parses the directory: zipfile holds all of it, and an object per entry, before a caller could count them."""
    with open(raw, "rb") as fh:
        # zipfile has no public reader of the end record alone; _EndRecData is what ZipFile itself reads first.
        end = zipfile._EndRecData(fh)
    if end is None:
        return  # no end record: ZipFile refuses it as damaged
    if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_MEMBERS:
        raise LoraError(_too_many(shown, "zip"))
    if end[zipfile._ECD_SIZE] > limit:
        raise LoraError(f"{shown}: the zip archive's directory is {human_bytes(end[zipfile._ECD_SIZE])}, over the "
                        f"{human_bytes(limit)} limit on a LoRA file's headers (FLUX_LORA_MAX_HEADER_BYTES). Send the "
                        ".safetensors file itself.")


def _the_one(shown: str, names: list[str], found: list[str], dest: Path) -> Path:
    if not found:
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        raise LoraError(f"{shown}: the archive holds no .safetensors file (it holds: {listing(names)})"
                        + (". Pickle files are never loaded." if pickles else "."))
    if len(found) > 1:
        raise LoraError(f"{shown}: the archive holds several .safetensors files ({listing(found)}); expected one LoRA.")
    return dest


def _copy(source, dest: Path, shown: str, limit: int) -> None:
    """Unpack one member, stopping at `limit` bytes of what it really unpacks to."""
    written = 0
    with open(dest, "wb") as out:
        while chunk := source.read(dl.MiB):
            written += len(chunk)
            if written > limit:
                raise LoraError(_too_big(shown, limit))
            out.write(chunk)


def _too_many(shown: str, kind: str) -> str:
    return (f"{shown}: the {kind} archive holds more than {MAX_MEMBERS:,} files; a LoRA's archive holds the "
            ".safetensors file and a few files beside it. Send the .safetensors file itself.")


def _too_big(shown: str, max_bytes: int) -> str:
    return (f"{shown}: the archive unpacks to more than {human_bytes(max_bytes)}, the LoRA size limit "
            "(FLUX_LORA_MAX_BYTES). Send the .safetensors file itself.")


def _check_safetensors(path: Path, shown: str, settings: LoraSettings) -> None:
    """A safetensors file with at least one tensor, at most settings.max_tensors, and a header of at most
    settings.max_header_bytes (read from its first 8 bytes before safetensors parses it); anything else is named for
    what it is."""
    from safetensors import SafetensorError, safe_open

    with open(path, "rb") as fh:
        head = fh.read(64)
        header_bytes = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if header_bytes > settings.max_header_bytes and head[8:9] == b"{":
            raise LoraError(f"{shown}: its safetensors header is {human_bytes(header_bytes)}, over the "
                            f"{human_bytes(settings.max_header_bytes)} limit on a LoRA file's headers "
                            "(FLUX_LORA_MAX_HEADER_BYTES).")
        fh.seek(8)
        header = fh.read(header_bytes) if header_bytes <= settings.max_header_bytes else b""
    # Every tensor's entry names its data_offsets: counted in the header's bytes, before safetensors makes an object
    # of each (seconds for 200,000; its list of names alone takes longer than the count).
    listed = header.count(b'"data_offsets"')
    if listed > settings.max_tensors:
        raise LoraError(f"{shown}: its header lists {listed:,} tensors, over the {settings.max_tensors:,} limit "
                        "(FLUX_LORA_MAX_TENSORS); a FLUX LoRA holds a few thousand.")
    as_float32 = _float32_bytes(header)
    if as_float32 is not None and as_float32 > settings.max_float32_bytes:
        raise LoraError(f"{shown}: its numbers take {human_bytes(as_float32)} once read in float32 (every factor is "
                        f"read in float32 before it is checked), over the {human_bytes(settings.max_float32_bytes)} "
                        "limit (FLUX_LORA_MAX_FLOAT32_BYTES). Use a LoRA of a lower rank.")
    if header_bytes <= settings.max_header_bytes:
        try:
            with safe_open(path, "pt") as f:
                if not f.keys():
                    raise LoraError(f"{shown} is an empty safetensors file.")
            return
        except (SafetensorError, OSError, ValueError):
            pass
    if head.lstrip()[:1] == b"<":
        raise LoraError(f"{shown} is a web page, not a safetensors file: use the file's direct download URL.")
    if head[:4] == b"PK\x03\x04":
        raise LoraError(f"{shown} is a .zip archive that cannot be read (damaged or truncated); a torch checkpoint "
                        "(.pt/.ckpt, a zip of a pickle) is never loaded either. Use the LoRA's .safetensors file.")
    if head[:1] == b"\x80":
        raise LoraError(pickle_message(shown))
    raise LoraError(f"{shown} is not a safetensors file (or it is truncated): check the URL.")


def _float32_bytes(header: bytes) -> int | None:
    """The bytes a safetensors file's tensors take in float32 (the dtype formats.py reads every factor in), from the
    shapes its header lists (already bounded in size and count); None when the header is not valid JSON of tensors
    (safetensors then says what is wrong)."""
    import json

    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entries, dict):
        return None
    total = 0
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            return None
        total += 4 * math.prod(shape)
    return total
