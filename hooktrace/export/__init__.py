"""Exporters: everything that leaves the process. They run on the worker thread only."""
