"""On-disk formats: one HDF5 feature file per slide (CLAM/TRIDENT-compatible names)."""

from wsi_ncmi.store.h5 import FeatureFile, FeatureWriter, read_attrs, read_feature_file

__all__ = ["FeatureFile", "FeatureWriter", "read_attrs", "read_feature_file"]
