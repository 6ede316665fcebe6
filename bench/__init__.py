"""``make bench``: what the gateway costs, measured against direct and a bare relay.

Every process runs on loopback and is started (and stopped) by ``bench.run``:

- ``bench.upstream``   a fake OpenAI-compatible upstream: model ``n{N}-d{D}`` streams N content
                       chunks D ms apart, then a finish chunk, a usage chunk and ``[DONE]``;
- ``bench.relay``      the reference thin relay (aiohttp, parses nothing);
- ``bench.serve``      ``python -m service serve`` plus pymongo command monitoring (and, only
                       when asked, uvloop) - the service's own code, unchanged;
- ``bench.loadgen``    the load generator (raw asyncio streams, separate process);
- ``bench.run``        the runner: scenarios, interleaving, CPU/RSS sampling, table and JSON.
"""
