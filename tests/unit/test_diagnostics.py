"""The collapse monitor on a run that collapses and one that does not, and the headroom probe on a planted overflow."""
import math

import pytest
import torch

from helpers.diagnostics import HeadroomProbe, StepRecord, detect_collapse, read_trace, replay_batch, rng_state
from helpers.fp16_emulation import FP16_MAX, fp16_range
from helpers.recipes import blog_recipe
from helpers.training import train

from blog_runs import arithmetic_rows, warned_about_the_blog_labels


def _run(tiny_model_dir, tmp_path, precision, learning_rate, name, max_steps=40):
    recipe = blog_recipe(quantization="none", precision=precision, learning_rate=learning_rate, max_steps=max_steps,
                         logging_steps=5, lora_targets="all", optimizer="adamw_torch", max_grad_norm=0.0,
                         gradient_checkpointing=False)
    with warned_about_the_blog_labels():
        return train(recipe, model_id=str(tiny_model_dir), data=arithmetic_rows(tmp_path), out_dir=tmp_path / name,
                     report_to="none", save_adapter=False, verbose=False)


def test_monitor_sees_the_full_signature_of_a_collapse(tiny_model_dir, tmp_path):
    # A huge learning rate blows up the LoRA weights until activations pass fp16's max: fp16 overflows, fp32 does not.
    run = _run(tiny_model_dir, tmp_path, "fp16_emulated", 50.0, "collapse")
    finding = run.monitor.finding()
    assert finding.collapsed
    assert finding.first_nonfinite_step is not None and finding.nonfinite_streak_from >= finding.first_nonfinite_step
    assert finding.lr_frozen_from is not None and finding.scale_to_zero_step is not None
    assert finding.fake_zero_log_step is not None  # the Trainer logged 0.0 while the raw loss was NaN
    trace = read_trace(tmp_path / "collapse" / "trace.jsonl")
    assert len(trace) == 40 and [r.step for r in trace] == list(range(1, 41))
    dead = [r for r in trace if r.step >= finding.nonfinite_streak_from]
    assert all(r.skipped and not r.finite for r in dead)
    assert len({r.learning_rate for r in dead}) == 1
    zero_logs = [r for r in trace if r.logged_loss == 0.0]
    assert zero_logs and all(not r.finite for r in zero_logs)
    # The replay meets the first non-finite step's forward again (its weights and dropout masks), not the end state.
    failing = run.trainer.first_nonfinite_batch
    assert failing["step"] == finding.first_nonfinite_step
    final = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    probe = replay_batch(run.model, failing["batch"], context=fp16_range(), weights=failing["weights"],
                         rng_state=failing["rng_state"])
    assert not math.isfinite(probe.loss) and probe.first_nonfinite is not None
    assert all(torch.equal(p, final[n]) for n, p in run.model.named_parameters() if p.requires_grad)


class _Dropped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return type("Out", (), {"loss": self.drop(self.lin(x)).sum()})()


def test_replay_uses_the_given_weights_and_dropout_masks_and_puts_everything_back():
    torch.manual_seed(0)
    model, x = _Dropped().train(), torch.randn(4, 8)
    met_weight, state = model.lin.weight.detach().clone(), rng_state()
    with torch.no_grad():
        expected = float(model(x).loss)
        model.lin.weight.mul_(3.0)  # a later step moved the weights
    moved = model.lin.weight.detach().clone()
    torch.randn(100)  # and the random state moved on
    probe = replay_batch(model, {"x": x}, context=None, weights={"lin.weight": met_weight}, rng_state=state)
    assert probe.loss == expected
    assert torch.equal(model.lin.weight, moved) and model.training
    assert replay_batch(model, {"x": x}, weights={"lin.weight": met_weight}).loss != expected  # eval: no dropout
    with pytest.raises(ValueError, match="no parameters named"):
        replay_batch(model, {"x": x}, weights={"nope": met_weight})


def test_monitor_reports_no_collapse_on_a_healthy_run(tiny_model_dir, tmp_path):
    run = _run(tiny_model_dir, tmp_path, "fp32", 1e-3, "healthy", max_steps=20)
    finding = run.monitor.finding()
    assert not finding.collapsed and finding.nonfinite_steps == 0 and finding.steps_skipped == 0
    assert all(math.isfinite(r.raw_loss) for r in run.monitor.records)
    lrs = [r.learning_rate for r in run.monitor.records]
    assert lrs[0] > lrs[-1]  # the linear schedule advanced


def test_stop_mode_ends_the_run_and_keeps_the_last_good_adapter(tiny_model_dir, tmp_path):
    recipe = blog_recipe(quantization="none", precision="fp16_emulated", learning_rate=50.0, max_steps=100,
                         logging_steps=5, lora_targets="all", optimizer="adamw_torch", max_grad_norm=0.0,
                         gradient_checkpointing=False)
    with warned_about_the_blog_labels():
        run = train(recipe, model_id=str(tiny_model_dir), data=arithmetic_rows(tmp_path), out_dir=tmp_path / "stop",
                    report_to="none", on_collapse="stop", save_adapter=False, verbose=False)
    assert run.monitor.stopped_at is not None and run.summary["global_step"] == run.monitor.stopped_at < 100
    finding = run.monitor.finding()  # it stopped only once the whole signature was on record
    assert finding.fake_zero_log_step is not None and finding.scale_to_zero_step is not None
    saved = tmp_path / "stop" / "last_good"
    assert (saved / "adapter_model.safetensors").exists()
    good_step = int((saved / "step.txt").read_text())
    assert good_step < run.monitor.finding().nonfinite_streak_from
    assert all(torch.isfinite(p).all() for p in run.model.parameters() if p.requires_grad)


def test_detect_collapse_ignores_isolated_overflows():
    # A healthy fp16 run skips a step now and then while its scale settles: that is not a collapse.
    records = [StepRecord(step=i, raw_loss=float("nan") if i in (3, 50) else 2.0, finite=i not in (3, 50),
                          skipped=i in (3, 50), learning_rate=1e-4 * (1 - i / 100), loss_scale=65536.0,
                          grad_norm=1.0) for i in range(1, 101)]
    finding = detect_collapse(records)
    assert not finding.collapsed and finding.first_nonfinite_step == 3 and finding.nonfinite_steps == 2


class _Planted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.small = torch.nn.Linear(4, 4)
        self.big = torch.nn.Linear(4, 4)
        self.after = torch.nn.Linear(4, 4)
        with torch.no_grad():
            self.small.weight.fill_(0.1)
            self.big.weight.fill_(40000.0)  # 4 inputs of 1.0 -> 160000 per output, past fp16's 65504

    def forward(self, x):
        return self.after(self.big(self.small(x) * 10))


def test_headroom_probe_names_the_planted_overflow():
    model = _Planted()
    x = torch.ones(2, 4)
    with HeadroomProbe(model) as probe, fp16_range():
        model(x)
    assert probe.first_nonfinite == "big"
    assert probe.stats["small"]["headroom"] > 1 and not probe.stats["small"]["nonfinite"]
    assert probe.stats["big"]["nonfinite"]
    table = probe.table()
    assert list(table["module"]) == ["small", "big", "after"]


def test_headroom_probe_in_fp32_reports_headroom_below_one_without_overflow():
    model = _Planted()
    with HeadroomProbe(model) as probe:
        model(torch.ones(2, 4))
    assert probe.first_nonfinite is None
    assert probe.stats["big"]["max_abs"] > FP16_MAX and probe.stats["big"]["headroom"] < 1


def test_emulation_keeps_fp32_range_outside_autocast_regions():
    big = torch.full((2, 2), 1e5)
    with fp16_range():
        assert not torch.isfinite(torch.matmul(big, torch.eye(2))).any()  # 1e5 overflows fp16: inf, then inf*0 = nan
        with torch.autocast("cpu", enabled=False):  # like transformers' rotary embedding
            assert torch.isfinite(torch.matmul(big, torch.eye(2))).all()
    assert torch.isfinite(torch.matmul(big, torch.eye(2))).all()


def test_the_emulation_reaches_the_4bit_product_and_computes_it_in_fp32():
    # bitsandbytes' 4-bit product is a custom op that the emulation's mode cannot see into: left alone, it ran under
    # the bf16 autocast marker in CPU bf16 (~45 s a step of notebook 04 on a CPU without bf16 instructions).
    import bitsandbytes as bnb

    from helpers.fp16_emulation import round_to_fp16

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64) * 0.1, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes the weight
    x = torch.randn(8, 64, requires_grad=True)
    with fp16_range():
        y = layer(x)
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    expected = round_to_fp16(torch.nn.functional.linear(round_to_fp16(x), weight))  # fp16 range, fp32 product
    assert y.dtype == torch.float32 and torch.equal(y, expected)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
