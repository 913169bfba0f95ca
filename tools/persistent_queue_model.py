#!/usr/bin/env python3
"""A model of the persistent warp-specialised kernels' synchronisation, run in random interleavings.

What it models (attention/cuda/kernels/flex_wgmma.cuh, flex_backward_wgmma.cuh): CTAs sharing one global counter;
in each CTA the queue (`FgJobQueue`, `fg_job_take`: two slots with full / empty mbarriers, the producer warpgroup
the lead), the resident tile's barriers (`bar_kv` / `bar_kv_free`, or the dQ kernel's `bar_q` / `bar_q_free`) and
the stage ring (`bar_full` / `bar_empty`), with the producer's 4 warps and the consumers' 8 as agents that advance
one step at a time in a random order. Grid CTAs are valid or not (`fg_dkdv_tile` returning false) and walk 0-4
chunks; `dq_style` releases stages as the dQ consumers do (a stage one chunk late, the last with the tile).
`prefetch` models FG_BWD_TILE_PREFETCH (the default in the persistent backward): the producer takes the next grid CTA
without waiting for the resident tile's release and waits for it only before loading the tile; the consumers release
the tile after the chunk flagged last (FgBwdChunk::last, which the walk may leave unset: conservative), or at the end.

The forward's FG_WGMMA_PIPE 3 loop (`run_forward`), warp by warp: its producer's load order, stages and resident Q,
and the consumer warpgroups' turns with FG_WGMMA_PINGPONG, persistent too.

What it checks: no deadlock; no waiter's parity aliases (an mbarrier two phases past or behind the phase it waits
for); every chunk a consumer reads is its grid CTA's, in order, still in its stage; every valid
grid CTA runs exactly once; a CTA takes a grid CTA only once the previous one's resident tile is released (without
`prefetch`; with it, it loads the tile only then, and no consumer reads a resident tile that is not its grid CTA's); no
stage is refilled while a product reads it; no named barrier is left half-arrived at exit.

The kernels are the truth: change this model with them. Run: python3 tools/persistent_queue_model.py [seeds]
"""
import random
import sys

PRODUCER_WARPS, CONSUMER_WARPS = 4, 8


class MBarrier:
    def __init__(self, count, name):
        self.count, self.pending, self.phase, self.name = count, count, 0, name

    def arrive(self):
        self.pending -= 1
        assert self.pending >= 0, ("too many arrivals", self.name)
        if self.pending == 0:
            self.phase, self.pending = self.phase + 1, self.count

    def passed(self, k):
        """try_wait.parity(k & 1) of a waiter that waits for phase k: true once phase k completed."""
        assert self.phase <= k + 1, ("parity aliased", self.name, self.phase, k)
        assert self.phase >= k, ("waiting two phases ahead: the parity would alias the other way", self.name, k)
        return (self.phase & 1) != (k & 1)



class JobQueue:
    """FgJobQueue of one CTA: two slots on full / empty mbarriers, numbers from a counter all CTAs share."""

    def __init__(self, counter, njobs, readers):
        self.counter, self.njobs = counter, njobs
        self.full = [MBarrier(1, "queue full %d" % i) for i in range(2)]
        self.empty = [MBarrier(readers, "queue empty %d" % i) for i in range(2)]
        self.slot = [None, None]

    def take(self, it, lead, publisher, tile_free, tiles_run):
        """fg_job_take: the lead waits until the last grid CTA's resident tile is free and slot it & 1 was read by
        every reader, and its `publisher` takes a number; everyone reads the slot."""
        s = it & 1
        if lead:
            if tiles_run > 0:
                while not tile_free.passed(tiles_run - 1):
                    yield
            if it >= 2:
                while not self.empty[s].passed((it >> 1) - 1):
                    yield
            if publisher:
                assert tile_free.phase >= tiles_run, "a grid CTA taken before the last one's tile was free"
                job = self.counter[0]
                self.counter[0] += 1
                self.slot[s] = job if job < self.njobs else -1
                self.full[s].arrive()
        while not self.full[s].passed(it >> 1):
            yield
        job = self.slot[s]
        self.empty[s].arrive()
        return job


def interleave(agents, rnd, seed):
    """Advances a random agent one step at a time until all are done."""
    live, steps = list(agents), 0
    while live:
        a = rnd.choice(live)
        try:
            next(a)
        except StopIteration:
            live.remove(a)
        steps += 1
        assert steps < 200000, ("deadlock", seed)

def run(seed, ncta, stages, dq_style, prefetch):
    rnd = random.Random(seed)
    njobs = rnd.randint(0, 12)
    # (valid tile, chunks, whether the walk flags its last chunk: fg's last() is conservative)
    jobs = [(rnd.random() < 0.8, rnd.randint(0, 4), rnd.random() < 0.8) for _ in range(njobs)]
    counter = [0]
    done = []
    agents = []

    def make_cta():
        queue = JobQueue(counter, njobs, PRODUCER_WARPS + CONSUMER_WARPS)
        tile, tile_free = MBarrier(PRODUCER_WARPS, "tile"), MBarrier(CONSUMER_WARPS, "tile free")
        full = [MBarrier(PRODUCER_WARPS, "full %d" % i) for i in range(stages)]
        empty = [MBarrier(CONSUMER_WARPS, "empty %d" % i) for i in range(stages)]
        chunk = [None] * stages
        resident = [None]

        def producer(warp):
            j = it = k = 0
            while True:
                job = yield from queue.take(k, True, warp == 0, tile_free, 0 if prefetch else it)
                k += 1
                if job < 0:
                    return
                valid, n, flags_last = jobs[job]
                if not valid:
                    continue
                if prefetch and it > 0:  # fg_resident_wait
                    while not tile_free.passed(it - 1):
                        yield
                if warp == 0:
                    assert tile_free.phase >= it, "a resident tile loaded before the last one was released"
                    resident[0] = job
                tile.arrive()
                c = 0
                while True:
                    st = j % stages
                    if j >= stages:
                        while not empty[st].passed(j // stages - 1):
                            yield
                    if warp == 0:
                        chunk[st] = (job, "end" if c == n else c, prefetch and flags_last and c == n - 1)
                    full[st].arrive()
                    j += 1
                    if c == n:
                        break
                    c += 1
                    yield
                it += 1

        def consumer(warp):
            j = it = k = 0
            while True:
                job = yield from queue.take(k, False, False, tile_free, it)
                k += 1
                if job < 0:
                    return
                valid, n, _ = jobs[job]
                if not valid:
                    continue
                j0 = j
                released = False
                while not tile.passed(it):
                    yield
                assert resident[0] == job, ("resident tile", resident[0], job)
                seen = 0
                while True:
                    st = j % stages
                    while not full[st].passed(j // stages):
                        yield
                    data = chunk[st]
                    assert data[0] == job, ("chunk of another grid CTA", data, job)
                    if data[1] == "end":
                        if not dq_style:
                            empty[st].arrive()
                            j += 1
                        break
                    assert data[1] == seen, ("chunk out of order", data, seen)
                    assert not released, "a chunk after the one flagged last"
                    seen += 1
                    assert resident[0] == job, "resident tile overwritten before its score products"
                    yield  # the score products (read the resident tile and the stage)
                    assert resident[0] == job, "resident tile overwritten while its score products read it"
                    if data[2]:  # the last chunk's score products done: the resident tile goes
                        tile_free.arrive()
                        released = True
                    yield  # the element step, the gradient products (read the stage)
                    assert chunk[st] == data, "stage overwritten while read"
                    if dq_style:  # the previous chunk's stage goes back once this one's products are issued
                        if j > j0:
                            empty[(j - 1) % stages].arrive()
                    else:
                        empty[st].arrive()
                    j += 1
                assert seen == n
                if dq_style:
                    if j > j0:
                        empty[(j - 1) % stages].arrive()
                    empty[j % stages].arrive()
                    j += 1
                if not released:
                    tile_free.arrive()
                if warp == 0:
                    done.append(job)
                yield
                it += 1

        for w in range(PRODUCER_WARPS):
            agents.append(producer(w))
        for w in range(CONSUMER_WARPS):
            agents.append(consumer(w))

    for _ in range(ncta):
        make_cta()
    interleave(agents, rnd, seed)
    assert sorted(done) == sorted(i for i, (valid, _, _) in enumerate(jobs) if valid), "a grid CTA ran twice or never"



class NamedBarrier:
    """bar.sync / bar.arrive of a named barrier of 256 threads: 8 warp arrivals, 4 from each consumer warpgroup
    (a warp arriving twice in one generation would be counted twice by the hardware)."""

    def __init__(self, name):
        self.name, self.arrived, self.generation = name, [], 0

    def arrive(self, warp):
        assert warp not in self.arrived, ("a warp arrived twice in one generation", self.name, warp)
        self.arrived.append(warp)
        if len(self.arrived) == 2 * 4:
            assert sorted(w // 4 for w in self.arrived) == [0] * 4 + [1] * 4, ("one warpgroup completed", self.name)
            self.arrived, self.generation = [], self.generation + 1

    def sync(self, warp):  # a generator: arrive, then wait for the generation to complete
        gen = self.generation
        self.arrive(warp)
        while self.generation == gen:
            yield


def run_forward(seed, ncta, pingpong):
    """flex_fwd_wgmma's FG_WGMMA_PIPE 3 (flex_forward_wgmma.cuh), persistent, warp by warp (a warpgroup's warps are
    not kept in step): the producer's 4 warps load Q, then K_j and V_j in FlashAttention-3's order (K_0, K_1, V_0,
    K_2, V_1, ...) into two stages each; each consumer warp issues S_0, then S_j with P_{j-1} V_{j-1}, releasing K_j
    after the softmax and V_{j-1} after P V, then the last P V; with `pingpong` the two warpgroups take turns
    issuing (named barriers 1 and 2, the turns running on across grid CTAs)."""
    rnd = random.Random(seed)
    njobs = rnd.randint(0, 10)
    jobs = [(rnd.random() < 0.8, rnd.randint(0, 5)) for _ in range(njobs)]  # (rows in the grid CTA, sub-tiles)
    counter = [0]
    done = []
    agents = []
    turns = []

    def make_cta():
        queue = JobQueue(counter, njobs, PRODUCER_WARPS + CONSUMER_WARPS)
        bar_q, bar_q_free = MBarrier(PRODUCER_WARPS, "q"), MBarrier(CONSUMER_WARPS, "q free")
        k_full = [MBarrier(PRODUCER_WARPS, "k full %d" % i) for i in range(2)]
        v_full = [MBarrier(PRODUCER_WARPS, "v full %d" % i) for i in range(2)]
        k_free = [MBarrier(CONSUMER_WARPS, "k free %d" % i) for i in range(2)]
        v_free = [MBarrier(CONSUMER_WARPS, "v free %d" % i) for i in range(2)]
        turn = [NamedBarrier("turn 1"), NamedBarrier("turn 2")]  # ids 1, 2: warpgroup w syncs on 1 + w
        turns.append(turn)
        # What each producer warp last copied into each stage (a stage is whole once all four wrote it).
        k_stage = [[None] * PRODUCER_WARPS for _ in range(2)]
        v_stage = [[None] * PRODUCER_WARPS for _ in range(2)]
        q_tile = [None] * PRODUCER_WARPS

        def producer(pw):
            j = it = k = 0
            while True:
                job = yield from queue.take(k, True, pw == 0, bar_q_free, it)
                k += 1
                if job < 0:
                    return
                rows, n = jobs[job]
                if not rows:
                    continue
                q_tile[pw] = job
                bar_q.arrive()

                def issue_v(tile, jv):
                    st = jv & 1
                    if jv >= 2:
                        while not v_free[st].passed((jv >> 1) - 1):
                            yield
                    v_stage[st][pw] = (job, tile)
                    v_full[st].arrive()

                j0 = j
                for tile in range(n):
                    st = j & 1
                    if j >= 2:
                        while not k_free[st].passed((j >> 1) - 1):
                            yield
                    k_stage[st][pw] = (job, tile)
                    k_full[st].arrive()
                    if j > j0:
                        yield from issue_v(tile - 1, j - 1)
                    j += 1
                    yield
                if j > j0:
                    yield from issue_v(n - 1, j - 1)
                it += 1

        def consumer(w):
            wg = w // 4
            j = it = k = 0
            if pingpong and wg == 1:
                turn[0].arrive(w)  # warpgroup 0 issues first
            while True:
                job = yield from queue.take(k, False, False, bar_q_free, it)
                k += 1
                if job < 0:
                    break
                rows, n = jobs[job]
                if not rows:
                    continue
                while not bar_q.passed(it):
                    yield
                assert q_tile == [job] * PRODUCER_WARPS, "Q of another grid CTA"

                def issue(reads):
                    if pingpong:
                        yield from turn[wg].sync(w)
                    seen = [list(stage[st]) for stage, st in reads]
                    if pingpong:
                        turn[1 - wg].arrive(w)
                    return seen

                def whole(job_tile):
                    return [job_tile] * PRODUCER_WARPS

                if n > 0:
                    while not k_full[j & 1].passed(j >> 1):
                        yield
                    seen = yield from issue([(k_stage, j & 1)])
                    assert seen == [whole((job, 0))], seen
                    yield  # the product, the mods step
                    assert k_stage[j & 1] == whole((job, 0)), "K overwritten before its release"
                    k_free[j & 1].arrive()
                    for tile in range(1, n):
                        j += 1
                        st, pst = j & 1, (j & 1) ^ 1
                        while not k_full[st].passed(j >> 1):
                            yield
                        while not v_full[pst].passed((j - 1) >> 1):
                            yield
                        seen = yield from issue([(k_stage, st), (v_stage, pst)])
                        assert seen == [whole((job, tile)), whole((job, tile - 1))], seen
                        yield  # the mods step and the softmax, P V running
                        assert k_stage[st] == whole((job, tile)), "K overwritten before its release"
                        k_free[st].arrive()
                        yield  # waiting for P V
                        assert v_stage[pst] == whole((job, tile - 1)), "V overwritten before its release"
                        v_free[pst].arrive()
                    st = j & 1
                    while not v_full[st].passed(j >> 1):
                        yield
                    seen = yield from issue([(v_stage, st)])
                    assert seen == [whole((job, n - 1))], seen
                    yield
                    assert v_stage[st] == whole((job, n - 1)), "V overwritten before its release"
                    v_free[st].arrive()
                    j += 1
                bar_q_free.arrive()
                if w == 0:
                    done.append(job)
                yield  # the output stores
                it += 1
            if pingpong and wg == 0:
                yield from turn[0].sync(w)  # warpgroup 1's last turn

        for w in range(PRODUCER_WARPS):
            agents.append(producer(w))
        for w in range(CONSUMER_WARPS):
            agents.append(consumer(w))

    for _ in range(ncta):
        make_cta()
    interleave(agents, rnd, seed)
    assert sorted(done) == sorted(i for i, (rows, _) in enumerate(jobs) if rows), "a grid CTA ran twice or never"
    for turn in turns:
        assert all(not t.arrived for t in turn), "a named barrier left half-arrived at exit"


def main():
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    cases = 0
    for seed in range(seeds):
        for ncta in (1, 2, 3, 5):
            for stages in (2, 3, 4):
                for dq_style in (False, True):
                    for prefetch in (False, True):
                        run(seed * 100 + ncta * 10 + stages + dq_style * 1000000 + prefetch * 2000000, ncta, stages,
                            dq_style, prefetch)
                        cases += 1
            for pingpong in (False, True):
                run_forward(seed * 100 + ncta * 10 + pingpong * 1000000, ncta, pingpong)
                cases += 1
    print(f"ok: {cases} interleavings")


if __name__ == "__main__":
    main()
