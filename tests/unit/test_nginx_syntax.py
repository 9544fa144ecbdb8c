"""nginx_syntax.py: one rule for what may stand in nginx text, and for addresses."""

from __future__ import annotations

import pytest

from omerowebd.config import NginxSettings
from omerowebd.nginx_syntax import address_problem, listen_address, listen_problem, settings_problems, value_problem


@pytest.mark.parametrize("address", ["127.0.0.1:4080", "[::1]:4080", "web-1.example.org:80", "unix:/run/web.sock"])
def test_good_addresses(address: str):
    assert address_problem(address) is None


@pytest.mark.parametrize("address, words", [
    ("127.0.0.1", "use HOST:PORT"),
    ("127.0.0.1:0", "from 1 to 65535"),
    ("::1:80", "use HOST:PORT"),
    ("[::g]:80", "not an IPv6 address"),
    ("unix:run/web.sock", "must be absolute"),
    ("unix:/run/" + "s" * 120, "at most 107 bytes"),
    # A unix path becomes an nginx upstream server: nothing in it may end a directive or quote.
    ("unix:/run/a;b.sock", "ends an nginx directive"),
    ('unix:/run/a"b.sock', "quote"),
    ("unix:/run/a b.sock", "space"),
    ("unix:/run/a\\b.sock", "backslash"),
    ("unix:/run/a}b.sock", "closes an nginx block"),
])
def test_bad_addresses_say_why(address: str, words: str):
    problem = address_problem(address)
    assert problem is not None and words in problem and repr(address) in problem


@pytest.mark.parametrize("listen", ["80", "127.0.0.1:8080", "[::]:443 ssl http2", "*:80", "unix:/run/n.sock",
                                    "443 ssl backlog=512"])
def test_good_listen(listen: str):
    assert listen_problem(listen) is None


def test_listen_uses_the_address_rule_for_a_unix_path():
    assert listen_problem("unix:/run/a;b.sock") == address_problem("unix:/run/a;b.sock")


@pytest.mark.parametrize("value, how, words", [
    ("a;b", {}, "ends an nginx directive"),
    ("a b", {}, "space"),
    ("a b", {"words": True}, None),
    ("#x", {"words": True}, "comment"),
    ("^a\\.b$", {"backslash": True}, None),
    ("", {}, "empty"),
])
def test_values(value: str, how: dict[str, bool], words: str | None):
    problem = value_problem(value, **how)
    assert (problem is None) if words is None else (problem is not None and words in problem)


def test_the_nginx_table_is_checked_without_importing_nginx_py():
    assert settings_problems(NginxSettings()) == []
    found = dict(settings_problems(NginxSettings(listen="8080 sssl", upstreams=("unix:/a;b",), max_body_size="1x")))
    assert "'sssl' is not a parameter" in found["listen"]
    assert "HOST:PORT" in found["upstreams"]
    assert "nginx size" in found["max_body_size"]
    # a value that breaks the text is reported once, by the text rule, not again by the listen rule
    assert settings_problems(NginxSettings(listen="80;")) == [("listen", "'80;' contains ';', which ends an nginx directive")]


@pytest.mark.parametrize("listen, address", [
    ("80", (None, "80")),
    ("8080 default_server", (None, "8080")),
    ("127.0.0.1:8080", ("127.0.0.1", "8080")),
    ("[::]:443 ssl", ("[::]", "443")),
    ("[::1]", ("[::1]", "80")),
    ("localhost", ("localhost", "80")),
    ("unix:/run/n.sock", None),
    ("", None),
])
def test_the_address_nginx_listens_on(listen: str, address: tuple[str | None, str] | None):
    assert listen_address(listen) == address


def test_host_and_port_is_the_one_parse_of_an_accepted_tcp_address():
    from omerowebd.nginx_syntax import host_and_port

    assert host_and_port("127.0.0.1:4080") == ("127.0.0.1", 4080)
    assert host_and_port("[::1]:9449") == ("::1", 9449)
    assert host_and_port("web2.example.org:4080") == ("web2.example.org", 4080)
    for bad in ("unix:/run/x.sock", "localhost", "host:port"):
        with pytest.raises(ValueError):
            host_and_port(bad)
