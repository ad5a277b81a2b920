"""Storage and output: the pgvector store and its migrations, the Redis centroid cache, the
Kafka publisher and the metrics registry. Knows nothing of torch, models or Kafka consumption.

Import the submodules directly (``from sinks.store import PgStore``); this package imports
nothing itself, so that ``sinks.records`` stays cheap for the stream layer.
"""
