"""Each server setting is declared once (a field of ServerConfig) and is a `pixart serve` flag and a PIXART_<FLAG>
variable because of that: the command line wins over the variable, which wins over the default."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from server.cli import check
from server.config import ServerConfig, add_arguments, flag_of, from_args


def parse(argv: list[str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(["--engine", "export", *argv]))


def test_every_setting_is_a_flag_with_its_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = {opt for action in parser._actions for opt in action.option_strings}
    settings = [f for f in fields(ServerConfig) if f.name != "engine_options"]
    assert {flag_of(f) for f in settings} <= options and "--webhook-backoff" in options
    parsed = parse([])
    for f in settings:
        if f.name != "engine":
            default = f.default_factory() if callable(f.default_factory) else f.default
            assert getattr(parsed, f.name) == default, f.name


def test_flags_win_over_variables_which_win_over_defaults(monkeypatch) -> None:
    monkeypatch.setenv("PIXART_MAX_QUEUE", "7")
    monkeypatch.setenv("PIXART_LEASE", "12.5")
    monkeypatch.setenv("PIXART_NO_WARMUP", "1")
    monkeypatch.setenv("PIXART_METRICS_PORT", "off")  # the alias' variable
    monkeypatch.setenv("PIXART_APP_ID", "acme/one, acme/two")
    monkeypatch.setenv("PIXART_API_KEYS", "k1,k2")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    cfg = parse(["--max-queue", "9", "--app-id", "acme/three", "--providers", "CUDAExecutionProvider, CPU"])
    assert (cfg.max_queue, cfg.lease_s, cfg.warmup, cfg.http_port) == (9, 12.5, False, None)
    assert cfg.app_ids == ["acme/one", "acme/two", "acme/three"] and cfg.api_keys == ["k1", "k2"]
    assert cfg.s3_endpoint_url == "http://minio:9000" and cfg.providers == ["CUDAExecutionProvider", "CPU"]
    assert parse(["--http-port", "0"]).http_port == 0 and parse(["--metrics-port", "9000"]).http_port == 9000


def test_the_engine_is_required_unless_its_variable_names_it(monkeypatch) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    monkeypatch.setenv("PIXART_ENGINE", "/models/default")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_args(parser.parse_args([])).engine == "/models/default"


def test_settings_that_cannot_work_together_are_refused() -> None:
    with pytest.raises(SystemExit, match="--tls-cert and --tls-key"):
        check(parse(["--tls-cert", "c.pem"]))
    with pytest.raises(SystemExit, match="--results"):
        check(parse(["--store", "postgresql://db/pixart"]))
    with pytest.raises(SystemExit, match="--lease"):
        check(parse(["--lease", "1", "--poll-interval", "0.5"]))
    check(parse([]))
