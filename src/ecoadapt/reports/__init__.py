"""From results to words: tables, the Pareto front, the recommendation and its verdicts, plots,
compute statements and model cards. No torch.
"""
