"""download / load_manifest / fetch_manifest_entry against a loopback HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from hnclip.data import download as dl
from hnclip.data.archive import extraction_marker_path
from hnclip.data.download import (
    ChecksumMismatchError,
    DownloadError,
    HTTPStatusError,
    SizeMismatchError,
    download,
    read_sidecar,
    sidecar_path,
)
from hnclip.data.lock import LockError, PinnedFileMismatchError, RevisionChangedError, is_commit_hash
from hnclip.data.manifest import (
    ManifestError,
    ManualDownloadRequired,
    MissingOutputError,
    fetch_manifest_entry,
    fetch_record_path,
    load_manifest,
)

REPO = Path(__file__).resolve().parents[2]
PAYLOAD = bytes((i * 7919) % 251 for i in range(300_000))  # not a repeating block: offsets matter
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
FAST = dict(retries=3, backoff=0.001, timeout=10)


# ------------------------------------------------------------------------------ the loopback server
@dataclass
class Route:
    body: bytes
    honour_range: bool = True
    cut_first_after: int | None = None  # first response: close the connection after this many bytes
    fail_first: list[int] = field(default_factory=list)  # statuses answered before the real response
    redirect_to: str | None = None  # answer 302 to this path, as the Hub's resolve URLs do
    etag: str | None = None  # sent as ETag; an If-Range naming another one gets the whole body (200)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every answer (the Hub's X-Repo-Commit)
    served: int = 0


class LoopbackServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.if_ranges: list[str | None] = []  # If-Range header of each request
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.state = self
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path: str, body: bytes, **behaviour) -> str:
        self.routes[path] = Route(body, **behaviour)
        return self.base_url + path

    def ranges(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        state: LoopbackServer = self.server.state
        state.requests.append((f"HEAD {self.path}", None))
        route = state.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        for key, value in route.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(route.body)))
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state: LoopbackServer = self.server.state
        range_header = self.headers.get("Range")
        state.requests.append((self.path, range_header))
        state.if_ranges.append(self.headers.get("If-Range"))
        route = state.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        if route.fail_first:
            self.send_error(route.fail_first.pop(0))
            return
        if route.redirect_to:
            self.send_response(302)
            self.send_header("Location", route.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_body(route, range_header)

    def _send_body(self, route: Route, range_header: str | None) -> None:
        start = 0
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range != route.etag:
            range_header = None  # the client's partial copy is of another version
        if range_header and route.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(route.body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(route.body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}")
        else:
            self.send_response(200)
        payload = route.body[start:]
        if route.etag:
            self.send_header("ETag", route.etag)
        for key, value in route.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        route.served += 1
        if route.cut_first_after is not None and route.served == 1:
            payload = payload[: route.cut_first_after]  # then the connection closes (HTTP/1.0)
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any connection to an address other than 127.0.0.1 fails the test instead of leaving the machine."""
    real_create_connection = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"test tried to connect to {address}"
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


@pytest.fixture
def server():
    srv = LoopbackServer()
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def sleeps(monkeypatch):
    delays: list[float] = []
    monkeypatch.setattr(dl, "_sleep", delays.append)
    return delays


# ---------------------------------------------------------------------------------------- download
def test_plain_download_verifies_and_records_sha256(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "sub" / "data.bin"

    assert download(url, dest, sha256=PAYLOAD_SHA256, size=len(PAYLOAD), **FAST) == dest

    assert dest.read_bytes() == PAYLOAD
    assert sidecar_path(dest).read_text() == f"{PAYLOAD_SHA256}  data.bin\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.bin", "data.bin.sha256"]
    assert server.ranges("/data.bin") == [None]


def test_unknown_checksum_is_computed_and_recorded(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    dest = download(url, tmp_path / "data.bin", **FAST)
    assert read_sidecar(dest) == hashlib.sha256(dest.read_bytes()).hexdigest() == PAYLOAD_SHA256


def test_transfer_cut_halfway_resumes_with_a_range_request(server, tmp_path, sleeps):
    cut = 123_457
    url = server.serve("/data.bin", PAYLOAD, cut_first_after=cut)

    dest = download(url, tmp_path / "data.bin", sha256=PAYLOAD_SHA256, size=len(PAYLOAD), **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/data.bin") == [None, f"bytes={cut}-"]
    assert sleeps == [FAST["backoff"]]


def test_resume_without_known_size_still_resumes(server, tmp_path, sleeps):
    cut = 1000
    url = server.serve("/data.bin", PAYLOAD, cut_first_after=cut)
    dest = download(url, tmp_path / "data.bin", **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/data.bin") == [None, f"bytes={cut}-"]


def test_part_left_by_an_earlier_run_is_resumed(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD[:5000])

    download(url, dest, sha256=PAYLOAD_SHA256, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/data.bin") == ["bytes=5000-"]


def test_resume_asks_for_the_same_version_with_if_range(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD, cut_first_after=2000, etag='"v1"')
    dest = download(url, tmp_path / "data.bin", **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/data.bin") == [None, "bytes=2000-"]
    assert server.if_ranges == [None, '"v1"']
    assert not (tmp_path / "data.bin.part.json").exists()


def test_part_of_an_older_version_is_not_glued_to_the_new_one(server, tmp_path):
    """No checksum known, remote file replaced since the part began: If-Range makes the server resend all."""
    new_body = PAYLOAD[::-1]
    url = server.serve("/data.bin", new_body, etag='"v2"')
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD[:5000])
    dest.with_name("data.bin.part.json").write_text(json.dumps({"url": url, "validator": '"v1"'}))

    download(url, dest, **FAST)

    assert dest.read_bytes() == new_body
    assert server.if_ranges == ['"v1"']


def test_part_begun_from_another_url_is_discarded(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(b"from a mirror")
    dest.with_name("data.bin.part.json").write_text(json.dumps({"url": "http://127.0.0.1:1/old", "validator": None}))

    download(url, dest, sha256=PAYLOAD_SHA256, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/data.bin") == [None]


def test_resume_survives_a_redirect(server, tmp_path):
    """Hub resolve URLs redirect to a CDN: the Range header must reach the final server."""
    server.serve("/cdn/blob", PAYLOAD, cut_first_after=777)
    url = server.serve("/resolve/file", b"", redirect_to="/cdn/blob")
    dest = download(url, tmp_path / "file", sha256=PAYLOAD_SHA256, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/resolve/file") == [None, "bytes=777-"]
    assert server.ranges("/cdn/blob") == [None, "bytes=777-"]


def test_complete_part_of_unknown_size_is_accepted_on_http_416(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD)

    download(url, dest, sha256=PAYLOAD_SHA256, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert server.ranges("/data.bin") == [f"bytes={len(PAYLOAD)}-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, sleeps):
    cut = 100_000
    url = server.serve("/data.bin", PAYLOAD, honour_range=False, cut_first_after=cut)

    dest = download(url, tmp_path / "data.bin", sha256=PAYLOAD_SHA256, size=len(PAYLOAD), **FAST)

    # The second request asked to resume, got a 200 with the whole body, and did not append it to the
    # first 100 000 bytes.
    assert server.ranges("/data.bin") == [None, f"bytes={cut}-"]
    assert dest.read_bytes() == PAYLOAD


def test_corrupted_payload_raises_and_leaves_no_file(server, tmp_path):
    corrupted = bytearray(PAYLOAD)
    corrupted[150_000] ^= 0xFF
    corrupted_sha256 = hashlib.sha256(corrupted).hexdigest()
    url = server.serve("/data.bin", bytes(corrupted))
    dest = tmp_path / "data.bin"

    with pytest.raises(ChecksumMismatchError) as caught:
        download(url, dest, sha256=PAYLOAD_SHA256, **FAST)

    message = str(caught.value)
    assert url in message and PAYLOAD_SHA256 in message and corrupted_sha256 in message
    assert (caught.value.expected, caught.value.actual) == (PAYLOAD_SHA256, corrupted_sha256)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert server.ranges("/data.bin") == [None]  # a wrong checksum is not retried


def test_wrong_md5_is_caught_too(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    with pytest.raises(ChecksumMismatchError, match="md5 expected 0{32}, got " + hashlib.md5(PAYLOAD).hexdigest()):
        download(url, tmp_path / "data.bin", md5="0" * 32, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_size_announced_by_server_must_match(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    with pytest.raises(SizeMismatchError, match=f"expected 1000 bytes, the server announces {len(PAYLOAD)}"):
        download(url, tmp_path / "data.bin", size=1000, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_404_is_not_retried_and_names_the_url(server, tmp_path, sleeps):
    url = server.base_url + "/missing.zip"
    with pytest.raises(HTTPStatusError) as caught:
        download(url, tmp_path / "missing.zip", retries=5, backoff=0.001)
    assert caught.value.status == 404
    assert url in str(caught.value) and "404" in str(caught.value)
    assert server.ranges("/missing.zip") == [None]
    assert sleeps == []
    assert list(tmp_path.iterdir()) == []


def test_transient_statuses_are_retried_with_exponential_backoff(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD, fail_first=[503, 429, 408])
    dest = download(url, tmp_path / "data.bin", sha256=PAYLOAD_SHA256, retries=5, backoff=0.01)
    assert dest.read_bytes() == PAYLOAD
    assert sleeps == [0.01, 0.02, 0.04]
    assert len(server.ranges("/data.bin")) == 4


def test_giving_up_after_retries_names_the_url(server, tmp_path, sleeps):
    url = server.serve("/data.bin", PAYLOAD, fail_first=[500] * 10)
    with pytest.raises(DownloadError, match=re.escape(url) + " failed after 3 attempts"):
        download(url, tmp_path / "data.bin", retries=2, backoff=0.5)
    assert sleeps == [0.5, 1.0]
    assert len(server.ranges("/data.bin")) == 3
    assert list(tmp_path.iterdir()) == []


def test_existing_verified_file_needs_no_request(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    dest = download(url, tmp_path / "data.bin", sha256=PAYLOAD_SHA256, **FAST)
    download(url, dest, sha256=PAYLOAD_SHA256, **FAST)
    assert len(server.requests) == 1


def test_existing_file_that_fails_verification_is_fetched_again(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"stale copy")  # no sidecar: hashed, found wrong, replaced
    download(url, dest, sha256=PAYLOAD_SHA256, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_file_changed_after_its_sidecar_is_rehashed(server, tmp_path):
    url = server.serve("/data.bin", PAYLOAD)
    dest = download(url, tmp_path / "data.bin", sha256=PAYLOAD_SHA256, **FAST)
    dest.write_bytes(PAYLOAD[::-1])  # same size, newer than the sidecar
    download(url, dest, sha256=PAYLOAD_SHA256, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_non_http_urls_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only http"):
        download("file:///etc/passwd", tmp_path / "passwd")


# ---------------------------------------------------------------------------------------- manifest
def write_manifest(path: Path, entries: dict) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "entries": entries}, sort_keys=False))
    return path


def url_entry(url: str, **overrides) -> dict:
    entry = {"url": url, "file": "raw/x/data.bin", "size": None, "sha256": None, "archive": "none",
             "produces": ["raw/x/data.bin"]}
    entry.update(overrides)
    return entry


BAD_ENTRIES = {
    "missing sha256": (lambda e: e.pop("sha256"), "sha256", "is required"),
    "short sha256": (lambda e: e.update(sha256="abc"), "sha256", "64 hex digits"),
    "unknown key": (lambda e: e.update(checksum="x"), "checksum", "is not allowed"),
    "bad archive": (lambda e: e.update(archive="rar"), "archive", "must be one of"),
    "zip without extract_to": (lambda e: e.update(archive="zip"), "extract_to", "is required"),
    "absolute file": (lambda e: e.update(file="/etc/x"), "file", "relative"),
    "dotdot produces": (lambda e: e.update(produces=["../x"]), "produces", "without '..'"),
    "negative size": (lambda e: e.update(size=-3), "size", "positive integer"),
    "ftp url": (lambda e: e.update(url="ftp://example.org/x"), "url", "only http"),
    "file not produced": (lambda e: e.update(produces=["raw/x/other.bin"]), "produces", "must list"),
    "output outside extract_to": (lambda e: e.update(archive="zip", extract_to="raw/y"), "produces",
                                  "are not under 'raw/y'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_invalid_manifest_entry_names_entry_and_key(tmp_path, case):
    mutate, key, message = BAD_ENTRIES[case]
    entry = url_entry("https://example.org/data.bin")
    mutate(entry)
    manifest = write_manifest(tmp_path / "manifest.yaml", {"broken_entry": entry})
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert "entry 'broken_entry'" in str(caught.value)
    assert f"key {key!r}" in str(caught.value) and message in str(caught.value)


def test_entry_needs_exactly_one_source(tmp_path):
    entry = url_entry("https://example.org/a", hf={"repo_id": "a/b", "filename": "c"})
    with pytest.raises(ManifestError, match="entry 'two': needs exactly one source key"):
        load_manifest(write_manifest(tmp_path / "m.yaml", {"two": entry}))


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.yaml")


def test_project_manifest_is_valid_and_agrees_with_its_sources():
    entries = load_manifest(REPO / "resources" / "manifest.yaml")
    expected = {"gqa_images", "gqa_scene_graphs", "hnc_train", "hnc_val", "hnc_test", "vqav2_val_questions",
                "vqav2_val_annotations", "coco_val2014_images", "textvqa_val", "textvqa_images",
                "textvqa_rosetta_ocr_val", "llava_textvqa_val_questions", "cifar10", "cifar100",
                "clip_vit_l14_336_openai", "llava_1_5_7b_hf", "vqav2_test_questions", "coco_test2015_images",
                *(f"sugarcrepe_{c}" for c in ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel",
                                              "swap_att", "swap_obj")),
                "coco_val2017_images", "aro_vg_relation", "aro_vg_attribution", "aro_vg_images", "coco_karpathy_test",
                "flickr30k_karpathy_test", "flickr30k_images", "vg_image_data", "winoground_examples",
                "winoground_images"}
    assert set(entries) == expected
    assert entries["gqa_images"].size == 21_817_965_542
    assert {entries[f"hnc_{s}"].hf.filename for s in ("train", "val", "test")} == {
        f"hnc_clean_strict_{s}.json" for s in ("train", "val", "test")}
    assert all(entries[f"hnc_{s}"].hf.repo_type == "dataset" for s in ("train", "val", "test"))

    # The CIFAR md5s are torchvision's; the CLIP repo is the one open_clip resolves for this tag.
    cifar = installed_source_constants("torchvision", "datasets/cifar.py")
    assert (entries["cifar10"].url, entries["cifar10"].md5) == (cifar["CIFAR10.url"], cifar["CIFAR10.tgz_md5"])
    assert (entries["cifar100"].url, entries["cifar100"].md5) == (cifar["CIFAR100.url"], cifar["CIFAR100.tgz_md5"])
    pretrained = installed_source_constants("open_clip", "pretrained.py")
    hf_hub = pretrained["_VITL14_336.openai.hf_hub"]
    assert hf_hub == "timm/vit_large_patch14_clip_336.openai/"  # trailing slash: open_clip's default file name
    assert entries["clip_vit_l14_336_openai"].hf.repo_id == hf_hub.rstrip("/")
    assert entries["llava_1_5_7b_hf"].hf_snapshot.repo_id == "llava-hf/llava-1.5-7b-hf"

    # Every Hugging Face model is pinned to a commit; a dataset without a published one is pinned by the lock.
    assert is_commit_hash(entries["clip_vit_l14_336_openai"].hf.revision)
    assert is_commit_hash(entries["llava_1_5_7b_hf"].hf_snapshot.revision)
    assert entries["clip_vit_l14_336_openai"].sha256 and entries["clip_vit_l14_336_openai"].size


def installed_source_constants(package: str, relative_file: str) -> dict[str, str]:
    """String constants of an installed module, read with ast instead of importing it (torch is slow).

    Class attributes come out as ``Class.attr``; keyword strings inside a module-level ``X = dict(tag=f(k=...))``
    as ``X.tag.k``.
    """
    import ast
    import importlib.util

    source = Path(importlib.util.find_spec(package).submodule_search_locations[0]) / relative_file
    constants: dict[str, str] = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.Assign) and isinstance(item.value, ast.Constant):
                    constants.update({f"{node.name}.{t.id}": item.value.value for t in item.targets
                                      if isinstance(t, ast.Name)})
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and isinstance(node.targets[0], ast.Name):
            for tag in node.value.keywords:
                if isinstance(tag.value, ast.Call):
                    for kw in tag.value.keywords:
                        if isinstance(kw.value, ast.Constant):
                            constants[f"{node.targets[0].id}.{tag.arg}.{kw.arg}"] = kw.value.value
    return constants


# ------------------------------------------------------------------------------- fetching entries
def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SCENE_GRAPHS = {"train_sceneGraphs.json": b'{"1": {}}', "val_sceneGraphs.json": b'{"2": {}}'}


def archive_entry(url: str, body: bytes, **overrides) -> dict:
    entry = {"url": url, "file": "archives/sceneGraphs.zip", "size": len(body),
             "sha256": hashlib.sha256(body).hexdigest(), "archive": "zip", "extract_to": "raw/gqa",
             "produces": ["raw/gqa/train_sceneGraphs.json", "raw/gqa/val_sceneGraphs.json"]}
    entry.update(overrides)
    return entry


@dataclass
class ServedArchive:
    body: bytes
    url: str
    manifest: Path
    resources: Path


@pytest.fixture
def served_archive(server, tmp_path) -> ServedArchive:
    """The scene-graph zip on the loopback server, a manifest entry ``gqa_scene_graphs`` for it, no download yet."""
    body = zip_bytes(SCENE_GRAPHS)
    url = server.serve("/sceneGraphs.zip", body)
    manifest = write_manifest(tmp_path / "m.yaml", {"gqa_scene_graphs": archive_entry(url, body)})
    return ServedArchive(body, url, manifest, tmp_path / "resources")


def test_fetch_archive_entry_downloads_extracts_and_then_skips(server, served_archive):
    body, url, manifest, resources = (served_archive.body, served_archive.url, served_archive.manifest,
                                      served_archive.resources)

    outputs = fetch_manifest_entry("gqa_scene_graphs", manifest, resources, **FAST)

    assert outputs == [resources / "raw/gqa/train_sceneGraphs.json", resources / "raw/gqa/val_sceneGraphs.json"]
    assert [p.read_bytes() for p in outputs] == list(SCENE_GRAPHS.values())
    assert read_sidecar(resources / "archives/sceneGraphs.zip") == hashlib.sha256(body).hexdigest()
    assert extraction_marker_path("sceneGraphs.zip", resources / "raw/gqa").is_file()
    record = json.loads(fetch_record_path("gqa_scene_graphs", resources).read_text())
    assert record["source"] == url and record["sha256"] == hashlib.sha256(body).hexdigest()

    fetch_manifest_entry("gqa_scene_graphs", manifest, resources, **FAST)
    assert len(server.requests) == 1


def test_damaged_extraction_is_redone_from_the_kept_archive(server, served_archive):
    manifest, resources = served_archive.manifest, served_archive.resources
    outputs = fetch_manifest_entry("gqa_scene_graphs", manifest, resources, **FAST)

    outputs[0].write_bytes(b"{")  # truncated by a full disk, say

    fetch_manifest_entry("gqa_scene_graphs", manifest, resources, **FAST)
    assert outputs[0].read_bytes() == SCENE_GRAPHS["train_sceneGraphs.json"]
    assert len(server.requests) == 1  # the archive was verified from its sidecar, not fetched again


def test_outputs_already_in_place_mean_no_download(server, tmp_path):
    """A user who already has the data: nothing is requested, the outputs are returned as they are."""
    url = server.serve("/sceneGraphs.zip", b"never served")
    manifest = write_manifest(tmp_path / "m.yaml", {"g": archive_entry(url, b"never served")})
    resources = tmp_path / "resources"
    for name, data in SCENE_GRAPHS.items():
        (resources / "raw/gqa").mkdir(parents=True, exist_ok=True)
        (resources / "raw/gqa" / name).write_bytes(data)

    outputs = fetch_manifest_entry("g", manifest, resources, **FAST)

    assert all(p.is_file() for p in outputs)
    assert server.requests == []


def test_archive_can_be_dropped_after_extraction(server, tmp_path):
    body = tar_gz_bytes({"cifar-10-batches-py/test_batch": b"batch", "cifar-10-batches-py/batches.meta": b"m"})
    url = server.serve("/cifar.tar.gz", body)
    entry = {"url": url, "file": "archives/cifar.tar.gz", "size": None, "sha256": None,
             "md5": hashlib.md5(body).hexdigest(), "archive": "tar.gz", "extract_to": "raw/cifar10",
             "keep_archive": False,
             "produces": ["raw/cifar10/cifar-10-batches-py/test_batch", "raw/cifar10/cifar-10-batches-py/batches.meta"]}
    resources = tmp_path / "resources"

    manifest = write_manifest(tmp_path / "m.yaml", {"cifar10": entry})
    outputs = fetch_manifest_entry("cifar10", manifest, resources, **FAST)

    assert outputs[0].read_bytes() == b"batch"
    assert not (resources / "archives/cifar.tar.gz").exists()
    assert not sidecar_path(resources / "archives/cifar.tar.gz").exists()


def test_archive_without_the_promised_outputs_is_an_error(server, tmp_path):
    body = zip_bytes({"other.json": b"{}"})
    url = server.serve("/sceneGraphs.zip", body)
    manifest = write_manifest(tmp_path / "m.yaml", {"g": archive_entry(url, body)})
    with pytest.raises(MissingOutputError, match=r"entry 'g'.*did not produce .*train_sceneGraphs\.json"):
        fetch_manifest_entry("g", manifest, tmp_path / "resources", **FAST)


HNC_TEST_JSON = b'{"n100552.jpg": {"0": {"caption": "a", "label": 1}}}'
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def hf_test_entry(revision: str = "main") -> dict:
    return {"hf": {"repo_id": "patilli/HNC", "repo_type": "dataset", "revision": revision,
                   "filename": "hnc_clean_strict_test.json"},
            "file": "raw/hnc/hnc_clean_strict_test.json", "size": None, "sha256": None, "archive": "none",
            "produces": ["raw/hnc/hnc_clean_strict_test.json"]}


def serve_hnc_test(server, commit: str, body: bytes = HNC_TEST_JSON, branch: str = "main") -> None:
    """The Hub's two URLs of one file: the branch's (naming its commit in X-Repo-Commit) and the commit's."""
    server.serve(f"/datasets/patilli/HNC/resolve/{branch}/hnc_clean_strict_test.json", body,
                 headers={"X-Repo-Commit": commit})
    server.serve(f"/datasets/patilli/HNC/resolve/{commit}/hnc_clean_strict_test.json", body,
                 headers={"X-Repo-Commit": commit})


def test_hf_file_entry_honours_hf_endpoint_and_pins_commit_and_digest(server, tmp_path, monkeypatch):
    serve_hnc_test(server, COMMIT_A)
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    resources = tmp_path / "resources"
    manifest = write_manifest(tmp_path / "m.yaml", {"hnc_test": hf_test_entry()})

    [output] = fetch_manifest_entry("hnc_test", manifest, resources, **FAST)

    assert output.read_bytes() == HNC_TEST_JSON
    assert read_sidecar(output) == hashlib.sha256(HNC_TEST_JSON).hexdigest()
    record = json.loads(fetch_record_path("hnc_test", resources).read_text())
    assert record["source"]["repo_id"] == "patilli/HNC"
    # the branch is asked only for its commit; the bytes come from the commit's URL
    assert [path for path, _ in server.requests] == [
        "HEAD /datasets/patilli/HNC/resolve/main/hnc_clean_strict_test.json",
        f"/datasets/patilli/HNC/resolve/{COMMIT_A}/hnc_clean_strict_test.json",
    ]
    lock = yaml.safe_load((tmp_path / "m.lock.yaml").read_text())
    assert lock["entries"]["hnc_test"] == {
        "revision": "main", "commit": COMMIT_A,
        "files": {"raw/hnc/hnc_clean_strict_test.json": {"size": len(HNC_TEST_JSON),
                                                         "sha256": hashlib.sha256(HNC_TEST_JSON).hexdigest()}},
    }


def test_pinned_inputs_name_the_locked_commit_after_the_first_download(server, tmp_path, monkeypatch):
    from hnclip.data.lock import pinned_inputs

    serve_hnc_test(server, COMMIT_A)
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    manifest = write_manifest(tmp_path / "m.yaml", {"hnc_test": hf_test_entry(),
                                                    "data": url_entry("http://x/d", sha256="e" * 64)})
    assert pinned_inputs(manifest) == {"hnc_test": "not pinned yet", "data": "sha256 " + "e" * 64}
    fetch_manifest_entry("hnc_test", manifest, tmp_path / "resources", **FAST)
    assert pinned_inputs(manifest)["hnc_test"] == f"commit {COMMIT_A}"


def test_every_result_of_a_real_run_records_what_pins_its_inputs():
    from hnclip.provenance import provenance

    pins = provenance({"data_source": "download"})["pinned_inputs"]
    assert pins["llava_1_5_7b_hf"] == "commit b234b804b114d9e37bb655e11cbbb5f5e971b7a9"
    assert pins["cifar100"] == "md5 eb9058c3a382ffc7106e4002c42a8d85"
    assert "pinned_inputs" not in provenance({"data_source": "synth"})


def test_a_later_download_fetches_the_locked_commit_though_the_branch_moved(server, tmp_path, monkeypatch):
    serve_hnc_test(server, COMMIT_A)
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    manifest = write_manifest(tmp_path / "m.yaml", {"hnc_test": hf_test_entry()})
    fetch_manifest_entry("hnc_test", manifest, tmp_path / "first", **FAST)
    serve_hnc_test(server, COMMIT_B, body=b'{"changed": {}}')  # main moves on; commit A stays as it was
    server.serve(f"/datasets/patilli/HNC/resolve/{COMMIT_A}/hnc_clean_strict_test.json", HNC_TEST_JSON)
    server.requests.clear()

    [output] = fetch_manifest_entry("hnc_test", manifest, tmp_path / "second", **FAST)

    assert output.read_bytes() == HNC_TEST_JSON
    assert [path for path, _ in server.requests] == [f"/datasets/patilli/HNC/resolve/{COMMIT_A}/hnc_clean_strict_test.json"]


def test_a_file_that_differs_from_its_lock_stops_the_download_naming_file_and_digests(server, tmp_path, monkeypatch):
    serve_hnc_test(server, COMMIT_A)
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    manifest = write_manifest(tmp_path / "m.yaml", {"hnc_test": hf_test_entry()})
    fetch_manifest_entry("hnc_test", manifest, tmp_path / "first", **FAST)
    re_uploaded = b'{"n100552.jpg": {"0": {"caption": "b", "label": 1}}}'
    serve_hnc_test(server, COMMIT_A, body=re_uploaded)  # same commit, other bytes: a broken mirror, say

    with pytest.raises(PinnedFileMismatchError) as caught:
        fetch_manifest_entry("hnc_test", manifest, tmp_path / "second", **FAST)

    message = str(caught.value)
    assert "'hnc_test'" in message and str(tmp_path / "second/raw/hnc/hnc_clean_strict_test.json") in message
    assert hashlib.sha256(HNC_TEST_JSON).hexdigest() in message and hashlib.sha256(re_uploaded).hexdigest() in message
    assert "m.lock.yaml" in message
    assert not (tmp_path / "second/raw/hnc/hnc_clean_strict_test.json").exists()


def test_a_changed_revision_stops_the_download_until_the_lock_entry_is_deleted(server, tmp_path, monkeypatch):
    serve_hnc_test(server, COMMIT_A)
    serve_hnc_test(server, COMMIT_B, branch="v2")
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    manifest = write_manifest(tmp_path / "m.yaml", {"hnc_test": hf_test_entry("main")})
    fetch_manifest_entry("hnc_test", manifest, tmp_path / "first", **FAST)
    write_manifest(manifest, {"hnc_test": hf_test_entry("v2")})

    with pytest.raises(RevisionChangedError, match=r"'hnc_test' now asks for revision 'v2'.*pins revision 'main' "
                                                   rf"\(commit {COMMIT_A}\).*delete entry 'hnc_test'"):
        fetch_manifest_entry("hnc_test", manifest, tmp_path / "second", **FAST)

    lock_path = tmp_path / "m.lock.yaml"
    lock = yaml.safe_load(lock_path.read_text())
    del lock["entries"]["hnc_test"]
    lock_path.write_text(yaml.safe_dump(lock))
    fetch_manifest_entry("hnc_test", manifest, tmp_path / "second", **FAST)
    assert yaml.safe_load(lock_path.read_text())["entries"]["hnc_test"]["commit"] == COMMIT_B


def test_manifest_and_lock_disagreeing_on_a_digest_is_an_error(server, tmp_path, monkeypatch):
    serve_hnc_test(server, COMMIT_A)
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    manifest = write_manifest(tmp_path / "m.yaml", {"hnc_test": hf_test_entry()})
    fetch_manifest_entry("hnc_test", manifest, tmp_path / "first", **FAST)
    write_manifest(manifest, {"hnc_test": {**hf_test_entry(), "sha256": "0" * 64}})
    with pytest.raises(LockError, match="pinned to sha256 0{64}.*in the manifest but [0-9a-f]{64}"):
        fetch_manifest_entry("hnc_test", manifest, tmp_path / "second", **FAST)


SNAPSHOT_ENTRY = {
    "hf_snapshot": {"repo_id": "llava-hf/llava-1.5-7b-hf", "repo_type": "model", "revision": "abc123",
                    "allow_patterns": ["*.json", "*.safetensors"]},
    "local_dir": "models/llava/llava",
    "produces": ["models/llava/llava/config.json", "models/llava/llava/model.safetensors.index.json"],
}


def fake_snapshot(calls: list[dict], shards: list[str], written: list[str], weights: bytes = b"weights"):
    """Stands in for huggingface_hub.snapshot_download: writes a tiny repo into local_dir."""
    def snapshot_download(**kwargs):
        calls.append(kwargs)
        local = Path(kwargs["local_dir"])
        local.mkdir(parents=True, exist_ok=True)
        (local / "config.json").write_text("{}")
        index = {"weight_map": {f"layer{i}": shard for i, shard in enumerate(shards)}}
        (local / "model.safetensors.index.json").write_text(json.dumps(index))
        for shard in written:
            (local / shard).write_bytes(weights)
        return str(local)
    return snapshot_download


@pytest.fixture
def hub_commits(monkeypatch):
    """The Hub's answer to which commit a revision is at: {revision: commit}, recorded per question asked."""
    import huggingface_hub

    commits = {"abc123": COMMIT_A}
    asked: list[str] = []

    def repo_info(self, repo_id, *, repo_type=None, revision=None, **kwargs):
        asked.append(revision)
        return type("RepoInfo", (), {"sha": commits[revision]})()

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    return asked


def test_snapshot_entry_calls_snapshot_download_once_at_the_resolved_commit(tmp_path, monkeypatch, hub_commits):
    import huggingface_hub

    calls: list[dict] = []
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(calls, shards, shards))
    manifest = write_manifest(tmp_path / "m.yaml", {"llava": SNAPSHOT_ENTRY})
    resources = tmp_path / "resources"

    outputs = fetch_manifest_entry("llava", manifest, resources)
    fetch_manifest_entry("llava", manifest, resources)

    assert len(calls) == 1 and hub_commits == ["abc123"]
    assert calls[0] == {"repo_id": "llava-hf/llava-1.5-7b-hf", "repo_type": "model", "revision": COMMIT_A,
                        "local_dir": str(resources / "models/llava/llava"),
                        "allow_patterns": ["*.json", "*.safetensors"], "endpoint": None}
    assert all(p.is_file() for p in outputs)
    marker = json.loads((resources / "models/llava/llava/.snapshot.json").read_text())
    assert marker["revision"] == "abc123" and marker["commit"] == COMMIT_A and set(marker["files"]) >= set(shards)
    locked = yaml.safe_load((tmp_path / "m.lock.yaml").read_text())["entries"]["llava"]
    assert locked["revision"] == "abc123" and locked["commit"] == COMMIT_A
    assert locked["files"][shards[0]] == {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert set(locked["files"]) == {"config.json", "model.safetensors.index.json", *shards}


def test_a_snapshot_file_that_differs_from_its_lock_stops_naming_file_and_digests(tmp_path, monkeypatch,
                                                                                  hub_commits):
    import huggingface_hub

    calls: list[dict] = []
    shards = ["model-00001-of-00001.safetensors"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(calls, shards, shards))
    manifest = write_manifest(tmp_path / "m.yaml", {"llava": SNAPSHOT_ENTRY})
    fetch_manifest_entry("llava", manifest, tmp_path / "first")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(calls, shards, shards, b"other"))

    with pytest.raises(PinnedFileMismatchError) as caught:
        fetch_manifest_entry("llava", manifest, tmp_path / "second")

    message = str(caught.value)
    assert str(tmp_path / "second/models/llava/llava" / shards[0]) in message
    assert hashlib.sha256(b"weights").hexdigest() in message and hashlib.sha256(b"other").hexdigest() in message
    assert calls[1]["revision"] == COMMIT_A and hub_commits == ["abc123"]  # the locked commit, not asked again
    assert not (tmp_path / "second/models/llava/llava/.snapshot.json").exists()


def test_snapshot_missing_a_shard_is_an_error(tmp_path, monkeypatch, hub_commits):
    import huggingface_hub

    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot([], shards, shards[:1]))
    manifest = write_manifest(tmp_path / "m.yaml", {"llava": SNAPSHOT_ENTRY})
    with pytest.raises(MissingOutputError, match="shard .*model-00002-of-00002.safetensors.* is missing"):
        fetch_manifest_entry("llava", manifest, tmp_path / "resources")
    assert not (tmp_path / "resources/models/llava/llava/.snapshot.json").exists()


def test_a_file_placed_by_hand_is_pinned_once_and_checked_after(tmp_path):
    entry = {"manual": "Copy it from eval.zip.", "produces": ["raw/textvqa/llava.jsonl"]}
    manifest = write_manifest(tmp_path / "m.yaml", {"llava_q": entry})
    resources = tmp_path / "resources"
    (resources / "raw/textvqa").mkdir(parents=True)
    (resources / "raw/textvqa/llava.jsonl").write_text("{}\n")
    fetch_manifest_entry("llava_q", manifest, resources)
    pin = yaml.safe_load((tmp_path / "m.lock.yaml").read_text())["entries"]["llava_q"]["files"]["raw/textvqa/llava.jsonl"]
    assert pin == {"size": 3, "sha256": hashlib.sha256(b"{}\n").hexdigest()}
    (resources / "raw/textvqa/llava.jsonl").write_text('{"x": 1}\n')  # another copy on another machine
    with pytest.raises(PinnedFileMismatchError, match=r"llava\.jsonl is not the file .*m\.lock\.yaml pins"):
        fetch_manifest_entry("llava_q", manifest, resources)


def test_manual_entry_explains_itself_until_the_file_is_there(tmp_path):
    entry = {"manual": "Copy it from eval.zip.", "produces": ["raw/textvqa/llava.jsonl"]}
    manifest = write_manifest(tmp_path / "m.yaml", {"llava_q": entry})
    resources = tmp_path / "resources"
    expected = r"'llava_q'.*raw/textvqa/llava\.jsonl is missing\. Copy it from eval\.zip\."
    with pytest.raises(ManualDownloadRequired, match=expected):
        fetch_manifest_entry("llava_q", manifest, resources)
    (resources / "raw/textvqa").mkdir(parents=True)
    (resources / "raw/textvqa/llava.jsonl").write_text("{}\n")
    assert fetch_manifest_entry("llava_q", manifest, resources) == [resources / "raw/textvqa/llava.jsonl"]


def test_unknown_entry_lists_the_known_ones(tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", {"a": url_entry("https://example.org/a")})
    with pytest.raises(ManifestError, match=r"no entry 'b' \(entries: a\)"):
        fetch_manifest_entry("b", manifest, tmp_path)
