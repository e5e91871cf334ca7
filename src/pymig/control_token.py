"""The control socket's token: what a client on loopback TCP proves itself with.

A unix control socket is a file of mode 0600, so the file system lets only its owner connect.
Loopback TCP has no such gate: any local user, and a web page through a browser, can open a
connection.  So a server that serves TCP makes a random token, writes it to a file only its
owner can read (mode 0600), and serves a TCP connection only once its first message,
``qmp_capabilities``, carries that token as its ``token`` argument.

The file is ``--control-tcp-token PATH`` where given; by default
``$XDG_RUNTIME_DIR/pymig/control-PORT.token``, or ``/tmp/pymig-UID/control-PORT.token`` where
XDG_RUNTIME_DIR is not set (a directory of mode 0700 that must be the user's own, as tmux
keeps its sockets).  A client of the same user finds PORT's token there without being told.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
import tempfile

from pymig.errors import ControlError
from pymig.transport.sockfile import remove_if_same

#: Random bytes in a token (written as hex).
TOKEN_BYTES = 32
#: A token file is read up to this size; a token is far shorter.
MAX_TOKEN_FILE_BYTES = 4096


def new_token() -> str:
    return secrets.token_hex(TOKEN_BYTES)


def matches(given: str, token: str) -> bool:
    """Whether ``given`` is ``token``, in a time that does not tell how much of it was right."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode())


def runtime_dir() -> str:
    """Where default token files live: this user's runtime directory."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "pymig")
    return os.path.join(tempfile.gettempdir(), f"pymig-{os.geteuid()}")


def default_path(port: int) -> str:
    """The token file of a control socket on loopback TCP ``port``, when not told another."""
    return os.path.join(runtime_dir(), f"control-{port}.token")


def _private_dir(path: str) -> None:
    """Create ``path`` (0700), or check that it is a directory only this user can enter: in a
    shared directory such as /tmp, anybody could have made it first."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(f"cannot create {path} for the control token: "
                           f"{exc.strerror or exc}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ControlError(f"{path} is not a private directory of this user (a directory of "
                           f"mode 0700 owned by uid {os.geteuid()}); pymig will not put the "
                           f"control token there (give --control-tcp-token PATH)")


class TokenFile:
    """A token written to ``path`` (0600), whole or not at all; :meth:`remove` takes it away
    again unless another file has replaced it."""

    def __init__(self, path: str, token: str, *, default: bool = False):
        self.path = path
        folder = os.path.dirname(path) or "."
        if default:
            _private_dir(folder)
        try:
            # mkstemp creates the file 0600 (O_EXCL, so never through a link); the rename
            # shows readers a whole token, and replaces a dead server's file of the same name.
            fd, staging = tempfile.mkstemp(dir=folder, prefix=".pymig-token-")
        except OSError as exc:
            raise ControlError(f"cannot write the control token {path}: "
                               f"{exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "w") as out:
                out.write(token + "\n")
            os.rename(staging, path)
            self._created = os.lstat(path)
        except OSError as exc:
            try:
                os.unlink(staging)
            except OSError:
                pass
            raise ControlError(f"cannot write the control token {path}: "
                               f"{exc.strerror or exc}") from None

    def remove(self) -> None:
        remove_if_same(self.path, self._created)


def read(path: str) -> str:
    """The token in the file at ``path``; ControlError saying why when there is none."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_TOKEN_FILE_BYTES)
    except OSError as exc:
        raise ControlError(f"cannot read the control token {path}: {exc.strerror or exc} (the "
                           f"server writes it when it starts; give --control-tcp-token PATH "
                           f"if it wrote it elsewhere)") from None
    token = text.decode("ascii", "replace").strip()
    if not token:
        raise ControlError(f"the control token file {path} is empty")
    return token
