import pytest

from tests.conftest import PgTarget

pytestmark = pytest.mark.integration


def test_postgres_answers(pg: PgTarget) -> None:
    assert pg.execute("select 1") == [(1,)]
