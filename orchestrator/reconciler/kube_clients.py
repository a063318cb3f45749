"""KubeRay sites' Kubernetes clients, loaded from the kubeconfig with a bound on the wait.

Loading a kubeconfig context runs its credential command when it names one (an exec plugin:
EKS's ``aws eks get-token``, GKE's ``gke-gcloud-auth-plugin``), and the kubernetes client
waits for it with no timeout: a command waiting on a browser login, or on a network call
that never ends, never answers. Awaited without a bound, it held its site's call for good
(calls run one at a time per site), so the site read Waiting for ever, never tried again,
saying nothing of why. Here each load runs in a thread of its own and is waited on at most
``wait_s``; past it the call fails, naming the command
(:class:`~orchestrator.adapters.kuberay.CredentialsUnanswered`), and the site is out of
reach and tried again on its backoff. The command cannot be stopped (the client gives no
handle on it), so a try that finds its load still running waits on that one again rather
than starting another: one load per site and context at a time, however long the command
takes, and once it answers the next try takes its client. The threads are daemons, so a
command that never answers holds up neither the event loop's shutdown nor the process's exit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters import daemon_calls, kuberay

#: How long a try waits for a kubeconfig context to load (its credential command to
#: answer) before its site is out of reach: a command answers in seconds, or waits on
#: something a person must do.
WAIT_S = 60.0


@dataclass
class _Load:
    """One load in its thread: its outcome, and the command it runs once its thread has read it."""

    command: str | None = None
    waited: bool = False  # a try gave up waiting on it
    taken: bool = False  # a try took its client
    answer: asyncio.Future[Any] = field(init=False)


class ClientLoads:
    """The loads of KubeRay sites' clients from ``kubeconfig`` (None: ``$KUBECONFIG``, else
    ``~/.kube/config``), one at a time per site and context, each waited on ``wait_s`` at a time."""

    def __init__(self, kubeconfig: str | None = None, wait_s: float = WAIT_S) -> None:
        self.kubeconfig = kubeconfig
        self.wait_s = wait_s
        self._loads: dict[tuple[str, str | None], _Load] = {}

    async def client(self, site: str, context: str | None) -> Any:
        """A client on ``context`` for ``site``: the load still running for them, else a new
        one, waited on ``wait_s`` at most. Raises
        :class:`~orchestrator.adapters.kuberay.CredentialsUnanswered` past it, the load
        left running for the next try; what the load raised once it ended."""
        key = (site, context)
        load = self._loads.get(key)
        if load is None:
            load = self._loads[key] = self._start(context)
        await asyncio.wait((load.answer,), timeout=self.wait_s)  # neither its end nor a cancel of this try cancels the load
        if not load.answer.done():
            again, load.waited = load.waited, True
            raise kuberay.CredentialsUnanswered(load.command, context, self.wait_s, again)
        if self._loads.get(key) is load:
            del self._loads[key]  # taken (or failed): the next try loads anew
        if load.answer.exception() is None:
            if load.taken:  # by another try for the site on this context (it moved namespace): each actuator closes its own
                return await self.client(site, context)
            load.taken = True
        return load.answer.result()

    async def close(self) -> None:
        """Let every load go: the clients of those that answered untaken are closed; those
        still running are left to end in their threads, their answers dropped."""
        loads, self._loads = list(self._loads.values()), {}
        for load in loads:
            if not load.answer.done():
                load.answer.cancel()
            elif load.answer.exception() is None:
                await asyncio.to_thread(load.answer.result().close)

    def _start(self, context: str | None) -> _Load:
        load = _Load()

        def run() -> Any:
            load.command = kuberay.credential_command(context, self.kubeconfig)  # before it runs: a try that gives up names it
            return kuberay.api_client_for(context, self.kubeconfig)

        load.answer = daemon_calls.start(run, f"kubeconfig {context}", dropped=lambda client: client.close())
        return load
