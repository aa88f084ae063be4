"""The downstream task: one protocol (fine-tune or linear probe) for base and adapted models,
paired by seed, with the base model's results cached, and the paired statistics.
"""
