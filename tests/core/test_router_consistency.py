"""The router's index against real BlockPools, through lost, duplicated and reordered event batches, late
snapshots, worker restarts (new generation, empty pool), deregistrations and router restarts.

Two properties: whenever the index says it is at a worker's current (generation, seq) — an `on_events`
that returned True for a heartbeat carrying the worker's `event_seq` — its set equals the pool's cached
set, resyncing only where the index asked for it; and routing never returns a deregistered or draining
worker.
"""

from hypothesis import HealthCheck, event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.core.blocks import BlockPool, hash_blocks
from splitserve.core.costs import CostModel
from splitserve.core.kv_manager import KVCacheManager
from splitserve.core.request import Request, SamplingParams
from splitserve.core.router import NoWorker, Router

BS = 2
ROLES = ("prefill", "prefill", "decode", "decode")
NUM_BLOCKS = 10
# Few distinct tokens: prompts share prefixes, so pools hit, share and evict chained blocks.
prompts = st.lists(st.integers(0, 2), min_size=1, max_size=9)


class Worker:
    def __init__(self, wid: str, role: str, generation: int) -> None:
        self.id, self.role, self.generation = wid, role, generation
        self.pool = BlockPool(NUM_BLOCKS, BS)
        self.kv = KVCacheManager(self.pool)
        self.held: list[Request] = []
        self.registered = True
        self.draining = False

    def snapshot_message(self) -> tuple:
        return ("snapshot", self.id, self.generation, *self.pool.snapshot())


def new_router() -> Router:
    cm = CostModel(kv_bytes_per_token=1000, num_layers=2, link_bytes_per_s=1e9, prefill_s_per_token=1e-4,
                   decode_step_s=0.01)
    return Router("kv_aware", BS, cm)


class RouterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.generations = 0
        self.workers = [Worker(f"w{i}", role, self._generation()) for i, role in enumerate(ROLES)]
        self.router = new_router()
        for w in self.workers:
            self.router.register(w.id, w.role, w.generation, NUM_BLOCKS)
        self.channel: list[tuple] = []  # messages in flight to the router, in any order
        self.index_generation: dict[str, int] = {}  # per worker, the newest the index has followed
        self.requests = 0

    def _generation(self) -> int:
        self.generations += 1
        return self.generations

    def _deliver(self, msg: tuple) -> None:
        kind, wid, generation, *rest = msg
        current = self.router.index.position(wid)
        if current is None:
            event(f"deliver {kind}: worker not in the index")
        else:  # which cases the run reached: see pytest --hypothesis-show-statistics
            event(f"deliver {kind}: {'older' if generation < current[0] else 'newer' if generation > current[0] else 'current'} generation")
        if kind == "events":
            if not self.router.on_events(wid, generation, rest[0]):
                event("events: gap, snapshot requested")
                # The router asks that worker for a snapshot; the answer travels like any message.
                self.channel.append(self.workers[int(wid[1:])].snapshot_message())
        else:
            self.router.resync(wid, generation, *rest)

    # ---------------------------------------------------------------- what happens on workers

    def _publish(self, w: Worker) -> None:
        events = w.pool.drain_events()
        if events:
            self.channel.append(("events", w.id, w.generation, events))

    @rule(i=st.integers(0, 3), tokens=prompts, publish=st.booleans())
    def start_request(self, i, tokens, publish):
        w = self.workers[i]
        self.requests += 1
        req = Request(f"r{self.requests}", tokens, SamplingParams(), 0.0)
        hit = w.kv.prefix_hit(req)
        if w.kv.allocate(req, req.num_tokens - len(hit) * BS, hit):
            req.num_computed_tokens = req.num_tokens
            w.kv.publish(req)
            w.held.append(req)
        if publish:  # or later, with more events in one batch
            self._publish(w)

    @rule(i=st.integers(0, 3), j=st.integers(0, 20), publish=st.booleans())
    def finish_request(self, i, j, publish):
        w = self.workers[i]
        if w.held:
            w.kv.free(w.held.pop(j % len(w.held)))
        if publish:
            self._publish(w)

    # ---------------------------------------------------------------- the network

    @precondition(lambda self: self.channel)
    @rule()
    def deliver_oldest(self):
        self._deliver(self.channel.pop(0))

    @precondition(lambda self: self.channel)
    @rule(j=st.integers(0, 50), duplicate=st.booleans())
    def deliver_any(self, j, duplicate):
        j %= len(self.channel)
        self._deliver(self.channel[j] if duplicate else self.channel.pop(j))

    @precondition(lambda self: self.channel)
    @rule(j=st.integers(0, 50))
    def drop(self, j):
        self.channel.pop(j % len(self.channel))

    # ---------------------------------------------------------------- membership (one rule, so that
    # these rarer happenings do not crowd out the traffic between them)

    @rule(action=st.sampled_from(["restart", "restart_unannounced", "deregister", "register", "drain",
                                  "restart_router"]), i=st.integers(0, 3))
    def membership(self, action, i):
        getattr(self, action)(self.workers[i])

    def restart(self, old: Worker, announce: bool = True) -> None:
        """The process dies with its cache; its undelivered messages may still arrive. The new one
        registers, or (unannounced) the router learns of it only from its messages."""
        w = self.workers[self.workers.index(old)] = Worker(old.id, old.role, self._generation())
        w.registered, w.draining = old.registered, old.draining
        if announce and w.registered:
            self.register(w)

    def restart_unannounced(self, old: Worker) -> None:
        self.restart(old, announce=False)

    def deregister(self, w: Worker) -> None:
        w.registered = False
        self.router.deregister(w.id)
        self.index_generation.pop(w.id, None)

    def register(self, w: Worker) -> None:
        w.registered, w.draining = True, False
        self.router.register(w.id, w.role, w.generation, NUM_BLOCKS)
        self.channel.append(w.snapshot_message())

    def drain(self, w: Worker) -> None:
        if w.registered:
            w.draining = True
            self.router.drain(w.id)

    def restart_router(self, _: Worker) -> None:
        """A new router knows nothing: it registers the workers and rebuilds the index from snapshots."""
        self.router = new_router()
        self.index_generation.clear()
        for w in self.workers:
            w.draining = False
            if w.registered:
                self.router.register(w.id, w.role, w.generation, NUM_BLOCKS)
                self._deliver(w.snapshot_message())

    # ---------------------------------------------------------------- checks

    @rule(tokens=prompts)
    def route(self, tokens):
        usable = {w.id for w in self.workers if w.registered and not w.draining}
        decoders = {w.id for w in self.workers if w.role == "decode"} & usable
        try:
            got = self.router.route_tokens(tokens, now=0.0)
        except NoWorker:
            assert not usable
            return
        if not decoders:  # degraded: a prefill worker computes the request whole
            assert got.decode in usable and got.prefill is None
            return
        assert got.decode in decoders
        assert got.prefill is None or got.prefill in usable - decoders

    @rule(tokens=prompts)
    def heartbeat_then_compare(self, tokens):
        """Every worker reports its position; the router resyncs only where it says it must. Then the index
        equals every pool, and a routed prompt's cached counts equal what the pools would really reuse."""
        for w in self.workers:
            if w.registered and not self.router.on_events(w.id, w.generation, [], last_seq=w.pool.event_seq):
                event("heartbeat: index behind, snapshot requested")
                self._deliver(w.snapshot_message())
        for w in self.workers:
            if w.registered:
                assert self.router.index.cached(w.id) == w.pool.cached_hashes()
        hashes = hash_blocks(tokens, BS)
        usable = [w for w in self.workers if w.registered and not w.draining]
        cached = self.router.index.match(hashes[: (len(tokens) - 1) // BS], [w.id for w in usable])
        for w in usable:
            assert cached[w.id] == len(w.kv.prefix_hit(Request("probe", tokens, SamplingParams(), 0.0)))

    @invariant()
    def index_is_exact_wherever_it_claims_to_be_current(self):
        for w in self.workers:
            pos = self.router.index.position(w.id)
            if not w.registered:
                assert pos is None, "a deregistered worker kept index entries"
            elif pos == (w.generation, w.pool.event_seq):
                assert self.router.index.cached(w.id) == w.pool.cached_hashes()
            elif pos is not None and pos[0] == w.generation:
                assert pos[1] < w.pool.event_seq, "the index ran ahead of the worker"
            if pos is not None:
                # A dead process's late messages must never take the index back to it.
                assert self.index_generation.get(w.id, 0) <= pos[0] <= w.generation
                self.index_generation[w.id] = pos[0]


TestRouterConsistency = RouterMachine.TestCase
TestRouterConsistency.settings = settings(
    max_examples=400, stateful_step_count=80, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
