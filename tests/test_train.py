"""The training loop: exact gradient accumulation, learning, precision modes."""

import pytest
import torch

from ecoadapt.config import LoraConfig, ModelConfig, TrainConfig
from ecoadapt.data.batches import IGNORE
from ecoadapt.model import losses, pretrained
from ecoadapt.model.precision import Policy
from ecoadapt.train.loop import accumulate, total_steps
from helpers.runs import fit_tiny

CPU = torch.device("cpu")


def grads_after(model, micro, objective):
    model.zero_grad(set_to_none=True)
    accumulate(model, micro, objective, Policy("fp32", "cpu"), CPU)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_accumulation_equals_one_big_batch_with_uneven_targets(tiny_bert, tiny_llama, objective):
    folder = tiny_bert if objective == "mlm" else tiny_llama
    model = pretrained.load(ModelConfig(str(folder)), 32).model.eval()  # eval: no dropout
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (8, 16), generator=gen)
    labels = ids.clone()
    # Very uneven target counts per row: row i keeps 2 + 2*i targets.
    for i in range(8):
        labels[i, 2 + 2 * i :] = IGNORE
    whole = grads_after(model, [{"input_ids": ids, "labels": labels}], objective)
    for micro_size in (4, 2):
        micro = [
            {"input_ids": ids[j : j + micro_size], "labels": labels[j : j + micro_size]}
            for j in range(0, 8, micro_size)
        ]
        split = grads_after(model, micro, objective)
        assert split.keys() == whole.keys()
        for name in whole:
            torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
    # And the naive per-micro-batch mean is *not* equal: the test can tell the difference.
    model.zero_grad(set_to_none=True)
    for j in (0, 4):
        logits, lab = losses.forward_logits(model, ids[j : j + 4], labels[j : j + 4], objective)
        n = (lab != IGNORE).sum() if objective == "mlm" else (lab[:, 1:] != IGNORE).sum()
        (losses.loss_sum(logits, lab, objective) / n / 2).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(not torch.allclose(naive[n], whole[n], rtol=1e-3, atol=1e-6) for n in whole)


def test_masked_positions_only_head_matches_full_logits(tiny_bert):
    model = pretrained.load(ModelConfig(str(tiny_bert)), 32).model.eval()
    ids = torch.randint(5, 30, (3, 16))
    labels = torch.full_like(ids, IGNORE)
    labels[:, ::3] = ids[:, ::3]
    logits, lab = losses.forward_logits(model, ids, labels, "mlm")
    # 18 targets, padded towards a bucket of 64 rows but never past the 48 positions there are
    assert logits.shape == (48, model.config.vocab_size) and int((lab != IGNORE).sum()) == 18
    full = model(input_ids=ids).logits
    torch.testing.assert_close(
        losses.loss_sum(logits, lab, "mlm"), losses.loss_sum(full, labels, "mlm"), rtol=1e-5, atol=1e-5
    )


def test_loss_goes_down_on_repetitive_text(tiny_llama):
    result, _, _ = fit_tiny(
        tiny_llama, TrainConfig(max_steps=40, lr=1e-2, micro_batch_size=4, log_every=10, warmup_ratio=0)
    )
    losses = [r.loss for r in result.logs]
    assert len(losses) == 4
    assert losses[-1] < 0.5 * losses[0]
    assert result.tokens == 40 * 4 * 16
    assert result.target_tokens == 40 * 4 * 15


def test_mlm_lora_with_checkpointing_learns(tiny_bert):
    cfg = TrainConfig(max_steps=30, lr=1e-2, micro_batch_size=4, grad_accum=2, gradient_checkpointing=True)
    result, _, _ = fit_tiny(tiny_bert, cfg, LoraConfig(enabled=True, r=4))
    assert result.logs[-1].loss < result.logs[0].loss


def test_gradient_checkpointing_gives_the_same_loss(tiny_llama):
    base, _, _ = fit_tiny(tiny_llama, TrainConfig(max_steps=5, micro_batch_size=2, log_every=1))
    ckpt, _, _ = fit_tiny(
        tiny_llama, TrainConfig(max_steps=5, micro_batch_size=2, log_every=1, gradient_checkpointing=True)
    )
    for a, b in zip(base.logs, ckpt.logs, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-4)


def test_total_steps_from_epochs():
    assert total_steps(TrainConfig(max_steps=None, epochs=2, micro_batch_size=4, grad_accum=2), 20) == 5
    assert total_steps(TrainConfig(max_steps=7), 20) == 7


def test_masked_rows_pad_to_a_bucket_with_ignored_rows():
    labels = torch.full((4, 64), IGNORE)
    labels[0, [3, 9]] = 7
    labels[2, 5] = 8
    index, targets = losses.masked_rows(labels)
    assert len(index) == losses.MASKED_ROWS_BUCKET
    assert index[:3].tolist() == [3, 9, 2 * 64 + 5] and targets[:3].tolist() == [7, 7, 8]
    assert (targets[3:] == IGNORE).all()
    # Every micro-batch with 1 to 64 targets gets the same size: the allocator reuses its blocks.
    more = labels.clone()
    more[1, :40] = 9
    assert len(losses.masked_rows(more)[0]) == len(index)


def test_parameter_groups_give_new_parameters_the_full_rate_and_the_body_its_share():
    from ecoadapt.train.loop import parameter_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))  # "1" plays the new head
    groups = parameter_groups(model, 0.01, 1e-3, new=["1.weight", "1.bias"], body_lr_scale=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model[1].weight)]["lr"] == 1e-3 and by_param[id(model[1].bias)]["lr"] == 1e-3
    assert by_param[id(model[0].weight)]["lr"] == pytest.approx(1e-4)
    assert by_param[id(model[0].bias)]["weight_decay"] == 0.0 and by_param[id(model[0].weight)]["weight_decay"] == 0.01
    same = parameter_groups(model, 0.01, 1e-3)  # no scaling: one rate, two decay groups
    assert [len(g["params"]) for g in same] == [2, 2] and {g["lr"] for g in same} == {1e-3}
