"""The wire contract between device and cloud: ``spinn_v1.proto`` and its generated modules (regenerate with
``python -m proto.generate``), the feature codec both sides use (``codec.py``) and the manifest's wire form
(``manifest.py``)."""
