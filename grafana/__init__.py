"""hooktrace's Grafana dashboards as code (``build.py``) and the queries they hold (``queries.py``)."""
