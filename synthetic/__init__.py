"""loc3r.synthetic: procedural rooms, rendered clips, questions and the paper's metrics.

Modules, one job each:

* ``scene``: rooms and furniture (room frame); ``trajectory``: camera walks;
  ``camera``: pinhole model and poses; ``render``: the numpy ray caster.
* ``ground_truth``: BEV / pose-prior frames, per-token BEV targets.
* ``questions``: situations and templated questions with answers.
* ``dataset``: generate and write a split; ``cli``: ``loc3r synth``.
* ``tokenizer``: the loc3r-tiny word-level tokenizer.
* ``metrics``, ``baselines``, ``label_files``, ``eval_cli``: ``loc3r eval``.
"""
