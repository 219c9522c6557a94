"""``wsi-ncmi extract``: slides -> tissue -> patch grid -> embeddings -> one HDF5 per slide."""

from wsi_ncmi.extract.config import ExtractConfig
from wsi_ncmi.extract.runner import run_extraction

__all__ = ["ExtractConfig", "run_extraction"]
