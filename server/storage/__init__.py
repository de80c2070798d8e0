"""Storage: the durable queue (SQLite or PostgreSQL, one set of statements) and where result images are kept."""

from .factory import is_database_url, is_s3_url, open_results, open_store
from .ids import is_request_id, is_result_file_name, new_request_id
from .results import FolderResults, Results, ResultWriteFailed
from .sql import Row, SchemaTooNew, StoreUnavailable
from .sql import SqlStore as Store
from .sqlite import SqliteStore
from .states import CANCELED, COMPLETED, FAILED, IN_PROGRESS, IN_QUEUE, TERMINAL, State

__all__ = ["CANCELED", "COMPLETED", "FAILED", "IN_PROGRESS", "IN_QUEUE", "TERMINAL", "FolderResults", "Results",
           "ResultWriteFailed", "Row", "SchemaTooNew", "SqliteStore", "State", "Store", "StoreUnavailable",
           "is_database_url", "is_request_id", "is_result_file_name", "is_s3_url", "new_request_id", "open_results",
           "open_store"]
