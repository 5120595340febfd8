from collections.abc import Iterator

import pytest

from streamtasks import App, Settings

#: The workflow tests' task registry fixture (``calls``).
pytest_plugins = ["tests.workflow_fixtures"]


@pytest.fixture
def app() -> Iterator[App]:
    settings = Settings(broker="memory://", backend="memory://", partitions=3,
                        commit_interval_s=0.0)
    application = App("test", settings=settings)
    yield application
    application.close()
