"""The embedded default: a throwaway CA shaped like the article's (:mod:`.ca`), throwaway
clusters (:mod:`.cluster`), and a lab fleet of them for the Ansible playbooks (:mod:`.fleet`)."""

from __future__ import annotations

from pgtls_helpers.lab.ca import LabCA
from pgtls_helpers.lab.cluster import LabCluster, find_bindir, free_port, server_bindirs

__all__ = ["LabCA", "LabCluster", "find_bindir", "free_port", "server_bindirs"]
