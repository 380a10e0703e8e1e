"""The hot path: hooks that run on the training thread and append to per-step buffers.

Nothing in this package does I/O, takes a lock, syncs a device or imports an exporter.
"""
