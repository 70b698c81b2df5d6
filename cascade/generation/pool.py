"""A pool of named generation replicas that works through a queue of shards and reports what comes
back.

    (run by stages/generate.py; tests/test_generation_faults.py kills its replicas)

The driver submits `Work` (a shard's requests) and reads `events()`: `Answers` as completions stream
in, `Done` when every request of a shard is answered. Each replica holds up to `shards_in_flight`
shards at once. A replica that dies (crash, ray.kill, node loss) has its shards in flight re-queued
with only their unanswered requests and is restarted by Ray (`max_actor_restarts`); it is probed
until it answers again, or dropped when it has not come back within `restart_timeout_s`. The pool
does not rely on Ray's notice of a death alone: when a node is removed, a stream to an actor on it
can stay silent for good (seen twice in CI; once the actor was still being created there, and Ray
neither restarted nor failed it). So every few seconds the pool checks the replicas with work in
flight against Ray's node table: one whose node is dead is lost; one that has not yet said where it
runs when `restart_timeout_s` has passed since a node died is killed (Ray restarts it) and counted
lost too, its shards re-queued. A shard that fails `max_shard_failures` times, or the loss of every
replica, ends the events with `ShardFailed` naming the shard and the cause. The pool holds no run
state: what to generate and what to commit is the driver's.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

from cascade import generation
from cascade.config import BackendConfig, GenerationConfig
from cascade.generation.actor import spawn
from cascade.generation.types import Request, Sampling

log = logging.getLogger(__name__)
# how often the nodes of replicas with work in flight are checked against Ray's node table
NODE_CHECK_S = 5.0


class ShardFailed(RuntimeError):
    pass


@dataclass(eq=False)
class Work:
    """One shard: its requests, those still unanswered, and a name for messages."""

    where: str
    requests: list[Request]
    tag: Any = None  # the submitter's handle (e.g. its job and shard index)
    pending: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.pending = {r.prompt_id for r in self.requests}


@dataclass
class Answers:
    work: Work
    completions: list[dict]
    # engine-busy seconds this chunk covers (overlapping calls on a replica counted once)
    busy_s: float


@dataclass
class Done:
    work: Work


class ReplicaPool:
    def __init__(self, names: list[str], model: str, backend_kwargs: dict[str, Any],
                 b: BackendConfig,
                 g: GenerationConfig, sampling: Sampling, system: str | None) -> None:
        self.names, self.g, self.sampling, self.system = names, g, sampling, system
        tp = generation.load(b.name).tensor_parallel(b.options)
        self.replicas = [spawn(n, b.name, model, b.options, backend_kwargs, num_cpus=b.num_cpus,
                               num_gpus=b.num_gpus, resources=dict(b.resources),
                               max_restarts=g.max_actor_restarts, tensor_parallel_size=tp,
                               shards_in_flight=g.shards_in_flight) for n in names]
        self.queue: collections.deque[Work] = collections.deque()
        # a shard's answer stream (or a probe) -> replica
        self.inflight: dict[Any, tuple[int, Work | None]] = {}
        # one entry per free slot, replicas interleaved so that work spreads over them first
        self.free = [r for _ in range(g.shards_in_flight) for r in range(len(names))]
        self.dead: set[int] = set()
        self.probing: dict[int, float] = {}  # replica -> when its restart began
        self.shard_failures: collections.Counter = collections.Counter()
        self.replica_failures: collections.Counter = collections.Counter()
        self.busy_until = [0.0] * len(names)
        self.node: dict[int, str] = {}  # replica -> the id of the node it runs on, once it has said
        # a node() call in flight -> its replica, when asked
        self.locating: dict[Any, tuple[int, float]] = {}
        self.dead_nodes = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
        self.node_died = 0.0  # when a node was last seen dead that had been alive
        self.checked = time.time()

    def info(self) -> dict[str, Any]:
        """The first replica's backend info (waits until its engine is up)."""
        return ray.get(self.replicas[0].info.remote())

    def submit(self, work: Work) -> None:
        self.queue.append(work)

    def events(self) -> Iterator[Answers | Done]:
        """Answers and Done events until the queue is empty and no shard is in flight (probes alone:
        done)."""
        while self.queue or any(w is not None for _, w in self.inflight.values()):
            self._dispatch()
            if time.time() - self.checked >= NODE_CHECK_S:
                self._check_nodes()
                if not self.inflight:
                    continue
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=5.0)
            if not ready:
                self._expire_probes()
                self._check_alive()
                continue
            r, work = self.inflight.pop(ready[0])
            if work is None:
                self._probed(ready[0], r)
            else:
                yield from self._read(ready[0], r, work)

    def loads(self, timeout: float = 60.0) -> list[dict]:
        """The weight loads of the live replicas (cascade/loads.py; a lost replica's are lost)."""
        refs = [a.loads.remote() for r, a in enumerate(self.replicas) if r not in self.dead]
        out: list[dict] = []
        for ref in refs:
            try:
                out += ray.get(ref, timeout=timeout)
            except Exception as e:  # noqa: BLE001 - a replica gone since: its loads are not known
                log.debug("replica loads: %s", e)
        return out

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every replica's engine (its processes exit before this returns), then the actors."""
        refs = [a.shutdown.remote() for r, a in enumerate(self.replicas) if r not in self.dead]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        except Exception as e:  # noqa: BLE001 - a replica already gone has nothing to stop
            log.debug("replica shutdown: %s", e)
        for a in self.replicas:
            ray.kill(a)
        for n in self.names:
            # a tensor-parallel replica's reserved GPUs (cascade/generation/actor.py: spawn)
            try:
                ray.util.remove_placement_group(ray.util.get_placement_group(f"{n}/pg"))
            except ValueError:  # none by that name: a replica without tensor parallelism
                pass

    # -- internals ---------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while self.queue and self.free:
            r, work = self.free.pop(0), self.queue.popleft()
            # answers already in survive a loss
            reqs = [q for q in work.requests if q.prompt_id in work.pending]
            stream = (
                self.replicas[r]
                .generate.options(num_returns="streaming")
                .remote(reqs, self.sampling, self.system)
            )
            self.inflight[stream] = (r, work)
            if r not in self.node and all(rr != r for rr, _ in self.locating.values()):
                self.locating[self.replicas[r].node.remote()] = (r, time.time())

    def _read(self, ref: Any, r: int, work: Work) -> Iterator[Answers | Done]:
        try:
            chunk = ray.get(next(ref))
        except StopIteration:  # the stream ended: every answer of the shard is in
            self.free.append(r)
            if work.pending:
                raise ShardFailed(f"shard {work.where}: {self.names[r]} ended its stream without "
                                  f"answers for {sorted(work.pending)[:3]}")
            yield Done(work)
            return
        except ActorUnavailableError:
            # restarting: not the shard's fault; wait until the replica is back
            log.warning("shard %s re-queued (%d of %d answers kept): %s is restarting", work.where,
                        self._kept(work), len(work.requests), self.names[r])
            self.inflight[ref] = (r, work)
            self._requeue(r)
            self._probe(r)
            return
        except (RayActorError, RayTaskError) as e:
            self._failed(ref, r, work, e)
            return
        t0, t1 = chunk["interval"]
        busy = max(0.0, t1 - max(t0, self.busy_until[r]))
        self.busy_until[r] = max(self.busy_until[r], t1)
        work.pending -= {c["prompt_id"] for c in chunk["completions"]}
        self.inflight[ref] = (r, work)  # read on
        log.debug("shard %s: %d of %d answers in (this chunk: %d answers, %d tokens)", work.where,
                  self._kept(work), len(work.requests), len(chunk["completions"]),
                  sum(c["completion_tokens"] for c in chunk["completions"]))
        yield Answers(work, chunk["completions"], busy)

    def _failed(self, ref: Any, r: int, work: Work, e: Exception) -> None:
        self.shard_failures[work.where] += 1
        n = self.shard_failures[work.where]
        log.warning("shard %s failed on %s (%d/%d, %d of %d answers kept): %s", work.where,
                    self.names[r], n,
                    self.g.max_shard_failures, self._kept(work), len(work.requests),
                    type(e).__name__)
        if n >= self.g.max_shard_failures:
            raise ShardFailed(f"shard {work.where} failed {n} times; last cause: {e}") from e
        if isinstance(e, RayActorError):
            # the replica is gone: its other shards in flight go back too
            self.inflight[ref] = (r, work)
            self._requeue(r)
            self._lost(r)
        else:
            self.queue.appendleft(work)
            self.free.append(r)
        self._check_alive(e)

    @staticmethod
    def _kept(work: Work) -> int:
        return len(work.requests) - len(work.pending)

    def _probe(self, r: int) -> None:
        """Hand a restarting replica work again once it answers."""
        self.probing.setdefault(r, time.time())
        self.inflight[self.replicas[r].info.remote()] = (r, None)

    def _probed(self, ref: Any, r: int) -> None:
        try:
            ray.get(ref)
            self.probing.pop(r, None)
            self.free.extend([r] * self.g.shards_in_flight)
        except ActorUnavailableError:
            time.sleep(1.0)
            self._probe(r)
        except RayActorError:
            self._lost(r)
        self._check_alive()

    def _requeue(self, r: int) -> None:
        """Every shard in flight on r goes back to the queue's front, in shard order."""
        refs = [ref for ref, (rr, w) in self.inflight.items() if rr == r and w is not None]
        works = [self.inflight.pop(ref)[1] for ref in refs]
        self.queue.extendleft(sorted(works, key=lambda w: w.where, reverse=True))
        self.free[:] = [x for x in self.free if x != r]
        # a restarted replica may come back on another node: it is located again
        self.node.pop(r, None)
        for ref in [ref for ref, (rr, _) in self.locating.items() if rr == r]:
            del self.locating[ref]

    def _check_nodes(self) -> None:
        """Replicas with work in flight that Ray's node table shows lost, whether or not their
        streams have said so: one whose node is dead; one still not located `restart_timeout_s`
        after a node died (it may have been in creation there), which is killed so that Ray restarts
        it."""
        now = self.checked = time.time()
        if self.locating:
            ready, _ = ray.wait(list(self.locating), num_returns=len(self.locating), timeout=0)
            for ref in ready:
                r, _ = self.locating.pop(ref)
                try:
                    self.node[r] = ray.get(ref)
                except RayError:  # the replica died: its streams or the checks below say so
                    pass
        dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
        if dead - self.dead_nodes:
            self.dead_nodes, self.node_died = dead, now
        asked = dict(self.locating.values())  # replica -> when its node() call went out
        for r in sorted({r for r, w in self.inflight.values() if w is not None}):
            if self.node.get(r) in dead:
                why = f"its node {self.node[r][:8]} is gone"
            elif r in asked and asked[r] < self.node_died < now - self.g.restart_timeout_s:
                why = (f"a node died {now - self.node_died:.0f} s ago and it has not said where it "
                       "runs: killed")
                ray.kill(self.replicas[r], no_restart=False)
            else:
                continue
            log.warning("%s: %s; its shards in flight re-queued (%s)", self.names[r], why,
                        ", ".join(
                sorted(w.where for rr, w in self.inflight.values() if rr == r and w is not None)))
            self._requeue(r)
            self._lost(r)
        self._check_alive()

    def _lost(self, r: int) -> None:
        """Its actor died under a call: Ray restarts it up to max_actor_restarts times."""
        self.replica_failures[r] += 1
        if self.replica_failures[r] > self.g.max_actor_restarts:
            self.dead.add(r)
            self.probing.pop(r, None)
        else:
            self._probe(r)

    def _expire_probes(self) -> None:
        """A replica that has not come back within restart_timeout_s (no node has room for it)
        counts as dead."""
        for ref, (r, work) in list(self.inflight.items()):
            if (work is None
                and time.time() - self.probing.get(r, time.time()) > self.g.restart_timeout_s):
                log.warning("%s did not come back within %.0f s: dropped from the pool",
                            self.names[r], self.g.restart_timeout_s)
                self.inflight.pop(ref)
                self.probing.pop(r, None)
                self.dead.add(r)

    def _check_alive(self, cause: BaseException | None = None) -> None:
        """Stop, naming the next shard, when work is left and every replica is gone for good."""
        if len(self.dead) == len(self.replicas) and self.queue:
            raise ShardFailed(f"shard {self.queue[0].where}: no live replica left "
                              f"({len(self.replicas)} died, "
                              f"max_actor_restarts={self.g.max_actor_restarts})"
                              + (f"; last cause: {cause}" if cause else "")) from cause
