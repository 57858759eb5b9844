"""The one Jupyter kernel a run shares between its five notebooks, and its papermill engine.

The papermill engine that runs notebooks in it is :mod:`pgtls_helpers.runbook.engine`; papermill
itself is imported in the kernel's start-up thread, while the lab cluster starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgtls_helpers.errors import PgtlsError

__all__ = ["ENGINE", "KERNEL_ARGS", "Kernel", "kernel_name"]


def kernel_name() -> str:
    """A kernel that runs this interpreter (the venv's): ``python3`` when it resolves here,
    else a ``pgtls`` kernelspec installed into this environment."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    me = Path(sys.executable).resolve()
    major, minor = sys.version_info[:2]
    bare = {"python", f"python{major}", f"python{major}.{minor}"}
    for name in ("python3", "pgtls"):
        try:
            argv0 = ksm.get_kernel_spec(name).argv[0]
        except NoSuchKernel:
            continue
        # jupyter_client starts a bare "python" with the interpreter that starts the kernel
        if argv0 in bare or Path(argv0).resolve() == me:
            return name
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ipykernel",
            "install",
            "--sys-prefix",
            "--name",
            "pgtls",
            "--display-name",
            "Python (pgtls)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PgtlsError(
            f"no Jupyter kernel runs {sys.executable} and installing one failed ({last}); run "
            f"'{sys.executable} -m ipykernel install --sys-prefix --name pgtls'"
        )
    return "pgtls"


# Each notebook starts with an empty namespace and In [1]; imported modules stay loaded.
_RESET = "get_ipython().reset(new_session=False)\nget_ipython().execution_count = 1\n"
# What the notebooks import, loaded while the lab cluster starts.
_WARM = """\
import importlib
for _name in ("pgtls_helpers.notebook", "pandas", "ipywidgets"):
    importlib.import_module(_name)
"""
KERNEL_ARGS = ["--IPKernelApp.log_level=CRITICAL", "--HistoryManager.enabled=False"]
ENGINE = "pgtls-shared-kernel"  # the papermill.engine entry point's name


class Kernel:
    """The run's kernel and one connection to it, shared by the five notebooks."""

    def __init__(self, name: str) -> None:
        from jupyter_client.manager import AsyncKernelManager

        self.name = name
        self.km = AsyncKernelManager(kernel_name=name)
        self.kc: Any = None
        self._starting: threading.Thread | None = None

    def start_in_background(self) -> Callable[[], None]:
        """Start the kernel and import the package in a thread; returns a join that connects
        to the kernel, or raises :class:`PgtlsError` when it did not come up."""
        import asyncio

        problem: list[BaseException] = []

        async def start() -> None:
            await self.km.start_kernel(extra_arguments=KERNEL_ARGS, cwd=os.getcwd())
            kc = self.km.client()
            kc.start_channels()
            try:
                await kc.wait_for_ready(timeout=60)
                await kc.execute_interactive(
                    _WARM, silent=True, store_history=False, timeout=60, output_hook=lambda m: None
                )
            finally:
                kc.stop_channels()

        def target() -> None:
            try:
                asyncio.run(start())
                # importing papermill is not free either: do it here too. Its engines come
                # from entry points; a stale install lacks ours.
                from papermill.engines import papermill_engines
                from papermill.exceptions import PapermillException

                try:
                    papermill_engines.get_engine(ENGINE)
                except PapermillException:
                    raise PgtlsError(
                        f"papermill has no '{ENGINE}' engine: the pgtls entry points are not "
                        f"installed; run '{sys.executable} -m pip install -e .' in the checkout"
                    ) from None
            except BaseException as exc:  # handed to the caller by join()
                problem.append(exc)

        thread = threading.Thread(target=target, name="pgtls-kernel", daemon=True)
        thread.start()
        self._starting = thread

        def join() -> None:
            from jupyter_core.utils import run_sync

            thread.join()
            try:
                if problem:
                    raise problem[0]
                # the connection lives in this thread's event loop, where papermill runs
                self.kc = self.km.client()
                self.kc.start_channels()
                run_sync(self.kc.wait_for_ready)(timeout=60)
                self.kc.allow_stdin = False
            except Exception as exc:
                raise PgtlsError(
                    f"the Jupyter kernel '{self.name}' did not start ({exc}); check "
                    f"'{sys.executable} -m jupyter kernelspec list'"
                ) from exc

        return join

    def fresh_namespace(self) -> Any:
        """Empty the kernel's namespace for the next notebook; returns the connection."""
        from jupyter_core.utils import run_sync

        reply = run_sync(self.kc.execute_interactive)(
            _RESET, silent=True, store_history=False, timeout=60, output_hook=lambda m: None
        )
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the kernel's namespace was not reset: {reply['content']}")
        return self.kc

    def close(self) -> None:
        from jupyter_core.utils import run_sync

        if self._starting is not None:  # a set-up that failed early: let the start finish
            self._starting.join(timeout=90)
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km.has_kernel:
            run_sync(self.km.shutdown_kernel)(now=True)
