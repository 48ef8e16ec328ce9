"""What every layer of vmoe uses: config checks, dotted keys, param paths, atomic files."""
