from __future__ import annotations

import hooktrace


def test_all_is_sorted_and_names_every_public_member() -> None:
    assert hooktrace.__all__ == sorted(hooktrace.__all__)
    public = {name for name in dir(hooktrace) if not name.startswith("_") and name not in {"annotations", "Any", "nn"}}
    modules = {
        "agent",
        "config",
        "errors",
        "summary",
        "envvars",
        "distributed",
        "health",
        "export",
        "cli",
        "summary_builder",
        "assets",
        "report",
        "slowest_rank",
    }
    assert set(hooktrace.__all__) - {"__version__"} == public - modules


def test_error_tree_lets_users_catch_everything_with_one_class() -> None:
    for cls in (
        hooktrace.ConfigError,
        hooktrace.AttachError,
        hooktrace.GradientExplosionError,
        hooktrace.NonFiniteGradientError,
    ):
        assert issubclass(cls, hooktrace.HooktraceError)
