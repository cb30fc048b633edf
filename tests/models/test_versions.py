"""The tested-version window check names the package, the window and the fix command."""
import pytest

from pronghorn import versions


def test_out_of_window_version_is_named_with_fix(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", lambda pkg: "4.40.0" if pkg == "transformers" else None)
    with pytest.raises(versions.UnsupportedVersionError, match=r"transformers==4.40.0.*pip install 'transformers>=5.0,<6.0'"):
        versions.check_versions(("transformers",))


def test_installed_versions_are_in_window():
    found = versions.check_versions(("transformers", "peft", "trl"))
    assert all(found.values())
