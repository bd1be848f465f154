"""``s3://`` stores: objects in an S3 bucket (under an optional key prefix), through boto3."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.storage.base import (
    SHA256_HEX,
    MiB,
    ObjectExists,
    ObjectInfo,
    ObjectStore,
    StoreError,
    check_sha256,
    download_to,
    normalize_prefix,
    not_found,
    sha256_file,
    under_prefix,
    validate_key,
)


class S3Store(ObjectStore):
    """Objects in an S3 bucket (under an optional key prefix), through boto3.

    * Credentials, region and endpoint come from the standard boto3 chain; ``AWS_ENDPOINT_URL`` /
      ``AWS_ENDPOINT_URL_S3`` are honoured by botocore itself (an explicit ``endpoint_url`` wins).
      With a custom endpoint, path-style addressing is used (S3-compatible servers such as SeaweedFS
      or MinIO rarely have wildcard DNS for virtual-hosted buckets).
    * Retries: botocore "standard" mode (exponential backoff with jitter, also on throttling and
      connection errors); failures that survive them become :class:`StoreError` naming the key.
    * Integrity: uploads ask for SHA-256 checksums, so the server verifies every part of a multipart
      upload (and every single PUT); the whole-file sha256 is stored as user metadata ``sha256``.
    * ``create_exclusive`` uses ``If-None-Match: *`` (S3 conditional writes).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 8 * MiB,
        multipart_chunksize: int = 8 * MiB,
        max_concurrency: int = 4,
        addressing_style: str | None = None,
        client: Any | None = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )
        if client is not None:
            self._client = client
            self.region_name = client.meta.region_name
            return
        # A private Session per store: boto3's default session is global state and not thread-safe.
        session = boto3.session.Session(region_name=region_name)
        self.region_name = region_name or session.region_name or "us-east-1"
        custom_endpoint = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        config = Config(
            region_name=self.region_name,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * max_concurrency),
            s3={"addressing_style": addressing_style or ("path" if custom_endpoint else "auto")},
            user_agent_extra="neuron-serve",
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)

    @property
    def client(self) -> Any:
        """The underlying boto3 S3 client (thread-safe; shared by all calls on this store)."""
        return self._client

    @property
    def endpoint_url(self) -> str:
        return str(self._client.meta.endpoint_url)

    def _s3_key(self, key: str) -> str:
        """The bucket key of store key ``key`` (under this store's prefix)."""
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- errors -------------------------------------------------------------------------------------

    @staticmethod
    def _error_code(exc: Exception) -> tuple[str, int | None]:
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code, status

    def _fail(self, op: str, uri: str, exc: BaseException) -> Exception:
        """Translate a boto error into this module's exceptions (called after botocore's retries)."""
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code, status = self._error_code(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                return not_found(uri)
            message = exc.response.get("Error", {}).get("Message", "")
            return StoreError(f"S3 {op} {uri} failed: {code or status} {message}".rstrip())
        return StoreError(f"S3 {op} {uri} failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _boto_errors() -> tuple[type[BaseException], ...]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        return (ClientError, BotoCoreError, Boto3Error)

    # -- writes -------------------------------------------------------------------------------------

    def put_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        validate_key(key)
        check_sha256(sha256)
        src = Path(path)
        size = src.stat().st_size  # a missing source raises FileNotFoundError naming *it*
        digest = sha256 or sha256_file(src)
        uri = self.uri_for(key)
        extra = {
            "ChecksumAlgorithm": "SHA256",  # per-part SHA-256, verified by the server
            "Metadata": {"sha256": digest},
            "ContentType": "application/octet-stream",
        }
        try:
            self._client.upload_file(
                str(src), self.bucket, self._s3_key(key), ExtraArgs=extra, Config=self._transfer
            )
        except self._boto_errors() as exc:
            raise self._fail("upload", uri, exc) from exc
        return ObjectInfo(key, size, digest)

    def _put(self, key: str, data: bytes, **conditions: str) -> ObjectInfo:
        digest = hashlib.sha256(data)
        self._client.put_object(
            Bucket=self.bucket,
            Key=self._s3_key(key),
            Body=data,
            ChecksumSHA256=base64.b64encode(digest.digest()).decode("ascii"),
            Metadata={"sha256": digest.hexdigest()},
            ContentType="application/octet-stream",
            **conditions,
        )
        return ObjectInfo(key, len(data), digest.hexdigest())

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        validate_key(key)
        try:
            return self._put(key, bytes(data))
        except self._boto_errors() as exc:
            raise self._fail("put", self.uri_for(key), exc) from exc

    def create_exclusive(self, key: str, data: bytes) -> ObjectInfo:
        """Conditional PUT (``If-None-Match: *``).

        412 PreconditionFailed (present) and 409 ConditionalRequestConflict (a concurrent
        conditional write to the same key is in flight) both mean "someone else is creating it":
        :class:`ObjectExists`. Caveat inherited from S3: if our PUT succeeded but its response was
        lost and botocore retried, the retry sees our own object and we report ObjectExists.
        """
        from botocore.exceptions import ClientError

        validate_key(key)
        uri = self.uri_for(key)
        try:
            return self._put(key, bytes(data), IfNoneMatch="*")
        except ClientError as exc:
            code, status = self._error_code(exc)
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise ObjectExists(f"object already exists: {uri}") from exc
            raise self._fail("conditional put", uri, exc) from exc
        except self._boto_errors() as exc:
            raise self._fail("conditional put", uri, exc) from exc

    # -- reads --------------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._s3_key(key))
            with contextlib.closing(response["Body"]) as body:
                return bytes(body.read())
        except self._boto_errors() as exc:
            raise self._fail("get", self.uri_for(key), exc) from exc

    def download_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        validate_key(key)
        uri = self.uri_for(key)

        def fill(tmp: Path) -> None:
            try:  # ranged GETs in parallel for large objects
                self._client.download_file(self.bucket, self._s3_key(key), str(tmp), Config=self._transfer)
            except self._boto_errors() as exc:
                raise self._fail("download", uri, exc) from exc

        size, digest = download_to(path, fill, uri)
        return ObjectInfo(key, size, digest)

    def stat(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        validate_key(key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._s3_key(key), ChecksumMode="ENABLED")
        except ClientError as exc:
            code, status = self._error_code(exc)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail("head", self.uri_for(key), exc) from exc
        except self._boto_errors() as exc:
            raise self._fail("head", self.uri_for(key), exc) from exc
        return ObjectInfo(key, int(head["ContentLength"]), _sha256_from_head(head))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        norm = normalize_prefix(prefix)
        if norm:
            s3_prefix = self._s3_key(norm)
        else:
            s3_prefix = f"{self.prefix}/" if self.prefix else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[ObjectInfo] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=s3_prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = str(obj["Key"])[strip:]
                    if not under_prefix(key, norm):
                        continue  # "models/xy" when asked for "models/x"
                    try:
                        validate_key(key)
                    except ValueError:
                        continue  # directory markers ("a/") and keys this API cannot address
                    out.append(ObjectInfo(key, int(obj["Size"]), None))
        except self._boto_errors() as exc:
            raise self._fail("list", f"{self.uri}/{norm}", exc) from exc
        out.sort(key=lambda info: info.key)
        return out

    # -- deletes ------------------------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        keys = [info.key for info in self.list(prefix)]
        for batch in _batches(keys, 1000):  # DeleteObjects takes at most 1000 keys
            try:
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._s3_key(k)} for k in batch], "Quiet": True},
                )
            except self._boto_errors() as exc:
                raise self._fail("delete", self.uri_for(batch[0]), exc) from exc
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StoreError(
                    f"S3 delete under {self.uri}/{prefix} failed for {len(errors)} keys, "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip()
                )
        return len(keys)

    # -- buckets ------------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and dev servers; production buckets pre-exist)."""
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            code, status = self._error_code(exc)
            if not (status == 404 or code in ("404", "NoSuchBucket", "NotFound")):
                raise self._fail("head bucket", f"s3://{self.bucket}", exc) from exc
        except self._boto_errors() as exc:
            raise self._fail("head bucket", f"s3://{self.bucket}", exc) from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region_name and self.region_name != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region_name}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            code, _ = self._error_code(exc)
            if code not in ("BucketAlreadyOwnedByYou",):
                raise self._fail("create bucket", f"s3://{self.bucket}", exc) from exc
        except self._boto_errors() as exc:
            raise self._fail("create bucket", f"s3://{self.bucket}", exc) from exc


def _sha256_from_head(head: dict[str, Any]) -> str | None:
    """Our ``sha256`` metadata; else a full-object ChecksumSHA256 (single-part uploads by others)."""
    meta = head.get("Metadata") or {}
    value = meta.get("sha256")
    if isinstance(value, str) and SHA256_HEX.fullmatch(value):
        return value
    checksum = head.get("ChecksumSHA256")
    if isinstance(checksum, str) and "-" not in checksum and head.get("ChecksumType") != "COMPOSITE":
        try:
            raw = base64.b64decode(checksum, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) == 32:
            return raw.hex()
    return None


def _batches(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
