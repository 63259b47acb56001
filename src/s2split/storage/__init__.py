"""Data on disk: the results store, an SQLite database of counts and
measurements keyed by model version and configuration (:mod:`.store`), and
the JSON Schemas of every file and row s2split reads (:mod:`.schemas`)."""
