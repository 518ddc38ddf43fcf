"""Iterative DPO (or KTO) with rejection sampling: rounds of sampling, judging (a scorer or people), selecting
and training. The one training pipeline that may use evaluation and annotation."""
