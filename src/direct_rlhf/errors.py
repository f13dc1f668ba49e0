"""The one exception type the CLI turns into a one-line message and exit status 2.

Anything the *user* can fix (a bad file, an unknown config key, a missing model) raises
`UserError`; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; `str(err)` is the whole message shown to them."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format 'file:line: field' prefixes consistently across loaders."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if field:
        out += f": field '{field}'"
    return out
