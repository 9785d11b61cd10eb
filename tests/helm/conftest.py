import pytest

from tests.helm.chart import PROFILES


@pytest.fixture(params=list(PROFILES))
def profile(request) -> str:
    return request.param
