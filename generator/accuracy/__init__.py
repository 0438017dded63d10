"""Accuracy of a bundle against its fp32 reference (issue 11): teacher-forced KL divergence, top-1 agreement
and perplexity over a fixed evaluation text (generator/data/text/evaluation.txt).

metrics.py: the numbers from two logit arrays; run.py: runs a bundle and its reference over the text;
report.py: the JSON, PNG and table."""
