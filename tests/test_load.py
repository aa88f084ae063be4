"""Loading lean: weights read straight into the recipe's storage dtype, a QLoRA base quantized as
it loads, the load's peak reported, and a model too large for the memory refused before reading."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ecoadapt.cli import main
from ecoadapt.config import ModelConfig
from ecoadapt.core.errors import UserError
from ecoadapt.model import load_spec, pretrained
from ecoadapt.model.load_spec import LoadSpec, Recipe, Shapes
from helpers.runs import write_config
from helpers.tiny_models import build_tiny_llama

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    ("recipe", "stored", "dtype"),
    [
        (Recipe("fp32", frozen_base=True), BF16, FP32),  # fp32 computes in fp32, whatever is stored
        (Recipe("tf32"), BF16, FP32),
        (Recipe("bf16-pure"), FP32, BF16),  # bf16-pure stores every weight in bf16
        (Recipe("bf16-pure", frozen_base=True, quantize="nf4"), FP32, BF16),
        (Recipe("bf16", frozen_base=True), FP32, BF16),  # a frozen base in the autocast dtype
        (Recipe("fp16", frozen_base=True), BF16, torch.float16),
        (Recipe("bf16", frozen_base=True, merge=True), BF16, FP32),  # the merged model keeps fp32 weights
        (Recipe("bf16", frozen_base=True, fsdp=True), BF16, FP32),  # one dtype per FSDP shard unit
        (Recipe("bf16-pure", fsdp=True), FP32, BF16),
        (Recipe("bf16"), FP32, FP32),  # full training under autocast: fp32 weights from an fp32 checkpoint
        (Recipe("bf16"), BF16, BF16),  # ... but a bf16 checkpoint loses nothing read in bf16
        (Recipe("bf16"), None, FP32),  # unknown storage: the safe side
    ],
)
def test_each_recipe_reads_its_weights_in_the_dtype_it_stores_them_in(recipe, stored, dtype):
    spec = recipe.spec(stored)
    assert spec.dtype == dtype
    assert spec.quantize == recipe.quantize
    assert spec.why  # says why, for the summary


def _bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_a_frozen_base_under_autocast_is_read_in_bf16_and_the_shapes_count_its_bytes(tiny_llama):
    full = pretrained.load(ModelConfig(str(tiny_llama)), 16)
    lean = pretrained.load(ModelConfig(str(tiny_llama)), 16, recipe=Recipe("bf16", frozen_base=True))
    assert {p.dtype for p in full.model.parameters()} == {FP32}
    assert {p.dtype for p in lean.model.parameters()} == {BF16}
    assert lean.spec.dtype == BF16 and lean.quantized is None
    # The same values, rounded to bf16: nothing was re-initialised.
    for (name, a), (_, b) in zip(full.model.named_parameters(), lean.model.named_parameters(), strict=True):
        assert torch.equal(a.to(BF16), b), name
    shapes = Shapes.of(pretrained.meta_model(AutoModelForCausalLM, full.model.config), "model.layers")
    assert shapes.weight_bytes(LoadSpec(FP32)) == _bytes(full.model)
    assert shapes.weight_bytes(LoadSpec(BF16)) == _bytes(lean.model)
    assert shapes.outside_blocks == ["lm_head"]


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama64"), hidden=64)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_qlora_base_is_quantized_while_it_loads_and_the_shapes_predict_its_bytes(llama64, kind):
    bnb = pytest.importorskip("bitsandbytes")
    loaded = pretrained.load(ModelConfig(str(llama64)), 16, recipe=Recipe("bf16", frozen_base=True, quantize=kind))
    kind_class = bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt
    quantized = [n for n, m in loaded.model.named_modules() if isinstance(m, kind_class)]
    assert len(quantized) == 2 * 7 and all(n.startswith("model.layers.") for n in quantized)
    assert type(loaded.model.lm_head) is torch.nn.Linear  # the head kept as loaded, in bf16
    assert loaded.model.lm_head.weight.dtype == BF16
    q = loaded.quantized
    assert q is not None and q.kind == kind and q.modules == 14 and q.compute_dtype == "bfloat16"
    assert q.bytes_after < q.bytes_before / (3.0 if kind == "nf4" else 1.8)
    # The shapes' forecast of the blocks' bytes matches what bitsandbytes stores, within 2%.
    shapes = Shapes.of(pretrained.meta_model(AutoModelForCausalLM, loaded.model.config), "model.layers")
    predicted = shapes.weight_bytes(LoadSpec(BF16, kind)) - shapes.other_values * 2
    assert predicted == pytest.approx(q.bytes_after, rel=0.02)


def test_a_model_whose_weights_cannot_fit_is_refused_before_reading_naming_a_recipe_that_fits(tiny_llama, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the weights were read")

    meta = pretrained.meta_model(
        AutoModelForCausalLM, pretrained._read_config(ModelConfig(str(tiny_llama)), str(tiny_llama), {})
    )
    shapes = Shapes.of(meta, "model.layers")
    fp32, bf16 = shapes.weight_bytes(LoadSpec(FP32)), shapes.weight_bytes(LoadSpec(BF16))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(UserError, match=r"model\.name_or_path: .* weights need .* GiB .*bf16 base under LoRA"):
        pretrained.load(ModelConfig(str(tiny_llama)), 16, memory_limit_bytes=(fp32 + bf16) // 2)
    with pytest.raises(UserError, match="no recipe's weights fit: use a smaller model"):
        pretrained.load(ModelConfig(str(tiny_llama)), 16, memory_limit_bytes=100)


def test_a_full_fine_tune_whose_gradients_and_optimizer_cannot_fit_is_refused_before_reading(
    tiny_llama, corpus_jsonl, monkeypatch
):
    """The weights alone fit; every weight's gradient and AdamW moments do not: refused before
    reading (a 3B fp32 full fine-tune on a 24 GiB machine would load its 12 GB and be killed at
    its first step). LoRA on the same room reads its weights; so does adamw8bit's smaller state."""
    from ecoadapt.config import from_dict
    from ecoadapt.train.prepare import load_model

    meta = pretrained.meta_model(
        AutoModelForCausalLM, pretrained._read_config(ModelConfig(str(tiny_llama)), str(tiny_llama), {})
    )
    shapes = Shapes.of(meta, "model.layers")
    values = shapes.block_linear_values + shapes.other_values
    weights = shapes.weight_bytes(LoadSpec(FP32))
    assert load_spec.full_training_bytes(shapes, LoadSpec(FP32), Recipe("fp32"), "adamw") == values * (4 + 8)
    assert load_spec.full_training_bytes(shapes, LoadSpec(BF16), Recipe("bf16-pure"), "adamw") == values * (2 + 4 + 8)
    scales = 8 * -(-values // 256)  # 8-bit moments: an fp32 scale per 256 values each
    assert load_spec.full_training_bytes(shapes, LoadSpec(BF16), Recipe("bf16"), "adamw8bit") == values * 8 + scales
    assert load_spec.full_training_bytes(shapes, LoadSpec(FP32), Recipe("fp32"), None) == 0  # not every weight trains
    monkeypatch.setattr(load_spec, "available_bytes", lambda device: weights + values * 8)

    def never(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)

    def cfg(**sections):
        return from_dict(
            {
                "model": {"name_or_path": str(tiny_llama)},
                "data": {"train": [str(corpus_jsonl)], "max_seq_len": 16},
                **sections,
            }
        )

    with pytest.raises(UserError, match=r"gradients and optimizer state of training every one .* GiB are free on cpu"):
        load_model(cfg(), torch.device("cpu"))
    for fits in (cfg(lora={"enabled": True}), cfg(train={"optimizer": "adamw8bit"})):
        with pytest.raises(AssertionError, match="the weights were read"):
            load_model(fits, torch.device("cpu"))


def test_the_free_memory_of_the_device_is_checked_without_a_limit(tiny_llama, monkeypatch):
    monkeypatch.setattr(load_spec, "available_bytes", lambda device: 1000)
    with pytest.raises(UserError, match="free on cpu"):
        pretrained.load(ModelConfig(str(tiny_llama)), 16)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_bert"])
def test_a_bf16_lora_run_reads_its_base_in_bf16_trains_fp32_adapters_and_reports_the_load_peak(
    tmp_path, model, corpus_jsonl, request
):
    """An encoder too: its LayerNorms compute in fp32 under autocast, and a bf16 LayerNorm weight
    met fp32 activations ("mixed dtype (CPU)": the demo's LoRA point on a CPU with fast bf16)."""
    folder = request.getfixturevalue(model)
    config = write_config(tmp_path, folder, corpus_jsonl, lora={"enabled": True, "r": 4}, precision={"mode": "bf16"})
    assert main(["adapt", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"]["load"]["dtype"] == "bf16"
    memory = summary["memory"]
    assert memory["load_peak_bytes"] > 0 and memory["load_peak_above_baseline_bytes"] >= 0
    assert summary["eval"]["loss"] < summary["eval"]["loss_before"]  # it learnt on the bf16 base
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert adapter and {t.dtype for t in adapter.values()} == {FP32}


def test_under_autocast_a_16_bit_base_hands_the_blocks_fp32_activations(tiny_llama):
    from ecoadapt.model.precision import Policy

    loaded = pretrained.load(ModelConfig(str(tiny_llama)), 16, recipe=Recipe("bf16", frozen_base=True))
    seen = []
    loaded.model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0].dtype) if args else seen.append(kwargs["hidden_states"].dtype),
        with_kwargs=True,
    )
    policy = Policy("bf16", "cpu")
    assert policy.keep_residual_fp32(loaded.model)
    with policy.autocast(), torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [FP32]
    assert not Policy("bf16-pure", "cpu").keep_residual_fp32(loaded.model)  # pure bf16 keeps bf16 activations


def test_under_autocast_a_16_bit_base_keeps_its_matmul_weights_in_16_bits_and_its_norms_in_fp32(tiny_bert):
    from ecoadapt.model.precision import Policy

    loaded = pretrained.load(ModelConfig(str(tiny_bert)), 16, recipe=Recipe("bf16", frozen_base=True))
    model = loaded.model.requires_grad_(False)  # frozen, as under LoRA
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert norms and linears and {p.dtype for p in model.parameters()} == {BF16}
    cast = Policy("bf16", "cpu").keep_fp32_weights(model)
    assert cast == sum(p.numel() for m in norms for p in m.parameters())
    assert {p.dtype for m in norms for p in m.parameters()} == {FP32}
    assert {m.weight.dtype for m in linears} == {BF16}
    assert model.get_input_embeddings().weight.dtype == BF16
    assert Policy("fp32", "cpu").keep_fp32_weights(model) == 0  # nothing to do outside autocast


def _mapped_ranges(folder) -> list[tuple[int, int]]:
    """The address ranges this process maps from ``folder``'s safetensors shards (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(str(folder)) and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("lora", [False, True])
def test_weights_that_train_get_memory_of_their_own_while_a_frozen_base_stays_in_the_mapped_shards(
    tmp_path, corpus_jsonl, lora
):
    from ecoadapt.config import from_dict
    from ecoadapt.model import parallel
    from ecoadapt.train import prepare

    model_dir = build_tiny_llama(tmp_path / "model", hidden=64)  # fp32 shards: an fp32 run reads them as they are
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [str(corpus_jsonl)], "text_field": "caption", "max_seq_len": 16},
        "precision": {"mode": "fp32"},
        "lora": {"enabled": lora, "r": 4},
        "train": {"max_steps": 2, "micro_batch_size": 2, "compile": False},
    }
    cfg = from_dict(raw)
    device = torch.device("cpu")
    loaded = prepare.load_model(cfg, device)
    built = prepare.build(cfg, loaded, torch.randint(0, 50, (4, 16)), device, parallel.World(), lambda _: None)
    ranges = _mapped_ranges(model_dir)  # none once every weight read from them has been copied

    def in_files(p: torch.Tensor) -> bool:
        return any(start <= p.data_ptr() < end for start, end in ranges)

    model = parallel.unwrap(built.model)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trained and not any(in_files(p) for p in trained)  # written at every step: not the file's pages
    if lora:
        assert ranges and all(in_files(p) for p in frozen)  # only read: the mapped pages, no copy
    del built, loaded, model, trained, frozen


def test_a_loaded_tokenizer_drops_the_python_copies_its_constructor_built_from(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2Tokenizer

    symbols = ["<|endoftext|>", "h", "e", "l", "o", "he", "ll", "hell", "hello", "w", "r", "d"]
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")]
    GPT2Tokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=merges).save_pretrained(tmp_path / "tok")
    GPT2Config(vocab_size=len(symbols), n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "tok")
    plain = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(plain._vocab) == len(symbols) and len(plain._merges) == len(merges)  # what transformers keeps
    lean = pretrained.load_tokenizer(ModelConfig(str(tmp_path / "tok")))
    assert lean._vocab == {} and lean._merges == []
    for text in ("hello", "held world", "dollhello"):
        assert lean(text)["input_ids"] == plain(text)["input_ids"], text
    assert lean.get_vocab() == plain.get_vocab()  # read from the Rust tokenizer
    lean.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded("hello held")["input_ids"] == plain("hello held")["input_ids"]


def test_every_tokenizer_class_that_reads_its_vocabulary_copies_later_keeps_them():
    """The classes of the installed transformers whose methods other than ``__init__`` read
    ``self._vocab`` or ``self._merges`` are exactly those ``without_construction_copies`` leaves
    alone: an upgrade that adds a reader fails here instead of breaking that tokenizer."""
    import ast

    import transformers

    root = Path(transformers.__file__).parent
    readers = set()
    for path in root.rglob("tokenization_*.py"):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for method in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name != "__init__"):
                for node in ast.walk(method):
                    if (
                        isinstance(node, ast.Attribute)
                        and node.attr in ("_vocab", "_merges")
                        and isinstance(node.value, ast.Name)
                        and node.value.id == "self"
                    ):
                        readers.add(cls.name)
    assert readers == pretrained.READ_AFTER_CONSTRUCTION
