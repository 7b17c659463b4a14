"""Training: metrics, the task suite, grain pipelines, adapter training and exact resume, fusion
logic (with a stub trainer), and the training CLI's errors. Runs on the micro model."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import assert_rel_close, micro_config
from serve.generate import Generator
from valora_jax import (AdapterPool, ByteTokenizer, LoraContext, ModelRunner, Request, init_model, load_adapter,
                        save_adapter, save_model)
from valora_jax.image import preprocess_batch
from valora_jax.lora import adapter_slots
from train import forward as fwd
from train.data import encode, eval_dataset, layout_for, train_dataset
from train.evaluate import evaluate_adapter, module_shapes
from train.fusion import generate_adapters, order_tasks, parse_spec
from train.metrics import box_iou, exact_match, iou_score, parse_box, token_f1
from train.tasks import TASKS, get_task
from train.trainer import TrainConfig, init_lora, train_adapter

# One config for every training run here, so the jitted step compiles once.
CFG = TrainConfig(steps=6, batch_size=4, learning_rate=1e-2, warmup_steps=1, examples_per_task=16,
                  eval_examples=4, eval_batch_size=4, checkpoint_every=3, log_every=1, rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def model():
    return init_model(micro_config(max_rank=8), seed=1)


@pytest.fixture(scope="module")
def trained(model):
    """(base state before training, adapter trained on colour with a head, base state after)."""
    before = jax.tree.map(np.array, nnx.state(model))                # params, slots, merged weights
    result = train_adapter(model, ["color"], CFG, progress=False)
    return before, result, jax.tree.map(np.array, nnx.state(model))


# metrics ------------------------------------------------------------------------------------------
def test_metrics_on_hand_made_cases():
    assert exact_match(" Red. ", "red") == 1.0 and exact_match("reds", "red") == 0.0
    assert parse_box("the box is [1, 2,3 ,4].") == (1, 2, 3, 4)
    assert parse_box("[3,2,1,4]") is None and parse_box("no box") is None
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 2, 2), (2, 2, 4, 4)) == 0.0
    assert iou_score("[0,0,2,3]", "[0,0,2,2]") == 1.0          # IoU 4/6
    assert iou_score("[0,0,2,4]", "[0,0,2,2]") == 1.0          # IoU exactly 0.5 counts
    assert iou_score("[0,0,3,3]", "[0,0,2,2]") == 0.0          # IoU 4/9
    assert iou_score("garbage", "[0,0,2,2]") == 0.0
    with pytest.raises(ValueError, match="not a box"):
        iou_score("[0,0,1,1]", "red")
    assert token_f1("a red circle", "a red circle") == 1.0
    assert token_f1("a red circle and a blue square", "a red circle") == pytest.approx(0.6)   # P 3/7, R 1
    assert token_f1("", "a red circle") == 0.0 and token_f1("green", "a red circle") == 0.0


# task suite ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic_bounded_and_split(name):
    task = TASKS[name]
    a, b = task.example("train", 3, seed=0, image_size=32), task.example("train", 3, seed=0, image_size=32)
    assert a.question == b.question and a.answer == b.answer
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    examples = task.examples("test", 40, seed=0, image_size=32)
    assert len({(e.answer, e.images[0].tobytes()) for e in examples}) > 30        # varied
    other = task.examples("test", 40, seed=1, image_size=32)
    assert any(not np.array_equal(x.images[0], y.images[0]) for x, y in zip(examples, other))
    for e in examples:
        assert len(e.images) == task.num_images and all(im.shape == (32, 32, 3) and im.dtype == np.uint8
                                                        for im in e.images)
        assert len(e.question.encode()) <= task.max_question_len and len(e.answer.encode()) <= task.max_answer_len
        if task.labels is not None:
            assert e.answer in task.labels
        assert task.score(e.answer, e.answer) == 1.0


def test_digit_splits_are_disjoint_and_sized():
    from train.tasks import _digit_split

    test, val, train = (set(_digit_split(s, 0).tolist()) for s in ("test", "val", "train"))
    assert not (test & val or test & train or val & train) and len(test | val | train) == 1797
    assert TASKS["digits"].size("test") == 360 and TASKS["digits"].size("val") == 180
    assert len(TASKS["digits"].examples("val", 1000)) == 180
    with pytest.raises(ValueError, match="outside split"):
        TASKS["digits"].example("test", 360)


def test_unknown_task_and_split_are_refused():
    with pytest.raises(ValueError, match="'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="'dev'"):
        TASKS["color"].example("dev", 0)


# data pipelines -----------------------------------------------------------------------------------
def test_pipeline_is_deterministic_and_masks_only_answers():
    config = micro_config()
    tasks = [TASKS["video"], TASKS["color"]]
    layout = layout_for(tasks, config)
    assert layout.max_images == 6 and layout.labels == TASKS["video"].labels + TASKS["color"].labels
    ds, again, other = (train_dataset(tasks, layout, 4, seed=s, examples_per_task=8) for s in (0, 0, 1))
    for step in (0, 1, 5):                                          # step 5: the second epoch
        assert all(np.array_equal(ds[step][k], again[step][k]) for k in ds[step])
    assert any(not np.array_equal(ds[s]["tokens"], other[s]["tokens"]) for s in range(3))
    assert not np.array_equal(ds[0]["tokens"], ds[4]["tokens"])     # epochs are reshuffled
    streamed = list(ds[2:4].to_iter_dataset())                      # resuming at step 2
    assert all(np.array_equal(streamed[0][k], ds[2][k]) for k in ds[2])
    batch = ds[0]
    tok = ByteTokenizer()
    for i in range(4):
        task = tasks[batch["task"][i]]
        answer = tok.decode(batch["tokens"][i][batch["loss_mask"][i]], skip_special=False)
        assert answer.endswith("<|end|>") and answer[: -len("<|end|>")] in task.labels
        assert batch["label"][i] == layout.labels.index(answer[: -len("<|end|>")])
        rows = batch["image_rows"][i]
        assert sorted(rows[rows >= 0].tolist()) == list(range(task.num_images * config.tokens_per_image))
        assert batch["prompt_len"][i] == np.argmax(batch["loss_mask"][i])
        assert not batch["valid"][i][batch["prompt_len"][i] + len(answer) - len("<|end|>") + 1:].any()
    ev = list(eval_dataset(tasks[1], layout, "test", n=5, batch_size=4))
    assert [b["weight"].tolist() for b in ev] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    example = TASKS["color"].example("test", 4, 0, 32)
    assert ev[1]["answer"][0] == example.answer
    assert np.array_equal(ev[1]["tokens"][0], encode(example, 1, layout)["tokens"])


# training -----------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_changes_only_the_adapter(model, trained, tmp_path):
    config = model.config
    before, result, after = trained
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    # the loss over the training examples (all 16 in one batch), before and after
    parts = fwd.split_for_training(model)
    layout = layout_for([TASKS["color"]], config)
    batch = train_dataset([TASKS["color"]], layout, 16, seed=CFG.seed, examples_per_task=16)[0]
    scales = {p: np.float32(CFG.alpha / CFG.rank) for p in result.lora}
    start_head = {"kernel": np.zeros_like(result.head["kernel"]), "bias": np.zeros_like(result.head["bias"])}
    loss = jax.jit(lambda lora, head: fwd.loss(parts, parts.params, lora, scales, head, batch)[0])
    loss0, loss1 = loss(init_lora(model, CFG.rank, CFG.seed), start_head), loss(result.lora, result.head)
    assert float(loss1) < float(loss0) - 0.25, (float(loss0), float(loss1))      # 7.40 -> 6.87 here
    assert [h["step"] for h in result.history[:-1]] == list(range(1, CFG.steps + 1))
    # export: a valora adapter with a task head, which the server's slots hold with zero padding
    adapter = result.to_adapter("color", config.base_id)
    assert adapter.rank == CFG.rank and adapter.head.labels == TASKS["color"].labels
    save_adapter(tmp_path / "color", adapter)
    loaded = load_adapter(tmp_path / "color", config, module_shapes(model))
    runner = ModelRunner(init_model(config, seed=1))
    runner.write_slot(2, loaded)
    served = runner.model()
    for key, slots in adapter_slots(served):
        a, b = np.asarray(slots.lora_a[...][2]), np.asarray(slots.lora_b[...][2])
        assert not a[:, CFG.rank:].any() and not b[CFG.rank:].any()
        np.testing.assert_array_equal(a[:, :CFG.rank], result.lora[key]["a"])
        assert int(slots.lora_rank[...][2]) == CFG.rank and float(slots.lora_scale[...][2]) == CFG.alpha / CFG.rank
    # the training forward (adapter folded into merged weights) equals the served unmerged LoRA path
    _, logits = fwd.forward(parts, parts.params, result.lora, scales, batch)
    b_, length = batch["tokens"].shape
    p = config.tokens_per_image                           # one image per row (layout.max_images == 1)
    v = config.vision
    pixels = preprocess_batch(list(batch["pixels"][:, 0]), size=v.image_size, mean=v.image_mean, std=v.image_std)
    np.testing.assert_allclose(fwd.normalize(batch["pixels"][:, 0], v.image_mean, v.image_std), pixels, atol=1e-6)
    feats = served.encode_images(pixels, LoraContext.unmerged(np.full(b_, 2)))
    rows = np.where(batch["image_rows"] >= 0, batch["image_rows"] + np.arange(b_)[:, None] * p, -1)
    served_logits = served(batch["tokens"], np.broadcast_to(np.arange(length), (b_, length)), batch["valid"], rows,
                           feats.reshape(-1, feats.shape[-1]), LoraContext.unmerged(np.full(b_ * length, 2)))
    valid = batch["valid"]
    assert_rel_close(np.asarray(logits)[valid], np.asarray(served_logits)[valid], "float32")


def test_trainer_answers_as_the_server_does(model, trained):
    """Evaluation (dense forward, adapter folded into merged weights) gives the served answers
    (paged KV cache, unmerged LoRA slots): through the head, and decoded without it."""
    adapter = trained[1].to_adapter("color", model.config.base_id)
    plain = dataclasses.replace(adapter, name="plain", head=None)
    runner = ModelRunner(init_model(model.config, seed=1))
    pool = AdapterPool(runner.config, runner.module_shapes, runner.write_slot)
    pool.register(adapter)
    pool.register(plain)
    examples = TASKS["color"].examples("test", 4, 0, model.config.vision.image_size)
    for a in (adapter, plain):
        _, pairs = evaluate_adapter(model, a, "color", n=4, batch_size=4, return_predictions=True)
        served = Generator(runner, pool, num_pages=64).generate(
            [Request(e.question, list(e.images), adapter=a.name, max_tokens=7) for e in examples])
        assert [p for p, _ in pairs] == [c.text for c in served]


class _Crash(Exception):
    pass


def test_resume_equals_an_uninterrupted_run_bitwise(model, tmp_path):
    whole = train_adapter(model, ["color"], CFG, workdir=tmp_path / "whole", progress=False)

    def crash(step, metrics):
        if step == 4:                                   # after the checkpoint of step 3
            raise _Crash

    with pytest.raises(_Crash):
        train_adapter(model, ["color"], CFG, workdir=tmp_path / "resumed", progress=False, callback=crash)
    resumed = train_adapter(model, ["color"], CFG, workdir=tmp_path / "resumed", progress=False)
    assert resumed.history[0]["step"] == 4                # it did resume
    for x, y in zip(jax.tree.leaves((whole.lora, whole.head)), jax.tree.leaves((resumed.lora, resumed.head))):
        np.testing.assert_array_equal(x, y)
    assert whole.accuracy == resumed.accuracy
    # a finished run resumes to its end without steps; other settings or a corrupt checkpoint are refused
    again = train_adapter(model, ["color"], CFG, workdir=tmp_path / "whole", progress=False)
    np.testing.assert_array_equal(jax.tree.leaves(again.lora)[0], jax.tree.leaves(whole.lora)[0])
    with pytest.raises(ValueError, match=r"another run .*tasks"):
        train_adapter(model, ["shape"], CFG, workdir=tmp_path / "whole", progress=False)
    for f in (tmp_path / "whole" / "ckpt" / str(CFG.steps)).rglob("_METADATA"):
        f.write_text("{not json")
    with pytest.raises(ValueError, match="cannot restore"):
        train_adapter(model, ["color"], CFG, workdir=tmp_path / "whole", progress=False)


# fusion -------------------------------------------------------------------------------------------
class StubTrainer:
    """Accuracies from a table: alone[task] for an adapter of one task, union(tasks) otherwise."""

    def __init__(self, alone, union=lambda tasks: {}, crash_at=None):
        self.alone, self.union, self.crash_at, self.calls, self.steps = alone, union, crash_at, [], []

    def base_accuracy(self, task, split):
        return 0.1

    def train(self, tasks, init, out, name, workdir, steps):
        self.calls.append((tuple(tasks), init is not None))
        self.steps.append(steps)
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            raise _Crash
        acc = {t: self.alone[t] for t in tasks} if len(tasks) == 1 else {
            t: self.union(tuple(tasks)).get(t, self.alone[t]) for t in tasks}
        out.mkdir(parents=True)
        (out / "adapter.json").write_text(json.dumps({"name": name, "tasks": list(tasks), "acc": acc}))
        workdir.mkdir(parents=True, exist_ok=True)          # stands for the training checkpoints
        return acc

    def accuracy(self, adapter, task, split):
        return json.loads((adapter / "adapter.json").read_text())["acc"][task]


SPEC = {"tasks": [{"task": "digits", "requirement": 0.9}, {"task": "counting", "requirement": 0.9},
                  {"task": "color", "requirement": 0.8}, {"task": "video", "requirement": 0.8}], "order": "given"}


def _union(tasks):          # adding colour to the numbers adapter costs digits its requirement
    return {"digits": 0.85} if set(tasks) >= {"digits", "color"} else {"digits": 0.93, "counting": 0.92}


def test_fusion_packs_and_rolls_back(tmp_path):
    stub = StubTrainer({"digits": 0.95, "counting": 0.95, "color": 0.9, "video": 0.9}, _union)
    report = generate_adapters(parse_spec(SPEC), tmp_path, stub, log=lambda *_: None)
    assert stub.calls == [(("digits",), False), (("digits", "counting"), True),
                          (("digits", "counting", "color"), True), (("color",), False), (("color", "video"), True)]
    assert [a["tasks"] for a in report["adapters"]] == [["digits", "counting"], ["color", "video"]]
    assert report["num_adapters"] == 2 and report["one_per_task"] == 4 and report["all_met"]
    rows = {r["task"]: r for r in report["tasks"]}
    assert rows["digits"]["adapter"] == "adapter0" and rows["digits"]["adapted_accuracy"] == 0.93
    assert rows["video"]["adapter"] == "adapter1" and rows["video"]["base_accuracy"] == 0.1
    assert [e["action"] for e in report["log"]] == ["new", "packed", "rollback", "new", "packed"]
    assert (tmp_path / "adapters" / "adapter1" / "adapter.json").exists()
    assert not list((tmp_path / "work").glob("*/train"))       # finished trials keep only their adapter
    assert "2 adapters for 4 tasks" in (tmp_path / "report.md").read_text()


def test_a_run_trains_for_the_most_steps_its_tasks_ask_for(tmp_path):
    tasks = [{"task": "digits", "requirement": 0.9}, {"task": "counting", "requirement": 0.9, "steps": 300},
             {"task": "color", "requirement": 0.8, "steps": 50}, {"task": "video", "requirement": 0.8}]
    spec = parse_spec({**SPEC, "tasks": tasks, "train": {"steps": 100}})
    assert parse_spec(spec.to_dict()) == spec
    stub = StubTrainer({"digits": 0.95, "counting": 0.95, "color": 0.9, "video": 0.9}, _union)
    generate_adapters(spec, tmp_path, stub, log=lambda *_: None)
    assert stub.steps == [100, 300, 300, 50, 100]   # digits; +counting; +color (rolled back); color; +video


def test_suite_targets_in_the_report(tmp_path):
    """The default run's target check on a stub fusion: gains per domain task, digits >= 0.95,
    adapters <= half the tasks; a task that misses shows as NO."""
    from train.run_default import _targets
    stub = StubTrainer({"digits": 0.95, "counting": 0.95, "color": 0.9, "video": 0.9}, _union)
    report = generate_adapters(parse_spec(SPEC), tmp_path, stub, log=lambda *_: None)
    markdown = (tmp_path / "report.md").read_text()
    assert "| digits | adapter0 | " in markdown and "| +83.0 |" in markdown
    targets = {t["target"]: t for t in _targets(report)}
    assert not targets["digits test accuracy >= 0.95"]["met"]          # packed with counting at 0.93
    assert targets["domain tasks: adapted - base >= 24 points"]["measured"] == {"digits": 83.0, "counting": 82.0,
                                                                                "video": 80.0}
    assert targets["adapters <= half of one per task (4 tasks)"]["met"] and targets["every requirement met"]["met"]


def test_grouped_order_puts_similar_tasks_together(tmp_path):
    names = ["caption", "video", "digits", "shape", "grounding", "counting", "color"]
    assert order_tasks(names) == ["digits", "counting", "shape", "color", "video", "grounding", "caption"]
    with pytest.raises(ValueError, match="unknown tasks"):
        order_tasks(["digits", "nope"])
    spec = parse_spec({**SPEC, "order": "grouped", "tasks": {"video": 0.5, "color": 0.5, "digits": 0.5}})
    stub = StubTrainer({"digits": 0.9, "color": 0.9, "video": 0.9})
    report = generate_adapters(spec, tmp_path, stub, log=lambda *_: None)
    assert report["order"] == ["digits", "color", "video"] and stub.calls[0] == (("digits",), False)
    assert report["num_adapters"] == 1


def test_unreachable_requirement_names_task_and_accuracy(tmp_path):
    spec = parse_spec({**SPEC, "tasks": {"digits": 0.9, "counting": 0.99}})
    stub = StubTrainer({"digits": 0.95, "counting": 0.9}, lambda tasks: {"counting": 0.5})
    with pytest.raises(ValueError, match=r"'counting': requirement 0.990 unreachable, reached 0.900"):
        generate_adapters(spec, tmp_path, stub, log=lambda *_: None)
    # the finished adapter stays; not strict: the task is reported unmet instead
    assert (tmp_path / "adapters" / "adapter0").exists()
    lenient = parse_spec({**SPEC, "tasks": {"digits": 0.9, "counting": 0.99}, "strict": False})
    report = generate_adapters(lenient, tmp_path / "lenient", stub, log=lambda *_: None)
    assert not report["all_met"] and [r["met"] for r in report["tasks"]] == [True, False]


@pytest.mark.parametrize("spec,message", [
    ({"tasks": {"nope": 0.5}}, "unknown task 'nope'"),
    ({"tasks": {"digits": 1.5}}, "requirement 1.5"),
    ({"tasks": {"digits": 0.5}, "train": {"stepz": 3}}, "stepz"),
    ({"tasks": {"digits": 0.5}, "order": "random"}, "'random'"),
    ({"tasks": [{"task": "digits"}]}, "requirement"),
    ({"tasks": {}}, "no tasks"),
    ({"tasks": [{"task": "digits", "requirement": 0.5, "steps": 0}]}, "steps 0"),
    ({"tasks": [{"task": "digits", "requirement": 0.5, "steps": 2.5}]}, "steps 2.5"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_crashed_fusion_resumes_without_losing_finished_adapters(tmp_path):
    alone = {"digits": 0.95, "counting": 0.95, "color": 0.9, "video": 0.9}
    crashing = StubTrainer(alone, _union, crash_at=5)         # dies training colour+video
    with pytest.raises(_Crash):
        generate_adapters(parse_spec(SPEC), tmp_path, crashing, log=lambda *_: None)
    assert (tmp_path / "adapters" / "adapter0").exists()
    crashed_after = json.loads((tmp_path / "state.json").read_text())["seconds"]
    fresh = StubTrainer(alone, _union)
    report = generate_adapters(parse_spec(SPEC), tmp_path, fresh, log=lambda *_: None)
    assert fresh.calls == [(("color", "video"), True)]        # nothing finished is trained again
    assert report["seconds"] > crashed_after > 0                # time summed over both runs
    assert [a["tasks"] for a in report["adapters"]] == [["digits", "counting"], ["color", "video"]]
    with pytest.raises(ValueError, match="another spec"):
        generate_adapters(parse_spec({**SPEC, "order": "grouped"}), tmp_path, fresh, log=lambda *_: None)
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt fusion state"):
        generate_adapters(parse_spec(SPEC), tmp_path, fresh, log=lambda *_: None)


# CLI ----------------------------------------------------------------------------------------------
def test_cli_trains_and_evaluates(model, tmp_path, capsys):
    from serve.cli import main

    save_model(tmp_path / "model", model)
    main(["train-adapter", "--model", str(tmp_path / "model"), "--task", "color", "--out", str(tmp_path / "color"),
          "--steps", "6", "--batch-size", "4", "--lr", "1e-2", "--rank", "4", "--alpha", "8", "--examples-per-task",
          "16", "--eval-examples", "4", "--quiet"])
    assert "saved to" in capsys.readouterr().out
    main(["eval", "--model", str(tmp_path / "model"), "--task", "color", "--adapter", str(tmp_path / "color"),
          "--examples", "4", "--batch-size", "4", "--json"])
    out = capsys.readouterr().out
    assert "color: " in out and "adapter 'color'" in out and 0 <= json.loads(out.splitlines()[-1])["color"] <= 1
    with pytest.raises(SystemExit, match="task head"):
        main(["eval", "--model", str(tmp_path / "model"), "--task", "grounding", "--adapter", str(tmp_path / "color")])
    with pytest.raises(SystemExit, match="'nope'"):
        main(["eval", "--model", str(tmp_path / "model"), "--task", "nope"])
    (tmp_path / "spec.json").write_text(json.dumps({"tasks": {"digits": 0.9, "nope": 0.5}}))
    with pytest.raises(SystemExit, match="unknown task 'nope'"):
        main(["generate-adapters", "--spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "gen")])
    shutil.rmtree(tmp_path / "color" / "weights")
    with pytest.raises(SystemExit, match="cannot restore adapter weights"):
        main(["eval", "--model", str(tmp_path / "model"), "--task", "color", "--adapter", str(tmp_path / "color")])
