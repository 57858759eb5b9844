"""The papermill engine of a run: every notebook in the run's one kernel.

Registered through the ``papermill.engine`` entry point (``pyproject.toml``), which papermill
loads while ``papermill.engines`` itself is being imported; nothing here reaches into
papermill's registry. So that loading this module never needs ``papermill.engines`` half
imported, the class papermill registers only forwards to the real engine, an
``NBClientEngine`` subclass built on first use.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgtls_helpers.runbook.kernel import Kernel

__all__ = ["SharedKernelEngine"]


class SharedKernelEngine:
    """A papermill engine that runs every notebook of a run in one kernel.

    Starting a kernel and importing the package costs more than most steps do; the runner pays
    it once per run. Each notebook still begins with an empty namespace (and ``In [1]``), so no
    notebook can lean on a name another one defined, and each reads as if it ran alone.
    Registered as the ``pgtls-shared-kernel`` engine through the ``papermill.engine`` entry
    point in ``pyproject.toml``; the runner passes its :class:`Kernel` as ``pgtls_kernel``.
    """

    @classmethod
    def execute_notebook(cls, nb: Any, kernel_name: str, **kwargs: Any) -> Any:
        return _engine().execute_notebook(nb, kernel_name, **kwargs)

    @classmethod
    def nb_kernel_name(cls, nb: Any, name: str | None = None) -> str:
        return str(_engine().nb_kernel_name(nb, name))

    @classmethod
    def nb_language(cls, nb: Any, language: str | None = None) -> str:
        return str(_engine().nb_language(nb, language))


@functools.cache
def _engine() -> Any:
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine
    from papermill.log import logger
    from papermill.utils import merge_kwargs, remove_args

    class Engine(NBClientEngine):
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

    return Engine
