"""BatchInterleavedSampler and schedules: task purity, ratios, ranks, resume, coverage, bucketing."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from harmonifuse.data.sampler import BatchInterleavedSampler, BatchPlan
from harmonifuse.data.schedules import Mixed, Ratio, RoundRobin, Temperature, build_schedule


def durations(n_asr: int = 103, n_ser: int = 37, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"asr": rng.uniform(1.0, 15.0, n_asr), "ser": rng.uniform(1.0, 8.0, n_ser)}


def as_tuples(plans: list[BatchPlan]) -> list[tuple[str, tuple]]:
    return [(p.task, tuple(p.items)) for p in plans]


SCHEDULES = [RoundRobin(), Ratio({"asr": 2, "ser": 1}), Temperature(2.0), Mixed()]


@pytest.mark.parametrize("schedule", SCHEDULES[:3], ids=repr)
def test_every_batch_holds_one_task(schedule):
    sampler = BatchInterleavedSampler(durations(), batch_size=4, schedule=schedule)
    plans = list(sampler)
    assert len(plans) == len(sampler) > 0
    for plan in plans:
        assert plan.task in ("asr", "ser")
        assert set(plan.tasks) == {plan.task} and 1 <= len(plan) <= 4


def test_round_robin_alternates_in_given_order():
    tasks = [p.task for p in BatchInterleavedSampler(durations(), batch_size=4)]
    assert tasks[:6] == ["asr", "ser"] * 3
    assert all(a != b for a, b in zip(tasks, tasks[1:]))


def test_ratio_gives_r_asr_batches_per_ser_batch():
    tasks = [p.task for p in BatchInterleavedSampler(durations(), batch_size=2, schedule={"name": "ratio", "weights": {"asr": 3, "ser": 1}})]
    full = len(tasks) // 4 * 4
    for start in range(0, full, 4):  # every window of r+1 steps: r asr, 1 ser
        assert Counter(tasks[start:start + 4]) == {"asr": 3, "ser": 1}


def test_temperature_frequencies_match_n_to_the_one_over_t():
    sizes = {"asr": 8000, "ser": 2000}
    schedule = Temperature(2.0)
    p = schedule.probabilities(sizes)
    assert p["asr"] == pytest.approx(2 / 3)  # sqrt(8000) : sqrt(2000) = 2 : 1
    assert Temperature(1.0).probabilities(sizes)["asr"] == pytest.approx(0.8)
    assert Temperature(1e6).probabilities(sizes)["asr"] == pytest.approx(0.5, abs=1e-5)
    d = {task: np.ones(n) for task, n in sizes.items()}
    tasks = [p.task for p in BatchInterleavedSampler(d, batch_size=4, schedule=schedule, seed=3)]
    assert len(tasks) > 2000
    assert Counter(tasks)["asr"] / len(tasks) == pytest.approx(2 / 3, abs=0.03)


def test_temperature_draws_are_seeded():
    d = durations()
    a = [p.task for p in BatchInterleavedSampler(d, batch_size=4, schedule=Temperature(1.0), seed=1)]
    b = [p.task for p in BatchInterleavedSampler(d, batch_size=4, schedule=Temperature(1.0), seed=1)]
    c = [p.task for p in BatchInterleavedSampler(d, batch_size=4, schedule=Temperature(1.0), seed=2)]
    assert a == b and a != c


def test_mixed_schedule_mixes_tasks_in_one_stream():
    sampler = BatchInterleavedSampler(durations(), batch_size=8, schedule="mixed")
    plans = list(sampler)
    assert {p.task for p in plans} == {"mixed"} and sampler.stream_names == ["mixed"]
    assert any(len(set(p.tasks)) == 2 for p in plans)
    items = [item for p in plans for item in p.items]  # one pass over the union, each once
    assert sorted(items) == sorted([("asr", i) for i in range(103)] + [("ser", i) for i in range(37)])


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_no_utterance_lost_or_repeated_within_a_pass(schedule):
    d = durations()
    plans = list(BatchInterleavedSampler(d, batch_size=4, schedule=schedule, seed=5))
    for task, values in d.items():
        n = len(values)
        seen = [i for p in plans for t, i in p.items if t == task]
        assert len(seen) >= n  # every utterance at least once per epoch
        for start in range(0, len(seen), n):  # each pass (complete or the cut-off last one) has no repeat
            chunk = seen[start:start + n]
            assert len(set(chunk)) == len(chunk)
            if len(chunk) == n:
                assert sorted(chunk) == list(range(n))


def test_round_robin_epoch_is_set_by_the_largest_task():
    d = durations(n_asr=100, n_ser=20)
    plans = list(BatchInterleavedSampler(d, batch_size=5, pool_size=None))
    asr = [i for p in plans for t, i in p.items if t == "asr"]
    assert sorted(asr) == list(range(100))  # exactly one pass of the largest task
    assert len(plans) == 2 * 20 - 1  # asr's 20th batch ends the epoch, ser restarted meanwhile


def test_ranks_share_task_order_and_split_global_batches():
    d = durations(n_asr=96, n_ser=48)
    world = 3
    per_rank = [list(BatchInterleavedSampler(d, batch_size=4, rank=r, world_size=world, seed=7))
                for r in range(world)]
    assert len({len(plans) for plans in per_rank}) == 1  # same number of steps
    for step in zip(*per_rank):
        assert len({p.task for p in step}) == 1  # same task at the same step
        shards = [set(p.items) for p in step]
        assert sum(map(len, shards)) == len(set().union(*shards))  # disjoint
        assert max(map(len, shards)) - min(map(len, shards)) <= 1 and max(map(len, shards)) <= 4
    # The shards cover the data: one pass of asr (8 global batches of 12 at steps 0, 2, .., 14);
    # ser (4 batches a pass) fills steps 1, .., 13: one pass and 3 batches of the next.
    assert len(per_rank[0]) == 15
    covered = Counter(item for plans in per_rank for p in plans for item in p.items)
    assert {i: covered[("asr", i)] for i in range(96)} == {i: 1 for i in range(96)}
    ser = [covered[("ser", i)] for i in range(48)]
    assert set(ser) == {1, 2} and sum(ser) == 7 * 12


def test_ranks_each_get_an_item_from_a_batch_smaller_than_the_world():
    d = {"asr": [1.0] * 7}
    world = 4
    per_rank = [list(BatchInterleavedSampler(d, batch_size=1, rank=r, world_size=world, shuffle=False))
                for r in range(world)]
    assert all(len(plans) == 2 for plans in per_rank)  # 4 + 3 (padded to 4) utterances
    assert all(len(plans[1]) == 1 for plans in per_rank)
    assert {i for plans in per_rank for i in plans[1].indices} == {4, 5, 6}


def test_rank_defaults_to_single_process():
    sampler = BatchInterleavedSampler(durations(), batch_size=4)
    assert (sampler.rank, sampler.world_size) == (0, 1)
    with pytest.raises(ValueError, match="rank"):
        BatchInterleavedSampler(durations(), batch_size=4, rank=2, world_size=2)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("k", [0, 1, 7])
def test_resume_mid_epoch_is_exact(schedule, k):
    kwargs = dict(batch_size=3, schedule=schedule, seed=11, rank=1, world_size=2, fraction={"asr": 0.5})
    d = durations()
    first = BatchInterleavedSampler(d, **kwargs)
    first.set_epoch(2)
    iterator = iter(first)
    consumed = [next(iterator) for _ in range(k)]
    state = first.state_dict()
    assert state["step"] == k and state["epoch"] == 2
    remaining = list(iterator)

    resumed = BatchInterleavedSampler(d, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop calls this before iterating: must keep the offset
    assert as_tuples(list(resumed)) == as_tuples(remaining)
    assert as_tuples(consumed + remaining) == as_tuples(list(resumed))  # later epochs start at 0
    resumed.set_epoch(3)
    assert resumed.state_dict()["step"] == 0


def test_resume_refuses_different_settings():
    state = BatchInterleavedSampler(durations(), batch_size=4).state_dict()
    for changed in (dict(seed=1), dict(schedule="mixed"), dict(fraction={"asr": 0.5}), dict(shuffle=False)):
        other = BatchInterleavedSampler(durations(), **{"batch_size": 4, **changed})
        with pytest.raises(ValueError, match="different settings"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="different settings"):
        BatchInterleavedSampler(durations(seed=1), batch_size=4).load_state_dict(state)
    # other batch limits and world sizes re-cut the rest of the epoch (tests below), but a state
    # written before states held the used utterances cannot say what is left
    old = {k: v for k, v in state.items() if k not in ("progress", "origin")}
    for changed in (dict(batch_size=5), dict(world_size=2, rank=0), dict(max_duration=30.0)):
        other = BatchInterleavedSampler(durations(), **{"batch_size": 4, **changed})
        other.load_state_dict(state)
        with pytest.raises(ValueError, match="different settings.*predates"):
            other.load_state_dict(old)
    BatchInterleavedSampler(durations(), batch_size=4).load_state_dict(old)  # the same settings: exact


def test_epochs_reshuffle_and_are_reproducible():
    sampler = BatchInterleavedSampler(durations(), batch_size=4, seed=0)
    epoch0 = as_tuples(list(sampler))
    assert as_tuples(list(sampler)) == epoch0
    sampler.set_epoch(1)
    assert as_tuples(list(sampler)) != epoch0
    in_order = BatchInterleavedSampler({"asr": [1.0] * 10}, batch_size=4, shuffle=False, pool_size=None)
    assert [p.indices for p in in_order] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def padding_seconds(plans: list[BatchPlan], d: np.ndarray) -> float:
    return float(sum(len(p) * d[p.indices].max() - d[p.indices].sum() for p in plans))


def test_bucketing_cuts_padding():
    d = np.random.default_rng(0).uniform(1.0, 20.0, 2000)
    random_batches = list(BatchInterleavedSampler({"asr": d}, batch_size=16, pool_size=None))
    bucketed = list(BatchInterleavedSampler({"asr": d}, batch_size=16, pool_size=500))
    waste_random, waste_bucketed = padding_seconds(random_batches, d), padding_seconds(bucketed, d)
    assert waste_bucketed < 0.1 * waste_random, (waste_bucketed, waste_random)
    # Pools keep batches random: the batch order is not sorted by length.
    longest = [d[p.indices].max() for p in bucketed]
    assert longest != sorted(longest)


def test_max_duration_bounds_padded_seconds_per_rank():
    d = durations(n_asr=300, n_ser=100)
    for rank in range(2):
        sampler = BatchInterleavedSampler(d, max_duration=40.0, rank=rank, world_size=2)
        for plan in sampler:
            lengths = d[plan.task][plan.indices]
            assert len(plan) * lengths.max() <= 40.0 or len(plan) == 1
    both = BatchInterleavedSampler(d, max_duration=1000.0, batch_size=3)
    assert max(len(p) for p in both) == 3


def test_limit_and_fraction_are_deterministic_nested_subsets():
    d = durations(n_asr=1000, n_ser=200)

    def subset(**kwargs):
        return BatchInterleavedSampler(d, batch_size=4, **kwargs).subset("asr")

    tenth = subset(fraction={"asr": 0.1})
    assert len(tenth) == 100 and tenth == sorted(tenth)
    assert tenth == subset(fraction={"asr": 0.1}, seed=99)  # training seed does not move the subset
    assert tenth != subset(fraction={"asr": 0.1}, subset_seed=1)
    assert set(tenth) < set(subset(fraction={"asr": 0.2}))  # nested
    assert subset(limit=50) == subset(limit=50)  # deterministic
    assert set(subset(limit=50)) < set(tenth)  # limits nest with fractions too
    assert len(subset(limit=50)) == 50 and len(subset(limit=5000)) == 1000
    assert len(subset(limit=30, fraction=0.5)) == 30

    sampler = BatchInterleavedSampler(d, batch_size=4, fraction={"asr": 0.1}, limit={"ser": 20})
    used = {t: {i for p in sampler for tt, i in p.items if tt == t} for t in ("asr", "ser")}
    assert used["asr"] == set(tenth) and used["ser"] == set(sampler.subset("ser"))
    assert len(sampler.subset("ser")) == 20
    with pytest.raises(ValueError, match="unknown task"):
        BatchInterleavedSampler(d, batch_size=4, limit={"sid": 3})
    with pytest.raises(ValueError, match="fraction"):
        BatchInterleavedSampler(d, batch_size=4, fraction=0.0)


def test_build_schedule_from_config_values():
    assert isinstance(build_schedule(None), RoundRobin)
    assert isinstance(build_schedule("mixed"), Mixed)
    assert build_schedule({"name": "temperature", "temperature": 3}).temperature == 3.0
    assert build_schedule({"name": "ratio", "weights": {"asr": 2, "ser": 1}}).weights == {"asr": 2, "ser": 1}
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("cyclic")
    with pytest.raises(ValueError, match="positive integers"):
        Ratio({"asr": 0, "ser": 1})
    with pytest.raises(ValueError, match="no ratio weight"):
        list(itertools.islice(BatchInterleavedSampler(durations(), batch_size=4, schedule=Ratio({"asr": 1})), 1))


def global_steps(d, world: int, *, epoch: int, state=None, take: int | None = None, **kwargs):
    """All ranks' plans step by step: [(stream, items of the global batch)] (a padded repeat counted
    once) and the state after them (rank 0's, as a checkpoint holds)."""
    samplers = [BatchInterleavedSampler(d, rank=r, world_size=world, **kwargs) for r in range(world)]
    for sampler in samplers:
        if state is not None:
            sampler.load_state_dict(state)
        sampler.set_epoch(epoch)
    steps = []
    for plans in zip(*samplers):
        assert len({p.task for p in plans}) == 1  # every rank takes the same stream at the same step
        steps.append((plans[0].task, {item for p in plans for item in p.items}))
        if len(steps) == take:
            break
    return steps, samplers[0].state_dict()


def assert_each_utterance_once_per_pass(steps, sizes: dict[str, int]):
    """Per stream, its items in step order fall into passes of all its utterances, each once; every
    stream finished its first pass (what ends an epoch)."""
    for stream, n in sizes.items():
        used = [item for name, items in steps if name == stream for item in sorted(items)]
        assert len(used) >= n, stream
        for start in range(0, len(used), n):
            chunk = used[start:start + n]
            assert len(set(chunk)) == len(chunk), (stream, start)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("world", [1, 3])
def test_resume_on_another_world_size_keeps_the_epoch_and_the_utterances_used(schedule, world):
    d = durations(n_asr=103, n_ser=37)
    kwargs = dict(batch_size=3, schedule=schedule, seed=11, pool_size=20)
    sizes = {"mixed": 140} if isinstance(schedule, Mixed) else {"asr": 103, "ser": 37}
    uninterrupted, _ = global_steps(d, 2, epoch=2, **kwargs)
    before, state = global_steps(d, 2, epoch=2, take=9, **kwargs)
    assert before == uninterrupted[:9] and state["step"] == 9 and state["epoch"] == 2
    after, end = global_steps(d, world, epoch=2, state=state, **kwargs)
    steps = before + after
    assert_each_utterance_once_per_pass(steps, sizes)
    # what a step consumed before the resume is never consumed again in that pass
    first_pass = {stream: [item for name, items in steps if name == stream for item in items][:n]
                  for stream, n in sizes.items()}
    assert all(sorted(items) == sorted(set(items)) and len(items) == sizes[s] for s, items in first_pass.items())
    # the schedule goes on where it was: the same stream order as the uninterrupted epoch
    common = min(len(steps), len(uninterrupted))
    assert [name for name, _ in steps[:common]] == [name for name, _ in uninterrupted[:common]]
    # global batches now hold 3 * world utterances at most (3 per rank)
    assert all(len(items) <= 3 * world for _, items in after) and any(len(items) == 3 * world for _, items in after)
    assert end["step"] == len(steps) and end["epoch"] == 2
    # the next epoch is simply that of the new world size
    resumed = BatchInterleavedSampler(d, rank=0, world_size=world, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert len(list(resumed)) == len(steps) - 9
    resumed.set_epoch(3)
    fresh = BatchInterleavedSampler(d, rank=0, world_size=world, **kwargs)
    fresh.set_epoch(3)
    assert as_tuples(list(resumed)) == as_tuples(list(fresh))


def test_a_re_cut_epoch_resumes_exactly_and_can_be_re_cut_again():
    d = durations(n_asr=103, n_ser=37)
    kwargs = dict(batch_size=2, seed=3, pool_size=None)
    before, state = global_steps(d, 2, epoch=0, take=7, **kwargs)
    on_three, _ = global_steps(d, 3, epoch=0, state=state, **kwargs)
    middle, state3 = global_steps(d, 3, epoch=0, state=state, take=5, **kwargs)
    assert middle == on_three[:5] and state3["origin"]["start"] == 7
    # the same settings again: exactly the batches the re-cut run would have taken next
    rest, _ = global_steps(d, 3, epoch=0, state=state3, **kwargs)
    assert middle + rest == on_three
    # and on one process (with a larger batch): still each utterance once per pass
    rest_on_one, _ = global_steps(d, 1, epoch=0, state=state3, batch_size=5, seed=3, pool_size=None)
    assert_each_utterance_once_per_pass(before + middle + rest_on_one, {"asr": 103, "ser": 37})
    # a state saved at the end of the epoch resumes into an empty rest
    _, at_end = global_steps(d, 2, epoch=0, **kwargs)
    assert global_steps(d, 1, epoch=0, state=at_end, **kwargs)[0] == []


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_duration_budget_bounds_every_ranks_batch_and_a_longer_utterance_goes_alone(world):
    rng = np.random.default_rng(4)
    d = {"asr": np.concatenate([rng.uniform(1.0, 20.0, 150), [45.0, 60.0]]), "ser": rng.uniform(1.0, 8.0, 60)}
    budget, too_long = 40.0, {("asr", 150), ("asr", 151)}
    per_rank = [list(BatchInterleavedSampler(d, max_duration=budget, batch_size=16, rank=r, world_size=world,
                                             seed=1, pool_size=50)) for r in range(world)]
    assert len({len(plans) for plans in per_rank}) == 1
    alone = set()
    for step in zip(*per_rank):
        assert len({p.task for p in step}) == 1  # the same task at the same step on every rank
        for plan in step:
            seconds = d[plan.task][plan.indices]
            assert len(plan) <= 16
            if set(plan.items) & too_long:
                assert len(plan) == 1  # its own batch (each rank a copy: every rank must take part)
                alone |= set(plan.items)
            else:
                assert len(plan) * seconds.max() <= budget
    assert alone == too_long
    # the budget is what bounds the batches here, and it is used: a batch of short ser utterances is full
    ser = [len(p) for plans in per_rank for p in plans if p.task == "ser"]
    assert max(ser) > 2 and max(ser) * 8.0 > budget / 2
    covered = Counter(item for plans in per_rank for p in plans for item in p.items if p.task == "asr")
    assert {i for _, i in covered} == set(range(152))  # one pass of asr, nothing lost


def test_data_max_duration_reaches_both_stages_samplers(tmp_path):
    import types

    from tiny import write_tiny_corpus

    from harmonifuse.config import ConfigError, from_dict
    from harmonifuse.config.run import DataConfig
    from harmonifuse.training.loaders import build_run_data

    write_tiny_corpus(tmp_path)
    encoder = types.SimpleNamespace(trainable=True)  # a trainable encoder: no feature cache to build

    def samplers(**data):
        config = from_dict(DataConfig, {"root": str(tmp_path), "build_synthetic": False, **data}, "data")
        run = build_run_data(config, encoder, ["neutral", "happy", "sad", "angry"], seed=0, align_batch_size=16)
        return run.loader.sampler, run.align_loader.sampler

    main, align = samplers(max_duration=1.0, batch_size=8)
    assert (main.max_duration, align.max_duration, main.batch_size, align.batch_size) == (1.0, 1.0, 8, 16)
    for plan in itertools.chain(main, align):  # tiny clips last 0.3-0.6 s: at most 3 fit into 1 s
        assert 1 <= len(plan) <= 3
    assert samplers()[0].max_duration is None  # 0: no budget, batch_size alone
    with pytest.raises(ConfigError, match="data.max_duration"):
        from_dict(DataConfig, {"max_duration": -1.0}, "data")
