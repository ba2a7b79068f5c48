"""The ultralytics side of training: offline settings, and (next milestone) training, evaluation
and export wrappers."""
