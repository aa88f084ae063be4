"""What a run leaves behind: ``summary.json`` as a type (``RunSummary``), the run folder's rules,
and a sweep's records. Read by the report without torch.
"""
