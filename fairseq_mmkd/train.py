"""``python -m fairseq_mmkd.train``: ``fairseq-hydra-train`` with a quiet start; it takes the same arguments.

``fairseq-hydra-train`` imports fairseq and Hydra before it imports this plugin, so their import-time
messages about modules the plugin does not use (listed in :mod:`fairseq_mmkd.quiet`) come before the plugin
can silence them. This entry point imports the plugin first, then runs fairseq's own ``cli_main``: the same
config composition, training loop, checkpoints and logs, without those lines. It works wherever
``fairseq-hydra-train`` does, e.g. ``torchrun --nproc_per_node=4 -m fairseq_mmkd.train ...``.
"""
from .runtime import quiet

with quiet.fairseq_import():
    from fairseq_cli.hydra_train import cli_main


if __name__ == "__main__":
    cli_main()
