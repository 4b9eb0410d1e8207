"""Model references: the accepted forms and everything else."""

from __future__ import annotations

import pytest

from rbee.errors import RbeeError
from rbee.modelref import ACCEPTED_FORMS, is_valid_model_ref, parse_model_ref


@pytest.mark.parametrize(
    ("text", "provider", "reference", "repo", "filename", "revision"),
    [
        ("hf:HuggingFaceTB/SmolLM2-135M-Instruct", "hf", "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", None, None),
        ("hf:org/repo/model.Q4_K_M.gguf", "hf", "org/repo/model.Q4_K_M.gguf", "org/repo", "model.Q4_K_M.gguf", None),
        ("hf:org/repo/sub/dir/w.safetensors@v1.0", "hf", "org/repo/sub/dir/w.safetensors@v1.0", "org/repo", "sub/dir/w.safetensors", "v1.0"),
        ("hf:org/repo@refs/pr/1", "hf", "org/repo@refs/pr/1", "org/repo", None, "refs/pr/1"),
        ("hf:a_b.c/d-e@0123456789abcdef0123456789abcdef01234567", "hf", "a_b.c/d-e@0123456789abcdef0123456789abcdef01234567", "a_b.c/d-e", None, "0123456789abcdef0123456789abcdef01234567"),
    ],
)
def test_hub_references(text, provider, reference, repo, filename, revision):
    ref = parse_model_ref(text)
    assert (ref.provider, ref.reference, ref.repo_id, ref.filename, ref.revision) == (
        provider, reference, repo, filename, revision,
    )
    assert str(ref) == text
    assert parse_model_ref(str(ref)) == ref


def test_file_reference_is_normalised_and_decoded():
    ref = parse_model_ref("file:///srv/models/../models/my%20model.gguf")
    assert ref.provider == "file"
    assert ref.reference == "/srv/models/my model.gguf"
    assert str(ref) == "file:///srv/models/my model.gguf"


@pytest.mark.parametrize(
    "text",
    [
        "", " hf:a/b", "hf:a/b ", "gpt2", "HF:a/b", "hf:", "hf:onlyorg", "hf:/repo", "hf:org/", "hf:-org/repo",
        "hf:org/repo-", "hf:org--x/repo", "hf:org/re..po", "hf:org/repo/../x", "hf:org/repo//x", "hf:org/repo/./x",
        "hf:org/repo@", "hf:org/repo@a b", "hf:org/repo@../x", "hf:org/repo@/main", "hf:or g/repo",
        "file:relative/path", "file://host/abs", "file:///", "s3://bucket/x", "https://example.invalid/x",
        "hf:" + "a" * 97 + "/repo",
    ],
)
def test_invalid_references(text):
    with pytest.raises(RbeeError) as exc:
        parse_model_ref(text)
    err = exc.value
    assert err.code == "INVALID_MODEL_REF"
    assert err.message == f"Invalid model reference format: '{text}'"
    assert err.details["accepted"] == ", ".join(ACCEPTED_FORMS)
    assert any("hf:ORG/REPO" in s and "file:///" in s for s in err.suggestions)
    assert not is_valid_model_ref(text)


def test_slugs_are_distinct_per_reference():
    refs = ["hf:o/r", "hf:o/r/f.gguf", "hf:o/r@dev", "hf:o/r/f.gguf@dev", "hf:o/r2", "hf:o2/r"]
    slugs = {parse_model_ref(r).slug() for r in refs}
    assert len(slugs) == len(refs)
    assert all("/" not in s for s in slugs)
