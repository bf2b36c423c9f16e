"""Settings: flags beat environment, environment beats defaults, bad values are refused."""

from __future__ import annotations

import pytest

from server.config import Settings, load_settings


def test_defaults() -> None:
    settings = load_settings([], {})
    assert settings == Settings()
    assert settings.model == "facebook/dinov2-small" and settings.dtype == "auto"


def test_environment_then_flags() -> None:
    env = {"MODEL_ID": "/models/x", "MAX_BATCH_SIZE": "8", "MAX_WAIT_MS": "2.5", "PORT": "1234", "HTTP_PORT": "8080"}
    settings = load_settings(["--max-batch-size", "16"], env)
    assert settings.model == "/models/x"
    assert settings.max_batch_size == 16
    assert settings.max_wait_ms == 2.5
    assert settings.port == 1234
    assert settings.http_port == 8080 and load_settings(["--http-port", "0"], env).http_port == 0
    assert load_settings([], {}).http_port is None  # no HTTP server unless asked


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"MAX_BATCH_SIZE": "many"}, "MAX_BATCH_SIZE='many' is not a valid int"),
        ([], {"DTYPE": "int8"}, "DTYPE must be one of"),
        (["--max-batch-size", "0"], {}, "max_batch_size must be at least 1"),
        ([], {"BACKLOG_WAIT_MS": "-1"}, "backlog_wait_ms and grace_s must not be negative"),
        (["--http-port", "70000"], {}, "http_port must be from 0 to 65535 (0 picks a free one), not 70000"),
        ([], {"HTTP_PORT": "web"}, "HTTP_PORT='web' is not a valid int"),
    ],
)
def test_bad_values_end_with_a_clear_message(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(argv, env)
    assert message in str(info.value)


def test_decode_workers_default_from_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from server.config import MAX_AUTO_DECODE_WORKERS

    assert Settings(preprocess_workers=3).decode_workers == 3
    for cpus, in_processes, in_threads in ((1, 1, 1), (2, 2, 2), (16, 16, MAX_AUTO_DECODE_WORKERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert Settings().decode_workers == in_processes
        assert Settings(decode_in="threads").decode_workers == in_threads
