"""The one exception type users see.

Every problem a user can fix (a bad option, a missing file, a corrupt artifact) raises `MaskforgeError`
with a message that names the thing at fault. The CLI prints it as one `error: ...` line and exits 2;
anything else is a bug and exits 1.
"""


class MaskforgeError(Exception):
    """A user-facing error: the message alone must tell the user what is wrong and where."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, whitespace collapsed: what a one-line error quotes of a
    library's own exception (onnx, onnxruntime, safetensors, protobuf)."""
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__
