"""What the hub says about a model, through huggingface_hub's public API.

Model info (commit + files) comes from ``HfApi.model_info``; each file's
size, ETag and download location from ``get_hf_file_metadata`` at that
commit; the bytes travel over the client's own session (``get_session``)
with its headers (``build_hf_headers``: token from ``HF_TOKEN``). The client
maps the hub's answers onto typed errors; this module maps those onto ours.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, get_token, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers

from rbee.errors import RbeeError
from rbee.modelref import ModelRef
from rbee.paths import relative_name_problem
from rbee_hive.provisioner.settings import DownloadSettings

log = logging.getLogger(__name__)

# Weights in these forms are skipped when the repository also has safetensors:
# one copy of the weights is enough to load the model.
_ALTERNATE_WEIGHTS = (
    "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data",
    "*.tflite", "*.mlmodel", "*.gguf", "onnx/*", "original/*", "coreml/*", "openvino/*",
)
_ALWAYS_SKIPPED = (".gitattributes",)


class TransientError(Exception):
    """Worth another attempt (network, stall, server 5xx, bad bytes)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # "stall", "connection", "server", "checksum", "range"
        self.detail = detail


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    etag: str
    url: str
    send_auth: bool

    @property
    def sha256(self) -> str | None:
        return self.etag if len(self.etag) == 64 and _is_hex(self.etag) else None

    @property
    def git_sha1(self) -> str | None:
        return self.etag if len(self.etag) == 40 and _is_hex(self.etag) else None


@dataclass
class RemoteModel:
    ref: ModelRef
    commit: str
    files: list[RemoteFile] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text.lower())


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def invalid_hub_file(ref: ModelRef, name: str, reason: str, endpoint: str) -> RbeeError:
    shown = name.replace("\x00", "\\0")
    return RbeeError(
        "INVALID_HUB_FILE",
        f"{endpoint} lists a file of {ref} that cannot be placed inside the model's folder: {shown!r} ({reason})",
        {"model": str(ref), "file": shown, "reason": reason, "endpoint": endpoint},
        ["Nothing was downloaded. Check HF_ENDPOINT: a hub names files relative to the repository",
         "If the repository is yours, rename the file"],
    )


def check_names(ref: ModelRef, names: list[str], endpoint: str) -> None:
    """Refuse the whole model if any name the hub gave could leave its folder:
    rbee drives the transfer itself, so the hub client's own guards do not apply."""
    for name in names:
        reason = relative_name_problem(name)
        if reason is not None:
            raise invalid_hub_file(ref, name, reason, endpoint)


def select_files(paths: list[str]) -> list[str]:
    """The files of a repository that make up one loadable model."""
    paths = [p for p in paths if p not in _ALWAYS_SKIPPED]
    if any(p.endswith(".safetensors") for p in paths):
        return [p for p in paths if not any(fnmatch.fnmatch(p, pat) for pat in _ALTERNATE_WEIGHTS)]
    return paths


class HubClient:
    def __init__(self, settings: DownloadSettings) -> None:
        self.settings = settings

    @property
    def endpoint_label(self) -> str:
        return self.settings.endpoint or "the Hugging Face hub"

    def headers(self, remote: RemoteFile | None = None) -> dict[str, str]:
        headers = build_hf_headers(library_name="rbee")
        # Sizes must be the file's own (no compression), as the client does.
        headers["Accept-Encoding"] = "identity"
        if remote is not None and not remote.send_auth:
            headers.pop("authorization", None)
        return headers

    def resolve(self, ref: ModelRef) -> RemoteModel:
        """Commit and files of ``ref`` (blocking). Raises RbeeError or TransientError."""
        try:
            if ref.filename:
                remote = self._file(ref, ref.filename, ref.revision or "main")
                return RemoteModel(ref, remote[1], [remote[0]])
            info = HfApi(endpoint=self.settings.endpoint).model_info(
                ref.repo_id, revision=ref.revision, files_metadata=True, timeout=self.settings.connect_timeout_s
            )
            commit = info.sha or ref.revision or "main"
            listed = [s.rfilename for s in info.siblings or []]
            check_names(ref, listed, self.endpoint_label)
            names = self._one_gguf(ref, select_files(listed))
            files = [self._file(ref, name, commit)[0] for name in names]
            if not files:
                raise RbeeError(
                    "MODEL_NOT_FOUND",
                    f"Model not found: {ref} has no files",
                    {"model": str(ref), "endpoint": self.endpoint_label},
                )
            return RemoteModel(ref, commit, files)
        except (RbeeError, TransientError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped below, unknown ones re-raised
            raise self.map_error(exc, ref) from exc

    def _one_gguf(self, ref: ModelRef, names: list[str]) -> list[str]:
        ggufs = [n for n in names if n.lower().endswith(".gguf")]
        others = [n for n in names if n.endswith((".safetensors", ".bin"))]
        if len(ggufs) > 1 and not others:
            shown = ", ".join(sorted(ggufs)[:5]) + (" …" if len(ggufs) > 5 else "")
            raise RbeeError(
                "INVALID_MODEL_REF",
                f"{ref} holds {len(ggufs)} GGUF files; name the one to download",
                {"model": str(ref), "files": shown},
                [f"Use hf:{ref.repo_id}/FILE.gguf, e.g. hf:{ref.repo_id}/{sorted(ggufs)[0]}"],
            )
        return names

    def _file(self, ref: ModelRef, name: str, revision: str) -> tuple[RemoteFile, str]:
        url = hf_hub_url(ref.repo_id, name, revision=revision, endpoint=self.settings.endpoint)
        meta = get_hf_file_metadata(url, timeout=self.settings.connect_timeout_s, endpoint=self.settings.endpoint)
        if not meta.commit_hash or not meta.etag:
            raise RbeeError(
                "DOWNLOAD_FAILED",
                f"{url} answered without the hub's commit/ETag headers",
                {"url": url, "endpoint": self.endpoint_label},
                ["Check that HF_ENDPOINT points at a hub-compatible server"],
            )
        location = meta.location or url
        remote = RemoteFile(
            path=name,
            size=meta.size,
            etag=meta.etag,
            url=location,
            send_auth=_origin(location) == _origin(url),
        )
        return remote, meta.commit_hash

    def map_error(self, exc: BaseException, ref: ModelRef) -> RbeeError | TransientError:
        """The hub client's exceptions → ours (fatal RbeeError or TransientError)."""
        model = str(ref)
        if isinstance(exc, OfflineModeIsEnabled):
            return offline_error(ref)
        if isinstance(exc, httpx2.TimeoutException) and not isinstance(exc, httpx2.ConnectTimeout):
            return TransientError("stall", f"no data from {self.endpoint_label}: {exc or type(exc).__name__}")
        if isinstance(exc, (httpx2.TransportError, ConnectionError)):
            return TransientError("connection", f"{type(exc).__name__}: {exc}")
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                return access_denied(ref, status, gated=isinstance(exc, GatedRepoError))
            if status == 404 or isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)):
                if isinstance(exc, RevisionNotFoundError):
                    what = f"revision '{ref.revision}' does not exist"
                elif isinstance(exc, RemoteEntryNotFoundError):
                    what = f"file '{ref.filename or '?'}' does not exist in {ref.repo_id}"
                else:
                    what = f"repository {ref.repo_id} does not exist"
                return RbeeError(
                    "MODEL_NOT_FOUND",
                    f"Model not found: {model} ({what} on {self.endpoint_label})",
                    {"model": model, "status": status, "endpoint": self.endpoint_label},
                    ["Check the spelling of ORG/REPO (and FILE, @REVISION)", "Private repositories answer 404 too: set HF_TOKEN"],
                )
            if status in (408, 429) or status >= 500:
                return TransientError("server", f"HTTP {status} from {self.endpoint_label}")
            return RbeeError(
                "DOWNLOAD_FAILED",
                f"Download of {model} failed: HTTP {status} from {self.endpoint_label}",
                {"model": model, "status": status},
            )
        return RbeeError("DOWNLOAD_FAILED", f"Download of {model} failed: {type(exc).__name__}: {exc}", {"model": model})


def access_denied(ref: ModelRef, status: int, gated: bool) -> RbeeError:
    has_token = get_token() is not None
    kind = "gated" if gated else "private or gated"
    suggestions = (
        [f"The HF_TOKEN in use has no access to {ref.repo_id}: check the token, or request access on the model's page"]
        if has_token
        else [f"Set HF_TOKEN on the node to a token with access to {ref.repo_id} (accept the model's terms first if it is gated)"]
    )
    return RbeeError(
        "ACCESS_DENIED",
        f"Access denied to {ref} (HTTP {status}): the repository is {kind}",
        {"model": str(ref), "status": status, "token_sent": str(has_token).lower()},
        suggestions,
    )


def offline_error(ref: ModelRef) -> RbeeError:
    return RbeeError(
        "HUB_OFFLINE",
        f"Cannot download {ref}: offline mode is on (HF_HUB_OFFLINE) and the model is not in the catalog",
        {"model": str(ref)},
        ["Unset HF_HUB_OFFLINE on the node, or register a local copy with file:///path"],
    )
