"""Where ingested frames live: the media store (image bytes, fsync'd) and the FiftyOne inbox."""
