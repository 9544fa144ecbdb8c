"""What counts as a secret, and how it is hidden: one rule for every output.

Error messages, reload results, status, diagnostics, logs and ``config
get|export`` all hide secrets through this module, so that they can never
disagree about what a secret is. It imports nothing of omerowebd: the log
set-up and every command can use it without a cycle.

Two ways a secret is hidden:

* by name: the value of a property or setting whose name looks like a
  secret (:func:`is_secret`), also inside JSON values (the ``[setting,
  value]`` pairs of ``omero.web.django_additional_settings``, nested tables
  such as ``DATABASES``) and the secrets of a URL: its password
  (``redis://:pw@host``, also one holding an ``@``), a key standing alone
  before the ``@`` (``https://KEY@sentry.example``), a secret-named query
  parameter (``redis://host/0?password=pw``);
* by value: free text (an error message that quotes a value, a line a
  library wrote) has every known secret value replaced (:class:`Secrets`).
  :func:`remember` collects the secrets of every config file read in this
  process, so the last line of defence (the log processor, reload results)
  knows them without being handed the config.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

HIDDEN = "*" * 8  # what `omero config get` prints for a secret
ADDITIONAL_SETTINGS = "omero.web.django_additional_settings"
# Shorter values are not searched for in free text: "1" or "on" would blank
# out half a message. They are still hidden wherever they appear by name.
MIN_SCRUB = 4
MAX_KNOWN = 4096  # secrets remembered per process (a reload adds a few)

# Words that make a name a secret wherever they appear in it.
_ANYWHERE = ("password", "passwd", "secret", "token")
# Endings of the last word: secret_key, apikey, db.pass, mail_pwd, LDAP_BIND_PW; not keyboard, KEY_PREFIX.
_LAST_WORD_ENDS = ("key", "pass", "pwd", "pw", "dsn")
_LAST_WORDS = ("credential", "credentials", "passphrase")
# Words of a name: snake_case, dotted, camelCase and CAPITALS alike (EMAIL_HOST_PASSWORD, apiKey, APIKey).
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# The secrets of a URL (cache, database, Sentry locations), each as the group "secret":
# The host follows the last "@" of the authority (people write passwords with an "@"
# unencoded, and parsers split there too); a "/", "?" or "#" ends the authority.
_HOST_FOLLOWS = r"""(?=@[^@/?#\s"']*(?:[/?#\s"']|\Z))"""
_URL_SECRETS = (
    # scheme://user:password@host
    re.compile(r"""(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#\s"']*:)(?P<secret>[^/?#\s"']+?)""" + _HOST_FOLLOWS),
    # scheme://KEY@host: a key alone before the "@" (Sentry's DSN, token URLs). A user
    # name stays: it is short, and hiding "omero" would blank out every path that names it.
    re.compile(r"""(?P<head>[A-Za-z][A-Za-z0-9+.-]*://)(?P<secret>[^:@/?#\s"']{16,})""" + _HOST_FOLLOWS),
    # ?password=...&token=...: a query parameter with a secret name.
    re.compile(r"""(?P<head>[?&;](?P<name>[^=&;#?\s"']+)=)(?P<secret>[^&;#\s"']+)"""),
)


def _url_secrets(text: str) -> list[str]:
    """The secrets in the URLs of ``text``."""
    return [m.group("secret") for pattern in _URL_SECRETS for m in pattern.finditer(text) if _is_url_secret(m)]


def _hide_url_secrets(text: str) -> str:
    for pattern in _URL_SECRETS:
        text = pattern.sub(lambda m: m.group("head") + HIDDEN if _is_url_secret(m) else m.group(0), text)
    return text


def _is_url_secret(m: re.Match[str]) -> bool:
    name = m.groupdict().get("name")
    return name is None or is_secret(name)


def is_secret(name: str) -> bool:
    """Is the value of ``name`` (an OMERO property, a Django setting, a table key) a secret?

    `omero config get`'s rule (names ending in ``pass``/``password``) plus
    secrets, keys, tokens and their usual spellings.
    """
    lower = name.lower()
    if any(word in lower for word in _ANYWHERE):
        return True
    words = [w.lower() for w in _WORDS.findall(name)]
    if not words:
        return False
    last = words[-1]
    return last.endswith(_LAST_WORD_ENDS) or last in _LAST_WORDS


def value(name: str, text: str | None) -> str | None:
    """``text``, the value of property ``name``, as it may be shown: secrets in it replaced by HIDDEN.

    A secret name hides the whole value. A JSON value keeps its shape with
    the secret parts hidden, so admins can still read what is set; an
    ``omero.web.django_additional_settings`` that is not JSON is hidden whole
    (it cannot be told where its passwords are).
    """
    if not text:
        return text
    if is_secret(name):
        return HIDDEN
    if text.lstrip()[:1] in ("[", "{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        else:
            hidden = _hide(parsed)
            return text if hidden == parsed else json.dumps(hidden, ensure_ascii=False)
    if name == ADDITIONAL_SETTINGS:
        return HIDDEN
    return _hide_url_secrets(text)


def properties(props: Mapping[str, str]) -> dict[str, str]:
    """Every value through :func:`value`."""
    return {name: value(name, text) or text for name, text in props.items()}


def hides_anything(name: str, text: str | None) -> bool:
    return value(name, text) != text


def structure(obj: Any, name: str | None = None) -> Any:
    """A nested structure (a log event, a status reply) with secrets hidden.

    Keys are names: a string under a secret name is hidden; a string under
    a property name goes through :func:`value`; anything else is searched
    for known secrets (:func:`scrub_known`).
    """
    if isinstance(obj, Mapping):
        return {k: structure(v, k if isinstance(k, str) else None) for k, v in obj.items()}
    if isinstance(obj, list):
        return [structure(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(structure(v) for v in obj)
    if isinstance(obj, str):
        if name is not None and is_secret(name) and obj:
            return HIDDEN
        if name is not None and name.startswith("omero."):
            obj = value(name, obj) or obj
        return scrub_known(_hide_url_secrets(obj))  # a URL in a library's message: its secrets too
    return obj


def argv(words: Iterable[str]) -> list[str]:
    """A command line with secrets hidden: ``NAME=VALUE``/``--name=VALUE`` and ``--secret-option VALUE``."""
    out: list[str] = []
    hide_next = False
    for word in words:
        name, eq, rest = word.partition("=")
        if hide_next and not word.startswith("-"):
            out.append(HIDDEN)
        elif eq and rest and is_secret(name.lstrip("-")):
            out.append(f"{name}={HIDDEN}")  # gunicorn --env SECRET_KEY=..., --password=...
        else:
            out.append(scrub_known(_hide_url_secrets(word)))
        hide_next = word.startswith("-") and not eq and is_secret(word.lstrip("-"))
    return out


def _hide(obj: Any) -> Any:
    """A parsed JSON value with the values of secret-named keys hidden (tables and [name, value] pairs)."""
    if isinstance(obj, dict):
        return {k: (HIDDEN if _is_set(v) and is_secret(str(k)) else _hide(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) == 2 and isinstance(obj[0], str) and is_secret(obj[0]) and _is_set(obj[1]):
            return [obj[0], HIDDEN]  # ["EMAIL_HOST_PASSWORD", "..."]
        return [_hide(v) for v in obj]
    if isinstance(obj, str):
        return _hide_url_secrets(obj)
    return obj


def _is_set(v: Any) -> bool:
    return v is not None and v != "" and v != {} and v != []


# -- secret values, for free text ---------------------------------------------------


def secret_values(props: Mapping[str, str]) -> set[str]:
    """The texts that must never appear in free text, for these properties."""
    found: set[str] = set()
    for name, text in props.items():
        if not text:
            continue
        if is_secret(name):
            found.add(text)
            continue
        parsed: Any = None
        if text.lstrip()[:1] in ("[", "{"):
            try:
                parsed = json.loads(text)
            except ValueError:
                if name == ADDITIONAL_SETTINGS:
                    found.add(text)  # cannot be told where its passwords are: all of it
                    continue
            else:
                _collect(parsed, found)
        elif name == ADDITIONAL_SETTINGS:
            found.add(text)
        found.update(_url_secrets(text))
    return found


def _collect(obj: Any, found: set[str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_secret(str(k)) and _is_set(v):
                _add_json(v, found)
            else:
                _collect(v, found)
    elif isinstance(obj, list):
        if len(obj) == 2 and isinstance(obj[0], str) and is_secret(obj[0]) and _is_set(obj[1]):
            _add_json(obj[1], found)
        else:
            for v in obj:
                _collect(v, found)
    elif isinstance(obj, str):
        found.update(_url_secrets(obj))


def _add_json(v: Any, found: set[str]) -> None:
    if isinstance(v, str):
        found.add(v)
    else:
        found.add(json.dumps(v))
        _collect_strings(v, found)


def _collect_strings(obj: Any, found: set[str]) -> None:
    """Every string inside a secret value (a whole table under PASSWORDS: each string in it)."""
    if isinstance(obj, dict):
        for v in obj.values():
            _collect_strings(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _collect_strings(v, found)
    elif isinstance(obj, str):
        found.add(obj)


class Secrets:
    """Replaces secret values in free text, also as a message quotes them (repr, JSON, XML)."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for v in values:
            for form in _forms(v):
                if len(form) >= MIN_SCRUB:
                    forms.add(form)
        # Longest first: a secret that contains another is replaced whole.
        self._forms = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, self._forms))) if self._forms else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def scrub(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(HIDDEN, text)


def _forms(v: str) -> set[str]:
    """``v`` as it may appear in a message: itself, quoted by repr() or JSON, escaped for XML; twice over
    (a repr() of a JSON value that holds it, as OMERO.web's parsers word a refusal)."""
    forms = {v}
    for _ in range(2):
        forms |= {quoted for form in forms for quoted in _quoted(form)}
    # A multi-line secret shows up line by line (a message keeps its first line).
    forms.update(line for line in v.splitlines() if line.strip())
    return forms


def _quoted(v: str) -> tuple[str, ...]:
    # repr() of a longer text that holds both quotes escapes ' where repr(v) alone would not.
    return (repr(v)[1:-1], repr(v + '"')[1:-2], json.dumps(v)[1:-1], json.dumps(v, ensure_ascii=False)[1:-1],
            v.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"))


def for_properties(props: Mapping[str, str]) -> Secrets:
    return Secrets(secret_values(props))


def scrub(text: str, props: Mapping[str, str]) -> str:
    """``text`` with the secrets of ``props`` (and every remembered one) replaced by HIDDEN."""
    return scrub_known(for_properties(props).scrub(text))


# -- what this process has seen ----------------------------------------------------------

_lock = threading.Lock()
_known: set[str] = set()
_known_secrets = Secrets()


def remember(props: Mapping[str, str]) -> None:
    """Add the secrets of a config just read to the ones :func:`scrub_known` replaces.

    Called wherever a config is parsed, so that every message that may quote
    one (an error, a reload result, a log line) can be cleaned without the
    config at hand. Only grows: a message about the previous config may
    still be on its way out.
    """
    global _known_secrets
    fresh = secret_values(props) - _known
    if not fresh:
        return
    with _lock:
        _known.update(fresh)
        if len(_known) > MAX_KNOWN:  # a process that reads endless configs: keep the newest
            for old in list(_known - fresh)[: len(_known) - MAX_KNOWN]:
                _known.discard(old)
        _known_secrets = Secrets(_known)


def scrub_known(text: str) -> str:
    return _known_secrets.scrub(text)


def forget_all() -> None:
    """For tests."""
    global _known_secrets
    with _lock:
        _known.clear()
        _known_secrets = Secrets()
