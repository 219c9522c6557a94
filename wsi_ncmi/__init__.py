"""wsi-ncmi: whole-slide feature extraction and attention-MIL training with the NCMI loss."""

__version__ = "0.1.0"
