"""Row store modules beyond the core tiers in ``uembed/serving/rows/store.py`` (tier 1, tier 2 on one Redis, tier 3 and
``TableStore``): ``cluster`` (tier 2 on Redis Cluster) and ``published`` (bundles' rows published to Redis, for
``uembed publish`` and ``UEMBED_ROW_SOURCE=redis``)."""
