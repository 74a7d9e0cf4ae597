"""Reporting: run records in, the study's tables, ``summary.md`` and figures out.

Where things are, in the order the data flows:

* ``names``: the names of every table and figure, shared with the workflow (plain Python,
  imported by ``workflow/rules/aggregate.smk``).
* ``runs``: ``metrics.json`` files read into run records, and which runs each family uses
  (:class:`~tlmat.report.runs.StudyDefaults`); ``published`` reads the paper's per-run
  results into the same records.
* ``stats``: the numbers every table shares (trial summaries, the paper's ratio-of-means
  gains, paired tests, Holm adjustment); ``cells``: cell selections shared by the headline,
  the summary and the figures.
* ``tables``: every table, and writing them; ``compare`` sets ours beside the published
  cells, ``headline`` and ``summary`` build the headline table and ``summary.md``.
* ``figures``: which figure is drawn from what; ``fig_*`` draw them, one family each, on
  ``fig_style``.
* ``commands``: the ``tlmat aggregate``/``tlmat figures`` verbs (config in, files out).
"""
