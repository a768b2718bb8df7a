"""Kubernetes EndpointSlice conditions as member status flags, pure.

The rules of ``../shared/reference/k8s.md`` §3.4: ``ready`` nil means ready; ``serving`` nil
means "as ready"; ``terminating`` nil means not terminating. A pod that is shutting down but
still serving keeps its sessions and takes no new ones (httpd's drain flag ``N``); one that no
longer serves leaves the pool, which flushes its idle connections and cuts its in-flight
requests after the pool's ``removalGrace``.
"""

from __future__ import annotations


def endpoint_flags(ready: bool | None, serving: bool | None, terminating: bool | None
                   ) -> frozenset[str] | None:
    """The member's status flags, or None when the endpoint must not be a member at all."""
    is_ready = True if ready is None else ready
    is_serving = is_ready if serving is None else serving
    is_terminating = bool(terminating)
    if is_terminating:
        return frozenset("N") if is_serving else None
    if is_ready:
        return frozenset()
    # Not ready and not terminating: starting up or failing its readiness probe. Kept as a
    # disabled member, so that it comes back with its counters when the probe passes.
    return frozenset("D")
