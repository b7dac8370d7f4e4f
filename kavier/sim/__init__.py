"""The simulation core: one vLLM-style engine (:mod:`~kavier.sim.engine`) with its
closed-form one-at-a-time path (:mod:`~kavier.sim.fastpath`), one KV block pool per GPU
(:mod:`~kavier.sim.kvpool`), prefix caching (:mod:`~kavier.sim.prefix`), routers, the GPU
timeline, the request record, the summary and energy/carbon; :func:`~kavier.sim.simulation.simulate`
runs it."""
