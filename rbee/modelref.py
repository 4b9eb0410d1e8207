"""Model references: the one place that parses and validates them.

Accepted forms (S5.1):

    hf:ORG/REPO                  a whole repository at its default branch
    hf:ORG/REPO/PATH/IN/REPO     one file of it (e.g. a .gguf)
    hf:ORG/REPO[...]@REVISION    pinned to a branch, tag or commit
    file:///absolute/path        a file or folder already on the node

keeper validates before sending anything; the hive validates again, since
other clients may call it.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import quote, unquote

from rbee.errors import RbeeError

ACCEPTED_FORMS = (
    "hf:ORG/REPO",
    "hf:ORG/REPO/FILE",
    "hf:ORG/REPO@REVISION (also with /FILE)",
    "file:///absolute/path",
)

PROVIDERS = ("hf", "file")

# The hub's rules for user, organisation and repository names: letters, digits,
# '-', '_', '.'; no leading/trailing '-' or '.', no '--' or '..', at most 96 chars.
_NAME = re.compile(r"^(?![-.])(?!.*(--|\.\.))[A-Za-z0-9_.\-]{1,96}(?<![-.])$")
# Branches, tags, commits and refs such as refs/pr/1.
_REVISION = re.compile(r"^[A-Za-z0-9_.\-/]{1,255}$")
_FILE_SEGMENT = re.compile(r"^[^\x00-\x1f\\]+$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference. ``reference`` is the catalog key next to ``provider``."""

    provider: str
    reference: str
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.provider == "file":
            return f"file://{self.reference}"
        return f"{self.provider}:{self.reference}"

    def slug(self) -> str:
        """The reference's folder name: its path segments escaped and joined
        with ``--`` (a revision after ``@``). One reference, one folder, and
        back (``from_slug``): no two references share a folder, so removing
        one never takes another's files. A segment keeps its text unless it
        holds '%', '@' or a '-' that touches another '-' or an end; those are
        %-escaped, so ``--`` only ever separates segments. Every reference
        the old mapping kept apart keeps its folder name."""
        if self.provider == "file":
            return _join(self.reference.strip("/").split("/")) or "root"
        base = _join([*(self.repo_id or "").split("/"), *(self.filename.split("/") if self.filename else [])])
        if self.revision:
            base += "@" + _join(self.revision.split("/"))
        return base

    @classmethod
    def from_slug(cls, provider: str, slug: str) -> "ModelRef":
        """The reference a folder name was made from (INVALID_MODEL_REF when none)."""
        if provider == "file":
            path = "/" + "/".join(_split(slug))
            return parse_model_ref("file://" + quote(path, safe="/"))
        base, at, revision = slug.partition("@")
        text = f"{provider}:" + "/".join(_split(base)) + (("@" + "/".join(_split(revision))) if at else "")
        return parse_model_ref(text)


def _escape(segment: str) -> str:
    out = []
    for i, ch in enumerate(segment):
        if ch == "%":
            out.append("%25")
        elif ch == "@":
            out.append("%40")
        elif ch == "-" and (i == 0 or i == len(segment) - 1 or segment[i - 1] == "-" or segment[i + 1] == "-"):
            out.append("%2D")
        else:
            out.append(ch)
    return "".join(out)


def _join(segments: list[str]) -> str:
    return "--".join(_escape(s) for s in segments)


def _split(text: str) -> list[str]:
    return [unquote(s) for s in text.split("--")]


def invalid(text: str, reason: str = "") -> RbeeError:
    details = {"reference": text, "accepted": ", ".join(ACCEPTED_FORMS)}
    if reason:
        details["reason"] = reason
    return RbeeError(
        "INVALID_MODEL_REF",
        f"Invalid model reference format: '{text}'",
        details,
        [f"Use one of: {', '.join(ACCEPTED_FORMS)}", "Example: hf:HuggingFaceTB/SmolLM2-135M-Instruct"],
    )


def parse_model_ref(text: str) -> ModelRef:
    """Parse and validate; raises RbeeError INVALID_MODEL_REF on anything else."""
    if not isinstance(text, str) or not text.strip() or text != text.strip():
        raise invalid(str(text), "empty or surrounded by spaces")
    if text.startswith("hf:"):
        return _parse_hub(text, text[3:])
    if text.startswith("file:"):
        return _parse_file(text)
    raise invalid(text, "unknown provider (expected 'hf:' or 'file://')")


def is_valid_model_ref(text: str) -> bool:
    try:
        parse_model_ref(text)
    except RbeeError:
        return False
    return True


def _parse_hub(text: str, rest: str) -> ModelRef:
    path_part, at, revision = rest.partition("@")
    if at and not _REVISION.match(revision):
        raise invalid(text, "revision may only contain letters, digits, '.', '_', '-' and '/'")
    if at and (".." in revision or revision.startswith("/") or revision.endswith("/")):
        raise invalid(text, "malformed revision")
    parts = path_part.split("/")
    if len(parts) < 2:
        raise invalid(text, "expected ORG/REPO")
    org, repo, *file_parts = parts
    for name, what in ((org, "organisation"), (repo, "repository")):
        if not _NAME.match(name):
            raise invalid(text, f"{what} name '{name}' is not a valid hub name")
    filename = None
    if file_parts:
        if any(seg in ("", ".", "..") or not _FILE_SEGMENT.match(seg) for seg in file_parts):
            raise invalid(text, "file path must be relative, without empty, '.' or '..' segments")
        filename = "/".join(file_parts)
    repo_id = f"{org}/{repo}"
    reference = repo_id + (f"/{filename}" if filename else "") + (f"@{revision}" if at else "")
    return ModelRef("hf", reference, repo_id=repo_id, filename=filename, revision=revision if at else None)


def _parse_file(text: str) -> ModelRef:
    if not text.startswith("file:///"):
        raise invalid(text, "file references need an absolute path: file:///abs/path")
    raw = unquote(text[len("file://"):])
    if "\x00" in raw:
        raise invalid(text, "path contains a NUL byte")
    path = posixpath.normpath(raw)
    if not PurePosixPath(path).is_absolute() or path == "/":
        raise invalid(text, "file references need an absolute path: file:///abs/path")
    return ModelRef("file", path, path=path)
