"""The row store and what feeds it. ``store`` chains one table's tiers, a module each: ``hot`` (tier 1),
``overlay`` (rows changed by updates), ``redis`` (tier 2, one Redis or a Redis Cluster), ``files`` (tier 3, the
bundle's row files), over ``codec`` (records to float32 rows) and ``index`` (row id -> slot). ``updates`` applies
row updates from a Redis Stream, ``push`` writes them, ``published`` publishes a bundle's rows to Redis (for
``uembed publish`` and ``UEMBED_ROW_SOURCE=redis``)."""
