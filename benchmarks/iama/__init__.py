"""IAMA (issue 21) reproduced small: ``python -m benchmarks.iama.run [--quick] --out DIR``."""
