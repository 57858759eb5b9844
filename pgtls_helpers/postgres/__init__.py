"""The server edge: connections and settings, atomic files with backups, ``pg_hba.conf``
policy, client OS users' files, and the TLS probe's wire code."""
