"""The ``storage_options`` zckpt gives an ``s3://`` URL it opens itself, where the user set
none (:func:`default_options`): on an ``http://`` endpoint botocore's CRC32 request checksum is
turned off, since the signed payload SHA-256 and zckpt's ETag check already cover every byte
(``docs/layout.md``, "What checks the bytes")."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["default_options"]


def _endpoint(options: Mapping[str, Any]) -> str:
    client_kwargs = options.get("client_kwargs") or {}
    return str(
        options.get("endpoint_url")
        or client_kwargs.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or ""
    )


def _checksum_setting_of_profile(options: Mapping[str, Any]) -> object:
    """The profile's own ``request_checksum_calculation`` (an explicit Config would override
    it, so it counts as the user's choice); None when it sets none or cannot be read."""
    try:
        import botocore.session  # type: ignore[import-untyped]

        session = botocore.session.Session(profile=options.get("profile"))
        return session.get_scoped_config().get("request_checksum_calculation")
    except Exception:  # no botocore, or a profile that does not exist: s3fs will say so
        return None


def default_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``storage_options`` for an ``s3://`` URL, with zckpt's defaults where the user set none.

    On an ``http://`` endpoint, botocore's default CRC32 request checksum is turned off
    (``config_kwargs={"request_checksum_calculation": "when_required"}``): there botocore
    signs each payload's SHA-256, which the server checks, and zckpt checks each part's and
    object's ETag against the MD5 of the bytes sent, so the CRC32 adds a third hash of every
    byte and no check. Anywhere else (https, real S3) the options are returned unchanged:
    there the CRC32 goes in a trailer instead of a signed payload SHA-256, the cheaper of the
    two. A ``request_checksum_calculation`` in ``config_kwargs``, in the environment
    (``AWS_REQUEST_CHECKSUM_CALCULATION``) or in the profile wins.

    Example:
        >>> default_options({"endpoint_url": "http://127.0.0.1:9000"})["config_kwargs"]
        {'request_checksum_calculation': 'when_required'}
        >>> default_options({"endpoint_url": "https://s3.example.com"})
        {'endpoint_url': 'https://s3.example.com'}
        >>> mine = {"endpoint_url": "http://minio:9000",
        ...         "config_kwargs": {"request_checksum_calculation": "when_supported"}}
        >>> default_options(mine) == mine
        True
    """
    out = dict(options)
    if not _endpoint(options).lower().startswith("http://"):
        return out
    config = dict(options.get("config_kwargs") or {})
    if (
        "request_checksum_calculation" in config
        or os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION")
        or _checksum_setting_of_profile(options) is not None
    ):
        return out
    config["request_checksum_calculation"] = "when_required"
    out["config_kwargs"] = config
    return out
