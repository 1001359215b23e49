"""Data: corpus sources (incl. the embedded default corpus), token shards (prepare) and the packed loader."""

from lmforge.data.loader import Batch, PackedLoader
from lmforge.data.prepare import prepare_data, write_token_documents
from lmforge.data.sources import DataError, Document, iter_documents, resolve_sources

__all__ = [
    "Batch",
    "DataError",
    "Document",
    "PackedLoader",
    "iter_documents",
    "prepare_data",
    "resolve_sources",
    "write_token_documents",
]
