"""A password written into a shard URL (http://user:password@host/...) is hidden from the console and train.log."""

from __future__ import annotations

from test_train_loop import DEMO, TINY

import clip.data.shards as shards
import clip.train
from clip.cli.train import main
from clip.url_passwords import hide_url_passwords


def test_the_password_of_every_url_in_a_text_is_hidden_and_nothing_else() -> None:
    said = ("shard https://alice:S3cr%40t@h.example:8443/cc-000001.tar (curl reading https://alice:S3cr%40t@h.example"
            ":8443/cc-000001.tar exited); 'simplecache::s3://bob:pw@bucket/x.tar'")
    assert hide_url_passwords(said) == (
        "shard https://alice:***@h.example:8443/cc-000001.tar (curl reading https://alice:***@h.example:8443/"
        "cc-000001.tar exited); 'simplecache::s3://bob:***@bucket/x.tar'")
    assert hide_url_passwords("http://u:p@ss@host/x.tar") == "http://u:***@host/x.tar"  # a raw '@' in it
    for kept in ("http://host:8080/a@b.tar", "http://alice@host/x.tar", "http://[::1]:80/x.tar", "a:b@c", "s3://b/x"):
        assert hide_url_passwords(kept) == kept


def test_a_shard_urls_password_reaches_neither_the_console_nor_train_log(tmp_path, monkeypatch, capsys) -> None:
    # Every unreadable shard was named in a warning with its URL whole, and the run's last line too
    url = "http://alice:Secret@127.0.0.1:9/s-{000000..000001}.tar"

    def unreachable(address):
        raise OSError(f"cannot connect to reach {address}")

    monkeypatch.setattr(shards, "open_url", unreachable)
    monkeypatch.setattr(clip.train, "require_shard_readers", lambda sources: None)  # (without curl: "needs aiohttp")
    run_dir = tmp_path / "run"
    status = main([str(DEMO), "--output-dir", str(run_dir), *TINY, "eval.every_n_steps=0", "data.workers=0",
                   "data.sources.0.kind=shards", f"data.sources.0.path={url}", "data.sources.0.num_samples=64"])
    assert status == 2
    err = capsys.readouterr().err
    logged = (run_dir / "train.log").read_text()
    assert "alice:***@127.0.0.1:9/s-000000.tar" in err and "alice:***@127.0.0.1:9/s-000000.tar" in logged
    assert "Secret" not in err and "Secret" not in logged


def test_a_logged_tracebacks_urls_lose_their_passwords_too() -> None:
    import io
    import logging

    from clip.url_passwords import URL_PASSWORDS_HIDDEN

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(URL_PASSWORDS_HIDDEN)
    logger = logging.getLogger("test_url_passwords")
    logger.addHandler(handler)
    try:
        raise OSError("cannot read http://alice:Secret@h/x.tar")
    except OSError:
        logger.error("the run failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert "OSError: cannot read http://alice:***@h/x.tar" in stream.getvalue() and "Secret" not in stream.getvalue()


def test_an_unexpected_errors_traceback_on_the_console_hides_url_passwords(tmp_path) -> None:
    # Errors main() does not expect end the command in Python's own traceback, which showed a URL's password whole
    import subprocess
    import sys

    code = ("import sys, clip.cli.train as cli\n"
            "def failing(*args, **kwargs):\n"
            "    raise RuntimeError('cannot read https://alice:Secret@store.example/s-000.tar')\n"
            "cli.train = failing\n"
            f"sys.argv = ['clip-train', {str(DEMO)!r}, '--output-dir', {str(tmp_path / 'run')!r}]\n"
            "cli.command()\n")
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert ended.returncode == 1
    assert "Traceback (most recent call last)" in ended.stderr
    assert "RuntimeError: cannot read https://alice:***@store.example/s-000.tar" in ended.stderr
    assert "Secret" not in ended.stderr


def test_a_shard_urls_password_is_hidden_from_the_consoles_log_lines_as_from_train_log(
    tmp_path, monkeypatch, caplog,
) -> None:
    # Only train.log's handler hid it: the console's warnings named each unreadable shard with its password.
    # (pytest's capture handler is on the root logger here, where clip-train's console handler would be.)
    url = "http://alice:Secret@127.0.0.1:9/s-{000000..000001}.tar"

    def unreachable(address):
        raise OSError(f"cannot connect to reach {address}")

    monkeypatch.setattr(shards, "open_url", unreachable)
    monkeypatch.setattr(clip.train, "require_shard_readers", lambda sources: None)
    status = main([str(DEMO), "--output-dir", str(tmp_path / "run"), *TINY, "eval.every_n_steps=0", "data.workers=0",
                   "data.sources.0.kind=shards", f"data.sources.0.path={url}", "data.sources.0.num_samples=64"])
    assert status == 2
    assert "alice:***@127.0.0.1:9/s-000000.tar" in caplog.text and "Secret" not in caplog.text


def test_a_config_error_naming_a_url_hides_its_password(tmp_path, capsys) -> None:
    # The config's refusal was printed as it was, the source's URL with its password whole
    url = "http://alice:Secret@h.example/s-{000000..000001}.tar"
    status = main([str(DEMO), "--output-dir", str(tmp_path / "run"), "data.sources.0.kind=manifest",
                   f"data.sources.0.path={url}"])
    assert status == 2
    err = capsys.readouterr().err
    assert "'http://alice:***@h.example/s-{000000..000001}.tar' names WebDataset shards" in err
    assert "Secret" not in err
