"""The papermill engine of a run: every notebook in the run's one kernel.

Registered through the ``papermill.engine`` entry point (``pyproject.toml``), which papermill
loads when ``papermill.engines`` is imported; nothing here reaches into papermill's registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine
from papermill.log import logger
from papermill.utils import merge_kwargs, remove_args

if TYPE_CHECKING:
    from pgtls_helpers.runbook.kernel import Kernel

__all__ = ["SharedKernelEngine"]


class SharedKernelEngine(NBClientEngine):
    """A papermill engine that runs every notebook of a run in one kernel.

    Starting a kernel and importing the package costs more than most steps do; the runner pays
    it once per run. Each notebook still begins with an empty namespace (and ``In [1]``), so no
    notebook can lean on a name another one defined, and each reads as if it ran alone.
    Registered as the ``pgtls-shared-kernel`` engine through the ``papermill.engine`` entry
    point in ``pyproject.toml``; the runner passes its :class:`Kernel` as ``pgtls_kernel``.
    """

    @classmethod
    def execute_managed_notebook(
        cls,
        nb_man: Any,
        kernel_name: str,
        log_output: bool = False,
        stdout_file: Any = None,
        stderr_file: Any = None,
        start_timeout: int = 60,
        execution_timeout: int | None = None,
        **kwargs: Any,
    ) -> Any:
        kernel: Kernel = kwargs.pop("pgtls_kernel")
        kwargs = remove_args(["input_path"], **kwargs)
        safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
        final_kwargs = merge_kwargs(
            safe_kwargs,
            timeout=execution_timeout or kwargs.get("timeout"),
            startup_timeout=start_timeout,
            kernel_name=kernel_name,
            log=logger,
            log_output=log_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
            km=kernel.km,
        )
        client = PapermillNotebookClient(nb_man, **final_kwargs)
        client.kc = kernel.fresh_namespace()
        return client.execute()
