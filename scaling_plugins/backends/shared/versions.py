"""The version check each engine's ``compat`` module runs when it is imported: a clear ``ImportError`` that names
the versions verified, instead of an ``AttributeError`` in the middle of a step."""
from __future__ import annotations


def require_supported_version(package: str, version: str, supported: tuple[str, ...], verified: str,
                              by: str = "scaling_plugins") -> None:
    """``ImportError`` unless ``version`` of ``package`` starts with one of the ``supported`` prefixes ("0.19."):
    "deepspeed 0.18.2 is not supported by scaling_plugins (supported: 0.19.x; verified on 0.19.8)"."""
    if not version.startswith(supported):
        shown = ", ".join(prefix.rstrip(".") + ".x" for prefix in supported)
        raise ImportError(f"{package} {version} is not supported by {by} (supported: {shown}; verified on "
                          f"{verified})")
