"""The relocation pass: after the greedy, move single replicas to other candidates while
that lowers the cost, which repairs the greedy's early choices.

The greedy places each replica where it helps most given those before it; with two or more
demand points an early replica can end up serving neither well once later ones exist.
Each round scores every (replica to take away, option to put it) pair in array operations,
a few replicas at a time (``RELOCATION_CHUNK_BYTES``: the scores are replicas × options ×
demand points), and makes the best improving move that capacity and spread allow, at most
``RELOCATION_ROUNDS`` times. ``simulation.budget`` sizes a what-if's work by the same rounds.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from orchestrator.scheduler import candidates
from orchestrator.scheduler.capacity import Capacity
from orchestrator.scheduler.job import Job
from orchestrator.scheduler.model import Variant
from orchestrator.scheduler.spread import DomainCounts


RELOCATION_ROUNDS = 4  # improving moves per deployment; later ones gain little
RELOCATION_CHUNK_BYTES = 32 << 20  # scratch per chunk of replicas scored by the relocation pass


def relocate(capacity: Capacity, job: Job, options: candidates.Options, spread: DomainCounts | None) -> None:
    """Move single replicas to other candidates while that lowers the cost.

    Each round scores every (replica to take away, option to put it) pair in one array
    operation and makes the best improving move that capacity and spread allow.
    """
    w = job.weights
    weight = np.array([w.latency_per_ms * d.share for d in job.demand])
    index = options.position
    running = options.lists[2]
    taken = job.taken(capacity.fleet)  # the other deployments of the model stay put meanwhile
    for _ in range(RELOCATION_ROUNDS):
        count = Counter((s, v.name) for s, v, _ in job.placed)
        if any(key not in index for key in count):
            return  # placed outside the final candidate list (after a widened search)
        opened = Counter(s for s, _, _ in job.placed)
        counts = np.zeros(len(options.site), dtype=np.int64)
        for key, n in count.items():
            counts[index[key]] = n
        move_in = options.static + np.where(counts >= running, job.move_cost, 0.0)
        refund_all = options.static + np.where(counts > running, job.move_cost, 0.0)
        open_sites = sorted(opened)
        first: dict[int, tuple[int, str]] = {}
        for key in count:
            first.setdefault(key[0], key)
        rows = options.rtt[[index[first[s]] for s in open_sites]]
        best_all = rows.min(axis=0)
        # RTT per point without each open site: the runner-up where that site was nearest
        if len(open_sites) > 1:
            ranked = np.sort(rows, axis=0)
            without = np.where(rows == ranked[0], ranked[1], ranked[0])
        else:
            without = np.full((1, len(weight)), w.unserved_rtt_ms)
        keys = sorted(count)
        if spread is None:
            # Taking one replica off a site that keeps others changes no latency: of those,
            # only the one whose removal refunds the most can give the best move.
            stacked = [k for k in keys if opened[k[0]] > 1]
            if len(stacked) > 1:
                keep = max(stacked, key=lambda k: (refund_all[index[k]], k))
                keys = [k for k in keys if opened[k[0]] == 1 or k == keep]
        a = np.array([index[k] for k in keys])
        base = np.array([without[open_sites.index(k[0])] if opened[k[0]] == 1 else best_all for k in keys])
        latency = _latency_after(options.rtt, base, weight)
        gain = move_in[None, :] - refund_all[a][:, None] + latency - float(weight @ best_all)
        gain[np.arange(a.size), a] = np.inf
        if gain.min() >= -1e-9:
            return
        moved = False
        for flat in _smallest(gain.ravel(), 16):
            i, c = divmod(flat, gain.shape[1])
            if gain[i, c] >= -1e-9:
                break
            site_a = options.site[a[i]]
            if options.site[c] != site_a and not capacity.has_room(options.site[c], options.variant[c]):
                continue
            if taken is not None and taken[options.site[c]]:
                continue
            if spread is not None and not spread.allows(options.domain[c], options.domain[a[i]]):
                continue
            if _swap(capacity, job, keys[i], options.site[c], options.variant[c]):
                if spread is not None:
                    spread.shift(options.domain[a[i]], -1)
                    spread.shift(options.domain[c], +1)
                moved = True
                break
        if not moved:
            return


def _latency_after(rtt: np.ndarray, base: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted latency per (replica taken away, option put in): ``np.minimum(rtt[None],
    base[:, None]) @ weight``, a few replicas at a time. In one go the array is replicas ×
    options × demand points, and options grow with the points: 40 replicas of a deployment
    with 1,000 demand points took about a gigabyte."""
    per_key = max(1, rtt.size * rtt.itemsize)
    step = max(1, RELOCATION_CHUNK_BYTES // per_key)
    out = np.empty((base.shape[0], rtt.shape[0]))
    for start in range(0, base.shape[0], step):
        out[start:start + step] = np.minimum(rtt[None, :, :], base[start:start + step, None, :]) @ weight
    return out


def _smallest(values: np.ndarray, k: int) -> list[int]:
    """``np.argsort(values, kind="stable")[:k]`` without sorting all of ``values``."""
    if values.size <= k:
        return values.argsort(kind="stable").tolist()
    bound = np.partition(values, k - 1)[k - 1]
    within = (values <= bound).nonzero()[0]  # ascending index: ties keep stable order
    return within[values[within].argsort(kind="stable")[:k]].tolist()


def _swap(capacity: Capacity, job: Job, a_key: tuple[int, str], to_site: int, to_variant: Variant) -> bool:
    """Move one replica ``a_key`` → (to_site, to_variant) if the target has room."""
    at = max(i for i, (s, v, _) in enumerate(job.placed) if (s, v.name) == a_key)
    site, variant, group = job.placed[at]
    new_group = capacity.trade(site, variant, group, job.deployment.name, to_site, to_variant, job.deployment.name)
    if new_group is None:
        return False
    job.placed[at] = (to_site, to_variant, new_group)
    return True
