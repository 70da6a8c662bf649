"""Checks that an id taken from an annotation file is safe to use as a file or store key.

Video ids become file names (``data/<dataset>/videos/<vid><suffix>.mp4``) and keys inside the
feature store; string query ids become store keys too. An id must therefore name exactly one
entry inside its folder: it may not climb out of it, point elsewhere, or be hidden.
"""

from __future__ import annotations

MAX_ID_BYTES = 200
"""Longest id accepted (UTF-8 bytes); leaves room for a suffix and an extension within the
usual 255-byte file-name limit."""

_FORBIDDEN = frozenset("/\\:")


def unsafe_id_reason(name: str) -> str | None:
    """Return why ``name`` cannot be used as a file / store key, or ``None`` when it is safe.

    Rejected: the empty string; leading or trailing white space; a leading ``.`` (hidden
    files, ``.`` and ``..``); the separators ``/``, ``\\`` and ``:`` (absolute paths,
    sub-folders, Windows drives); control characters; more than :data:`MAX_ID_BYTES` bytes.
    """
    if not name:
        return "it is empty"
    if name != name.strip():
        return "it starts or ends with white space"
    if name.startswith("."):
        return "it starts with '.'"
    bad = sorted({c for c in name if c in _FORBIDDEN or ord(c) < 32 or ord(c) == 127})
    if bad:
        return "it contains " + ", ".join(repr(c) for c in bad)
    if len(name.encode("utf-8")) > MAX_ID_BYTES:
        return f"it is longer than {MAX_ID_BYTES} bytes"
    return None
