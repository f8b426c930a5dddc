"""The fixed recipe's loss from labelled logits only: same value and gradients as the model's own loss."""
import copy
import functools
import json
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM, Trainer

from helpers import data as lab_data
from helpers import trainer as lab_trainer
from helpers import training
from helpers.losses import labelled_logits_loss
from helpers.precision import plan_precision
from helpers.recipes import fast_recipe, fixed_recipe
from helpers.trainer import LabTrainer
from helpers.training import train


def test_lab_trainer_is_a_trainer_defined_at_module_level():
    # Importable by name: a class built inside a function cannot be imported, subclassed or pickled.
    assert issubclass(LabTrainer, Trainer)
    assert LabTrainer.__module__ == "helpers.trainer" and LabTrainer.__qualname__ == "LabTrainer"


def _batch(tokenizer):
    lab_data.prepare_tokenizer(tokenizer, "answer_only")
    rows = [{"instruction": "김치찌개 끓이는 법?", "output": "묵은지를 볶은 뒤 물을 붓고 끓여요.", "context": ""},
            {"instruction": "서울의 인구는 얼마나 되나요? 대략 알려 주세요.", "output": "약 940만 명이에요.", "context": ""}]
    encoded = [lab_data.encode_example(row, tokenizer, "answer_only") for row in rows]
    return lab_data.make_collator(tokenizer, "answer_only")(encoded)


@pytest.mark.parametrize("num_items", [None, 7])
def test_labelled_logits_loss_equals_the_models_loss_and_gradients(tiny_model_dir, tokenizer, num_items):
    batch = _batch(tokenizer)
    assert (batch["labels"] == -100).float().mean() > 0.3  # prompt and padding: positions the loss skips
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    kwargs = {"num_items_in_batch": torch.tensor(num_items)} if num_items else {}
    theirs = model(**batch, **kwargs).loss
    theirs.backward()
    their_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ours = labelled_logits_loss(model, batch, kwargs.get("num_items_in_batch"))
    ours.backward()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    for mine, reference in zip((p.grad for p in model.parameters()), their_grads):
        assert torch.allclose(mine, reference, rtol=1e-4, atol=1e-6)


def test_labelled_logits_loss_asks_for_no_hidden_states_and_keeps_none(tiny_model_dir, tokenizer):
    # every layer's hidden states, cast to fp32 by mixed precision, were 5 GiB of a 5.8B step's peak (GPU, 2026-12-07)
    batch = _batch(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    asked = []
    model.register_forward_pre_hook(lambda _module, _args, kwargs: asked.append(kwargs.get("output_hidden_states")),
                                    with_kwargs=True)
    first = labelled_logits_loss(model, batch)
    copied = copy.deepcopy(model)  # the copy catches its own decoder's output
    assert asked == [None] and torch.allclose(labelled_logits_loss(copied, batch), first)
    assert torch.allclose(labelled_logits_loss(model, batch), first)  # the hook is added once, not per call
    assert len(model.get_decoder()._forward_hooks) == 1 and model.get_decoder()._last_hidden_state == []
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1])
    assert len(model.get_decoder()._last_hidden_state) == 1  # other forward passes leave the last one only


def _tiny_fixed_run(tiny_model_dir, tmp_path, **overrides):
    recipe = fixed_recipe(quantization="none", precision="fp32", max_steps=2, batch_size=2, logging_steps=1,
                          **overrides)
    return train(recipe, model_id=str(tiny_model_dir), out_dir=tmp_path, report_to="none", max_rows=8,
                 save_adapter=False, verbose=False)


def test_fixed_recipe_trains_on_labelled_logits_after_checking_them(tiny_model_dir, tmp_path):
    run = _tiny_fixed_run(tiny_model_dir, tmp_path)
    assert run.trainer.labelled_logits_only and run.trainer._labelled_logits_checked
    assert run.trainer.args.train_sampling_strategy == "group_by_length"
    assert run.summary["global_step"] == 2


def test_eval_loss_from_labelled_logits_equals_trainers_own(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    real = lab_trainer.labelled_logits_loss
    monkeypatch.setattr(lab_trainer, "labelled_logits_loss", lambda model, *a, **k: calls.append(model.training)
                        or real(model, *a, **k))
    run = _tiny_fixed_run(tiny_model_dir, tmp_path, eval_steps=2)
    assert False in calls  # the eval at step 2 went through labelled logits too
    ours = run.summary["final_eval_loss"]
    run.trainer.labelled_logits_only = False  # Trainer's own prediction_step, the model's full logits
    assert run.trainer.evaluate()["eval_loss"] == pytest.approx(ours, rel=1e-5)


def test_a_mismatching_labelled_loss_falls_back_to_the_models_loss(tiny_model_dir, tmp_path, monkeypatch):
    real = lab_trainer.labelled_logits_loss
    monkeypatch.setattr(lab_trainer, "labelled_logits_loss", lambda *a, **k: real(*a, **k) + 1.0)
    with pytest.warns(UserWarning, match=r"labelled_logits_only: loss \S+ differs from the model's \S+"):
        run = _tiny_fixed_run(tiny_model_dir, tmp_path)
    assert not run.trainer.labelled_logits_only


def test_resume_refuses_checkpoints_of_a_different_recipe(tiny_model_dir, tmp_path):
    recipe = fixed_recipe(quantization="none", precision="fp32", max_steps=2, batch_size=2, save_steps=2)
    train(recipe, model_id=str(tiny_model_dir), out_dir=tmp_path, report_to="none", max_rows=8, save_adapter=False,
          verbose=False)
    changed = fixed_recipe(quantization="none", precision="fp32", max_steps=4, batch_size=2, save_steps=2,
                           learning_rate=1e-3)
    with pytest.raises(ValueError, match="learning_rate"):
        train(changed, model_id=str(tiny_model_dir), out_dir=tmp_path, report_to="none", max_rows=8, resume=True,
              save_adapter=False, verbose=False)
    longer = fixed_recipe(quantization="none", precision="fp32", max_steps=4, batch_size=2, save_steps=2)
    run = train(longer, model_id=str(tiny_model_dir), out_dir=tmp_path, report_to="none", max_rows=8, resume=True,
                save_adapter=False, verbose=False)
    assert run.summary["resumed_from"].endswith("checkpoint-2") and run.summary["global_step"] == 4


def test_padding_adds_no_token_and_the_adapter_holds_lora_weights_only(tiny_model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token  # as the blog sets it, and as many base tokenizers come
    rows = model.get_input_embeddings().weight.shape[0]
    recipe = fixed_recipe(quantization="none", precision="fp32", max_steps=2, batch_size=2, save_steps=2)
    run = train(recipe, model=model, tokenizer=tokenizer, model_id=str(tiny_model_dir), out_dir=tmp_path,
                report_to="none", max_rows=8, verbose=False)
    assert run.model.get_input_embeddings().weight.shape[0] == rows
    for folder in (tmp_path / "adapter", tmp_path / "checkpoints" / "checkpoint-2"):
        with safe_open(folder / "adapter_model.safetensors", "pt") as weights:
            keys = list(weights.keys())
        assert keys and all("lora_" in key for key in keys), [k for k in keys if "lora_" not in k]
    assert run.summary["adapter_dir"] == "adapter"  # relative to out_dir: no machine path in the run card


def test_a_bf16_model_trains_on_labelled_logits(tiny_model_dir, tmp_path, monkeypatch):
    # On a GPU, precision bf16 loads the model in bf16 and trains under autocast; accelerate hands the model's
    # outputs back in fp32, so the hidden state met the bf16 head outside autocast ("float != BFloat16").
    # The CPU runs the same path when train() gets the precision plan of a GPU that has bf16.
    monkeypatch.setattr(training, "plan_precision", functools.partial(plan_precision, gpu=True, gpu_has_bf16=True))
    recipe = fixed_recipe(quantization="none", precision="bf16", max_steps=2, batch_size=2, logging_steps=1)
    run = train(recipe, model_id=str(tiny_model_dir), out_dir=tmp_path, report_to="none", max_rows=8,
                save_adapter=False, verbose=False)
    assert run.model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert run.trainer.args.bf16 and run.trainer.labelled_logits_only  # checked against the model's loss, kept
    assert run.summary["global_step"] == 2 and all(r.finite for r in run.monitor.records)


def test_run_card_records_peak_gpu_memory(tiny_model_dir, tmp_path):
    run = _tiny_fixed_run(tiny_model_dir, tmp_path)
    card = json.loads((tmp_path / "run_card.json").read_text())
    for key in ("peak_gpu_allocated_gib", "peak_gpu_reserved_gib"):
        assert key in card and key in run.summary
        if not torch.cuda.is_available():
            assert card[key] is None
        else:
            assert card[key] > 0


@pytest.mark.parametrize("asked, expected", [(None, "eager"), ("sdpa", "sdpa")])
def test_train_passes_the_attention_choice_to_the_loader(tiny_model_dir, tmp_path, asked, expected):
    # Notebooks 02/03 take attn_implementation; None lets the loader pick per architecture (eager for Gemma-3).
    recipe = fixed_recipe(quantization="none", precision="fp32", max_steps=1, batch_size=2)
    run = train(recipe, model_id=str(tiny_model_dir), out_dir=tmp_path, report_to="none", max_rows=4,
                save_adapter=False, verbose=False, attn_implementation=asked)
    assert run.summary["attn_implementation"] == expected
    assert json.loads((tmp_path / "run_card.json").read_text())["attn_implementation"] == expected


class _HostReads(TorchFunctionMode):
    """Records each read of a tensor's value into Python or copy to the host made by the code of one file."""

    READS = {"item", "cpu", "__bool__", "__float__", "__int__", "tolist", "numpy"}

    def __init__(self, filename: str):
        super().__init__()
        self.filename, self.reads = filename, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS and sys._getframe(1).f_code.co_filename == self.filename:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_one_value_to_the_host_the_loss_and_copies_no_batch(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    # On a GPU each read waits for the queued work to finish. The step used to copy every batch tensor to the host
    # and test its loss for finiteness (4 reads a step, besides the monitor's); now it reads the loss once, for the
    # monitor and the replay alike.
    per_step = []
    real_step = LabTrainer.training_step

    def counted(self, *args, **kwargs):
        with _HostReads(lab_trainer.__file__) as reads:
            loss = real_step(self, *args, **kwargs)
        per_step.append(reads.reads)
        return loss

    monkeypatch.setattr(LabTrainer, "training_step", counted)
    recipe = fixed_recipe(quantization="none", precision="fp32", max_steps=4, batch_size=2, logging_steps=1)
    run = train(recipe, model_id=str(tiny_model_dir), out_dir=tmp_path, report_to="none", max_rows=8,
                save_adapter=False, verbose=False)
    assert len(per_step) == 4
    assert per_step[0] == ["__float__", "__float__", "item"]  # the first step also checks labelled logits, once
    assert per_step[1:] == [["item"]] * 3
    assert run.trainer.first_nonfinite_batch is None and all(r.finite for r in run.monitor.records)


def test_the_fast_recipe_trains_packed_rows_and_counts_real_tokens(tiny_model_dir, tmp_path):
    assert fast_recipe().torch_compile is False  # compiling costs minutes up front (see fast_recipe)
    recipe = fast_recipe(quantization="none", max_steps=2, tokens_per_step=512, logging_steps=1, loss_chunk_rows=64,
                         min_steps_per_epoch=0, torch_compile="auto")
    run = train(recipe, model_id=str(tiny_model_dir), out_dir=tmp_path, report_to="none", max_rows=24,
                save_adapter=False, verbose=False)
    card = run.summary
    assert run.recipe.batch_size == round(512 / _mean_train_length(run)) and card["global_step"] == 2
    assert card["optimizer"] == "adamw_torch" and card["recipe"]["torch_compile"] is torch.cuda.is_available()
    assert run.trainer.loss_chunk_rows == 64 and run.trainer.labelled_logits_only  # checked on step 1, kept
    assert card["recipe"]["gradient_checkpointing"] is False  # no budget on a CPU: nothing needs it
    assert card["memory_estimate"]["logits"] == "chunked" and card["memory_estimate"]["total_gib"] > 0
    # packed rows have no padding between examples: every token of two steps' examples is counted once
    assert 0.5 * 2 * 512 < card["real_tokens"] < 2 * 2 * 512
    assert all(r.finite for r in run.monitor.records)


def _mean_train_length(run) -> float:
    lengths = [len(ids) for ids in run.trainer.train_dataset["input_ids"]]
    return sum(lengths) / len(lengths)


def test_small_data_lowers_the_fast_recipes_step_so_an_epoch_keeps_its_steps(tiny_model_dir, tmp_path):
    recipe = fast_recipe(quantization="none", max_steps=1, tokens_per_step=4096, min_steps_per_epoch=4,
                         logging_steps=1, loss_chunk_rows=64)
    run = train(recipe, model_id=str(tiny_model_dir), out_dir=tmp_path, report_to="none", max_rows=24,
                save_adapter=False, verbose=False)
    lengths = [len(ids) for ids in run.trainer.train_dataset["input_ids"]]
    most = sum(lengths) // 4
    assert most < 4096  # the tiny split cannot fill four steps of 4,096 tokens
    assert run.summary["step_plan"]["tokens_per_step"] == most
    assert run.recipe.batch_size == round(most / (sum(lengths) / len(lengths)))
    assert "4,096 tokens asked, at most" in run.summary["step_plan"]["reason"]


def test_a_memory_budget_is_planned_with_the_estimates_margin(tiny_model_dir, tmp_path):
    # the H200's 12.8B row peaked 9.1% above its estimate: a stated budget is planned to 90% of itself
    recipe = fast_recipe(quantization="none", max_steps=1, tokens_per_step=512, min_steps_per_epoch=0,
                         memory_budget_gib=10.0, logging_steps=1, loss_chunk_rows=64)
    run = train(recipe, model_id=str(tiny_model_dir), out_dir=tmp_path, report_to="none", max_rows=24,
                save_adapter=False, verbose=False)
    assert run.summary["step_plan"]["budget_gib"] == pytest.approx(9.0)
    assert run.summary["memory_estimate"]["total_gib"] <= 9.0


def test_two_accumulated_micro_batches_train_as_one_batch_of_both(tiny_model_dir, tmp_path):
    # the step "auto" checkpointing accumulates instead of recomputing must be the same step: same examples, same
    # loss normalisation (num_items_in_batch over both micro-batches), same update
    adapters = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        recipe = fast_recipe(quantization="none", precision="fp32", tokens_per_step=0, batch_size=batch_size,
                             gradient_accumulation=accumulation, lora_dropout=0.0, max_steps=2, logging_steps=1)
        run = train(recipe, model_id=str(tiny_model_dir), out_dir=tmp_path / f"{batch_size}x{accumulation}",
                    report_to="none", max_rows=24, save_adapter=False, verbose=False)
        assert (run.recipe.batch_size, run.recipe.gradient_accumulation) == (batch_size, accumulation)
        adapters.append({n: p.detach().clone() for n, p in run.model.named_parameters() if "lora_" in n})
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for name, weight in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], weight, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(w, torch.zeros_like(w)) for n, w in adapters[0].items() if "lora_B" in n)
