"""The versions of our dependencies that pronghorn is tested with, checked at run time."""
from __future__ import annotations

import importlib.metadata
import logging

from packaging.version import Version

logger = logging.getLogger(__name__)

# (inclusive lower, exclusive upper) bounds we test in CI and on the GPU machine.
TESTED = {
    "transformers": ("5.0", "6.0"),
    "peft": ("0.17", "1.0"),
    "trl": ("1.0", "2.0"),
    "bitsandbytes": ("0.45", "1.0"),
}


class UnsupportedVersionError(RuntimeError):
    pass


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(packages=("transformers", "peft", "trl"), strict: bool = True) -> dict[str, str | None]:
    """Check installed versions against the tested window; raise (or warn) naming the fix command."""
    found = {}
    for pkg in packages:
        low, high = TESTED[pkg]
        version = installed_version(pkg)
        found[pkg] = version
        if version is None:
            continue
        if not (Version(low) <= Version(version) < Version(high)):
            message = (
                f"pronghorn is tested with {pkg}>={low},<{high} but {pkg}=={version} is installed; "
                f"fix with: pip install '{pkg}>={low},<{high}'"
            )
            if strict:
                raise UnsupportedVersionError(message)
            logger.warning(message)
    return found
