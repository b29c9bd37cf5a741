"""AWS error codes every AWS-backed part of the providers sorts the same way."""

from __future__ import annotations

ACCESS_DENIED = frozenset({"AccessDeniedException", "AccessDenied"})
"""The credentials are valid but lack the permission."""

BAD_CREDENTIALS = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredTokenException",
        "ExpiredToken",
    }
)
"""The credentials themselves are wrong, expired or missing."""
