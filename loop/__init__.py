"""The whole active-learning loop on one machine: ``edgeloop demo``.

Where the parts meet: it starts the stack (a Prefect server and the flows' runner, an MQTT broker,
the edgeloop server with its bundled MongoDB and FiftyOne, edge agents on cameras), and runs rounds
of curate -> label -> approve -> retrain -> gate -> release -> swap, measuring each. The parts
themselves live where they belong (``edge_agent/``, ``server/``, ``flows/``); this package only
orchestrates them, so nothing in them imports it.
"""
