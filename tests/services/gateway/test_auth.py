import pytest

from services.errors import Unauthenticated
from services.gateway.auth import Authenticator


def test_open_mode_is_the_default_tenant():
    assert Authenticator(None).tenant([]) == "default"


def test_keys_map_to_tenants(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text('[keys]\n"k-alpha" = "alpha"\n"k-beta" = "beta"\n')
    auth = Authenticator.from_file(str(f))
    assert auth.tenant([("authorization", "Bearer k-alpha")]) == "alpha"
    assert auth.tenant([("x", "y"), ("authorization", "Bearer k-beta")]) == "beta"
    for md in ([], [("authorization", "k-alpha")], [("authorization", "Bearer nope")]):
        with pytest.raises(Unauthenticated):
            auth.tenant(md)


def test_bad_tenant_names_are_refused():
    with pytest.raises(ValueError, match="tenant name"):
        Authenticator({"k": "bad tenant!"})
