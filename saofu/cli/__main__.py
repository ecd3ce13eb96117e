"""`python -m saofu.cli ...`, the form torchrun launches: `torchrun --nproc_per_node 2 -m saofu.cli step train ...`."""

from saofu.cli import main

main()
