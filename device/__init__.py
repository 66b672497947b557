"""The device daemon and CLI (``python -m device serve|classify|fetch|plan``): runs the head and its early exits,
offloads the rest to the cloud with a deadline and never loses an answer (``runtime.py``), streams its weights
progressively (``delivery.py``), and picks split point and threshold at run time (``scheduler.py``,
``adaptive.py``)."""
