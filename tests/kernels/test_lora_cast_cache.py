"""The per-step cache of LoRA factors cast to the compute dtype."""
import pytest
import torch

from pronghorn.kernels.lora import cast_cache, lora_mlp


@pytest.fixture
def steps_ended():
    """The test begins steps itself; whatever happens, none is left open for the next test."""
    yield
    cast_cache.end_steps()


def _mlp_parts(hidden=16, inter=24, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def proj(out, inp):
        return (torch.randn(out, inp, generator=g).bfloat16(), torch.randn(r, inp, generator=g) * 0.1,
                torch.randn(out, r, generator=g) * 0.1, 0.5)

    return proj(inter, hidden), proj(inter, hidden), proj(hidden, inter)


def test_casts_are_shared_within_a_step_and_dropped_at_the_next(steps_ended):
    a = torch.randn(4, 8)
    cast_cache.begin_step()
    first = cast_cache.cast(a, torch.bfloat16)
    assert cast_cache.cast(a, torch.bfloat16) is first
    cat = cast_cache.cat_rows([a, a * 2], torch.bfloat16)
    assert cast_cache.cat_rows([a, a * 2], torch.bfloat16) is not None
    torch.testing.assert_close(cat.float(), torch.cat([a, a * 2]).bfloat16().float())
    a.data.mul_(3)  # as a fused optimizer does: new values, same version
    cast_cache.begin_step()
    assert torch.equal(cast_cache.cast(a, torch.bfloat16), a.bfloat16())
    torch.testing.assert_close(cast_cache.cat_rows([a, a * 2], torch.bfloat16).float(),
                               torch.cat([a, a * 2]).bfloat16().float())


def test_the_next_step_refreshes_last_steps_casts_in_one_batch(monkeypatch, steps_ended):
    """What a step cast is recast at the next begin_step by one _foreach_copy_ and found there; factors the step
    did not use are dropped, and so are freed sources."""
    a, b, c = torch.randn(4, 8), torch.randn(2, 8), torch.randn(3, 5)
    batches = []
    foreach_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda d, s: batches.append(len(d)) or foreach_copy(d, s))
    cast_cache.begin_step()
    cast_cache.cast(c, torch.bfloat16)
    cat = cast_cache.cat_rows([a, b], torch.bfloat16)
    cast_cache.begin_step()  # refreshes c and the two slices of the concatenation
    assert batches == [3]
    assert cast_cache.cast(c, torch.bfloat16) is not None and cast_cache.cat_rows([a, b], torch.bfloat16) is cat
    a.data.add_(1.0)  # a fused optimizer's update: no version bump
    cast_cache.begin_step()
    again = cast_cache.cat_rows([a, b], torch.bfloat16)  # c is not used this step
    assert again is cat and torch.equal(again, torch.cat([a, b]).bfloat16())
    cast_cache.begin_step()
    assert batches == [3, 3, 2]  # c dropped
    cast_cache.cat_rows([a, b], torch.bfloat16)
    del a, b, again, cat
    cast_cache.begin_step()
    assert batches == [3, 3, 2]  # its sources are gone: nothing left to refresh


def test_no_caching_outside_a_step_or_without_grad():
    a = torch.randn(4, 8)
    assert cast_cache.cast(a, torch.bfloat16) is not cast_cache.cast(a, torch.bfloat16)
    with torch.no_grad():
        cast_cache.begin_step()
    assert cast_cache.cast(a, torch.bfloat16) is not cast_cache.cast(a, torch.bfloat16)


def test_an_optimizer_step_between_steps_is_seen():
    """Fused optimizers update weights without bumping their version; the next step must still see the update."""
    gate, up, down = _mlp_parts()
    x = torch.randn(3, 16).bfloat16()
    params = [p[1].requires_grad_() for p in (gate, up, down)]
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    try:
        for _ in range(2):
            cast_cache.begin_step()
            y = lora_mlp(x, gate, up, down)
            y.float().square().sum().backward()
            opt.step()
            opt.zero_grad()
        stale = lora_mlp(x, gate, up, down)  # same step as the casts: shows what a missed reset would give
        cast_cache.begin_step()
        got = lora_mlp(x, gate, up, down)
    finally:
        cast_cache.end_steps()
    fresh = lora_mlp(x, gate, up, down)  # no cache at all
    assert torch.equal(got, fresh)
    assert not torch.equal(stale, fresh)


@pytest.fixture
def held_released():
    yield
    cast_cache.release_held()
    cast_cache.end_steps()


def test_a_capture_reads_cached_casts_and_holds_them_across_steps(held_released):
    """Under graph_reads a cached cast is returned and then refreshed at every step although no one asks for it
    again (graph replays do not), even across end_steps; a cast not cached is made afresh and not cached."""
    a, b = torch.randn(4, 4), torch.randn(3, 4)
    cast_cache.begin_step()
    cached = cast_cache.cast(a, torch.float16)  # the uncaptured warm-up
    with cast_cache.graph_reads():
        assert cast_cache.cast(a, torch.float16) is cached
        fresh = cast_cache.cast(b, torch.float16)
    assert cast_cache.cast(b, torch.float16) is not fresh
    for _ in range(3):  # replays only: the cast is never asked for, yet stays current
        a.data.add_(1.0)
        cast_cache.begin_step()
        assert torch.equal(cached, a.half())
    cast_cache.end_steps()
    a.data.add_(1.0)
    cast_cache.begin_step()
    assert torch.equal(cached, a.half())
    cast_cache.release_held()  # the graphs are gone: the cast refreshes only while used
    cast_cache.begin_step()
    a.data.add_(1.0)
    cast_cache.begin_step()
    assert not torch.equal(cached, a.half())
