"""Reporting: statistics, published runs as an input, and the comparison with them.

``stats`` holds the numbers every table shares (trial summaries, the paper's ratio-of-means
gains, paired tests, multiple-testing adjustment); ``published`` reads the paper's per-run
results into the same run records as our ``metrics.json`` files; ``compare`` puts the two side
by side and computes the headline table. ``tlmat.aggregate`` builds the tables from these.
"""
