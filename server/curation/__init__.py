"""Curation: from uploaded frames to a clean, immutable, versioned training set.

The path: the inbox (every uploaded frame, with the edge's predictions, uncertainty and reasons)
-> :meth:`Curation.next_batch <server.curation.service.Curation.next_batch>` picks 30-50 frames
(uncertain, diverse in the curation model's embedding space, balanced over predicted classes,
fair to every device, no near-duplicates) and shows them in the FiftyOne App as a saved view
``batch-NNN`` with ``ground_truth`` pre-filled from the predictions -> curators correct the boxes
in the App's Annotate tab and tag frames ``approved`` / ``reject`` ->
:meth:`Curation.approve <server.curation.service.Curation.approve>` records an immutable dataset
version ``ds-NNNN`` and adds the frames to the training dataset -> :func:`export_yolo
<server.curation.versions.export_yolo>` writes a version as a YOLO directory to train from.

What the retraining flows and the demo call (all documented where they live):

- ``Curation.from_server_config(cfg)`` (:mod:`server.curation.service`), then
  ``.next_batch(size=None, *, any_size=False) -> BatchResult``, ``.approve(name) -> ApprovalResult``,
  ``.reject(name)``, ``.batches()``, ``.status(name)``, ``.versions()``, ``.version(vid)``,
  ``.latest_version() -> DatasetVersion | None``, ``.export(vid, out) -> Path`` (data.yaml),
  ``.report() -> Report``;
- without the database: ``VersionStore(cfg.curation.root)`` and ``export_yolo(store, vid, out)``
  (:mod:`server.curation.versions`); ``DatasetVersion`` has ``id``, ``parent``, ``splits`` (frame ids), ``counts``,
  ``class_counts``, ``test_frozen``, ``labels_sha256``; ``VersionStore.splits(vid)`` gives the
  frame ids per split;
- :func:`server.curation.hooks.start_retraining` (dataset version -> run handle) is the seam the
  retraining flows fill.

Modules: ``config`` (the ``curation:`` section), ``selection`` and ``duplicates`` (pure numpy),
``splits`` (the split policy), ``embeddings`` (the curation model's space), ``review`` (what the
App shows and what approval reads), ``store`` and ``versions`` (durable state), ``training`` (the
training dataset), ``report``, ``hooks``, ``plugin`` (installs ``server/fiftyone_plugin``),
``cli`` (``edgeloop curate``).
"""
