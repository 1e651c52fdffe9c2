"""`python -m retina_fgvis` runs the CLI (torchrun needs a module entry point)."""
from retina_fgvis.cli import main

if __name__ == "__main__":
    main()
