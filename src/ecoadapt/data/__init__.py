"""Text in, token blocks out: readers of every format, the memory-mapped token store, batches and
masking for pre-training, and the labelled examples of the downstream task.
"""
