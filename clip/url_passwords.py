"""Passwords written into URLs (`https://user:password@host/shards/{000..099}.tar`, a way some object stores and
HTTP servers are reached), hidden from what a training run prints and logs. A shard that cannot be read is
named in a warning, on the console and in train.log, which are shared and pasted into bug reports: such a URL
showed its password there in full. The config (RUN_DIR/config.toml and the checkpoints) keeps it as written:
resuming needs it."""

from __future__ import annotations

import logging
import re

# scheme://user:password@ -- the user name kept (it says which account), the password replaced
# (to the last '@' before the path: a password written with a raw '@' in it, 'p@ss', is hidden whole)
_PASSWORD_IN_URL = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@'\"]*):[^\s/'\"]*@")


def hide_url_passwords(text: str) -> str:
    """`text` with the password of every URL in it replaced by '***'."""
    return _PASSWORD_IN_URL.sub(r"\1:***@", text)


class HideURLPasswords(logging.Filter):
    """A handler filter that writes each record's message with its URLs' passwords hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = hide_url_passwords(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        if record.exc_info and not record.exc_text:  # the traceback, which formatters take from exc_text when set
            record.exc_text = hide_url_passwords(logging.Formatter().formatException(record.exc_info))
        return True


# One filter for every handler: a process that starts several runs (tests, a notebook) adds it once to each
URL_PASSWORDS_HIDDEN = HideURLPasswords()
