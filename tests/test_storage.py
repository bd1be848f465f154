"""shared/storage/ against a real filesystem and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.storage import (
    FileStore,
    ObjectExists,
    ObjectStore,
    S3Store,
    StoreError,
    default_store_uri,
    open_store,
    split_uri,
    validate_key,
)

MiB = 1 << 20
BAD_KEYS = [
    "",
    "../x",
    "/abs",
    "a/../b",
    "a//b",
    "a\\b",
    ".",
    "..",
    "a/./b",
    "a/",
    "x\x00y",
    "k" * 1025,
    ".tmp-x",
    "a/.tmp-y",
]


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    uri = request.getfixturevalue("file_store_uri" if request.param == "file" else "s3_env")
    return open_store(uri)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


# --------------------------------------------------------------------------------------------------
# Both stores


def test_put_get_round_trip(store: ObjectStore) -> None:
    info = store.put_bytes("models/m/k/config.json", b'{"a": 1}')
    assert info.key == "models/m/k/config.json"
    assert info.size == 8
    assert info.sha256 == _sha(b'{"a": 1}')
    assert store.get_bytes("models/m/k/config.json") == b'{"a": 1}'
    assert store.exists("models/m/k/config.json")
    stat = store.stat("models/m/k/config.json")
    assert stat is not None and stat.size == 8
    # Overwrite replaces.
    store.put_bytes("models/m/k/config.json", b"v2")
    assert store.get_bytes("models/m/k/config.json") == b"v2"
    # Empty objects are objects.
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    empty = store.stat("empty")
    assert empty is not None and empty.size == 0
    # A prefix is not an object.
    assert not store.exists("models/m")
    assert store.stat("models/m") is None


def test_sha256_of_put_file_and_download(store: ObjectStore, tmp_path: Path) -> None:
    data = _random_file(tmp_path / "src.bin", 123_457)
    info = store.put_file("a/src.bin", tmp_path / "src.bin")
    assert (info.size, info.sha256) == (len(data), _sha(data))

    out = store.download_file("a/src.bin", tmp_path / "out" / "dst.bin")
    assert (out.size, out.sha256) == (len(data), _sha(data))
    assert (tmp_path / "out" / "dst.bin").read_bytes() == data
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]

    # A caller-supplied digest is trusted (it was computed while the file was produced).
    given = _sha(b"pretend")
    assert store.put_file("a/given.bin", tmp_path / "src.bin", sha256=given).sha256 == given
    with pytest.raises(ValueError, match="sha256"):
        store.put_file("a/bad.bin", tmp_path / "src.bin", sha256="ABC")
    with pytest.raises(FileNotFoundError, match=r"nope\.bin"):
        store.put_file("a/missing.bin", tmp_path / "nope.bin")
    assert not store.exists("a/missing.bin")


def test_large_file_multipart_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    size = 20 * MiB + 12345  # > 8 MiB multipart threshold: three parts on S3
    data = _random_file(tmp_path / "big.bin", size)
    info = store.put_file("shards/rank-00000-of-00001.safetensors", tmp_path / "big.bin")
    assert (info.size, info.sha256) == (size, _sha(data))

    stat = store.stat("shards/rank-00000-of-00001.safetensors")
    assert stat is not None and stat.size == size
    if isinstance(store, S3Store):
        assert stat.sha256 == _sha(data)  # from the object's `sha256` metadata
        head = store.client.head_object(
            Bucket=store.bucket, Key="shards/rank-00000-of-00001.safetensors", ChecksumMode="ENABLED"
        )
        # Proof it went up as a multipart upload with server-verified per-part SHA-256 checksums.
        assert head["ChecksumSHA256"].endswith("-3"), head
        assert head["ETag"].endswith('-3"'), head

    out = store.download_file("shards/rank-00000-of-00001.safetensors", tmp_path / "back.bin")
    assert (out.size, out.sha256) == (size, _sha(data))
    assert (tmp_path / "back.bin").read_bytes() == data


def test_create_exclusive(store: ObjectStore) -> None:
    first = store.create_exclusive("models/m/k/manifest.json", b"first")
    assert first.sha256 == _sha(b"first")
    with pytest.raises(ObjectExists, match=r"manifest\.json"):
        store.create_exclusive("models/m/k/manifest.json", b"second")
    assert store.get_bytes("models/m/k/manifest.json") == b"first"
    assert issubclass(ObjectExists, StoreError)
    # Also refuses when the object was written by an ordinary put.
    store.put_bytes("plain", b"x")
    with pytest.raises(ObjectExists):
        store.create_exclusive("plain", b"y")
    assert store.get_bytes("plain") == b"x"


def test_create_exclusive_race_has_one_winner(store: ObjectStore) -> None:
    results: dict[int, str] = {}
    barrier = threading.Barrier(8)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            store.create_exclusive("race/manifest.json", f"writer-{i}".encode())
            results[i] = "won"
        except ObjectExists:
            results[i] = "exists"

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == "won"]
    assert len(results) == 8
    assert len(winners) == 1, results
    assert store.get_bytes("race/manifest.json") == f"writer-{winners[0]}".encode()


def test_list_and_delete_prefix(store: ObjectStore) -> None:
    for key in ["a/b/1", "a/b/2", "a/b/c/3", "a/bc/4", "a/b.txt", "z"]:
        store.put_bytes(key, key.encode())
    assert [i.key for i in store.list()] == ["a/b.txt", "a/b/1", "a/b/2", "a/b/c/3", "a/bc/4", "z"]
    # Prefixes match whole segments: "a/b" is not "a/bc" or "a/b.txt".
    assert [i.key for i in store.list("a/b")] == ["a/b/1", "a/b/2", "a/b/c/3"]
    assert [i.key for i in store.list("a/b/")] == ["a/b/1", "a/b/2", "a/b/c/3"]
    assert [i.key for i in store.list("z")] == ["z"]
    assert store.list("nothing/here") == []
    sizes = {i.key: i.size for i in store.list("a")}
    assert sizes["a/b/c/3"] == len(b"a/b/c/3")

    assert store.delete_prefix("a/b") == 3
    assert [i.key for i in store.list()] == ["a/b.txt", "a/bc/4", "z"]
    assert store.delete_prefix("a/b") == 0
    assert not store.exists("a/b/1")
    if isinstance(store, FileStore):
        assert not (store.root / "a" / "b").exists()  # emptied directories are pruned
    assert store.delete_prefix("") == 3
    assert store.list() == []


def test_missing_key(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no/such/key"):
        store.get_bytes("no/such/key")
    with pytest.raises(FileNotFoundError, match="no/such/key"):
        store.download_file("no/such/key", tmp_path / "dl" / "out.bin")
    assert not (tmp_path / "dl" / "out.bin").exists()
    assert not [p for p in (tmp_path / "dl").glob("*")]  # no temp left behind
    assert store.stat("no/such/key") is None
    assert not store.exists("no/such/key")
    # A key below an existing object is missing too, not an error of another kind.
    store.put_bytes("file", b"x")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("file/child")
    assert store.stat("file/child") is None


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_bad_keys_rejected(store: ObjectStore, bad: str, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    calls = [
        lambda: store.put_bytes(bad, b"x"),
        lambda: store.put_file(bad, src),
        lambda: store.create_exclusive(bad, b"x"),
        lambda: store.get_bytes(bad),
        lambda: store.download_file(bad, tmp_path / "dl.bin"),
        lambda: store.exists(bad),
        lambda: store.stat(bad),
        lambda: store.uri_for(bad),
        lambda: store.local_path(bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="key"):
            call()
    assert store.list() == []
    assert not (tmp_path / "dl.bin").exists()


def test_traversal_writes_nothing_outside_root(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "store"
    store = FileStore(root)
    store.put_bytes("inside", b"ok")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for bad in ["../x", "../../x", "/abs", "a/../../x", "a//b", "a\\b", "..", "a/.."]:
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"evil")
        with pytest.raises(ValueError):
            store.create_exclusive(bad, b"evil")
    with pytest.raises(ValueError):
        store.list("../")
    with pytest.raises(ValueError):
        store.delete_prefix("..")
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert before == after
    assert not Path("/abs").exists()


def test_symlink_cannot_escape_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store = FileStore(tmp_path / "store")
    store.put_bytes("real", b"r")
    (tmp_path / "store" / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        store.put_bytes("link/x", b"evil")
    with pytest.raises(ValueError, match="outside"):
        store.get_bytes("link/secret")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert [i.key for i in store.list()] == ["real"]
    # A symlinked file pointing outside is not listed either.
    (tmp_path / "store" / "filelink").symlink_to(outside / "secret")
    assert [i.key for i in store.list()] == ["real"]
    assert store.delete_prefix("") == 1
    assert (outside / "secret").read_bytes() == b"secret"


def test_validate_key_accepts_normal_keys() -> None:
    for key in ["a", "models/name/0123abcd/manifest.json", "x.y-z_w", "a/b c/d", "ünïcode/ключ", "k" * 1024]:
        assert validate_key(key) == key


def test_uri_for_and_split_uri_round_trip(store: ObjectStore) -> None:
    store.put_bytes("models/x/k/manifest.json", b"{}")
    uri = store.uri_for("models/x/k/manifest.json")
    assert uri.startswith(store.uri + "/")
    parent, name = split_uri(uri)
    assert name == "manifest.json"
    assert parent.uri == store.uri + "/models/x/k"
    assert parent.get_bytes(name) == b"{}"
    assert parent.uri_for(name) == uri


def test_local_path(store: ObjectStore) -> None:
    store.put_bytes("w/x.bin", b"abc")
    path = store.local_path("w/x.bin")
    if isinstance(store, FileStore):
        assert path is not None and path.read_bytes() == b"abc"
        assert path == store.root / "w" / "x.bin"
    else:
        assert path is None


# --------------------------------------------------------------------------------------------------
# file:// specifics


def test_file_store_root_created_on_demand(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/lazy/store")
    assert not (tmp_path / "lazy").exists()
    assert store.list() == []
    assert store.stat("x") is None
    assert not (tmp_path / "lazy").exists()
    store.put_bytes("x", b"1")
    assert (tmp_path / "lazy" / "store" / "x").read_bytes() == b"1"


def test_file_store_failed_put_is_invisible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path / "store")
    store.put_bytes("d/old", b"old")
    src = tmp_path / "src.bin"
    src.write_bytes(b"new contents")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(5, "injected I/O error")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StoreError, match="d/old"):
        store.put_bytes("d/old", b"new")
    with pytest.raises(StoreError, match="d/new"):
        store.put_file("d/new", src)
    with pytest.raises(StoreError, match="d/new2"):
        store.put_bytes("d/new2", b"x")
    monkeypatch.undo()

    assert store.get_bytes("d/old") == b"old"
    assert not store.exists("d/new") and not store.exists("d/new2")
    assert [i.key for i in store.list()] == ["d/old"]
    assert sorted(p.name for p in (tmp_path / "store" / "d").iterdir()) == ["old"]  # no temp left


def test_file_store_list_skips_temp_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    store.put_bytes("a/x", b"1")
    (tmp_path / "store" / "a" / ".tmp-x.inflight").write_bytes(b"partial")
    assert [i.key for i in store.list()] == ["a/x"]
    assert store.delete_prefix("a") == 1
    # The in-flight temp of another writer is left alone (and keeps its directory).
    assert (tmp_path / "store" / "a" / ".tmp-x.inflight").exists()


def test_file_store_create_exclusive_failure_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path / "store")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "injected: no space left")

    monkeypatch.setattr(os, "link", boom)
    with pytest.raises(StoreError, match=r"manifest\.json"):
        store.create_exclusive("m/manifest.json", b"{}")
    monkeypatch.undo()
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))


def test_file_uri_with_special_characters(tmp_path: Path) -> None:
    root = tmp_path / "a b%c"
    store = open_store(root.as_uri())
    assert isinstance(store, FileStore) and store.root == root
    store.put_bytes("k e y", b"v")
    parent, name = split_uri(store.uri_for("k e y"))
    assert name == "k e y" and parent.get_bytes(name) == b"v"


# --------------------------------------------------------------------------------------------------
# s3:// specifics


def test_s3_honours_aws_endpoint_url(s3_env: str, seaweedfs: object) -> None:
    store = open_store(s3_env)  # no endpoint kwarg: botocore reads AWS_ENDPOINT_URL itself
    assert isinstance(store, S3Store)
    assert store.endpoint_url == os.environ["AWS_ENDPOINT_URL"]
    store.put_bytes("hello", b"world")
    assert store.get_bytes("hello") == b"world"
    # An explicit endpoint_url wins over the environment.
    explicit = S3Store(
        store.bucket, endpoint_url=os.environ["AWS_ENDPOINT_URL"].replace("127.0.0.1", "localhost")
    )
    assert explicit.endpoint_url.startswith("http://localhost:")
    assert explicit.get_bytes("hello") == b"world"


def test_s3_prefix_store_is_isolated(s3_env: str) -> None:
    pre = open_store(f"{s3_env}/pre/")
    assert pre.uri == f"{s3_env}/pre"
    prefix = open_store(f"{s3_env}/prefix")
    pre.put_bytes("k/1", b"1")
    prefix.put_bytes("k/2", b"2")
    assert [i.key for i in pre.list()] == ["k/1"]
    assert [i.key for i in prefix.list()] == ["k/2"]
    root = open_store(s3_env)
    assert [i.key for i in root.list()] == ["pre/k/1", "prefix/k/2"]
    assert pre.delete_prefix("") == 1
    assert [i.key for i in root.list()] == ["prefix/k/2"]


def test_s3_small_upload_checksum_verified_and_stat_sha(s3_env: str, tmp_path: Path) -> None:
    store = open_store(s3_env)
    assert isinstance(store, S3Store)
    data = _random_file(tmp_path / "small.bin", 4096)
    store.put_file("small.bin", tmp_path / "small.bin")
    head = store.client.head_object(Bucket=store.bucket, Key="small.bin", ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == _sha(data)
    assert head["Metadata"]["sha256"] == _sha(data)
    stat = store.stat("small.bin")
    assert stat is not None and stat.sha256 == _sha(data)
    # An object written by someone else (no metadata) still yields sha256 from a full-object checksum.
    store.client.put_object(Bucket=store.bucket, Key="foreign", Body=b"abc", ChecksumAlgorithm="SHA256")
    foreign = store.stat("foreign")
    assert foreign is not None and foreign.sha256 == _sha(b"abc")


def test_s3_missing_bucket_is_store_error_not_missing_key(s3_env: str) -> None:
    store = S3Store("no-such-bucket-" + s3_env[-8:], max_attempts=1)
    with pytest.raises(StoreError, match="no-such-bucket"):
        store.get_bytes("k")
    with pytest.raises(StoreError):
        store.list()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fake_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
    ):
        monkeypatch.delenv(name, raising=False)


def _count_attempts(store: S3Store) -> list[str]:
    sent: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda **kw: sent.append(kw["request"].url))
    return sent


@pytest.mark.usefixtures("fake_aws_env")
def test_s3_connection_refused_retries_then_store_error(tmp_path: Path) -> None:
    store = S3Store(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        max_attempts=3,
        connect_timeout=1,
        read_timeout=1,
    )
    assert store.region_name == "us-east-1"  # default when nothing is configured
    sent = _count_attempts(store)
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    for name, call in [
        ("get", lambda: store.get_bytes("models/x/manifest.json")),
        ("put", lambda: store.put_bytes("models/x/manifest.json", b"{}")),
        ("create", lambda: store.create_exclusive("models/x/manifest.json", b"{}")),
        ("upload", lambda: store.put_file("models/x/manifest.json", src)),
        ("download", lambda: store.download_file("models/x/manifest.json", tmp_path / "dl")),
        ("stat", lambda: store.stat("models/x/manifest.json")),
    ]:
        sent.clear()
        start = time.monotonic()
        with pytest.raises(StoreError, match=r"s3://bucket/models/x/manifest\.json"):
            call()
        assert time.monotonic() - start < 15, name
        assert len(sent) >= 3, (name, sent)  # botocore retried before giving up
    with pytest.raises(StoreError, match="s3://bucket"):
        store.list("models")
    assert not (tmp_path / "dl").exists()


@pytest.mark.usefixtures("fake_aws_env")
def test_s3_read_timeout_is_bounded() -> None:
    # A listener that never accepts: connects succeed (kernel backlog), responses never come.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2, read_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(StoreError, match="s3://bucket/slow/key"):
            store.get_bytes("slow/key")
        assert time.monotonic() - start < 15


# --------------------------------------------------------------------------------------------------
# URIs


def test_open_store_schemes(tmp_path: Path) -> None:
    plain = open_store(str(tmp_path / "plain"))
    assert isinstance(plain, FileStore) and plain.uri == (tmp_path / "plain").as_uri()
    assert open_store(f"file://{tmp_path}/x/").uri == f"file://{tmp_path}/x"
    assert open_store(f"file://localhost{tmp_path}/x").uri == f"file://{tmp_path}/x"
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store) and s3.uri == "s3://bucket/some/prefix"
    assert (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert open_store("s3://bucket").uri == "s3://bucket"
    for uri, needle in [
        ("gs://bucket/x", "'gs'"),
        ("http://127.0.0.1/x", "'http'"),
        ("hdfs://n/x", "'hdfs'"),
        ("s3://", "bucket"),
        ("s3:///x", "bucket"),
        ("s3://b/../x", "prefix"),
        ("file://relative/path", "absolute"),
        ("", "empty"),
    ]:
        with pytest.raises(ValueError, match=needle):
            open_store(uri)


def test_open_store_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # conftest points NEURON_SERVE_STORE at a per-test temp dir.
    assert default_store_uri() == (tmp_path / "default-store").as_uri()
    store = open_store()
    assert isinstance(store, FileStore) and store.root == tmp_path / "default-store"
    monkeypatch.delenv("NEURON_SERVE_STORE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_store_uri() == (tmp_path / "xdg" / "neuron-serve" / "store").as_uri()
    monkeypatch.setenv("NEURON_SERVE_STORE", "s3://bkt/p")
    assert open_store().uri == "s3://bkt/p"


def test_split_uri() -> None:
    store, name = split_uri("s3://b/p/models/x/k/manifest.json")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.uri, name) == (
        "b",
        "p/models/x/k",
        "s3://b/p/models/x/k",
        "manifest.json",
    )
    store, name = split_uri("s3://b/top.json")
    assert (store.uri, name) == ("s3://b", "top.json")
    store, name = split_uri("file:///srv/store/models/x/manifest.json")
    assert isinstance(store, FileStore)
    assert (store.root, name) == (Path("/srv/store/models/x"), "manifest.json")
    store, name = split_uri("/srv/store/m.json")
    assert (store.uri, name) == ("file:///srv/store", "m.json")
    for bad, needle in [
        ("s3://b", "object"),
        ("s3://b/", "object"),
        ("s3://b/p/", "object"),
        ("s3://b/a//m.json", "key"),
        ("s3://b/../m.json", "key"),
        ("gs://b/m.json", "'gs'"),
        ("file:///srv/dir/", "object"),
    ]:
        with pytest.raises(ValueError, match=needle):
            split_uri(bad)


def test_repr_names_uri(tmp_path: Path) -> None:
    assert repr(FileStore(tmp_path)) == f"FileStore({tmp_path.as_uri()!r})"


@pytest.fixture
def many_files_store(tmp_path: Path) -> Iterator[FileStore]:
    store = FileStore(tmp_path / "store")
    for i in range(50):
        store.put_bytes(f"d{i % 5}/f{i:03d}", b"x")
    yield store


def test_file_store_list_many_sorted(many_files_store: FileStore) -> None:
    keys = [i.key for i in many_files_store.list()]
    assert keys == sorted(keys) and len(keys) == 50
    assert len(many_files_store.list("d3")) == 10
