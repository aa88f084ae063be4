"""Every loss of the training loop, and the head/loss splits that keep them cheap.

- :func:`loss_sum`: summed cross-entropy over target tokens (or examples), from logits.
- :func:`forward_logits`: logits for the loss; masked LM sends only masked rows through its head.
- :func:`training_loss_sum`: what the loop calls; a causal LM with a plain head, and a masked LM
  whose head ends in its vocabulary projection, compute head and loss a chunk of rows at a
  time (:func:`linear_cross_entropy_sum`), never holding whole logits.

Why chunks: a small language model's largest tensors are its logits, (batch x seq) rows of the
vocabulary (49,152 for SmolLM2), kept in 16-bit, copied to fp32 for the loss, kept again by
log-softmax for the backward pass, and matched by a gradient of the same size: about 20 bytes
per row and vocabulary entry, 500 MB for 4 x 128 tokens. Here each chunk of rows goes through
the head, its loss is summed and the gradient of that loss with respect to the chunk's hidden
states (and to the head's weight, when it trains) is computed at once, in the forward pass, as
fused linear-cross-entropy kernels do (Liger, Apple's Cut Cross-Entropy). No logits outlive
their chunk; the FLOPs are those of the usual head and loss, with no recomputation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ecoadapt.data.batches import IGNORE, shift_labels


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """Summed cross-entropy over target tokens, in fp32.

    Args:
        logits: (batch, seq, vocab), or (targets, vocab) already gathered; any float dtype.
        labels: (batch, seq) or (targets,), int64, IGNORE where there is no target.
        objective: "clm" predicts token t+1 from position t; "mlm" predicts each masked token.

    Returns:
        A scalar tensor: the sum (not the mean) of the per-token losses.
    """
    if objective == "clm":
        labels = shift_labels(labels)
    if logits.ndim == 2:  # already gathered to target positions
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def encoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """Split a masked-LM model into its encoder and its LM head, when the layout is the usual one.

    Works through a PEFT wrapper (LoRA layers sit inside the same modules). Returns None when
    the model is not ``encoder + one head module`` (the caller then computes full logits).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    encoder = getattr(inner, "base_model", None)
    if encoder is None or encoder is inner:
        return None
    heads = [m for m in inner.children() if m is not encoder]
    return (encoder, heads[0]) if len(heads) == 1 else None


MASKED_ROWS_BUCKET = 64  # masked positions per micro-batch are rounded up to a multiple of this


def masked_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the masked positions and their labels, padded to a bucket size.

    The number of masked positions differs from one micro-batch to the next; tensors of a new
    size every step fragment the CPU allocator's heap until the process holds far more than it
    uses (measured: peak memory 1.13x the Hugging Face Trainer's at 40 steps). Padding to a
    multiple of ``MASKED_ROWS_BUCKET`` with ignored rows (position 0 again, label IGNORE: no
    loss, no gradient) keeps the sizes to a few, at the cost of a few extra head rows.
    """
    flat = labels.reshape(-1)
    index = (flat != IGNORE).nonzero().squeeze(1)
    pad = -len(index) % MASKED_ROWS_BUCKET
    pad = min(pad, flat.numel() - len(index)) if flat.numel() > len(index) else 0
    if pad:
        index = torch.cat([index, index.new_zeros(pad)])
    targets = flat[index]
    if pad:
        targets[-pad:] = IGNORE
    return index, targets


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    objective: str,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for the loss.

    For masked LM only the masked positions (about 15%) go through the LM head: the head's
    vocabulary projection is about half of a small encoder's FLOPs, and its full
    (batch, seq, vocab) logits the largest tensor of the step. Returns logits (targets, vocab)
    and labels (targets,) then; for classification ("cls") logits (batch, classes) and labels
    (batch,); otherwise logits (batch, seq, vocab) and labels (batch, seq). Packed LM blocks
    have no padding, so only classification batches carry an attention mask.
    """
    if objective == "cls":
        return model(input_ids=input_ids, attention_mask=attention_mask).logits, labels
    if objective == "mlm":
        split = encoder_and_head(model)
        if split is not None:
            encoder, head = split
            hidden = encoder(input_ids=input_ids).last_hidden_state
            index, targets = masked_rows(labels)
            return head(hidden.reshape(-1, hidden.shape[-1])[index]), targets
    return model(input_ids=input_ids).logits, labels


def head_rows(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, objective: str
) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor] | None:
    """(the rows the vocabulary projection sees, that projection, their targets), for models
    whose head ends in a plain projection; None for others (they compute full logits).

    Causal LM: every position's final hidden state, targets shifted. Masked LM: only the masked
    positions, through the head's transform (dense, activation, norm), padded to a bucket.
    """
    if objective == "clm" and (parts := lm_parts(model)) is not None:
        body, head = parts
        hidden = body(input_ids=input_ids).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]), head, shift_labels(labels).reshape(-1)
    if objective == "mlm" and (split := encoder_and_head(model)) is not None:
        encoder, head_module = split
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
        get_decoder = getattr(inner, "get_output_embeddings", None)
        decoder = get_decoder() if callable(get_decoder) else None
        head_parts = masked_lm_head_parts(head_module, decoder) if decoder is not None else None
        if head_parts is not None:
            transform, projection = head_parts
            hidden = encoder(input_ids=input_ids).last_hidden_state
            index, targets = masked_rows(labels)
            return transform(hidden.reshape(-1, hidden.shape[-1])[index]), projection, targets
    return None


def training_loss_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    objective: str,
    attention_mask: torch.Tensor | None = None,
    kernel: Kernel | None = None,
) -> torch.Tensor:
    """The summed loss of one micro-batch (see :func:`loss_sum`); models with a plain head
    compute the vocabulary projection and loss in chunks, never holding whole logits, with
    ``kernel`` for each chunk's loss and gradient (see :func:`linear_cross_entropy_sum`)."""
    if (rows := head_rows(model, input_ids, labels, objective)) is not None:
        hidden, projection, targets = rows
        return linear_cross_entropy_sum(hidden, projection.weight, projection.bias, targets, kernel)
    logits, labels = forward_logits(model, input_ids, labels, objective, attention_mask)
    return loss_sum(logits, labels, objective)


@torch.no_grad()
def score_sums(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, objective: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out scores of one batch: (summed loss, fp32; arg-max hits; targets), device tensors.

    The same chunked head as training where the model allows: evaluation never holds whole
    (batch, seq, vocab) logits either, so its peak memory stays below training's.
    """
    if (rows := head_rows(model, input_ids, labels, objective)) is not None:
        hidden, projection, targets = rows
        return chunked_scores(hidden, projection.weight, projection.bias, targets)
    logits, labels = forward_logits(model, input_ids, labels, objective)
    total = loss_sum(logits, labels, objective)
    if objective == "clm" and logits.ndim == 3:
        labels = shift_labels(labels)
    keep = labels != IGNORE
    return total, (logits.argmax(-1)[keep] == labels[keep]).sum(), keep.sum()


class LossModule(torch.nn.Module):
    """A model and its objective as one module: what DDP and FSDP wrap.

    DDP and FSDP hang their hooks on the forward pass of the module they wrap. Wrapping this one
    rather than the model lets the loss take its cheap path (masked rows only, the vocabulary
    projection in chunks) under data parallelism too: 1 and N processes run the same code.

    Args:
        model: the language model or classifier (PEFT-wrapped or not).
        objective: "clm", "mlm" or "cls".

    Attributes:
        kernel: each loss chunk's loss-and-gradient function (None: the eager one); train.compile
            puts a compiled one here (:mod:`ecoadapt.model.compiling`).
    """

    def __init__(self, model: torch.nn.Module, objective: str) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.kernel: Kernel | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        scores: bool = False,
    ) -> Any:
        """The micro-batch's summed training loss; with ``scores``, :func:`score_sums` instead
        (through forward, so that FSDP gathers the weights for evaluation too)."""
        if scores:
            return score_sums(self.model, input_ids, labels, self.objective)
        return training_loss_sum(self.model, input_ids, labels, self.objective, attention_mask, self.kernel)


def as_loss_module(model: torch.nn.Module, objective: str) -> torch.nn.Module:
    """``model`` itself when it is a LossModule (DDP- or FSDP-wrapped or not), else one around it."""
    inner = getattr(model, "module", model)  # DDP keeps the wrapped module here
    return model if isinstance(inner, LossModule) else LossModule(model, objective)


# Logits per chunk for a small vocabulary: on a CPU 16 MiB in fp32 (cache-sized pieces); on a
# GPU 128 MiB, enough rows per matmul (682 of a 49,152 vocabulary) to keep it busy rather than
# bound by kernel launches, and still a small share of a small GPU's memory.
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**25}
# But a vocabulary so large that the cap leaves fewer rows than SKINNY_ROWS gets WIDE_ROWS:
# each chunk's matmuls read the whole head weight (vocab x d), and a skinny chunk is bound by
# that read, not by arithmetic. Gemma 3 (262,144 words; 16 rows a chunk under the CPU cap)
# trained at 1.34x the Trainer's tokens/s with 256 rows, 0.82x with 16 (bench/scaling.py).
# Not for SmolLM2 or MiniLM (85 and 137 rows): 256 rows made SmolLM2's LoRA step 1.07x slower.
SKINNY_ROWS = 64
WIDE_ROWS = 256
# Never a chunk larger than this (a vocabulary of millions): 256 MiB in bf16.
MAX_CHUNK_ELEMENTS = 2**27


def chunk_rows(vocab: int, device_type: str) -> int:
    """Rows of a (rows, vocab) logits chunk on ``device_type``."""
    rows = CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cpu"]) // vocab
    if rows < SKINNY_ROWS:
        rows = min(WIDE_ROWS, MAX_CHUNK_ELEMENTS // vocab)
    return max(1, rows)


Kernel = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def softmax_cross_entropy_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE in fp32, its gradient ``softmax - one_hot`` in the logits' dtype) of a chunk.

    Written as one expression for torch.compile, which turns it into one kernel: a pass that
    reads each row once for its max, sum of exponentials and target logit, and a pass that
    writes the gradient, with no fp32 copy of the chunk. Rows labelled IGNORE give 0 and 0.

    Args:
        logits: (rows, vocab) in the head's compute dtype.
        labels: (rows,) int64, IGNORE where there is no target.
    """
    x = logits.float()
    valid = (labels != IGNORE).to(x.dtype)
    target = labels.clamp(min=0)
    top = x.amax(-1, keepdim=True)
    e = (x - top).exp()
    s = e.sum(-1, keepdim=True)
    picked = x.gather(1, target[:, None])
    loss = ((top + s.log() - picked).squeeze(1) * valid).sum()
    one_hot = torch.arange(x.shape[1], device=x.device)[None, :] == target[:, None]
    return loss, ((e / s - one_hot.to(x.dtype)) * valid[:, None]).to(logits.dtype)


def softmax_grad_inplace(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`softmax_cross_entropy_grad` for eager execution, in place in an fp32 copy of the
    chunk: logsumexp, the target logit, then ``exp(x - lse)`` in place. (A log-softmax variant
    measured 1.25x slower here: bench/loss_kernel.py.)"""
    x = logits.float()
    valid = labels != IGNORE
    target = labels.clamp(min=0)
    lse = torch.logsumexp(x, dim=-1)
    loss = ((lse - x.gather(1, target[:, None]).squeeze(1)) * valid).sum()
    probs = x.sub_(lse[:, None]).exp_()
    probs[torch.arange(len(labels), device=labels.device), target] -= 1.0
    probs *= valid[:, None]
    return loss, probs.to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T + bias, labels_i) over rows whose label is not IGNORE."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        compute_dtype: torch.dtype | None,
        kernel: Kernel,
    ) -> torch.Tensor:
        rows, vocab = hidden.shape[0], weight.shape[0]
        chunk = chunk_rows(vocab, hidden.device.type)
        # Matmuls in the dtype autocast would use (the caller passes it): the same numbers as
        # the model's own head under autocast, without autocast's per-call weight cast.
        w = weight if compute_dtype is None else weight.to(compute_dtype)
        b = None if bias is None else (bias if compute_dtype is None else bias.to(compute_dtype))
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            h = hidden[start : start + chunk]
            h_c = h if compute_dtype is None else h.to(compute_dtype)
            y = labels[start : start + chunk]
            logits = h_c @ w.T if b is None else torch.addmm(b, h_c, w.T)
            loss, g = kernel(logits, y)  # d(sum CE)/d logits, in the matmuls' dtype
            total += loss
            if grad_bias is not None:
                grad_bias += g.sum(0, dtype=torch.float32)
            grad_hidden[start : start + chunk] = (g @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (g.T @ h_c).float()
        empty = torch.empty(0)
        ctx.save_for_backward(
            grad_hidden,
            grad_weight if grad_weight is not None else empty,
            grad_bias if grad_bias is not None else empty,
        )
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype)
        gw = (grad_weight * grad_output).to(ctx.dtypes[0]) if ctx.needs_input_grad[1] else None
        gb = (grad_bias * grad_output).to(ctx.dtypes[1]) if ctx.dtypes[1] and ctx.needs_input_grad[2] else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    kernel: Kernel | None = None,
) -> torch.Tensor:
    """sum CE(hidden @ weight^T + bias, labels) in fp32 over labels != IGNORE, chunk by chunk.

    Args:
        hidden: (rows, d) the head's input.
        weight: (vocab, d); bias: (vocab,) or None.
        labels: (rows,) int64.
        kernel: the per-chunk loss and gradient (:func:`softmax_grad_inplace` unless
            train.compile put a compiled :func:`softmax_cross_entropy_grad` here).
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    with torch.autocast(device, enabled=False):  # the Function casts as autocast would
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, dtype, kernel or softmax_grad_inplace)


@torch.no_grad()
def chunked_scores(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed CE in fp32, arg-max hits, targets) of ``hidden @ weight^T + bias``, chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    hits = torch.zeros((), dtype=torch.long, device=hidden.device)
    chunk = chunk_rows(weight.shape[0], hidden.device.type)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        logits = torch.nn.functional.linear(h, weight, bias).float()  # autocast casts as the model's head would
        valid = y != IGNORE
        target = y.clamp(min=0)
        picked = logits.gather(1, target[:, None]).squeeze(1)
        total += ((torch.logsumexp(logits, dim=-1) - picked) * valid).sum()
        hits += ((logits.argmax(-1) == target) & valid).sum()
    return total, hits, (labels != IGNORE).sum()


def lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(the decoder body, the LM head) of a causal LM with a plain linear head, else None.

    Works through a PEFT wrapper. Models that transform their logits (soft-capping, scaling)
    or whose head has a bias are left to their own forward pass.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    config = getattr(inner, "config", None)
    if config is None or any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    body = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or not isinstance(body, torch.nn.Module):
        return None
    if type(head) is not torch.nn.Linear:  # a LoRA or other wrapped head computes more than x @ W^T
        return None
    return body, head


class _Without(torch.nn.Module):
    """Runs ``head`` with its output projection ``decoder`` replaced by the identity."""

    def __init__(self, head: torch.nn.Module, parent: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.head, self.parent, self.name = head, parent, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decoder = getattr(self.parent, self.name)
        setattr(self.parent, self.name, torch.nn.Identity())
        try:
            return self.head(x)
        finally:
            setattr(self.parent, self.name, decoder)


def masked_lm_head_parts(head: torch.nn.Module, decoder: torch.nn.Module) -> tuple[_Without, torch.nn.Linear] | None:
    """(the head up to its vocabulary projection, that projection) when the head ends with it.

    The split is checked once on random rows: ``decoder(transform(x))`` must equal ``head(x)``
    (heads that do more after the projection keep their own forward pass).
    """
    if type(decoder) is not torch.nn.Linear:
        return None
    for parent in head.modules():
        for name, child in parent.named_children():
            if child is decoder:
                transform = _Without(head, parent, name)
                verdict = getattr(head, "_ecoadapt_split_ok", None)
                if verdict is None:
                    with torch.no_grad():
                        # A private generator: drawing from the global one would shift dropout
                        # masks, and a resumed run would no longer match an uninterrupted one.
                        w = decoder.weight
                        rng = torch.Generator(w.device).manual_seed(0)
                        x = torch.randn(3, decoder.in_features, generator=rng, device=w.device).to(w.dtype)
                        verdict = torch.allclose(decoder(transform(x)), head(x), rtol=1e-3, atol=1e-3)
                    head._ecoadapt_split_ok = verdict  # type: ignore[assignment]
                return (transform, decoder) if verdict else None
    return None
