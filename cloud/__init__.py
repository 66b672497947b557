"""The cloud daemon (``python -m cloud``): serves the tail of the early-exit model behind every split point over
gRPC (``server.py``: Inference, ModelDelivery, health, reflection), with validation and answers in
``inference.py``, dynamic batching in ``batcher.py``, progressive packages in ``delivery.py`` and the optional
forward process in ``worker.py``."""
