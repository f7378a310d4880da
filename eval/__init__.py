"""`flock eval`: the routing-quality benchmark of the default expert library.

Two parts, both on the same fixed test set (`eval.testset`):

* routing accuracy, in process and without generation (`eval.routing`): the service's own Router over the
  library pool, and side by side the global-router variants `description` (what the service does), `centroid`
  (experts as the centroid of their example embeddings), `generated` (the cards' LLM-written descriptions, when
  present) and `glider` (GLIDER's query side: an LLM-written task instruction embedded instead of the query);
* task accuracy through the real service path (`eval.generation`): chat completions to the gateway for each
  mode (base, oracle, global, merge, and any other routing mode named).

`eval.harness` wires both, writes results.json / results.md / results.png and registers the CLI subcommand.
"""
