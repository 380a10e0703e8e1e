"""The ``hooktrace`` command line: run, report, rules, dashboards."""
