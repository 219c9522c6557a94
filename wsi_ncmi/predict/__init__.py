"""Using a trained run: ``predict`` (new slides, no labels) and ``heatmap`` (one slide's maps).

Modules: ``slides`` (what was given), ``settings`` (the run's extraction settings -> config and
encoder), ``members`` (every trained seed/fold, through ``train.inference``), ``shifted``
(overlapping patches on the fly), ``maps`` (per-patch values -> picture, CSV, GeoJSON),
``geojson`` (QuPath detections), ``heatmap`` (the ``heatmap`` command), ``runner`` (``predict``).
"""
