"""`python -m deepfit ...`, which is how `torchrun --nproc-per-node N -m deepfit train ...` starts each rank."""

from deepfit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
