"""safe_extract: good archives round-trip; malicious ones are refused, naming the member, and leave nothing."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from hnclip.data.archive import (
    ArchiveFormatError,
    UnsafeArchiveError,
    extraction_marker_path,
    safe_extract,
    verify_extraction,
)

GOOD_FILES = {
    "data/a.txt": b"alpha\n",
    "data/nested/b.bin": bytes(range(256)) * 40,
    "top.json": b'{"k": 1}',
}


def make_zip(path: Path, members: dict[str, bytes], *, symlinks: dict[str, str] | None = None,
             special: dict[str, int] | None = None) -> Path:
    """A zip with regular members, Unix symlinks (name -> target) and members of other file types."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so the mode bits in external_attr mean something
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
        for name, file_type in (special or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (file_type | 0o644) << 16
            zf.writestr(info, b"")
    return path


def tar_member(name: str, *, data: bytes | None = None, kind: bytes = tarfile.REGTYPE,
               linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    if data is not None:
        info.size = len(data)
    return info, data


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def leftovers(parent: Path) -> list[str]:
    """Staging folders safe_extract might have left beside the destination."""
    return [p.name for p in parent.iterdir() if ".extracting-" in p.name]


def test_zip_round_trip_writes_every_file_and_a_marker(tmp_path):
    archive = make_zip(tmp_path / "good.zip", GOOD_FILES)
    dest = tmp_path / "out" / "dest"

    extracted = safe_extract(archive, dest)

    assert {p.relative_to(dest).as_posix() for p in extracted} == set(GOOD_FILES)
    for name, data in GOOD_FILES.items():
        assert (dest / name).read_bytes() == data
    marker = json.loads(extraction_marker_path(archive, dest).read_text())
    assert marker["archive"] == "good.zip"
    assert marker["files"] == {name: len(data) for name, data in GOOD_FILES.items()}
    assert verify_extraction(archive, dest) == []
    assert leftovers(dest.parent) == []


def test_tar_gz_round_trip_keeps_internal_links(tmp_path):
    archive = make_tar(tmp_path / "good.tar.gz", [
        tar_member("pkg", kind=tarfile.DIRTYPE),
        tar_member("pkg/real.txt", data=b"payload"),
        tar_member("pkg/sym.txt", kind=tarfile.SYMTYPE, linkname="real.txt"),
        tar_member("pkg/hard.txt", kind=tarfile.LNKTYPE, linkname="pkg/real.txt"),
    ])
    dest = tmp_path / "dest"

    safe_extract(archive, dest)

    assert (dest / "pkg/real.txt").read_bytes() == b"payload"
    assert os.readlink(dest / "pkg/sym.txt") == "real.txt"
    assert (dest / "pkg/sym.txt").read_bytes() == b"payload"
    assert os.stat(dest / "pkg/hard.txt").st_ino == os.stat(dest / "pkg/real.txt").st_ino
    marker = json.loads(extraction_marker_path(archive, dest).read_text())
    assert marker["symlinks"] == {"pkg/sym.txt": "real.txt"}
    assert marker["files"] == {"pkg/real.txt": 7, "pkg/hard.txt": 7}


def test_two_archives_share_one_destination(tmp_path):
    """GQA's images.zip and sceneGraphs.zip both extract into raw/gqa; neither may erase the other."""
    images = make_zip(tmp_path / "images.zip", {"images/1.jpg": b"jpg"})
    graphs = make_zip(tmp_path / "sceneGraphs.zip", {"train_sceneGraphs.json": b"{}"})
    dest = tmp_path / "gqa"
    dest.mkdir()
    (dest / "users_note.txt").write_text("keep me")

    safe_extract(images, dest)
    safe_extract(graphs, dest)

    assert (dest / "images/1.jpg").read_bytes() == b"jpg"
    assert (dest / "train_sceneGraphs.json").read_bytes() == b"{}"
    assert (dest / "users_note.txt").read_text() == "keep me"
    assert verify_extraction(images, dest) == [] and verify_extraction(graphs, dest) == []


def test_reextraction_replaces_a_damaged_top_level_entry(tmp_path):
    archive = make_zip(tmp_path / "a.zip", GOOD_FILES)
    dest = tmp_path / "dest"
    safe_extract(archive, dest)
    (dest / "data/a.txt").write_bytes(b"truncated")
    (dest / "data/stray.tmp").write_bytes(b"x")

    problems = verify_extraction(archive, dest)
    assert problems == [f"{dest / 'data/a.txt'} has 9 bytes, 6 were extracted"]

    safe_extract(archive, dest)
    assert (dest / "data/a.txt").read_bytes() == b"alpha\n"
    assert not (dest / "data/stray.tmp").exists()
    assert verify_extraction(archive, dest) == []


def test_verify_extraction_reports_missing_marker_and_missing_files(tmp_path):
    archive = make_zip(tmp_path / "a.zip", GOOD_FILES)
    dest = tmp_path / "dest"
    assert verify_extraction(archive, dest) == [f"extraction marker {extraction_marker_path(archive, dest)} is missing"]
    safe_extract(archive, dest)
    (dest / "top.json").unlink()
    assert verify_extraction(archive, dest) == [f"{dest / 'top.json'} is missing"]



def assert_refused_leaving_nothing(archive: Path, dest: Path, member: str, reason: str) -> None:
    """Extraction refuses ``member`` for ``reason``, naming it, and leaves neither the destination nor staging."""
    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(archive, dest)

    assert caught.value.member == member
    assert repr(member) in str(caught.value) and reason in str(caught.value)
    assert not dest.exists()
    assert leftovers(dest.parent) == []

MALICIOUS_ZIPS = {
    "dotdot": (dict(members={"../evil.txt": b"x"}), "../evil.txt", "'..' path component"),
    "nested_dotdot": (dict(members={"ok/../../evil.txt": b"x"}), "ok/../../evil.txt", "'..' path component"),
    "absolute": (dict(members={"/tmp/hnclip-evil.txt": b"x"}), "/tmp/hnclip-evil.txt", "absolute path"),
    "symlink_out": (dict(members={}, symlinks={"etc": "/etc"}), "etc", "symlink to an absolute path"),
    "relative_symlink_out": (dict(members={}, symlinks={"up": "../.."}), "up", "symlink pointing outside"),
    "link_chain": (dict(members={"x/": b""}, symlinks={"x/y": "..", "x/y/z": ".."}), "x/y/z",
                   "symlink pointing outside"),
    "char_device": (dict(members={}, special={"dev/tty0": stat.S_IFCHR}), "dev/tty0", "special file"),
    "fifo": (dict(members={}, special={"pipe": stat.S_IFIFO}), "pipe", "special file"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS_ZIPS))
def test_malicious_zip_is_refused_naming_the_member(tmp_path, case):
    spec, member, reason = MALICIOUS_ZIPS[case]
    # A harmless member first: it must not survive the refusal (extraction is all or nothing).
    archive = make_zip(tmp_path / f"{case}.zip", {"harmless.txt": b"ok", **spec["members"]},
                       symlinks=spec.get("symlinks"), special=spec.get("special"))
    dest = tmp_path / "work" / "dest"

    assert_refused_leaving_nothing(archive, dest, member, reason)
    assert not (tmp_path / "work" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/hnclip-evil.txt").exists()


MALICIOUS_TARS = {
    "dotdot": ([tar_member("../evil.txt", data=b"x")], "../evil.txt", "'..' path component"),
    "absolute": ([tar_member("/tmp/hnclip-evil.txt", data=b"x")], "/tmp/hnclip-evil.txt", "absolute path"),
    "symlink_to_etc": ([tar_member("etc", kind=tarfile.SYMTYPE, linkname="/etc")], "etc",
                       "symlink to an absolute path"),
    "relative_symlink_out": ([tar_member("a/up", kind=tarfile.SYMTYPE, linkname="../../..")], "a/up",
                             "symlink pointing outside"),
    "hardlink_absolute": ([tar_member("passwd", kind=tarfile.LNKTYPE, linkname="/etc/passwd")], "passwd",
                          "hard link to /etc/passwd"),
    "hardlink_dotdot": ([tar_member("sneaky", kind=tarfile.LNKTYPE, linkname="../outside.txt")], "sneaky",
                        "hard link to ../outside.txt"),
    "char_device": ([tar_member("dev/null0", kind=tarfile.CHRTYPE)], "dev/null0", "character device"),
    "block_device": ([tar_member("dev/sda0", kind=tarfile.BLKTYPE)], "dev/sda0", "block device"),
    "fifo": ([tar_member("pipe", kind=tarfile.FIFOTYPE)], "pipe", "FIFO"),
    # Each link alone stays inside by string arithmetic (x/y/.. = x); only resolving the real
    # filesystem shows that x/y is the root, so x/y/z -> .. is the root's parent.
    "link_chain": ([tar_member("x", kind=tarfile.DIRTYPE),
                    tar_member("x/y", kind=tarfile.SYMTYPE, linkname=".."),
                    tar_member("x/y/z", kind=tarfile.SYMTYPE, linkname="..")], "x/y/z",
                   "symlink pointing outside"),
    # A link that stays inside, then a file written through a link that leaves: refused at the file.
    "write_through_link": ([tar_member("d", kind=tarfile.DIRTYPE),
                            tar_member("d/self", kind=tarfile.SYMTYPE, linkname="."),
                            tar_member("d/self/../../evil.txt", data=b"x")], "d/self/../../evil.txt",
                           "'..' path component"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS_TARS))
def test_malicious_tar_is_refused_naming_the_member(tmp_path, case):
    members, member, reason = MALICIOUS_TARS[case]
    (tmp_path / "outside.txt").write_text("precious")
    archive = make_tar(tmp_path / f"{case}.tar.gz", [tar_member("harmless.txt", data=b"ok"), *members])
    dest = tmp_path / "work" / "dest"

    assert_refused_leaving_nothing(archive, dest, member, reason)
    assert (tmp_path / "outside.txt").read_text() == "precious"
    assert not (tmp_path / "work" / "evil.txt").exists()
    assert not Path("/tmp/hnclip-evil.txt").exists()


def test_refusal_keeps_an_existing_destination_untouched(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    archive = make_tar(tmp_path / "bad.tar.gz", [tar_member("old.txt", data=b"new"),
                                                  tar_member("../evil.txt", data=b"x")])
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]
    assert (dest / "old.txt").read_text() == "old"


def test_a_file_that_is_no_archive_is_refused(tmp_path):
    html = tmp_path / "download.zip"
    html.write_bytes(b"<html>Google Drive can't scan this file for viruses</html>")
    with pytest.raises(ArchiveFormatError, match="download.zip is neither a zip nor a tar"):
        safe_extract(html, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
