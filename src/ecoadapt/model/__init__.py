"""The model: loading (hub rules), what trains (LoRA, top blocks), precision and layer maps, the
losses, compiling, data-parallel wrapping and saving.
"""
