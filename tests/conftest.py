from collections.abc import Iterator

import pytest

from streamtasks import App, Settings

#: The workflow tests' task registry fixture (``calls``).
pytest_plugins = ["tests.workflow_fixtures"]


@pytest.fixture(autouse=True)
def no_streamtasks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests see no ``STREAMTASKS_*`` variable of the shell or CI (``App(...)`` reads
    them); a test that wants one sets it."""
    import os

    for name in [n for n in os.environ if n.startswith("STREAMTASKS_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def app() -> Iterator[App]:
    settings = Settings(broker="memory://", backend="memory://", partitions=3,
                        commit_interval_s=0.0)
    application = App("test", settings=settings)
    yield application
    application.close()
