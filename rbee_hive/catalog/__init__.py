"""The hive's catalogs: models (``models.db``) and worker environments (``workers.db``)."""

from rbee_hive.catalog.models import ModelCatalog, ModelRecord
from rbee_hive.catalog.workers import WorkerCatalog, WorkerEnvRecord

__all__ = ["ModelCatalog", "ModelRecord", "WorkerCatalog", "WorkerEnvRecord"]
