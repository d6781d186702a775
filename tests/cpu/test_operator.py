"""Operator experience: `ziggurat --version`, a busy port refused in one line, and
a port whose previous server just stopped (TIME_WAIT) accepted at once."""

from __future__ import annotations

import socket

import pytest

from ziggurat import __version__
from ziggurat.cluster import cli
from ziggurat.cluster.deploy import _check_port_free


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ziggurat {__version__}"


def test_a_listening_port_is_refused_and_a_time_wait_one_is_not():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    with pytest.raises(RuntimeError, match=f"cannot serve on 127.0.0.1:{port}"):
        _check_port_free("127.0.0.1", port)
    # A connection the server closes first leaves the server's side in TIME_WAIT.
    c = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()
    srv.close()
    c.recv(1)
    c.close()
    _check_port_free("127.0.0.1", port)  # what a restart right after a stop does
