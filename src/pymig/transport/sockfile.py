"""Socket files in the file system: private from the moment they exist, never put in place of
something else, and removed only while they are still the one this process made.

A unix socket file's mode decides who may connect (connect() needs write permission on it),
so pymig's socket files are 0600: only their owner (and root) reach them.  The mode is set on
the socket before bind(): Linux gives the new file the socket's mode less the umask, so there
is no moment at which the file is wider, and the process-wide umask (shared by every thread)
is left alone.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

#: Who may connect to a socket file pymig creates: its owner.
SOCKET_MODE = 0o600


def claim(path: str) -> None:
    """Make ``path`` free for a new socket file: nothing there, or a dead socket (removed).

    Raises ValueError, with the reason, when something else is there: a file of another kind
    (left untouched) or a socket another process still serves.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path} exists and is not a socket; pymig will not replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # removed meanwhile
            return
        if exc.errno != errno.ECONNREFUSED:
            raise
        os.unlink(path)  # nobody listens: a leftover of a process that is gone
    else:
        raise ValueError(f"another process is listening on {path}")
    finally:
        probe.close()


def bind_private(sock: socket.socket, path: str) -> os.stat_result:
    """Bind the AF_UNIX ``sock`` at ``path``, a new file of mode 0600; returns its stat.

    ``path`` must be free (see :func:`claim`): bind() never replaces a file.
    """
    os.fchmod(sock.fileno(), SOCKET_MODE)
    sock.bind(path)
    created = os.lstat(path)
    if stat.S_IMODE(created.st_mode) & ~SOCKET_MODE:
        os.unlink(path)
        raise OSError(errno.EPERM, f"the socket file {path} came out with mode "
                                   f"{stat.S_IMODE(created.st_mode):o}, not {SOCKET_MODE:o}")
    return created


def remove_if_same(path: str, created: os.stat_result) -> None:
    """Remove ``path`` if it is still the file ``created`` describes (not one put there
    since by someone else)."""
    try:
        now = os.lstat(path)
    except OSError:
        return
    if (now.st_dev, now.st_ino) == (created.st_dev, created.st_ino):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
