"""Which models this hive lets a worker load (S13 confinement).

A spawn names a model by catalog reference (the hive loads the entry's
files) or by a path on the node; a path must lie, links followed, inside the
models folder or a folder the operator added (``model_dirs``). Anything else
is refused before anything looks at it: no preflight walks a tree a client
chose.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from rbee.errors import RbeeError
from rbee.modelref import parse_model_ref
from rbee.paths import within


class ModelLookup(Protocol):
    """The model catalog as a spawn sees it (the provisioner implements it)."""

    async def loadable(self, model_ref: str, backend: str) -> Path | None: ...


class ModelAccess:
    def __init__(self, roots: Sequence[Path], catalog: ModelLookup | None = None) -> None:
        self.roots = [Path(r) for r in roots]
        self.catalog = catalog

    def check_path(self, path: str | Path, field: str = "model_path") -> Path:
        """The resolved ``path`` if it lies inside a model root, else PATH_NOT_ALLOWED."""
        try:
            return within(self.roots, path, what="Model path", details={"field": field})
        except RbeeError as err:
            err.suggestions[:0] = [
                "Download the model into the hive's catalog (rbee-keeper models download MODEL --node NODE) and spawn it by reference",
                "Or place it under the hive's models folder, or ask the node's operator to add its folder "
                "to model_dirs (RBEE_HIVE_MODEL_DIRS)",
            ]
            raise

    async def locate(self, model_path: str, model_ref: str, backend: str) -> tuple[Path, str]:
        """What the worker loads and the reference it is listed under."""
        if model_ref:
            ref = str(parse_model_ref(model_ref))
        else:
            ref = ""
        if model_path:
            path = self.check_path(model_path)
            return path, ref or f"file://{path}"
        if not ref:
            raise RbeeError(
                "INVALID_ARGUMENT",
                "model_path or model_ref is required",
                {"field": "model_ref"},
                ["Name a model in the hive's catalog (hf:ORG/REPO) or a folder under its models folder"],
            )
        found = await self.catalog.loadable(ref, backend) if self.catalog is not None else None
        if found is None:
            raise RbeeError(
                "MODEL_NOT_FOUND",
                f"Model not in this hive's catalog: {ref}",
                {"model": ref, "field": "model_ref"},
                [f"Download it first: rbee-keeper models download {ref} --hive HOST:PORT"],
            )
        # Catalog entries were confined when registered; checked again in case
        # the catalog predates confinement or its files were replaced by links.
        return self.check_path(found, "model_ref"), ref
