"""Names from datasets, cards, configs and the command line that become part of a file path.

A model name (a dataset branch, a card's ``model_name``, ``--model``) or a file name from a config is
untrusted data. It becomes one path component only when it is certain to stay one: otherwise the
command stops with an error naming it, and nothing is written.
"""

from __future__ import annotations

#: Longest accepted name, in UTF-8 bytes: file systems allow 255 per component, and suffixes such as
#: ``-attention-scale.png`` or ``.tmp`` are appended to some of these names.
MAX_NAME_BYTES = 200


class UnsafeName(ValueError):
    """A name that cannot be used as a single file or folder name."""


def name_problem(name: object) -> str | None:
    """Why `name` is not a safe single path component, or None when it is.

    Safe: a non-empty string of at most MAX_NAME_BYTES UTF-8 bytes, not ``.`` or ``..``, without a
    path separator (``/``, ``\\``), a drive colon, NUL or another control character, and without
    leading or trailing spaces (which file systems and shells treat inconsistently).
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    if name == "":
        return "is empty"
    if name in (".", ".."):
        return "is a relative folder reference"
    bad = sorted({c for c in name if c in "/\\:" or ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return f"contains {shown} (a path separator or control character)"
    if name != name.strip():
        return "starts or ends with a space"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def safe_path_component(name: object, what: str) -> str:
    """`name` unchanged if it is safe as one file or folder name (see `name_problem`), else UnsafeName.

    `what` says where the name came from, for the message (e.g. "model name from the dataset card").
    """
    problem = name_problem(name)
    if problem is not None:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise UnsafeName(f"{what} {shown} {problem}: it cannot be used as a file or folder name")
    return name  # type: ignore[return-value]


def label_problem(label: object) -> str | None:
    """Why `label` (a free-text label such as a training stage) cannot be stored and shown, or None:
    it must be non-empty text of at most MAX_NAME_BYTES UTF-8 bytes, without control characters
    (a newline or an escape sequence would rewrite the terminal of whoever lists it)."""
    if not isinstance(label, str):
        return f"is a {type(label).__name__}, not text"
    if label.strip() == "":
        return "must not be empty"
    bad = sorted({c for c in label if c in _ESCAPED})
    if bad:
        return f"contains {', '.join(repr(c) for c in bad)} (a control character)"
    if len(label.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


#: Characters a terminal would act on instead of showing: C0 and C1 controls, DEL, and the bidi
#: overrides and isolates (which reorder what follows them on the line).
_ESCAPED = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
            for c in [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x200E, 0x200F, *range(0x202A, 0x202F),
                      *range(0x2066, 0x206A)]}
_ESCAPED.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})
_TRANSLATE = dict(_ESCAPED)
_ESCAPED_KEEP_LINES = {c: e for c, e in _ESCAPED.items() if c not in (ord("\n"), ord("\t"))}
_ESCAPED = {chr(c) for c in _ESCAPED}


def terminal_safe(text: str, keep_lines: bool = False) -> str:
    """`text` with every character a terminal would act on written out as an escape (``\\x1b``, ``\\n``,
    ``\\u202e``), so untrusted text (a model name from a card, a shard's column name) is shown, never
    obeyed. `keep_lines`: newlines and tabs stay (CSV quotes them)."""
    return text.translate(_ESCAPED_KEEP_LINES if keep_lines else _TRANSLATE)
