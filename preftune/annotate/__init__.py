"""Collecting human preferences: a small web app where annotators compare, rank or rate responses.

Pieces: ``db`` (engines, migrations), ``models`` (tables), ``tokens`` (annotator tokens),
``sessions`` (browser sessions, CSRF), ``members`` (who may see which project), ``importer`` (items
from files or a model), ``queue`` (who labels what, in which order), ``ordering`` (active learning
with a reward model), ``answers`` (what a label means), ``aggregate`` (export to training pairs),
``agreement`` (kappa, alpha, per-annotator statistics), ``security`` (who is asking, limits,
headers) and ``app`` (the web app: ``pages``, ``api``, ``admin``).
"""
