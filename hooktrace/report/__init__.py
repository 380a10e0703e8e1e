"""Reports made from a run's files alone: ``hooktrace report --html`` / ``--tree`` and ``hooktrace diff``.

Data first: :mod:`load` reads the files into a :class:`~hooktrace.report.load.RunData`, then
:mod:`rows` computes plain rows that the terminal tree, the diff and the HTML page all render.
Nothing here imports the agent or the hot path, so a report can be made on a machine without
the training code (only the HTML page needs the ``report`` extra: Plotly's JavaScript).
"""
