"""Generator.generate(): the oracle's outputs, batch and mode invariance, sampling, stops, task heads,
bad input, no page leaks."""

import dataclasses

import numpy as np
import pytest

from conftest import random_image
from valora_jax import Request, TaskHead


def _requests():
    return [Request("describe the picture", [random_image(0)], adapter="task0", max_tokens=6),
            Request("a question without images", adapter=None, max_tokens=4),
            Request("two frames of a clip", [random_image(1), random_image(2)], adapter="task2", max_tokens=5),
            Request("sampled", [random_image(3)], adapter="task1", max_tokens=6, temperature=0.9, top_p=0.8,
                    seed=7)]


@pytest.fixture(scope="module")
def together(generator):
    return generator.generate(_requests())


def test_a_batch_gives_each_request_its_full_recompute_output(oracle, together):
    for req, got in zip(_requests(), together):
        want = oracle(req)
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason


def test_each_request_alone_equals_its_batch(generator, together):
    for req, batched in zip(_requests(), together):
        alone = generator.generate([req])[0]
        assert alone.token_ids == batched.token_ids
        assert alone.finish_reason == batched.finish_reason
    assert generator.allocator.num_free == generator.allocator.num_pages - 1      # no page leaks


def test_merged_and_mixture_modes_give_the_same_greedy_output(generator, together):
    reqs = _requests()[:3]
    solo = generator.generate([reqs[0]], mode="merged")[0]
    assert solo.token_ids == together[0].token_ids
    mixed = generator.generate(reqs, mode="mixture", merged_adapter="task0")
    assert [c.token_ids for c in mixed] == [c.token_ids for c in together[:3]]
    other = generator.generate(reqs, mode="mixture", merged_adapter="task1")   # merged one not in batch
    assert [c.token_ids for c in other] == [c.token_ids for c in together[:3]]


def test_adapters_change_the_output(generator):
    req = Request("same prompt", [random_image(5)], max_tokens=8)
    outs = {generator.generate([dataclasses.replace(req, adapter=a)])[0].token_ids
            for a in (None, "task0", "task1", "task2")}
    assert len(outs) > 1


def test_sampling_is_seeded_per_request(generator):
    req = Request("sample me", max_tokens=8, temperature=1.0, top_p=1.0, seed=3)
    a = generator.generate([req])[0]
    b = generator.generate([Request("other", max_tokens=3), req])[1]
    c = generator.generate([dataclasses.replace(req, seed=4)])[0]
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_max_tokens_and_stop_strings(generator, together):
    first = together[0]
    assert first.finish_reason == "length" and len(first.token_ids) == 6
    stop_text = first.text[2:4]
    if stop_text:
        cut = generator.generate([dataclasses.replace(_requests()[0], stop=[stop_text])])[0]
        assert cut.finish_reason == "stop" and stop_text not in cut.text and first.text.startswith(cut.text)


def test_stop_token_ends_generation(generator, monkeypatch):
    req = Request("stop early", max_tokens=6)
    first = generator.generate([req])[0].token_ids[0]
    monkeypatch.setattr(type(generator.tokenizer), "stop_ids", (first,))
    out = generator.generate([req])[0]
    assert out.token_ids == () and out.finish_reason == "stop"


def test_task_head_answers_after_prefill(generator, config):
    rng = np.random.default_rng(0)
    base = generator.pool.store["task1"]
    head = TaskHead(rng.standard_normal((config.text.hidden_size, 3)).astype(np.float32),
                    np.zeros(3, np.float32), ("left", "right", "none"))
    generator.pool.register(dataclasses.replace(base, name="headed", head=head))
    out = generator.generate([Request("which way?", [random_image(9)], adapter="headed")])[0]
    assert out.label in head.labels and out.text == out.label and out.token_ids == ()


@pytest.mark.parametrize("req,message", [
    (Request(""), "prompt"),
    (Request("hi", [b"not an image"]), "image"),
    (Request("hi", max_tokens=0), "max_tokens"),
    (Request("hi", temperature=-1.0), "temperature"),
    (Request("x" * 600), "context"),
    (Request("hi", adapter="missing"), "'missing'"),
])
def test_bad_requests_fail_alone_and_change_nothing(generator, req, message):
    resident = dict(generator.pool.resident)
    with pytest.raises(ValueError, match=message):
        generator.generate([Request("fine", max_tokens=2), req])
    assert generator.pool.resident == resident
    assert generator.allocator.num_free == generator.allocator.num_pages - 1
    assert generator.generate([Request("fine", max_tokens=2)])[0].token_ids


def test_merged_mode_needs_one_adapter(generator):
    with pytest.raises(ValueError, match="one adapter"):
        generator.generate(_requests()[:2], mode="merged")


def test_shape_buckets_bound_compilations(generator):
    step = generator.runner._sample_step
    before = step._cache_size()
    lengths = range(1, 41, 3)
    for n in lengths:
        generator.generate([Request("z" * n, max_tokens=2)])
    compiled = step._cache_size()
    assert compiled - before <= 12 < 2 * len(lengths)     # one prefill + one decode per length would be 28
    for n in lengths:
        generator.generate([Request("y" * n, max_tokens=2, adapter="task1")])
    assert step._cache_size() == compiled                 # nothing new on a second pass


def test_conversations_place_images_where_their_parts_stand(generator):
    img = random_image(11)
    convo = [{"role": "system", "content": "be brief"},
             {"role": "user", "content": [{"type": "text", "text": "look:"}, {"type": "image"}]},
             {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "and now?"}]
    out = generator.generate([Request(messages=convo, images=[img], max_tokens=4)])[0]
    tok = generator.tokenizer
    ids = tok.expand_image_tokens(tok.chat_prompt(convo), generator.runner.config.tokens_per_image)
    assert out.prompt_tokens == len(ids) and len(out.token_ids) == 4
    simple = generator.generate([Request("look:", [img], max_tokens=4)])[0]
    assert simple.prompt_tokens != out.prompt_tokens
    with pytest.raises(ValueError, match="1 image parts but 2 images"):
        generator.generate([Request(messages=convo, images=[img, img])])
    with pytest.raises(ValueError, match="not both"):
        generator.generate([Request("text", messages=convo, images=[img])])
    with pytest.raises(ValueError, match="role"):
        generator.generate([Request(messages=[{"role": "robot", "content": "hi"}])])


def test_precompiled_step_variants_are_not_compiled_again(generator, caplog):
    import jax
    import jax.numpy as jnp

    from valora_jax import RowSpec, pack_block

    runner, cache = generator.runner, generator.engine.cache
    blocks = [pack_block([RowSpec([5], 3, None, -1, [1])], min_rows=4, min_pages=8),
              pack_block([RowSpec(list(range(1, 21)), 0, None, 0, [2, 3])], min_tokens=32, min_pages=8)]
    features = jnp.zeros((16, runner.config.text.hidden_size), jnp.dtype(runner.config.dtype))
    shape = (tuple((*b.tokens.shape, b.page_table.shape[1]) for b in blocks), 16, "unmerged")
    assert runner.precompile(cache, [shape], threads=2) == 1
    with jax.log_compiles(), caplog.at_level("WARNING"):
        *_, generator.engine.cache = runner.step(cache, blocks, features)
    assert "_step_impl" not in caplog.text


def test_precompiled_encoder_batches_are_not_compiled_again(generator, caplog):
    import jax

    from valora_jax.runtime import compile_lowered

    runner, size = generator.runner, generator.runner.config.vision.image_size
    assert compile_lowered(runner.lower_encoder([3]), threads=1) == 1
    with jax.log_compiles(), caplog.at_level("WARNING"):
        features = runner.encode_images(np.zeros((3, size, size, 3), np.float32), [-1, 0, -1])
    assert features.shape[0] == 3 and "_encode_impl" not in caplog.text
