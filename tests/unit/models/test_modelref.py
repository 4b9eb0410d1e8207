"""Model references: the accepted forms and everything else."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings, strategies as st

from rbee.errors import RbeeError
from rbee.modelref import ACCEPTED_FORMS, ModelRef, is_valid_model_ref, parse_model_ref


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


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("hf:o/r/x/y.gguf", "hf:o/r/x--y.gguf"),
        ("hf:o/r@v/1", "hf:o/r@v--1"),
        ("file:///a--b", "file:///a/b"),
        ("file:///x-/y", "file:///x/-y"),
        ("hf:o/r/a-/b.gguf", "hf:o/r/a/-b.gguf"),
    ],
)
def test_references_the_old_folder_names_merged_get_folders_of_their_own(one: str, other: str) -> None:
    assert parse_model_ref(one).slug() != parse_model_ref(other).slug()


def test_folder_names_of_plain_references_are_unchanged():
    """Catalogs and staging folders of earlier versions keep working."""
    assert parse_model_ref("hf:HuggingFaceTB/SmolLM2-135M-Instruct").slug() == "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert parse_model_ref("hf:org/repo/sub/w.Q4_K-M.gguf@v1.0").slug() == "org--repo--sub--w.Q4_K-M.gguf@v1.0"
    assert parse_model_ref("hf:org/repo@refs/pr/1").slug() == "org--repo@refs--pr--1"
    assert parse_model_ref("file:///srv/models/tiny-model").slug() == "srv--models--tiny-model"


_SEGMENT = st.text(alphabet="ab-.%@_~ 1", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
_HUB_SEGMENT = st.text(alphabet="ab-._1", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))


@st.composite
def references(draw) -> str:
    if draw(st.booleans()):
        return "file:///" + "/".join(quote(s) for s in draw(st.lists(_SEGMENT, min_size=1, max_size=4)))
    org, repo = draw(st.sampled_from(["o", "o-p", "o.q"])), draw(st.sampled_from(["r", "r-s", "r_t"]))
    files = draw(st.lists(_HUB_SEGMENT, max_size=3))
    revision = draw(st.one_of(st.none(), st.lists(st.sampled_from(["v", "v-", "-x", "1", "a--b", "r.c"]), min_size=1, max_size=3)))
    text = f"hf:{org}/{repo}" + "".join(f"/{f}" for f in files)
    if revision and not any(part.startswith("-") and i == 0 for i, part in enumerate(revision)):
        text += "@" + "/".join(revision)
    return text


@settings(max_examples=300, deadline=None)
@given(references(), references())
def test_a_folder_name_belongs_to_exactly_one_reference(one: str, other: str) -> None:
    try:
        a, b = parse_model_ref(one), parse_model_ref(other)
    except RbeeError:
        return
    assert (a.slug() == b.slug()) == (a == b)
    for ref in (a, b):
        assert "/" not in ref.slug() and ModelRef.from_slug(ref.provider, ref.slug()) == ref
