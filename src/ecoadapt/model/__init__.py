"""The model: loading (hub rules), what trains (LoRA, top blocks), precision and layer maps, the
losses, compiling, data-parallel wrapping and saving.
"""

from ecoadapt.model.voice import quiet_bitsandbytes

quiet_bitsandbytes()  # before anything (peft, transformers) imports bitsandbytes: see model/voice.py
