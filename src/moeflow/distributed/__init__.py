"""Expert parallelism over several processes (torch.distributed): one expert cache spread over every rank.

``placement`` gives each (layer, expert) one home rank (pure NumPy); ``group`` owns the process group and its
bounded collectives; ``experts`` is the per-layer experts call that computes the homed pairs and sums the partial
outputs over the ranks; ``engine`` builds an ``LLM`` whose store and policy hold only the rank's homed experts;
``launch`` starts N local processes for ``--gpus N``.
"""
