"""server.py against a real cluster: facts, settings, reloads and the server's own verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgtls_helpers.errors import ServerError
from pgtls_helpers.lab import LabCA, LabCluster
from pgtls_helpers.postgres.server import Server


def _server(cluster: LabCluster, **overrides: object) -> Server:
    return Server(cluster.conninfo(**overrides))  # type: ignore[arg-type]


def test_facts_are_absolute_paths_from_the_servers_own_settings(lab_cluster: LabCluster) -> None:
    with _server(lab_cluster) as server:
        facts = server.facts()
    assert facts.ssl is False
    assert facts.data_directory == lab_cluster.pgdata
    # the defaults are relative ('server.crt'); they resolve against the data directory
    assert facts.ssl_cert_file == lab_cluster.pgdata / "server.crt"
    assert facts.ssl_key_file == lab_cluster.pgdata / "server.key"
    assert facts.hba_file == lab_cluster.pgdata / "pg_hba.conf"
    assert facts.ssl_ca_file is None
    assert facts.port == lab_cluster.port and facts.version_num >= 100000
    assert facts.is_superuser
    assert facts.data_directory_owner == (
        lab_cluster.pgdata.stat().st_uid,
        lab_cluster.pgdata.stat().st_gid,
    )


def test_alter_system_is_read_back_and_reset(fresh_cluster: LabCluster) -> None:
    with _server(fresh_cluster) as server:
        assert server.auto_conf_value("ssl_min_protocol_version") is None
        server.alter_system("ssl_min_protocol_version", "TLSv1.3")
        assert server.auto_conf_value("ssl_min_protocol_version") == "TLSv1.3"
        assert server.show("ssl_min_protocol_version") == "TLSv1.2"  # not reloaded yet
        assert server.reload_and_wait()
    with _server(fresh_cluster) as server:
        assert server.show("ssl_min_protocol_version") == "TLSv1.3"
        server.alter_system("ssl_min_protocol_version", None)
        assert server.auto_conf_value("ssl_min_protocol_version") is None


def test_a_bad_value_is_refused_in_one_sentence(fresh_cluster: LabCluster) -> None:
    with _server(fresh_cluster) as server, pytest.raises(ServerError, match="ALTER SYSTEM SET"):
        server.alter_system("ssl", "maybe")


def test_file_setting_errors_show_what_the_next_reload_would_reject(
    fresh_cluster: LabCluster,
) -> None:
    conf = fresh_cluster.pgdata / "postgresql.conf"
    original = conf.read_bytes()
    conf.write_bytes(original + b"\nssl_min_protocol_version = 'TLSv9'\n")
    try:
        with _server(fresh_cluster) as server:
            errors = server.file_setting_errors()
        assert errors and "ssl_min_protocol_version" in errors[0]
    finally:
        conf.write_bytes(original)
    with _server(fresh_cluster) as server:
        assert server.file_setting_errors() == []


def test_hba_errors_come_from_the_file_on_disk(fresh_cluster: LabCluster) -> None:
    hba = fresh_cluster.pgdata / "pg_hba.conf"
    original = hba.read_bytes()
    with _server(fresh_cluster) as server:
        assert server.hba_errors() == []
        rows = server.hba_rules()
        assert {r.type for r in rows} >= {"local", "host"}
        hba.write_bytes(original + b"hostnossl all all all eject\n")
        try:
            (error,) = server.hba_errors()
            assert "eject" in error and error.startswith("line ")
        finally:
            hba.write_bytes(original)


def test_ssl_status_of_the_runbooks_own_connection(
    fresh_cluster: LabCluster, lab_ca: LabCA, tmp_path: Path
) -> None:
    with _server(fresh_cluster) as server:
        assert server.ssl_status().ssl is False
    key, cert = lab_ca.issue(["localhost", "127.0.0.1"])
    fresh_cluster.serve_certificate(key, [cert, *lab_ca.intermediates])
    with _server(fresh_cluster, sslmode="require") as server:
        status = server.ssl_status()
    assert status.ssl and status.version and status.version.startswith("TLSv1.")
    assert status.cipher and status.bits


def test_log_tail_needs_the_logging_collector(lab_cluster: LabCluster) -> None:
    with _server(lab_cluster) as server:
        assert server.current_logfile() is None
        assert server.log_tail("anything") is None


def test_an_unreachable_server_is_one_sentence(tmp_path: Path) -> None:
    from pgtls_helpers.lab import free_port

    server = Server(
        {
            "host": "127.0.0.1",
            "port": free_port(),
            "user": "postgres",
            "dbname": "postgres",
            "connect_timeout": 2,
        }
    )
    with pytest.raises(ServerError, match=r"^cannot connect to 127\.0\.0\.1:\d+: ") as err:
        server.facts()
    assert "\n" not in str(err.value)
