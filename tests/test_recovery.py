"""Recovery after pruning: distillation by LoRA (merged back) or full training, on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from gqaprune_core.config import PruneConfig
from gqaprune_core.data import calibration_batch
from gqaprune_core.models import layout, load_model
from gqaprune_core.pipeline import run_pipeline
from gqaprune_core.plan import LayerPlan, identity_plan
from gqaprune_core.recovery import distillation_loss, lr_factor, recover_
from gqaprune_core.surgery import apply_plan_

pytestmark = pytest.mark.usefixtures("one_thread")

FAST_LR = {"lora": 1e-2, "full": 1e-3}  # tiny random models: big steps, few of them


def prune_unevenly_(model):
    """Layer 0 loses a GQA group, layer 1 stays whole, layer 2 loses half its MLP channels."""
    shapes = layout(model)
    plan = identity_plan(shapes)
    for index, groups, channels in ((0, (1,), None), (2, None, tuple(range(0, 40, 2)))):
        s = plan.layers[index]
        plan = plan.with_layer(LayerPlan(
            index, s.q_heads_before, s.kv_heads_before, s.head_dim, s.mlp_before,
            groups or s.kept_kv_heads, channels or s.kept_mlp_channels))
    return apply_plan_(model, plan)


@pytest.fixture
def teacher_student(make_tiny):
    teacher = make_tiny()
    return teacher, prune_unevenly_(copy.deepcopy(teacher))


@pytest.fixture
def windows():
    return torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def kd_on(student, teacher, tokens) -> float:
    return distillation_loss(student(tokens).logits, teacher(tokens).logits).item()


def test_distillation_loss_is_the_kl_divergence_per_position():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11,
                                                                               generator=generator)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    assert distillation_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(student.bfloat16(), teacher).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(2, 5, 11\).*\(2, 5, 7\)"):
        distillation_loss(student, teacher[..., :7])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_distillation_loss_goes_down_on_a_pruned_model(teacher_student, windows, method):
    teacher, student = teacher_student
    shapes = layout(student)
    before = kd_on(student, teacher, windows)
    report = recover_(student, teacher, windows, method=method, steps=12, lr=FAST_LR[method],
                      batch_size=4, seed=0)
    assert kd_on(student, teacher, windows) < 0.6 * before
    assert (report.steps_done, report.stopped_by, report.tokens_seen) == (12, "steps", 12 * 4 * 24)
    assert report.loss_last < report.loss_first and report.trainable_params > 0
    assert layout(student) == shapes and not student.training
    assert all(p.grad is None for p in student.parameters())


def test_full_training_leaves_embeddings_and_head_alone_and_is_seeded(teacher_student, windows):
    teacher, student = teacher_student
    twin = copy.deepcopy(student)
    frozen = {name: p.clone() for name, p in student.named_parameters() if ".layers." not in name}
    first = recover_(student, teacher, windows, method="full", steps=3, lr=1e-3, seed=5)
    second = recover_(twin, teacher, windows, method="full", steps=3, lr=1e-3, seed=5)
    for name, p in student.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert first.loss_last == second.loss_last
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), twin.parameters()))


def test_merged_lora_is_the_same_plain_model_and_matches_the_unmerged_one(teacher_student,
                                                                          windows):
    teacher, student = teacher_student
    model_class, shapes = type(student), layout(student)
    names = [(name, p.shape) for name, p in student.named_parameters()]
    student.model.embed_tokens.weight.requires_grad_(False)  # flags must come back as they were
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    probe = windows[:2]
    with torch.no_grad():
        start = student(probe).logits
    unmerged = {}

    def at_the_end(done: int, total: int) -> None:
        if done == total:  # the adapters are trained but not merged yet
            assert any("lora_" in name for name, _ in student.named_parameters())
            with torch.no_grad():
                unmerged["logits"] = student(probe).logits

    recover_(student, teacher, windows, method="lora", steps=4, lr=1e-2, progress=at_the_end)
    assert type(student) is model_class and layout(student) == shapes
    assert [(name, p.shape) for name, p in student.named_parameters()] == names
    assert not [m for m in student.modules() if type(m).__module__.startswith("peft")]
    assert {name: p.requires_grad for name, p in student.named_parameters()} == flags
    assert not student.training and all(p.grad is None for p in student.parameters())
    with torch.no_grad():
        merged = student(probe).logits
    assert not torch.allclose(merged, start, atol=1e-4)  # training did change the model
    torch.testing.assert_close(merged, unmerged["logits"], atol=1e-5, rtol=1e-4)


def test_lora_recovers_a_model_with_biases(make_tiny, windows):
    teacher = make_tiny("qwen2_bias")
    student = prune_unevenly_(copy.deepcopy(teacher))
    report = recover_(student, teacher, windows, method="lora", steps=2, lr=1e-2)
    assert report.steps_done == 2 and report.loss_last < report.loss_first
    assert student.model.layers[0].self_attn.q_proj.bias.shape == (3 * 8,)


def test_a_time_budget_of_zero_runs_no_step(teacher_student, windows):
    teacher, student = teacher_student
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    calls = []
    report = recover_(student, teacher, windows, method="lora", steps=5, time_budget_s=0,
                      progress=lambda d, t: calls.append((d, t)))
    assert (report.steps_done, report.steps_requested, report.stopped_by) == (0, 5, "time")
    assert report.loss_first is None and report.tokens_seen == 0
    assert calls == [(0, 5)]
    assert all(torch.equal(weights[k], v) for k, v in student.state_dict().items())


def test_cosine_schedule_decays_to_zero_and_constant_keeps_the_rate():
    factors = [lr_factor(step, 4, "cosine") for step in range(4)]
    assert factors[0] == 1.0 and factors == sorted(factors, reverse=True) and factors[-1] > 0
    assert lr_factor(4, 4, "cosine") == pytest.approx(0.0)
    assert {lr_factor(step, 4, "constant") for step in range(4)} == {1.0}


def test_the_schedule_sets_the_optimiser_rate(teacher_student, windows, monkeypatch):
    teacher, student = teacher_student
    rates = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    report = recover_(student, teacher, windows, method="full", steps=3, lr=0.5, batch_size=2)
    assert report.schedule == "cosine"
    assert rates == pytest.approx([0.5 * lr_factor(s, 3, "cosine") for s in range(3)])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "distill"}, "method 'distill'"),
    ({"steps": -1}, "steps=-1"),
    ({"lr": 0.0}, "lr=0.0"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"time_budget_s": -2.0}, "time_budget_s=-2.0"),
    ({"schedule": "linear"}, "schedule 'linear'"),
])
def test_bad_arguments_are_named(teacher_student, windows, kwargs, message):
    teacher, student = teacher_student
    with pytest.raises(ValueError, match=message):
        recover_(student, teacher, windows, **kwargs)
    with pytest.raises(ValueError, match=r"\(N, T\).*\(24,\)"):
        recover_(student, teacher, windows[0])


@pytest.mark.parametrize(("changes", "message"), [
    ({"recovery": "distill"}, "recovery='distill'"),
    ({"recovery_steps": -3}, "recovery_steps=-3"),
    ({"recovery_time_s": -1.5}, "recovery_time_s=-1.5"),
    ({"recovery_lr": 0.0}, "recovery_lr=0.0"),
    ({"recovery_lr": -1e-4}, "recovery_lr=-0.0001"),
    ({"recovery_batch_size": 0}, "recovery_batch_size=0"),
    ({"recovery_seq_len": 1}, "recovery_seq_len=1"),
    ({"recovery_samples": 0}, "recovery_samples=0"),
])
def test_bad_recovery_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**changes)


def test_recovery_draws_one_window_per_step_and_row_unless_told():
    config = PruneConfig(recovery="lora", recovery_steps=7, recovery_batch_size=3)
    assert config.recovery_samples is None and config.recovery_windows() == 21
    assert config.with_(recovery_samples=5).recovery_windows() == 5
    assert config.with_(recovery_steps=0).recovery_windows() == 1


def test_presets_leave_recovery_off():
    from gqaprune_core.config import PRESETS

    assert {p.recovery for p in PRESETS.values()} == {"none"}


SMALL = {"base_model": "tiny", "importance_samples": 4, "importance_seq_len": 16,
         "importance_method": "activation", "num_examples": 4, "seq_len": 24,
         "eval_seq_len": 32, "max_eval_windows": 2, "eval_datasets": ("demo",),
         "pruning_ratio": 0.3, "min_pruning_rate": 0.0, "prune_mlp": True,
         "recovery_steps": 3, "recovery_seq_len": 32, "recovery_samples": 5,
         "recovery_batch_size": 2, "recovery_lr": 1e-2}


@pytest.mark.parametrize("copy_model", [True, False])
def test_pipeline_reports_perplexity_after_pruning_and_after_recovery(copy_model, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path))
    model, tokenizer = load_model("tiny", device="cpu")
    dense_shapes = layout(model)
    teachers = []

    def recover_spy(student, teacher, tokens, **kwargs):
        teachers.append(teacher)
        assert layout(teacher) == dense_shapes and layout(student) != dense_shapes
        return recover_(student, teacher, tokens, **kwargs)

    monkeypatch.setattr("gqaprune_core.pipeline.recover_", recover_spy)
    drawn = []
    monkeypatch.setattr("gqaprune_core.pipeline.calibration_batch",
                        lambda *args, **kw: drawn.append(args[2]) or calibration_batch(*args, **kw))
    stages = []
    # copied: 5 windows as configured; in place: None, one window per step and batch row
    config = PruneConfig(**SMALL, recovery="lora").with_(recovery_samples=5 if copy_model else None)
    result = run_pipeline(config, model, tokenizer,
                          copy_model=copy_model, progress=lambda s, d, t: stages.append((s, d, t)))
    report = result.report
    recovery = report["recovery"]
    assert recovery["method"] == "lora" and recovery["steps_done"] == 3
    pruned = report["ppl_after_pruning"]["demo"]["value"]
    final = report["ppl_after"]["demo"]["value"]
    assert recovery["ppl_after_pruning"] == {"demo": pruned}
    assert recovery["ppl_after_recovery"] == {"demo": final}
    assert pruned != final and result.ppl_after_pruning[0].value == pruned
    assert {"prune", "recover", "evaluate_after", "evaluate_recovered"} <= set(report["timings_s"])
    assert ("recover", 0, 3) in stages and ("recover", 3, 3) in stages
    # 5 windows in batches of 2 end an epoch with a batch of 1
    assert result.recovery.tokens_seen == (5 if copy_model else 6) * 32
    assert drawn[-1] == (5 if copy_model else 3 * 2)  # the recovery's windows come last
    # the teacher was dense: the caller's own model when it is copied anyway, else a copy
    # taken before the caller's model was cut in place
    assert len(teachers) == 1 and (teachers[0] is model) == copy_model
    assert (result.model is model) != copy_model


def test_pipeline_without_recovery_reports_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path))
    model, tokenizer = load_model("tiny", device="cpu")
    result = run_pipeline(PruneConfig(**SMALL), model, tokenizer)
    assert result.report["recovery"] is None and result.recovery is None
    assert result.report["ppl_after_pruning"] == result.report["ppl_after"]
    assert "recover" not in result.report["timings_s"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recovery_on_cuda(make_tiny, windows, method, dtype):
    teacher = make_tiny().to("cuda", dtype)
    student = prune_unevenly_(copy.deepcopy(teacher))
    before = kd_on(student, teacher, windows.cuda())
    lr = FAST_LR[method] * (10 if dtype == torch.bfloat16 and method == "full" else 1)
    report = recover_(student, teacher, windows, method=method, steps=12, lr=lr)
    assert report.steps_done == 12
    assert kd_on(student, teacher, windows.cuda()) < before
    assert {p.dtype for p in student.parameters()} == {dtype}
    assert {p.device.type for p in student.parameters()} == {"cuda"}
    assert not [m for m in student.modules() if type(m).__module__.startswith("peft")]
