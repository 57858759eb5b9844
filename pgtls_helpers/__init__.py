"""pgtls: take a PostgreSQL server from SSL off to verified TLS with CA-signed certificates.

The package is layered (arrows point down only):

- :mod:`pgtls_helpers.cli`: one module per ``pgtls`` command;
- :mod:`pgtls_helpers.display`: what the notebooks show;
- :mod:`pgtls_helpers.runbook`: parameters, the work directory, the steps, rollback, the runner;
- :mod:`pgtls_helpers.postgres`: the server edge (settings, files, ``pg_hba.conf``, clients, probe);
- :mod:`pgtls_helpers.pki`: pure certificate work.

The notebooks import :mod:`pgtls_helpers.notebook`, the short list of what they call.
"""
