"""What both daemons share about serving: admission control (``admission``) and the Prometheus exporter
(``metrics``)."""
